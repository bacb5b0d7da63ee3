//! A trained model applied to new slides (`wsimil predict`), as a user runs it: train on one
//! cohort, predict another made with another seed (external validation), from the run, its final
//! model and an exported folder in another store; refusals; and through NATS and S3.

mod support;

use std::path::Path;
use support::*;

fn ok(args: &[String]) -> String {
    let out = wsimil().args(args).output().unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "wsimil {}:\n{o}\n{e}", args.join(" "));
    format!("{o}{e}")
}

fn refused(args: &[String]) -> String {
    let out = wsimil().args(args).output().unwrap();
    assert!(!out.status.success(), "wsimil {} should have failed", args.join(" "));
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn predict(model: &str, manifest: &Path, store: &Path, name: &str) -> Vec<String> {
    let mut a = s(&["predict", "--model", model, "--manifest"]);
    a.push(manifest.display().to_string());
    a.extend(s(&["--store", store.to_str().unwrap(), "--name", name]));
    a
}

/// The manifest with every slide id prefixed (the files unchanged), beside it.
fn renamed(manifest: &Path, prefix: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut lines = text.lines();
    let mut out = format!("{}\n", lines.next().unwrap());
    for l in lines {
        out.push_str(&format!("{prefix}{l}\n"));
    }
    let path = manifest.with_file_name(format!("{prefix}manifest.csv"));
    std::fs::write(&path, out).unwrap();
    path
}

/// Each slide's probabilities from a predictions.csv.
fn probs(csv: &str) -> Vec<(String, Vec<f64>)> {
    csv.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[3..].iter().map(|v| v.parse().unwrap()).collect())
        })
        .collect()
}

