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

/// Import Musk1 into a new store under `dir`; returns the store and the manifest.
fn musk1_store(dir: &std::path::Path) -> (String, String) {
    let (store, manifest) = (dir.join("store").display().to_string(), dir.join("m.csv").display().to_string());
    let table = data("musk1.csv").display().to_string();
    run_ok(&["import-bags", "--table", &table, "--name", "musk1", "--store", &store, "--manifest-out", &manifest]);
    (store, manifest)
}

fn fold_report(run_dir: &std::path::Path, k: usize) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join(format!("round-0/fold-{k}/metrics.json"))).unwrap())
        .unwrap()
}

#[test]
fn a_bag_budget_far_below_the_cohort_trains_the_same_models_and_predictions_as_one_that_holds_it() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let runs: Vec<(String, std::path::PathBuf)> = [(&a, "1"), (&b, "0.0001")]
        .into_iter()
        .map(|(dir, gb)| {
            let (store, manifest) = musk1_store(dir.path());
            run_ok(&[
                "run",
                "--features",
                "musk1",
                "--manifest",
                &manifest,
                "--store",
                &store,
                "--model",
                "abmil",
                "--folds",
                "3",
                "--epochs",
                "6",
                "--patience",
                "6",
                "--final-model",
                "--bag-cache-gb",
                gb,
            ]);
            let run_dir = std::fs::read_dir(dir.path().join("store/runs")).unwrap().next().unwrap().unwrap().path();
            (gb.to_string(), run_dir)
        })
        .collect();
    let ((_, big), (_, small)) = (&runs[0], &runs[1]);
    // 100 kB: far below Musk1's 92 bags (about 0.3 MB of features, as much again in files): most
    // bags are read again at every pass.
    let bytes = |p: std::path::PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for k in 0..3 {
        let f = format!("round-0/fold-{k}/model.safetensors");
        assert!(bytes(big.join(&f)) == bytes(small.join(&f)), "fold {k}: the same weights whatever the budget");
        let (rb, rs) = (fold_report(big, k), fold_report(small, k));
        assert_eq!(rb["predictions"], rs["predictions"], "fold {k}");
        let n = |r: &serde_json::Value, f: &str| r[f].as_u64().unwrap();
        let bags = n(&rb, "n_train") + n(&rb, "n_val") + n(&rb, "n_test");
        // Every epoch visits the training and validation bags, the test pass the test bags.
        let visits = n(&rb, "epochs_run") * (n(&rb, "n_train") + n(&rb, "n_val")) + n(&rb, "n_test");
        for r in [&rb, &rs] {
            assert_eq!(n(&r["bags"], "reads") + n(&r["bags"], "hits"), visits, "{}", r["bags"]);
        }
        // Held: every bag read once, later epochs from memory. Streamed: most read again each pass.
        assert_eq!(n(&rb["bags"], "reads"), bags, "{}", rb["bags"]);
        assert!(n(&rs["bags"], "reads") * 4 > visits * 3, "{}", rs["bags"]);
    }
    for f in ["round-0/predictions.csv", "round-0/final/model.safetensors"] {
        assert!(bytes(big.join(f)) == bytes(small.join(f)), "{f}: the same whatever the budget");
    }
}

#[test]
fn a_bag_budget_that_cannot_hold_one_bag_is_said_with_the_bag_and_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = musk1_store(dir.path());
    let out = wsimil()
        .args(["run", "--features", "musk1", "--manifest", &manifest, "--store", &store, "--model", "abmil"])
        .args(["--folds", "2", "--epochs", "2", "--bag-cache-gb", "0.00001"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("'s bag (") && text.contains("patches × 166 features"), "{text}");
    assert!(
        text.contains("more than the whole bag budget of") && text.contains("raise --bag-cache-gb to at least"),
        "{text}"
    );
    // Said before any training: no fold trained, no epoch logged.
    let run_dir = std::fs::read_dir(dir.path().join("store/runs")).unwrap().next().unwrap().unwrap().path();
    assert!(!run_dir.join("round-0/fold-0/model.safetensors").exists());
}
