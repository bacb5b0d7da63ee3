//! Bring your own features: the real Musk1 MIL benchmark imported from its table and trained on
//! with the same `wsimil run` command, through the CLI; and survival on imported features: a
//! semi-synthetic cohort whose hazard rises with its planted lesions (`wsimil-dev make-cohort
//! --survival`), cross-validated with `--task survival` (the discrete-time NLL and the Cox loss),
//! its final model applied with `predict`, and bad follow-up refused before any work.

mod support;

use std::path::Path;
use support::{data, wsimil};
use wsimil_common::store::Store;

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
/// Musk1 imported standardised (its raw features are integers, which f16 holds exactly).
fn musk1_store(dir: &std::path::Path) -> (String, String) {
    let (store, manifest) = (dir.join("store").display().to_string(), dir.join("m.csv").display().to_string());
    let table = data("musk1.csv").display().to_string();
    let name = ["--name", "musk1", "--standardise"];
    run_ok(&[&["import-bags", "--table", &table, "--store", &store, "--manifest-out", &manifest][..], &name].concat());
    (store, manifest)
}

fn fold_report(run_dir: &std::path::Path, k: usize) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join(format!("round-0/fold-{k}/metrics.json"))).unwrap())
        .unwrap()
}

#[test]
fn a_bag_budget_far_below_the_cohort_trains_the_same_models_and_predictions_as_one_that_holds_it() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let runs: Vec<(String, std::path::PathBuf)> = [(&a, "1", "f32"), (&b, "0.0001", "f32"), (&c, "0.0001", "f16")]
        .into_iter()
        .map(|(dir, gb, precision)| {
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
                "--bag-precision",
                precision,
            ]);
            let run_dir = std::fs::read_dir(dir.path().join("store/runs")).unwrap().next().unwrap().unwrap().path();
            (gb.to_string(), run_dir)
        })
        .collect();
    let ((_, big), (_, small), (_, half)) = (&runs[0], &runs[1], &runs[2]);
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
    // Half precision: twice the bags in the same budget, and a model that reads features rounded
    // to f16 (relative error 2^-11) predicts as the f32 one does, to within a few hundredths.
    for k in 0..3 {
        let (rs, rh) = (fold_report(small, k), fold_report(half, k));
        let hits = |r: &serde_json::Value| r["bags"]["hits"].as_u64().unwrap();
        assert!(hits(&rh) > hits(&rs), "fold {k}: f16 {} vs f32 {}", rh["bags"], rs["bags"]);
        let probs = |r: &serde_json::Value| -> Vec<f64> {
            let rows = r["predictions"].as_array().unwrap();
            rows.iter().flat_map(|p| p["probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap())).collect()
        };
        let (pf, ph) = (probs(&rs), probs(&rh));
        assert_eq!(pf.len(), ph.len());
        let d = pf.iter().zip(&ph).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d < 0.05, "fold {k}: f16 moves a probability by {d}");
        assert!(d > 0.0, "fold {k}: the features rounded to f16 changed nothing: not read in half precision?");
        assert!(
            bytes(small.join(format!("round-0/fold-{k}/model.safetensors")))
                != bytes(half.join(format!("round-0/fold-{k}/model.safetensors")))
        );
    }
    // Scoring holds its bag within the budget too: one that cannot hold a bag says which and why.
    let store = a.path().join("store").display().to_string();
    let manifest = a.path().join("m.csv").display().to_string();
    let model = big.file_name().unwrap().to_str().unwrap().to_string();
    let out = wsimil()
        .args(["predict", "--model", &model, "--features", "musk1", "--manifest", &manifest, "--store", &store])
        .args(["--bag-cache-gb", "0.00001"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("'s bag (") && text.contains("more than the whole bag budget of"), "{text}");
}

/// Every bag model the literature compares against trains through `wsimil run` and scores through
/// `wsimil predict`, as ABMIL and TransMIL do: CLAM-SB, CLAM-MB in subtyping mode, DSMIL and
/// DTFD-MIL (distilling max and min instances) on Musk1, each ranking the bags well out of fold,
/// its final model scoring every bag again.
#[test]
fn clam_dsmil_and_dtfd_train_and_predict_through_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = musk1_store(dir.path());
    let common = ["--features", "musk1", "--manifest", &manifest, "--store", &store];
    let train = ["--folds", "3", "--epochs", "10", "--patience", "10", "--optimizer", "adamw", "--lr", "5e-4"];
    let models: [(&str, &[&str]); 4] = [
        ("clam-sb", &[]),
        ("clam-mb", &["--clam-subtyping"]),
        ("dsmil", &[]),
        ("dtfd", &["--dtfd-distill", "maxmins"]),
    ];
    for (model, extra) in models {
        let mut args = vec!["run", "--run", model, "--model", model, "--final-model"];
        args.extend(extra);
        let text = run_ok(&[&args[..], &common, &train].concat());
        let run_dir = dir.path().join(format!("store/runs/{model}/round-0"));
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("metrics.json")).unwrap()).unwrap();
        let auc = metrics["pooled"]["auc"].as_f64().unwrap();
        assert!(auc > 0.75, "{model}: out-of-fold AUC {auc}\n{text}");
        let report = fold_report(&dir.path().join(format!("store/runs/{model}")), 0);
        assert_eq!(report["model"]["model"].as_str(), Some(model.split('-').next().unwrap()), "{report}");
        if model.starts_with("clam") {
            assert_eq!(report["model"]["subtyping"].as_bool(), Some(!extra.is_empty()), "{model}");
        }
        if model == "dtfd" {
            assert_eq!(report["model"]["distill"].as_str(), Some("maxmins"), "{report}");
        }
        let scored =
            run_ok(&[&["predict", "--model", &format!("{model}:final"), "--name", model][..], &common].concat());
        let csv = std::fs::read_to_string(dir.path().join(format!("store/applied/{model}/predictions.csv"))).unwrap();
        assert_eq!(csv.lines().count(), 93, "{model}: every bag scored\n{scored}");
    }
}