#[test]
fn a_model_trained_on_one_cohort_predicts_another_with_confidence_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = cohort(&d.join("a"), 6, 1024, 1280, false);
    let same_ids = cohort_seeded(&d.join("b"), 4, 1024, 1280, false, 3);
    let external = renamed(&same_ids, "ext-");
    let store = d.join("store");
    let mut run = run_flags(&train, &["--model", "abmil", "--run", "train-a", "--final-model"]);
    run.extend(s(&["--store", store.to_str().unwrap()]));
    let out = ok(&run);
    assert!(out.contains("final"), "{out}");
    // The final model trains on every slide for the epochs the folds chose: their median best
    // epoch (the upper one of two), counted from 1.
    let json = |rel: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(store.join("runs/train-a/round-0").join(rel)).unwrap()).unwrap()
    };
    let mut best: Vec<u64> =
        (0..2).map(|k| json(&format!("fold-{k}/metrics.json"))["best_epoch"].as_u64().unwrap()).collect();
    best.sort_unstable();
    let fin = json("final/metrics.json");
    assert_eq!(fin["epochs"].as_u64().unwrap(), best[1] + 1, "{fin}");
    assert_eq!(fin["curve"].as_array().unwrap().len() as u64, best[1] + 1, "trained for exactly those epochs");
    assert_eq!(fin["n_train"].as_u64().unwrap(), 6, "on every slide");

    // The external cohort's slides under the training cohort's ids would get the training slides'
    // tiles (keys are by slide id): refused, every conflict named.
    let err = refused(&predict("train-a", &same_ids, &store, "clash"));
    assert!(err.contains("4 slide id(s) already name other slides") && err.contains("demo-000 (here "), "{err}");

    // The folds' models, averaged, on the external cohort: metrics with 95% CIs.
    let out = ok(&predict("train-a", &external, &store, "ext-b"));
    assert!(out.contains("the mean of 2 classifiers' class probabilities"), "{out}");
    assert!(out.contains("external validation (4 labelled slides): AUC") && out.contains("95% CI"), "{out}");
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("applied/ext-b/metrics.json")).unwrap()).unwrap();
    let acc = &metrics["metrics"]["accuracy"];
    assert!(acc["ci95"][0].as_f64().unwrap() <= acc["value"].as_f64().unwrap(), "{metrics}");
    assert_eq!(metrics["labelled"], 4);
    let csv = std::fs::read_to_string(store.join("applied/ext-b/predictions.csv")).unwrap();
    assert!(csv.starts_with("slide_id,label,predicted,prob_normal,prob_tumor"), "{csv}");
    assert_eq!(probs(&csv).len(), 4);
    for i in 0..4 {
        assert!(store.join(format!("applied/ext-b/heatmaps/ext-demo-{i:03}.png")).is_file());
    }
    // The application's page, in a browser: its metrics with their intervals, the four slides
    // ranked with their heatmaps.
    let dom = render_in_chromium(&store.join("applied/ext-b/report.html"));
    assert!(dom.contains("<table id=\"metrics\">") && dom.contains("over 4 labelled slides"), "metrics table");
    assert_eq!(dom.matches("<tr data-slide=").count(), 4);
    assert_eq!(dom.matches("class=\"hm\"").count(), 4);
    assert!(dom.contains("data-name=\"pooled"), "the pooled ROC curve");
    // The new slides were tiled and embedded with the model's tiling and embedder: again, nothing
    // is recomputed.
    let again = ok(&predict("train-a", &external, &store, "ext-b"));
    for stage in ["tile", "embed", "score"] {
        assert!(again.contains(&format!("{stage:<8} nothing to do")), "{stage}: {again}");
    }

    // The final model (one classifier, trained on every slide).
    let out = ok(&predict("train-a:final", &external, &store, "ext-b-final"));
    assert!(out.contains("one classifier") && out.contains("embed    nothing to do"), "{out}");

    // One fold's model, and then the same model by the id it was registered under: one classifier,
    // the same probabilities both ways.
    let out = ok(&predict("train-a:fold-1", &external, &store, "ext-b-fold1"));
    assert!(out.contains("one classifier"), "{out}");
    let id = out
        .split("application ext-b-fold1: model ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no model id in {out}"))
        .to_string();
    ok(&predict(&id, &external, &store, "ext-b-by-id"));
    let read = |name: &str| std::fs::read_to_string(store.join(format!("applied/{name}/predictions.csv"))).unwrap();
    assert_eq!(probs(&read("ext-b-fold1")), probs(&read("ext-b-by-id")));
    assert_ne!(probs(&read("ext-b-fold1")), probs(&csv), "one fold is not the folds' mean");
    assert!(refused(&predict("train-a:fold-7", &external, &store, "x")).contains("run train-a has 2 folds: no fold 7"));

    // What predict writes beside the CSV: the same predictions as Parquet, and each slide's
    // attention over its patches (one value per patch, a distribution).
    let (batch, _) = wsimil_common::table::read_parquet(
        "predictions",
        std::fs::read(store.join("applied/ext-b/predictions.parquet")).unwrap().into(),
    )
    .unwrap();
    assert_eq!(batch.num_rows(), 4);
    let tumour: &arrow_array::Float64Array = wsimil_common::table::column("predictions", &batch, "prob_tumor").unwrap();
    for (i, (_, p)) in probs(&csv).iter().enumerate() {
        // The CSV holds 6 decimals.
        assert!((tumour.value(i) - p[1]).abs() < 1e-6, "slide {i}: parquet {} vs csv {}", tumour.value(i), p[1]);
    }
    for i in 0..4 {
        let path = store.join(format!("applied/ext-b/attention/ext-demo-{i:03}.parquet"));
        let map =
            wsimil_common::attention::AttentionMap::from_parquet("attention", std::fs::read(&path).unwrap().into())
                .unwrap();
        assert!(!map.attention.is_empty() && map.attention.len() == map.xs.len());
        let sum: f32 = map.attention.iter().sum();
        assert!((sum - 1.0).abs() < 1e-3, "slide {i}: attention sums to {sum}");
    }

    // Exported, then applied from the folder in a store that has never seen the run: the same
    // probabilities.
    let bundle = d.join("bundle");
    let mut export = s(&["export-model", "train-a", "--store", store.to_str().unwrap(), "--out"]);
    export.push(bundle.display().to_string());
    ok(&export);
    let card: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("model.json")).unwrap()).unwrap();
    assert_eq!(card["classes"], serde_json::json!(["normal", "tumor"]));
    assert_eq!(card["members"].as_array().unwrap().len(), 2);
    // The card's training block is the run's: its slides, and the cross-validation figures the
    // run reported (mean over folds and pooled out-of-fold), not blanks.
    let training = &card["training"];
    assert_eq!(training["slides"], 6, "{card}");
    assert_eq!(training["per_class"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>(), 6);
    let cv = json("metrics.json");
    let pooled = cv["pooled"]["auc"].as_f64().unwrap_or_else(|| panic!("the run reports a pooled AUC: {cv}"));
    assert_eq!(training["cv_auc_pooled"].as_f64(), Some(pooled), "{card}");
    assert_eq!(training["cv_auc_mean"].as_f64(), cv["auc"]["mean"].as_f64(), "{card}");
    assert!(training["cv_auc_mean"].is_number(), "{card}");
    let other = d.join("other-store");
    ok(&predict(bundle.to_str().unwrap(), &external, &other, "ext-b"));
    let there = std::fs::read_to_string(other.join("applied/ext-b/predictions.csv")).unwrap();
    for ((a, pa), (b, pb)) in probs(&csv).iter().zip(probs(&there)) {
        assert_eq!(a, &b);
        assert!(pa.iter().zip(&pb).all(|(x, y)| (x - y).abs() < 1e-6), "{a}: {pa:?} vs {pb:?}");
    }

    // Refusals, before any work, each naming what differs.
    let unknown = d.join("unknown.csv");
    let first = std::fs::read_to_string(&external).unwrap().lines().nth(1).unwrap().to_string();
    let path = first.split(',').nth(1).unwrap();
    std::fs::write(&unknown, format!("slide_id,path,label\nx,{path},cancer\n")).unwrap();
    let err = refused(&predict("train-a", &unknown, &store, "u"));
    assert!(err.contains("line 2: x: unknown label \"cancer\" (classes: normal, tumor)"), "{err}");
    assert!(!store.join("applied/u").exists());
    let mut feats = predict("train-a", &external, &store, "f");
    feats.extend(s(&["--features", "musk1"]));
    let err = refused(&feats);
    assert!(err.contains("--features musk1: model") && err.contains("not on musk1"), "{err}");
    // A card from a later wsimil, its fields changed too: refused by its version, not as "not a card".
    let mut newer = card.clone();
    newer["format_version"] = serde_json::json!(99);
    newer["wsimil_version"] = serde_json::json!("9.0.0");
    newer["members"] = serde_json::json!({"renamed": true});
    std::fs::write(bundle.join("model.json"), serde_json::to_vec(&newer).unwrap()).unwrap();
    let err = refused(&predict(bundle.to_str().unwrap(), &external, &d.join("third"), "n"));
    assert!(err.contains("model.json: written by wsimil 9.0.0 in model format 99"), "{err}");
    // A manifest without labels predicts, without metrics.
    let unlabelled = d.join("unlabelled.csv");
    std::fs::write(&unlabelled, format!("slide_id,path\n{}\n", first.split(',').take(2).collect::<Vec<_>>().join(",")))
        .unwrap();
    let out = ok(&predict("train-a", &unlabelled, &store, "nolabels"));
    assert!(out.contains("1 slides predicted (no labels: no metrics)"), "{out}");
}

