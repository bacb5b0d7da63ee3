//! Bring your own features: the real Musk1 MIL benchmark imported from its table and trained on
//! with the same `wsimil run` command, through the CLI.

mod support;

use support::{data, wsimil};

fn run_ok(args: &[&str]) -> String {
    let out = wsimil().args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "wsimil {args:?} failed:\n{text}");
    text
}

#[test]
fn musk1_imports_and_trains_with_the_run_command() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let manifest = dir.path().join("manifest.csv");
    let (store_s, manifest_s) = (store.display().to_string(), manifest.display().to_string());
    let table = data("musk1.csv").display().to_string();
    let text = run_ok(&[
        "import-bags",
        "--table",
        &table,
        "--name",
        "musk1",
        "--store",
        &store_s,
        "--manifest-out",
        &manifest_s,
        "--standardise",
    ]);
    assert!(text.contains("imported 92 bags (476 instances, 166 features)"), "{text}");
    let bag = store.join("features/musk1/imported/1.parquet");
    assert!(bag.is_file());
    let m = std::fs::read_to_string(&manifest).unwrap();
    assert_eq!(m.lines().count(), 93);

    // Another feature set name is refused before anything runs.
    let out =
        wsimil().args(["run", "--features", "musk2", "--manifest", &manifest_s, "--store", &store_s]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--features musk2: no imported features for 92 of 92"), "{err}");

    let text = run_ok(&[
        "run",
        "--features",
        "musk1",
        "--manifest",
        &manifest_s,
        "--store",
        &store_s,
        "--model",
        "abmil",
        "--folds",
        "3",
        "--epochs",
        "8",
        "--patience",
        "8",
    ]);
    assert!(text.contains("tile           0 planned") && text.contains("embed          0 planned"), "{text}");
    assert!(!text.contains("heatmaps:"), "no slide geometry, no heatmaps: {text}");
    let run_dir = std::fs::read_dir(store.join("runs")).unwrap().next().unwrap().unwrap().path();
    let preds = std::fs::read_to_string(run_dir.join("round-0/predictions.csv")).unwrap();
    assert_eq!(preds.lines().count(), 93, "every bag predicted out of fold");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("round-0/metrics.json")).unwrap()).unwrap();
    // Musk1 is learnable: even a short 3-fold run separates the classes well above chance.
    let auc = metrics["pooled"]["auc"].as_f64().unwrap();
    assert!(auc > 0.75, "out-of-fold AUC {auc}");
}