/// A manifest naming patients (Musk1's bags paired within each class into patients, a few left
/// single): a patient's bags are tested in one fold, and the run reports the figures per patient,
/// each patient's out-of-fold probabilities the mean of its bags'.
#[test]
fn slides_of_one_patient_share_a_fold_and_are_pooled_into_the_patients_figures() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = musk1_store(dir.path());
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut seen = std::collections::HashMap::new();
    let mut with_patients = String::from("slide_id,path,label,patient\n");
    for line in text.lines().skip(1) {
        let (slide, label) = (line.split(',').next().unwrap(), line.rsplit(',').next().unwrap());
        let n = seen.entry(label.to_string()).or_insert(0usize);
        // Pairs of one class, and every fifth bag a patient on its own.
        let patient = if *n % 5 == 4 { format!("single-{slide}") } else { format!("p{label}-{}", *n / 2) };
        *n += 1;
        with_patients.push_str(&format!("{line},{patient}\n"));
    }
    let manifest = dir.path().join("patients.csv");
    std::fs::write(&manifest, &with_patients).unwrap();
    let args = ["--features", "musk1", "--manifest", manifest.to_str().unwrap(), "--store", &store];
    let out = run_ok(
        &[&["run", "--run", "pp", "--model", "abmil", "--folds", "3", "--epochs", "3", "--final-model"][..], &args]
            .concat(),
    );
    let run_dir = dir.path().join("store/runs/pp/round-0");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("metrics.json")).unwrap()).unwrap();
    // The slides' out-of-fold rows, pooled here by patient.
    let patient: std::collections::HashMap<String, String> = with_patients
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[3].to_string())
        })
        .collect();
    let csv = std::fs::read_to_string(run_dir.join("predictions.csv")).unwrap();
    let mut pooled: std::collections::BTreeMap<String, (Vec<f64>, bool, std::collections::BTreeSet<String>)> =
        Default::default();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let e = pooled.entry(patient[f[0]].clone()).or_default();
        e.0.push(f[5].parse().unwrap());
        e.1 = f[1] == "1";
        e.2.insert(f[2].to_string());
    }
    assert!(pooled.values().all(|p| p.2.len() == 1), "a patient's slides tested in one fold");
    let p = &metrics["patients"];
    assert_eq!(p["patients"].as_u64(), Some(pooled.len() as u64), "{p}");
    let several = pooled.values().filter(|v| v.0.len() > 1).count();
    assert!(several >= 20 && several < pooled.len(), "{several} of {}", pooled.len());
    assert_eq!(p["with_several_slides"].as_u64(), Some(several as u64));
    let pairs: Vec<(f64, bool)> =
        pooled.values().map(|(probs, pos, _)| (probs.iter().sum::<f64>() / probs.len() as f64, *pos)).collect();
    let auc = p["pooled"]["auc"].as_f64().unwrap();
    assert!((auc - support::pair_auc(&pairs)).abs() < 1e-6, "{auc} vs {}", support::pair_auc(&pairs));
    assert!(out.contains(&format!("per patient ({} patients, {several} with several slides", pooled.len())), "{out}");

    // The final model applied to the same manifest: every patient's slides pooled, listed in
    // patients.csv, and the figures over them.
    let out = run_ok(&[&["predict", "--model", "pp:final", "--name", "pooled"][..], &args].concat());
    let applied = dir.path().join("store/applied/pooled");
    let csv = std::fs::read_to_string(applied.join("predictions.csv")).unwrap();
    let mut by_patient: std::collections::BTreeMap<String, (Vec<f64>, bool)> = Default::default();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let e = by_patient.entry(patient[f[0]].clone()).or_default();
        e.0.push(f.last().unwrap().parse().unwrap());
        e.1 = f[1] == "1";
    }
    assert_eq!(by_patient.len(), pooled.len());
    let listed = std::fs::read_to_string(applied.join("patients.csv")).unwrap();
    assert!(listed.starts_with("patient,slides,label,prob_0,prob_1\n"), "{listed}");
    assert_eq!(listed.lines().count(), by_patient.len() + 1, "{listed}");
    for line in listed.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (probs, pos) = &by_patient[f[0]];
        assert_eq!(f[1].parse::<usize>().unwrap(), probs.len(), "{line}");
        assert_eq!(f[2] == "1", *pos, "{line}");
        let mean = probs.iter().sum::<f64>() / probs.len() as f64;
        assert!((f[4].parse::<f64>().unwrap() - mean).abs() < 1e-5, "{line}: mean {mean}");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(applied.join("metrics.json")).unwrap()).unwrap();
    let p = &metrics["patients"];
    assert_eq!(p["patients"].as_u64(), Some(by_patient.len() as u64), "{p}");
    let pairs: Vec<(f64, bool)> =
        by_patient.values().map(|(probs, pos)| (probs.iter().sum::<f64>() / probs.len() as f64, *pos)).collect();
    let auc = p["pooled"]["auc"].as_f64().unwrap();
    assert!((auc - support::pair_auc(&pairs)).abs() < 1e-6, "{auc} vs {}", support::pair_auc(&pairs));
    assert!(
        out.contains(&format!("per patient ({} patients", by_patient.len())) && out.contains("patients.csv"),
        "{out}"
    );
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