/// A model trained elsewhere (a CLAM_SB checkpoint made with CLAM's own code), imported as users
/// have it and applied to slides: they are embedded with the embedder named at import and scored
/// by the imported classifier, through the same `predict` as a model trained here.
#[test]
fn an_imported_checkpoint_predicts_new_slides() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort_seeded(&d.join("c"), 2, 1024, 1280, false, 9);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../coordinator/tests/fixtures/import/clam_sb.pt");
    let folder = d.join("clam");
    let mut import = s(&["import-model", "--clam", fixture.to_str().unwrap(), "--classes", "normal,tumor"]);
    import.extend(s(&["--embedder", "resnet50-trunc", "--random-weights", "1", "--tissue-preset", "biopsy"]));
    import.extend(s(&["--out", folder.to_str().unwrap()]));
    ok(&import);
    let store = d.join("store");
    let out = ok(&predict(folder.to_str().unwrap(), &manifest, &store, "clam"));
    assert!(out.contains("external validation (2 labelled slides)"), "{out}");
    assert!(out.contains("embed") && !out.contains("embed    nothing to do"), "the slides were embedded: {out}");
    let csv = std::fs::read_to_string(store.join("applied/clam/predictions.csv")).unwrap();
    let rows = probs(&csv);
    assert_eq!(rows.len(), 2, "{csv}");
    for (slide, p) in rows {
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{slide}: {p:?}");
    }
}