// Survival.

fn run(args: &[&str]) -> (bool, String) {
    let out = wsimil().args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The pooled C-index and its interval from the run's summary line.
fn c_index(text: &str) -> (f64, f64, f64) {
    let line = text.lines().find(|l| l.contains("C-index") && l.contains("95% CI")).unwrap_or_else(|| panic!("{text}"));
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .filter(|v: &f64| *v < 1.0 && *v > 0.0)
        .collect();
    (nums[0], nums[1], nums[2])
}

async fn cohort(dir: &Path) -> (String, String) {
    let store_dir = dir.join("store");
    let store = Store::open(store_dir.to_str().unwrap(), &Default::default()).unwrap();
    let spec = wsimil_dev::cohort::CohortSpec { slides: 240, patches: 100, dim: 8, seed: 3, survival: true };
    let name = wsimil_common::ids::EmbedderId::new("syn").unwrap();
    let (manifest, _) = wsimil_dev::cohort::write_cohort(&store, &name, &spec, None).await.unwrap();
    let path = dir.join("cohort.csv");
    std::fs::write(&path, manifest).unwrap();
    (store_dir.display().to_string(), path.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_survival_run_ranks_slides_by_their_lesions_and_its_model_predicts_risks() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = cohort(dir.path()).await;
    let common = ["--features", "syn", "--manifest", &manifest, "--store", &store, "--task", "survival"];
    let train = ["--model", "abmil", "--folds", "3", "--epochs", "12", "--patience", "12", "--lr", "1e-3"];
    let args: Vec<&str> =
        ["run", "--run", "nll", "--final-model"].iter().chain(&common).chain(&train).copied().collect();
    let text = run_ok(&args);
    assert!(text.contains("survival (discrete-time NLL loss), 3 folds"), "{text}");
    // The hazard follows the lesions: the out-of-fold risks rank slides better than chance, its
    // whole interval above one half.
    let (c, lo, hi) = c_index(&text);
    assert!(lo > 0.5 && lo <= c && c <= hi, "C-index {c} ({lo}–{hi}):\n{text}");
    assert!(text.contains("risk groups (split at each fold's training median): high"), "{text}");
    assert!(text.contains("time-dependent AUC (cumulative/dynamic, IPCW): "), "{text}");

    // What the run leaves: the risks per slide with their group, the figures, the page and its chart.
    let run_dir = Path::new(&store).join("runs/nll");
    let csv = std::fs::read_to_string(run_dir.join("round-0/predictions.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("slide_id,fold,time,event,risk,risk_group"));
    assert_eq!(lines.clone().count(), 240);
    assert!(lines.all(|l| l.ends_with(",high") || l.ends_with(",low")), "{csv}");
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("round-0/metrics.json")).unwrap()).unwrap();
    let sv = &metrics["survival"];
    assert_eq!(sv["slides"], 240);
    let (high, low) = (sv["high"]["slides"].as_u64().unwrap(), sv["low"]["slides"].as_u64().unwrap());
    assert_eq!(high + low, 240);
    assert!(sv["log_rank_p"].as_f64().unwrap() < 0.05, "the groups' curves differ: {sv}");
    // The time-dependent AUC at the event times' three quartiles, each above chance as the C-index is.
    let td = sv["td_auc"].as_array().unwrap();
    assert_eq!(td.len(), 3, "{sv}");
    assert!(td.iter().all(|p| p[1].as_f64().unwrap() > 0.5), "{sv}");
    let fold: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("round-0/fold-0/metrics.json")).unwrap()).unwrap();
    assert_eq!(fold["survival"]["bin_edges"].as_array().unwrap().len(), 3, "4 bins: {fold}");
    // The page in a browser: no console message, its script to the end, every slide ranked, both
    // groups' curves and the time-dependent AUC.
    let dom = support::render_in_chromium(&run_dir.join("report.html"));
    assert!(dom.contains("Kaplan-Meier by risk group") && dom.contains("Slides, highest risk first"));
    assert!(dom.contains("<span id=\"shown\">240</span>"), "the slide filter counts the 240 slides");
    assert_eq!(dom.matches("<tr data-slide=").count(), 240);
    assert!(dom.contains("data-name=\"high risk (") && dom.contains("data-name=\"low risk ("));
    assert!(dom.contains("id=\"td-auc\""));
    let svg = std::fs::read_to_string(run_dir.join("round-0/kaplan-meier.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("high risk (") && svg.contains("low risk ("), "{svg}");
    // And as PNG, its two curves in the page's two colours.
    let png = image::open(run_dir.join("round-0/kaplan-meier.png")).unwrap().to_rgb8();
    assert_eq!(png.width(), 720);
    for colour in [[0x1f, 0x77, 0xb4], [0xff, 0x7f, 0x0e]] {
        assert!(png.pixels().filter(|p| p.0 == colour).count() > 500, "a curve in {colour:?}");
    }

    // The final model gives new slides a risk; where they have follow-up, its C-index.
    let predict = |manifest: &str, name: &str| {
        run_ok(&[
            "predict",
            "--model",
            "nll:final",
            "--features",
            "syn",
            "--manifest",
            manifest,
            "--store",
            &store,
            "--name",
            name,
        ])
    };
    let text = predict(&manifest, "again");
    assert!(text.contains("survival (240 slides with follow-up,"), "{text}");
    let applied = std::fs::read_to_string(Path::new(&store).join("applied/again/predictions.csv")).unwrap();
    assert_eq!(applied.lines().next(), Some("slide_id,time,event,risk"));
    assert_eq!(applied.lines().count(), 241);

    // The same slides paired into patients (a patient's follow-up is one: the second slide takes
    // the first's): patients.csv holds each patient's mean risk, and the C-index over them.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut lines = text.lines();
    let mut paired = format!("{},patient\n", lines.next().unwrap());
    let mut first_follow_up = String::new();
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let n = f.len();
        if i % 2 == 0 {
            first_follow_up = f[n - 2..].join(",");
        }
        paired.push_str(&format!("{},{first_follow_up},case-{}\n", f[..n - 2].join(","), i / 2));
    }
    let paired_path = dir.path().join("paired.csv");
    std::fs::write(&paired_path, &paired).unwrap();
    let text = predict(paired_path.to_str().unwrap(), "paired");
    assert!(text.contains("per patient (120 patients, 120 with several slides"), "{text}");
    let risk: std::collections::HashMap<&str, f64> = applied
        .lines()
        .skip(1)
        .map(|l| (l.split(',').next().unwrap(), l.rsplit(',').next().unwrap().parse().unwrap()))
        .collect();
    let listed = std::fs::read_to_string(Path::new(&store).join("applied/paired/patients.csv")).unwrap();
    assert_eq!(listed.lines().next(), Some("patient,slides,risk,time,event"));
    assert_eq!(listed.lines().count(), 121, "{listed}");
    let (mut mean, mut time, mut event) = (vec![], vec![], vec![]);
    for (line, row) in listed.lines().skip(1).zip(paired.lines().skip(1).step_by(2)) {
        let f: Vec<&str> = line.split(',').collect();
        let slides: Vec<&str> = paired.lines().filter(|l| l.ends_with(&format!(",{}", f[0]))).collect();
        assert_eq!((f[1], slides.len()), ("2", 2), "{line}");
        let want = slides.iter().map(|l| risk[l.split(',').next().unwrap()]).sum::<f64>() / 2.0;
        assert!((f[2].parse::<f64>().unwrap() - want).abs() < 1e-5, "{line}: mean risk {want}");
        let r: Vec<&str> = row.split(',').collect();
        let (t, e) = (r[r.len() - 3].parse::<f64>().unwrap(), r[r.len() - 2]);
        assert_eq!((f[3].parse::<f64>().unwrap(), f[4]), (t, e), "{line}: the follow-up of {row}");
        mean.push(want);
        time.push(f[3].parse::<f64>().unwrap());
        event.push(f[4] == "1");
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&store).join("applied/paired/metrics.json")).unwrap()).unwrap();
    let c = metrics["patients"]["c_index"]["value"].as_f64().unwrap_or_else(|| panic!("{metrics}"));
    let want = wsimil_common::survival::concordance(&mean, &time, &event).unwrap();
    assert!((c - want).abs() < 1e-4, "patients' C-index {c} vs {want} over their mean risks");

    // The Cox loss over batches of bags, through the same command.
    let args: Vec<&str> = ["run", "--run", "cox", "--survival-loss", "cox", "--cox-batch", "32"]
        .iter()
        .chain(&common)
        .chain(&train)
        .copied()
        .collect();
    let text = run_ok(&args);
    assert!(text.contains("survival (Cox loss)"), "{text}");
    let (c, lo, _) = c_index(&text);
    assert!(lo > 0.5, "Cox C-index {c} (lower bound {lo}):\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_follow_up_and_folds_without_events_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = cohort(dir.path()).await;
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    // Row 3 (line 3) gets a negative time, line 5 an event of 2.
    let bad = |l: &str, time: &str, event: &str| {
        let mut f: Vec<&str> = l.split(',').collect();
        let n = f.len();
        f[n - 2] = time;
        f[n - 1] = event;
        f.join(",")
    };
    lines[2] = bad(&lines[2], "-4", "1");
    lines[4] = bad(&lines[4], "30", "2");
    let broken = dir.path().join("broken.csv");
    std::fs::write(&broken, lines.join("\n")).unwrap();
    let (success, out) = run(&[
        "run",
        "--features",
        "syn",
        "--manifest",
        broken.to_str().unwrap(),
        "--store",
        &store,
        "--task",
        "survival",
    ]);
    assert!(!success, "{out}");
    assert!(out.contains("2 problems in the manifest"), "{out}");
    assert!(out.contains("line 3: TCGA-SYN-00001: time \"-4\" is not a non-negative number"), "{out}");
    assert!(out.contains("line 5: TCGA-SYN-00003: event \"2\" is not 0 or 1"), "{out}");
    assert!(!Path::new(&store).join("runs").exists(), "nothing was planned");

    // Folds from the manifest that leave one fold without an event to test on.
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[0].push_str(",fold");
    for l in lines.iter_mut().skip(1) {
        let event = l.ends_with(",1");
        l.push_str(if event { ",0" } else { ",1" });
    }
    let folded = dir.path().join("folded.csv");
    std::fs::write(&folded, lines.join("\n")).unwrap();
    let (success, out) = run(&[
        "run",
        "--features",
        "syn",
        "--manifest",
        folded.to_str().unwrap(),
        "--store",
        &store,
        "--task",
        "survival",
    ]);
    assert!(!success, "{out}");
    assert!(out.contains("fold 1: none of the") && out.contains("slides it tests on had the event"), "{out}");
    assert!(!Path::new(&store).join("runs").exists(), "nothing was planned");
}