/// `predict` on a worker pool: a new cohort the bucket has never seen is tiled, embedded and
/// scored by a worker through JetStream, and the predictions are those of the same model applied
/// in one process to the same slides in a store of its own (nothing shared but the model folder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prediction_through_nats_and_s3_gives_the_embedded_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = cohort(&d.join("a"), 4, 1024, 1280, false);
    let external = renamed(&cohort_seeded(&d.join("b"), 3, 1024, 1280, false, 5), "ext-");
    let s3 = s3();
    let store = s3.flags("predict");
    let mut run = run_flags(&train, &["--model", "abmil", "--run", "m"]);
    run.extend(store.clone());
    ok(&run);
    // On a worker, through JetStream: the external slides are tiled and embedded by the pool.
    let nats = Nats::start();
    let mut worker = spawn("w", d, &worker_flags(&nats, &store, "w"));
    let mut remote = s(&["predict", "--model", "m", "--manifest", external.to_str().unwrap(), "--name", "there"]);
    remote.extend(store.clone());
    remote.extend(nats_flags(&nats));
    let out = ok(&remote);
    assert!(out.contains("external validation (3 labelled slides)"), "{out}");
    for kind in ["tile", "embed", "score"] {
        let line = out.lines().find(|l| l.trim_start().starts_with(kind)).unwrap_or_else(|| panic!("{kind}: {out}"));
        assert!(line.contains("3 planned,    3 computed"), "{kind}: the pool did every slide: {out}");
        let worker_log = log(d, "w");
        for k in 0..3 {
            let (job, slide) = (format!("{kind}."), format!("ext-demo-{k:03}"));
            assert!(
                worker_log.lines().any(|l| l.contains("done") && l.contains(&job) && l.contains(&slide)),
                "the worker did {job}…{slide}: {worker_log}"
            );
        }
    }
    worker.terminate(std::time::Duration::from_secs(30));

    // The reference: the model exported, applied in this process in a store of its own.
    let bundle = d.join("bundle");
    let mut export = s(&["export-model", "m", "--out", bundle.to_str().unwrap()]);
    export.extend(store.clone());
    ok(&export);
    let here = d.join("here-store");
    ok(&predict(bundle.to_str().unwrap(), &external, &here, "here"));
    let a = std::fs::read_to_string(here.join("applied/here/predictions.csv")).unwrap();
    let key = object_store::path::Path::from("applied/there/predictions.csv");
    let b = String::from_utf8(s3.store("predict").get(&key).await.unwrap().to_vec()).unwrap();
    assert_eq!(probs(&a).len(), 3);
    for ((x, pa), (y, pb)) in probs(&a).iter().zip(probs(&b)) {
        assert_eq!(x, &y);
        assert!(pa.iter().zip(&pb).all(|(p, q)| (p - q).abs() < 1e-5), "{x}: {pa:?} vs {pb:?}");
    }
}
