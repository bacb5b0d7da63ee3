//! The whole pipeline in embedded mode on real tissue: a small semi-synthetic cohort built from the
//! CMU slide and the tumour image, plus one corrupt slide that must fail alone; then resume.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use wsimil_common::features::FeatureBag;
use wsimil_common::grid::TissueParams;
use wsimil_common::ids::SlideId;
use wsimil_common::job::JobKind;
use wsimil_common::layout;
use wsimil_common::models::zoo::Architecture;
use wsimil_common::plan::{EmbedderSpec, IcmilConfig, IcmilMethod, RunPlan, TilingSpec, TrainConfig};
use wsimil_common::store::{S3Options, Store};
use wsimil_coordinator::dispatch::LocalDispatcher;
use wsimil_coordinator::planner::FoldSettings;
use wsimil_coordinator::run::{self, EmbedderChoice, RunSettings, RunSummary, Weights};
use wsimil_worker::error::RetryPolicy;
use wsimil_worker::jobs::WorkerContext;
use wsimil_worker::synth::{build_cohort, read_level0, SynthOptions};

fn data(name: &str) -> PathBuf {
    let p = wsimil_common::data_dir().join(name);
    assert!(p.is_file(), "{} missing: run scripts/fetch-data.sh", p.display());
    p
}

/// Six small slides (three with tumour) and a copy of OpenSlide's unreadable.svs.
fn make_cohort(dir: &Path) -> PathBuf {
    let src = wsimil_worker::slide::open(&data("cmu_small_region.svs")).unwrap();
    let source = read_level0(src.as_ref()).unwrap();
    let tumour = image::open(data("target_image.png")).unwrap().to_rgb8();
    let opt = SynthOptions { slides: 6, width: 1024, height: 1280, radius: (120.0, 180.0), ..SynthOptions::default() };
    build_cohort(&source, &tumour, dir, &opt).unwrap();
    let corrupt = dir.join("slides/corrupt.svs");
    std::fs::copy(data("unreadable.svs"), &corrupt).unwrap();
    let manifest = dir.join("manifest.csv");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str(&format!("corrupt,{},tumor\n", corrupt.display()));
    std::fs::write(&manifest, text).unwrap();
    manifest
}

fn settings(manifest: PathBuf) -> RunSettings {
    RunSettings {
        manifest,
        classes: Some(vec!["normal".into(), "tumor".into()]),
        run: None,
        tiling: TilingSpec {
            patch_px: 256,
            target_mpp: 0.5,
            step_fraction: 1.0,
            min_tissue_fraction: 0.25,
            tissue: TissueParams { threshold: None, ..TissueParams::biopsy() },
        },
        embedder: EmbedderChoice {
            architecture: Architecture::EfficientNetLite0,
            weights: Weights::File(data("efficientnet-lite0.safetensors")),
            batch_size: 8,
            corrupt_tiles: Default::default(),
        },
        train: TrainConfig { max_epochs: 3, patience: 3, landmarks: 16, ..TrainConfig::default() },
        folds: FoldSettings { k: 2, seed: 0 },
        imported: None,
        clam_splits: None,
        icmil: None,
        s3: Default::default(),
        task: Default::default(),
    }
}

async fn run_once(store: &Store, settings: &RunSettings) -> RunSummary {
    let (_, plan) = run::prepare(store, settings).await.unwrap();
    let ctx = Arc::new(WorkerContext::new(store.clone(), wsimil_worker::device::Compute::cpu(), "test"));
    let d = LocalDispatcher::new(ctx, RetryPolicy { max_attempts: 2, backoff: std::time::Duration::from_millis(10) });
    run::run(store, &d, &plan, JobKind::Predict, false).await.unwrap()
}

/// `runs/<run>/report.html` in headless Chromium: it loads with nothing on the console, its
/// script runs to the end, and it shows the run: its training settings, both folds' and the pooled
/// ROC curves and the precision-recall chart, the patch-level figures against the truth masks, the
/// six predicted slides ranked worst error first with their heatmaps (files beside the page), the
/// corrupt slide's failure.
fn report_renders_in_chromium(store_dir: &Path, plan: &RunPlan) {
    let page = store_dir.join(format!("runs/{}/report.html", plan.run));
    let dom = support::render_in_chromium(&page);
    assert_eq!(dom.matches("class=\"hm\"").count(), 6, "a heatmap for each predicted slide");
    assert!(dom.contains("<span id=\"shown\">6</span>"), "the slide filter counts the six slides");
    assert_eq!(dom.matches("<tr data-slide=").count(), 6);
    for curve in ["data-name=\"fold 0", "data-name=\"fold 1", "data-name=\"pooled"] {
        assert!(dom.contains(curve), "no {curve} curve");
    }
    assert_eq!(dom.matches("data-name=\"pooled").count(), 2, "the pooled ROC and precision-recall curves");
    assert!(dom.contains("Precision-recall (tumor positive)"), "no precision-recall chart");
    assert!(dom.contains("Confusion matrix") && dom.contains("Calibration"));
    let lesions = dom.split("<h3>Where the lesions are</h3><p>").nth(1).expect("no patch-level figures");
    assert!(lesions.starts_with("6 slides with truth") && lesions.contains("instance AUC"), "{}", &lesions[..120]);
    let settings = dom.split("<p id=\"settings\">").nth(1).expect("the training settings").split("</p>").next();
    let settings = settings.unwrap();
    for want in
        ["optimizer lookahead-radam", "learning rate 0.0002", "at most 3 epochs", "16 Nyström landmarks", "seed 0"]
    {
        assert!(settings.contains(want), "{want:?} not in {settings:?}");
    }
    // Worst error first: the probability given to each slide's true class, lowest first.
    let p_truth: Vec<f64> = dom
        .split("<tr data-slide=")
        .skip(1)
        .map(|row| {
            let cells: Vec<&str> = row.split("<td").skip(1).collect();
            let cell = cells[4].split('>').nth(1).unwrap().split('<').next().unwrap();
            cell.parse().unwrap_or_else(|_| panic!("p(truth) {cell:?}"))
        })
        .collect();
    assert_eq!(p_truth.len(), 6);
    assert!(p_truth.windows(2).all(|w| w[0] <= w[1]), "not worst error first: {p_truth:?}");
    assert!(
        dom.contains("<h2 id=\"failures\">Failures (1)</h2>") && dom.contains("corrupt.svs"),
        "the failure and its reason"
    );
}

/// `wsimil report RUN` makes the page again from what the store holds: the same page.
async fn report_command_remakes_the_page(store_dir: &Path, plan: &RunPlan) {
    use clap::Parser;
    use wsimil_coordinator::cli::{Cli, Command};
    let page = store_dir.join(format!("runs/{}/report.html", plan.run));
    let before = std::fs::read(&page).unwrap();
    std::fs::remove_file(&page).unwrap();
    let args = ["wsimil", "report", plan.run.as_str(), "--store", store_dir.to_str().unwrap()];
    let Command::Report(args) = Cli::try_parse_from(args).unwrap().command else { panic!("not report") };
    wsimil_coordinator::cli::report(args).await.unwrap();
    assert!(std::fs::read(&page).unwrap() == before, "wsimil report wrote another page");
}

/// `wsimil export-features --run RUN`: one h5 file per slide with features (the corrupt slide left
/// out), read by h5py as CLAM and TRIDENT read them, with the store's values and TRIDENT's
/// attributes; then imported back with `import-clam`'s reader, unchanged.
async fn export_features_reads_back_in_h5py(store: &Store, store_dir: &Path, plan: &RunPlan, dir: &Path) {
    use clap::Parser;
    use wsimil_coordinator::cli::{Cli, Command};
    let to = dir.join("exported");
    let args = ["wsimil", "export-features", "--store", store_dir.to_str().unwrap(), "--run", plan.run.as_str()];
    let cli = Cli::try_parse_from(args.iter().copied().chain(["--to", to.to_str().unwrap()])).unwrap();
    let Command::ExportFeatures(args) = cli.command else { panic!("not export-features") };
    wsimil_coordinator::cli::export_features(args).await.unwrap();
    let csv = std::fs::read_to_string(to.join("dataset.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "six slides with features, the corrupt one left out:\n{csv}");
    assert!(!csv.contains("corrupt") && csv.contains("demo-000,demo-000,"), "{csv}");

    let id = SlideId::new("demo-000").unwrap();
    let key = layout::features(&plan.embedder.id(), &plan.tiling.id(), &id);
    let bag = FeatureBag::from_parquet("demo-000", store.get(&key).await.unwrap()).unwrap();
    let file = to.join("h5_files/demo-000.h5");
    let python = support::tools_dir().join("venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/fetch-tools.sh (its venv has h5py)", python.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dev/read_h5_features.py");
    let out = std::process::Command::new(python).arg(script).arg(&file).output().unwrap();
    assert!(out.status.success(), "h5py cannot read {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (f, c) = (&seen["features"], &seen["coords"]);
    use serde_json::json;
    assert_eq!(f["shape"], json!([bag.len(), bag.dim]));
    assert_eq!((f["dtype"].as_str(), c["dtype"].as_str()), (Some("float32"), Some("int64")));
    let sum: f64 = bag.features.iter().map(|&v| v as f64).sum();
    assert!((f["sum"].as_f64().unwrap() - sum).abs() <= 1e-9 * sum.abs().max(1.0), "{} vs {sum}", f["sum"]);
    let first: Vec<f32> = serde_json::from_value(f["first_row"].clone()).unwrap();
    assert_eq!(first, bag.features[..bag.dim]);
    let rows: Vec<[i64; 2]> = serde_json::from_value(c["rows"].clone()).unwrap();
    assert_eq!(rows, bag.xs.iter().zip(&bag.ys).map(|(x, y)| [*x, *y]).collect::<Vec<_>>());
    let t = bag.provenance.tiling.as_ref().unwrap();
    let attrs = &c["attrs"];
    assert_eq!(attrs["patch_size"], 256);
    assert_eq!(attrs["patch_size_level0"], t.patch_level0);
    assert_eq!(attrs["overlap"], 0, "step 1.0: no overlap");
    assert_eq!((&attrs["level0_width"], &attrs["level0_height"]), (&json!(t.level0_width), &json!(t.level0_height)));
    assert_eq!(attrs["name"], "demo-000");
    assert_eq!(f["attrs"]["encoder"], "efficientnet-lite0");
    let provenance: wsimil_common::features::EmbeddingProvenance =
        serde_json::from_str(f["attrs"]["wsimil_provenance"].as_str().unwrap()).unwrap();
    assert_eq!(provenance, bag.provenance);

    let back = wsimil_coordinator::import::read_clam_h5(&file).unwrap();
    assert_eq!((back.dim, back.features), (bag.dim, bag.features));
}

fn stage(s: &RunSummary, kind: JobKind) -> &run::StageReport {
    s.stages.iter().find(|st| st.kind == kind).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_run_end_to_end_isolates_a_corrupt_slide_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_cohort(&dir.path().join("cohort"));
    let store_dir = dir.path().join("store");
    let store = Store::open(store_dir.to_str().unwrap(), &S3Options::default()).unwrap();
    let settings = settings(manifest);

    // First run: everything computed but the corrupt slide, which fails alone, with its reason.
    let s = run_once(&store, &settings).await;
    let tile = stage(&s, JobKind::Tile);
    assert_eq!((tile.planned, tile.outcome.computed, tile.outcome.failed.len()), (7, 6, 1));
    let failure = &tile.outcome.failed[0];
    assert_eq!(failure.slide.as_ref().unwrap().as_str(), "corrupt");
    assert!(
        failure.reason.contains("corrupt.svs") && failure.reason.contains("could not be decoded"),
        "{}",
        failure.reason
    );
    assert_eq!(failure.attempts, 1, "a corrupt slide is not retried");
    assert_eq!(stage(&s, JobKind::Embed).outcome.computed, 6);
    assert_eq!(stage(&s, JobKind::Train).outcome.computed, 2);
    assert_eq!(stage(&s, JobKind::Predict).outcome.computed, 6);

    // Outputs where the layout says, for every slide that could be read.
    let run = &s.plan.run;
    let m = s.metrics().unwrap();
    assert_eq!(m.predicted, 6);
    let pooled = m.pooled.expect("pooled metrics");
    assert!(pooled.auc.is_some() && (0.0..=1.0).contains(&pooled.accuracy));
    assert_eq!(m.failures.len(), 1);
    let csv = String::from_utf8(store.get(&layout::predictions_csv(run, 0)).await.unwrap().to_vec()).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    assert!(csv.starts_with("slide_id,label,fold,predicted,prob_normal,prob_tumor"));
    for id in (0..6).map(|i| SlideId::new(format!("demo-{i:03}")).unwrap()) {
        let png = store.get(&layout::heatmap(run, 0, &id)).await.unwrap();
        let img = image::load_from_memory(&png).unwrap();
        assert!(img.width() > 100, "heatmap of {id}");
        assert!(store.exists(&layout::attention(run, 0, &id)).await.unwrap());
    }
    assert!(store.exists(&layout::failure(run, &failure.job)).await.unwrap());
    let report = run::render_summary(&s, &store);
    assert!(report.contains("AUC") && report.contains("corrupt") && report.contains("predictions.csv"), "{report}");

    // The page a person reads, in a real browser.
    report_renders_in_chromium(&store_dir, &s.plan);
    report_command_remakes_the_page(&store_dir, &s.plan).await;

    // The run's features out as CLAM/TRIDENT h5 files, through the command line, read back by h5py.
    export_features_reads_back_in_h5py(&store, &store_dir, &s.plan, dir.path()).await;

    // Resume: nothing is computed again (the corrupt slide is retried and fails again).
    let s2 = run_once(&store, &settings).await;
    assert_eq!(s2.plan.run, *run);
    assert_eq!(stage(&s2, JobKind::Tile).planned, 1);
    for k in [JobKind::Embed, JobKind::Train, JobKind::Predict] {
        assert_eq!(stage(&s2, k).planned, 0, "{k} planned again");
    }

    // Lose one slide's features and attention: exactly that work is redone.
    let lost = SlideId::new("demo-002").unwrap();
    store.delete(&layout::features(&s.plan.embedder.id(), &s.plan.tiling.id(), &lost)).await.unwrap();
    store.delete(&layout::attention(run, 0, &lost)).await.unwrap();
    let s3 = run_once(&store, &settings).await;
    assert_eq!(stage(&s3, JobKind::Embed).planned, 1);
    assert_eq!(stage(&s3, JobKind::Embed).outcome.computed, 1);
    assert_eq!(stage(&s3, JobKind::Predict).planned, 1);
    assert_eq!(stage(&s3, JobKind::Train).planned, 0);
}

/// Heatmaps are every model's, not ABMIL's and TransMIL's alone: CLAM-SB, CLAM-MB, DSMIL and
/// DTFD-MIL, each trained on the same cohort (tiled and embedded once), map their attention over
/// every patch of every slide (finite, not flat), draw each slide's heatmap, and give the round's
/// patch-level figures against the lesion masks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clam_dsmil_and_dtfd_map_their_attention_over_every_slide() {
    use wsimil_common::attention::AttentionMap;
    use wsimil_common::models::BagModelKind;
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_cohort(&dir.path().join("cohort"));
    let store = Store::open(dir.path().join("store").to_str().unwrap(), &S3Options::default()).unwrap();
    for kind in [BagModelKind::ClamSb, BagModelKind::ClamMb, BagModelKind::Dsmil, BagModelKind::Dtfd] {
        let mut st = settings(manifest.clone());
        st.train.model = kind;
        let s = run_once(&store, &st).await;
        assert_eq!(stage(&s, JobKind::Predict).outcome.computed, 6, "{kind:?}");
        let run = &s.plan.run;
        for id in (0..6).map(|i| SlideId::new(format!("demo-{i:03}")).unwrap()) {
            let key = layout::features(&s.plan.embedder.id(), &s.plan.tiling.id(), &id);
            let bag = FeatureBag::from_parquet("f", store.get(&key).await.unwrap()).unwrap();
            let map = store.get(&layout::attention(run, 0, &id)).await.unwrap();
            let map = AttentionMap::from_parquet("a", map).unwrap();
            assert_eq!((&map.xs, &map.ys), (&bag.xs, &bag.ys), "{kind:?} {id}: one weight per patch");
            assert!(map.attention.iter().all(|a| a.is_finite()), "{kind:?} {id}");
            let lo = map.attention.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = map.attention.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!(hi > lo, "{kind:?} {id}: flat attention");
            let png = store.get(&layout::heatmap(run, 0, &id)).await.unwrap();
            assert!(image::load_from_memory(&png).unwrap().width() > 100, "{kind:?}: heatmap of {id}");
        }
        let i = s.rounds[0].instance.unwrap_or_else(|| panic!("{kind:?}: no patch-level figures"));
        assert_eq!(i.slides, 6, "{kind:?}");
        assert!(i.instance_auc.is_some() && i.attention_auc.is_some(), "{kind:?}: {i:?}");
    }
}

/// Two copies of the small slide under `dir/s`, a normal and a tumour, and their manifest `dir/m.csv`.
fn two_slide_manifest(dir: &Path) -> PathBuf {
    let slides = dir.join("s");
    std::fs::create_dir_all(&slides).unwrap();
    for n in ["a", "b"] {
        std::fs::copy(data("small.svs"), slides.join(format!("{n}.svs"))).unwrap();
    }
    let manifest = dir.join("m.csv");
    std::fs::write(&manifest, "slide_id,path,label\na,s/a.svs,normal\nb,s/b.svs,tumor\n").unwrap();
    manifest
}

#[tokio::test]
async fn a_changed_plan_under_the_same_run_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = two_slide_manifest(dir.path());
    let store = Store::memory();
    let mut st = settings(manifest);
    st.run = Some(wsimil_common::ids::RunId::new("mine").unwrap());
    st.embedder.weights = Weights::Random(1);
    run::prepare(&store, &st).await.unwrap();
    st.train.lr = 1.0;
    let err = run::prepare(&store, &st).await.unwrap_err().to_string();
    assert!(err.contains("run mine already exists with a different plan"), "{err}");
}

/// ICMIL's negative class must be one of the manifest's: a misspelt one is refused before any
/// work, naming the manifest and its classes.
#[tokio::test]
async fn an_icmil_negative_class_the_manifest_lacks_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = two_slide_manifest(dir.path());
    let store = Store::memory();
    let mut st = settings(manifest);
    st.embedder.weights = Weights::Random(1);
    st.icmil = Some(IcmilConfig { negative_class: Some("tumour".into()), ..IcmilConfig::default() });
    let err = run::prepare(&store, &st).await.unwrap_err().to_string();
    assert!(
        err.contains("--icmil-negative-class \"tumour\" is not a class of") && err.contains("m.csv (normal, tumor)"),
        "{err}"
    );
    assert!(
        store.list(&object_store::path::Path::default()).await.unwrap().is_empty(),
        "nothing written before the refusal"
    );
    st.icmil = Some(IcmilConfig { negative_class: Some("normal".into()), ..IcmilConfig::default() });
    let (_, plan) = run::prepare(&store, &st).await.unwrap();
    assert_eq!(plan.icmil.unwrap().negative_class.as_deref(), Some("normal"));
}

/// A torchvision ResNet50 state dict as `torch.save(model.state_dict())` names it, random values,
/// with the parts the truncated embedder must ignore (`layer4`, `fc`, BatchNorm step counters).
fn torchvision_resnet50_safetensors() -> Vec<u8> {
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let mut t = std::collections::BTreeMap::new();
    let mut seed = 0u64;
    let mut randn = |shape: &[usize]| {
        seed += 1;
        let mut r = wsimil_common::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let std = (2.0 / shape[1..].iter().product::<usize>() as f64).sqrt();
        Tensor::from_vec((0..n).map(|_| (r.normal() * std) as f32).collect::<Vec<_>>(), shape, &dev).unwrap()
    };
    let bn = |t: &mut std::collections::BTreeMap<String, Tensor>, p: &str, c: usize| {
        t.insert(format!("{p}.weight"), Tensor::ones(c, DType::F32, &dev).unwrap());
        t.insert(format!("{p}.bias"), Tensor::zeros(c, DType::F32, &dev).unwrap());
        t.insert(format!("{p}.running_mean"), Tensor::zeros(c, DType::F32, &dev).unwrap());
        t.insert(format!("{p}.running_var"), Tensor::ones(c, DType::F32, &dev).unwrap());
        t.insert(format!("{p}.num_batches_tracked"), Tensor::zeros((), DType::I64, &dev).unwrap());
    };
    t.insert("conv1.weight".into(), randn(&[64, 3, 7, 7]));
    bn(&mut t, "bn1", 64);
    let mut cin = 64;
    for (layer, blocks, planes) in [(1, 3, 64), (2, 4, 128), (3, 6, 256), (4, 3, 512)] {
        for b in 0..blocks {
            let p = format!("layer{layer}.{b}");
            t.insert(format!("{p}.conv1.weight"), randn(&[planes, cin, 1, 1]));
            bn(&mut t, &format!("{p}.bn1"), planes);
            t.insert(format!("{p}.conv2.weight"), randn(&[planes, planes, 3, 3]));
            bn(&mut t, &format!("{p}.bn2"), planes);
            t.insert(format!("{p}.conv3.weight"), randn(&[planes * 4, planes, 1, 1]));
            bn(&mut t, &format!("{p}.bn3"), planes * 4);
            if b == 0 {
                t.insert(format!("{p}.downsample.0.weight"), randn(&[planes * 4, cin, 1, 1]));
                bn(&mut t, &format!("{p}.downsample.1"), planes * 4);
            }
            cin = planes * 4;
        }
    }
    t.insert("fc.weight".into(), randn(&[1000, 2048]));
    t.insert("fc.bias".into(), Tensor::zeros(1000, DType::F32, &dev).unwrap());
    wsimil_common::models::params::safetensors_bytes(&t).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnet50_trunc_loads_torchvision_safetensors_and_embeds_a_real_slide() {
    use wsimil_common::job::{EmbedJob, Job, TileJob};
    use wsimil_worker::jobs::execute;
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("resnet50.safetensors");
    std::fs::write(&weights, torchvision_resnet50_safetensors()).unwrap();
    let store = Store::memory();
    let choice = EmbedderChoice {
        architecture: Architecture::ResNet50Trunc,
        weights: Weights::File(weights),
        batch_size: 4,
        corrupt_tiles: Default::default(),
    };
    let spec = run::register_embedder(&store, &choice).await.unwrap();
    assert!(spec.id().as_str().starts_with("resnet50-trunc-"));
    assert!(store.exists(&layout::embedder_weights(&spec.id())).await.unwrap());
    // Tile the real CMU slide with large patches (few of them), then embed with the checkpoint.
    let ctx = WorkerContext::new(store.clone(), wsimil_worker::device::Compute::cpu(), "t");
    let slide = SlideId::new("cmu").unwrap();
    let path = data("cmu_small_region.svs").display().to_string();
    let tiling = TilingSpec { patch_px: 224, target_mpp: 2.0, ..settings(PathBuf::new()).tiling };
    execute(&ctx, &Job::Tile(TileJob { slide: slide.clone(), path: path.clone(), mpp: None, tiling: tiling.clone() }))
        .await
        .unwrap();
    let job =
        EmbedJob { slide: slide.clone(), path, tiling: tiling.id(), embedder: spec.clone(), release_slide: false };
    execute(&ctx, &Job::Embed(job)).await.unwrap();
    let key = layout::features(&spec.id(), &tiling.id(), &slide);
    let bag = wsimil_common::features::FeatureBag::from_parquet(key.as_ref(), store.get(&key).await.unwrap()).unwrap();
    assert_eq!(bag.dim, 1024);
    assert!(!bag.is_empty());
    assert!(bag.features.iter().all(|v| v.is_finite() && *v >= 0.0), "pooled ReLU features");
    let prov = &bag.provenance;
    assert_eq!(prov.architecture, "resnet50-trunc");
    assert_eq!(prov.preprocessing.as_ref().unwrap().mean, [0.485, 0.456, 0.406]);
    assert_eq!(prov.tiling.as_ref().unwrap().patch_px, 224);
    assert_eq!(prov.compute.as_deref(), Some("cpu f32"));
}

#[tokio::test]
async fn weights_that_do_not_fit_the_architecture_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("wrong.safetensors");
    std::fs::write(&weights, torchvision_resnet50_safetensors()).unwrap();
    let choice = EmbedderChoice {
        architecture: Architecture::EfficientNetLite0,
        weights: Weights::File(weights),
        batch_size: 4,
        corrupt_tiles: Default::default(),
    };
    let err = format!("{:#}", run::register_embedder(&Store::memory(), &choice).await.unwrap_err());
    assert!(err.contains("wrong.safetensors") && err.contains("do not fit efficientnet-lite0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_stops_after_the_named_stage() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a", "b"] {
        std::fs::copy(data("cmu_small_region.svs"), dir.path().join(format!("{n}.svs"))).unwrap();
    }
    let manifest = dir.path().join("m.csv");
    std::fs::write(&manifest, "slide_id,path,label\na,a.svs,normal\nb,b.svs,tumor\n").unwrap();
    let store = Store::memory();
    let mut st = settings(manifest);
    st.embedder.weights = Weights::Random(1);
    let (_, plan) = run::prepare(&store, &st).await.unwrap();
    let ctx = Arc::new(WorkerContext::new(store.clone(), wsimil_worker::device::Compute::cpu(), "t"));
    let d = LocalDispatcher::new(ctx, RetryPolicy::default());
    let s = run::run(&store, &d, &plan, JobKind::Tile, false).await.unwrap();
    assert_eq!(s.stages.len(), 1);
    assert_eq!(s.stages[0].outcome.computed, 2);
    assert!(s.metrics().is_none());
    assert!(!store
        .exists(&layout::features(&plan.embedder.id(), &plan.tiling.id(), &SlideId::new("a").unwrap()))
        .await
        .unwrap());
    assert!(run::render_summary(&s, &store).contains("stopped after tile"));
}

/// One ICMIL round in embedded mode: each fold's classifier teaches its own copy of the embedder on
/// its training slides (two shards per fold, averaged), every slide is re-embedded by each fold's
/// new embedder, the folds retrain, and the report shows both rounds. The corrupt slide stays
/// failed and out of the way; a second run resumes with nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_icmil_round_fine_tunes_each_folds_embedder_re_embeds_and_retrains() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = make_cohort(&dir.path().join("cohort"));
    let store = Store::open(dir.path().join("store").to_str().unwrap(), &S3Options::default()).unwrap();
    let mut st = settings(manifest);
    st.train.model = wsimil_common::models::BagModelKind::Abmil;
    st.icmil = Some(IcmilConfig {
        rounds: 1,
        shards: 2,
        epochs: 1,
        lr: 1e-4,
        batch_size: 4,
        patches_per_slide: 4,
        beta: 6.0,
        trainable_blocks: 2,
        method: IcmilMethod::Paper,
        negative_class: None,
        stain_jitter: 0.0,
        // Each slide's top 2 drawn and taught outright: the path through the jobs runs too.
        top_k: 2,
    });
    let s = run_once(&store, &st).await;
    let run = s.plan.run.clone();
    let ft = s.stages.iter().find(|x| x.kind == JobKind::Finetune).expect("a finetune stage");
    assert_eq!((ft.round, ft.planned, ft.outcome.computed), (1, 4, 4), "{:?}", ft.outcome.failed);
    let re_embed = s.stages.iter().find(|x| x.kind == JobKind::Embed && x.round == 1).unwrap();
    assert_eq!(re_embed.outcome.computed, 12, "6 readable slides x 2 fold embedders");
    assert_eq!(s.rounds.len(), 2);
    assert_eq!(s.rounds[1].predicted, 6);

    // Each fold has its own content-addressed embedder whose card names its parent and lineage.
    let base = s.plan.embedder.id();
    let mut ids = Vec::new();
    for k in 0..2u32 {
        let spec: EmbedderSpec = store.get_json(&layout::fold_embedder(&run, 1, k)).await.unwrap();
        let id = spec.id();
        assert_ne!(id, base, "fold {k}: fine-tuning changed the weights");
        let card: serde_json::Value = store.get_json(&layout::embedder_card(&id)).await.unwrap();
        assert_eq!(card["parent"], base.as_str());
        assert_eq!((card["lineage"]["round"].as_u64(), card["lineage"]["fold"].as_u64()), (Some(1), Some(k as u64)));
        let shards = card["lineage"]["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 2);
        assert!(
            shards.iter().all(|r| r["patches"].as_u64().unwrap() > 0 && r["steps"].as_u64().unwrap() > 0),
            "{card}"
        );
        // The stored weights hash to the id's address and build the embedder.
        let bytes = store.get(&layout::embedder_weights(&id)).await.unwrap();
        assert_eq!(spec.weights.sha256(), Some(wsimil_common::ids::sha256_hex(&bytes).as_str()));
        for slide in (0..6).map(|i| SlideId::new(format!("demo-{i:03}")).unwrap()) {
            let f = store.get(&layout::features(&id, &s.plan.tiling.id(), &slide)).await.unwrap();
            let bag = FeatureBag::from_parquet("f", f).unwrap();
            let old = store.get(&layout::features(&base, &s.plan.tiling.id(), &slide)).await.unwrap();
            let old = FeatureBag::from_parquet("f", old).unwrap();
            assert_eq!((bag.xs.clone(), bag.provenance.embedder.clone()), (old.xs.clone(), id.to_string()));
            assert_ne!(bag.features, old.features, "{slide}: re-embedded with the new weights");
        }
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "each fold learns from its own training slides");
    let report = run::render_summary(&s, &store);
    assert!(
        report.contains("round 0: AUC") && report.contains("round 1: AUC") && report.contains("r1 finetune"),
        "{report}"
    );
    assert!(store.exists(&layout::predictions_csv(&run, 1)).await.unwrap());
    // The cohort's manifest carries its lesion masks: every round says how well its classifier
    // finds them, patch by patch, and its attention comes as QuPath tiles too.
    for r in &s.rounds {
        let i = r.instance.unwrap_or_else(|| panic!("round {}: no instance-level figures", r.round));
        assert_eq!(i.slides, 6, "every readable slide has truth");
        assert!(i.lesion_patches > 0 && i.lesion_patches < i.patches, "{i:?}");
        // The figures are those of the round's stored maps, recomputed here by counting pairs: the
        // instance path's probabilities pooled over every patch, the attention (min-maxed per slide)
        // over the patches of slides with a lesion.
        let (mut instance, mut attention) = (Vec::new(), Vec::new());
        for k in 0..6 {
            let slide = SlideId::new(format!("demo-{k:03}")).unwrap();
            let map = store.get(&layout::attention(&run, r.round, &slide)).await.unwrap();
            let map = wsimil_common::attention::AttentionMap::from_parquet("a", map).unwrap();
            let lesion: Vec<bool> = map.truth.as_ref().unwrap().iter().map(|c| *c >= 0.5).collect();
            instance.extend(map.instance.as_ref().unwrap().iter().copied().zip(lesion.iter().copied()));
            if lesion.contains(&true) {
                let lo = map.attention.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = map.attention.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                attention.extend(map.attention.iter().map(|a| (a - lo) / (hi - lo)).zip(lesion));
            }
        }
        let (want_i, want_a) = (support::pair_auc(&instance), support::pair_auc(&attention));
        assert!((i.instance_auc.unwrap() - want_i).abs() < 1e-9, "round {}: {i:?} vs {want_i}", r.round);
        assert!((i.attention_auc.unwrap() - want_a).abs() < 1e-9, "round {}: {i:?} vs {want_a}", r.round);
    }
    assert!(report.contains("instance AUC"), "{report}");
    // The run's page sets the rounds side by side, each with its own section, in a real browser.
    let dom = support::render_in_chromium(&dir.path().join(format!("store/runs/{run}/report.html")));
    let rounds = dom.split("<table id=\"rounds\">").nth(1).expect("the rounds table").split("</table>").next();
    let rounds = rounds.unwrap();
    assert_eq!(rounds.matches("<tr>").count(), 3, "a header and the two rounds: {rounds}");
    for r in &s.rounds {
        let i = r.instance.unwrap();
        assert!(rounds.contains(&format!("{:.3}", i.instance_auc.unwrap())), "round {}: {rounds}", r.round);
    }
    assert!(dom.contains("<h2 id=\"round-0\">") && dom.contains("<h2 id=\"round-1\">"), "a section per round");
    assert_eq!(dom.matches("<h3>Where the lesions are</h3>").count(), 2);
    assert!(dom.contains("1 ICMIL round after round 0"));
    let map = store.get(&layout::attention(&run, 1, &SlideId::new("demo-000").unwrap())).await.unwrap();
    let map = wsimil_common::attention::AttentionMap::from_parquet("a", map).unwrap();
    assert_eq!(map.truth.as_ref().map(Vec::len), Some(map.xs.len()));
    assert_eq!(map.instance.as_ref().map(Vec::len), Some(map.xs.len()));
    let tiles: serde_json::Value =
        store.get_json(&layout::attention_geojson(&run, 1, &SlideId::new("demo-000").unwrap())).await.unwrap();
    assert_eq!(tiles["features"].as_array().unwrap().len(), map.xs.len());
    // The teacher diagnostic reads the cohort's truth masks: one report per fold and round.
    for round in [0, 1] {
        let check =
            wsimil_dev::teacher_check::teacher_check(&store, &s.plan, round, &dir.path().join("cohort")).await.unwrap();
        assert_eq!(check.matches("pseudo-label AUC vs truth").count(), 2, "{check}");
        assert!(check.contains(&format!("round {round} fold 1")) && check.contains("negative slides:"), "{check}");
    }

    // Resume: every stage of both rounds is already done (the corrupt slide is retried, alone).
    let again = run_once(&store, &st).await;
    for st in &again.stages {
        let expected = usize::from(st.kind == JobKind::Tile);
        assert_eq!(st.planned, expected, "round {} {} planned again", st.round, st.kind);
    }
}

/// A Vision Transformer embeds a cohort like the CNNs do (timm's ViT-Ti/16 by its timm name, random
/// weights: the pretrained presets' loaders are held to their publishers' code in
/// common/tests/vit_parity.rs); its features say what they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vision_transformer_embeds_the_cohort_and_its_features_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let src = wsimil_worker::slide::open(&data("cmu_small_region.svs")).unwrap();
    let source = read_level0(src.as_ref()).unwrap();
    let tumour = image::open(data("target_image.png")).unwrap().to_rgb8();
    let opt = SynthOptions { slides: 4, width: 1024, height: 1024, radius: (120.0, 180.0), ..SynthOptions::default() };
    build_cohort(&source, &tumour, &dir.path().join("cohort"), &opt).unwrap();
    let store = Store::open(dir.path().join("store").to_str().unwrap(), &S3Options::default()).unwrap();
    let mut st = settings(dir.path().join("cohort/manifest.csv"));
    st.embedder.architecture = "vit:vit_tiny_patch16_224".parse().unwrap();
    st.embedder.weights = Weights::Random(7);
    st.train.model = wsimil_common::models::BagModelKind::Abmil;
    let s = run_once(&store, &st).await;
    assert_eq!(stage(&s, JobKind::Embed).outcome.computed, 4);
    let emb = s.plan.embedder.id();
    // A bare timm name is timm's default tag, which the id, the card and the features name.
    assert_eq!(emb.as_str(), "vit-vit_tiny_patch16_224.augreg_in21k_ft_in1k-random-7");
    let f = store.get(&layout::features(&emb, &s.plan.tiling.id(), &SlideId::new("demo-000").unwrap())).await.unwrap();
    let bag = FeatureBag::from_parquet("f", f).unwrap();
    assert_eq!(bag.dim, 192);
    let p = &bag.provenance;
    assert_eq!(
        (p.architecture.as_str(), p.output.as_deref()),
        ("vit:vit_tiny_patch16_224.augreg_in21k_ft_in1k", Some("class token"))
    );
    assert_eq!((p.weights_sha256.as_deref(), p.weights_seed), (None, Some(7)), "random weights have no SHA-256");
    // timm's eval transform for that tag: resize to 248 (224 / 0.9), crop 224, mean = std = 0.5.
    let pre = p.preprocessing.as_ref().unwrap();
    assert_eq!((pre.input_px, pre.resize_px, pre.mean, pre.std), (224, Some(248), [0.5; 3], [0.5; 3]));
    assert!(bag.features.iter().all(|v| v.is_finite()) && bag.features.iter().any(|v| *v != 0.0));
    assert_eq!(s.metrics().unwrap().predicted, 4);

    // The same architecture from a weights file in timm's names (as a publisher ships it): the
    // embedder card and every feature file record the file's SHA-256, the preset and the output.
    let params = wsimil_common::models::params::Params::new(11);
    st.embedder.architecture.build(params.var_builder(&candle_core::Device::Cpu)).unwrap();
    let file = dir.path().join("pytorch_model.safetensors");
    std::fs::write(&file, wsimil_common::models::params::safetensors_bytes(&params.snapshot().unwrap()).unwrap())
        .unwrap();
    let sha = wsimil_common::ids::sha256_hex(&std::fs::read(&file).unwrap());
    st.embedder.weights = Weights::File(file.clone());
    let s = run_once(&store, &st).await;
    assert_eq!(stage(&s, JobKind::Embed).outcome.computed, 4, "other weights: embedded again");
    let emb = s.plan.embedder.id();
    let card: serde_json::Value =
        serde_json::from_slice(&store.get(&layout::embedder_card(&emb)).await.unwrap()).unwrap();
    assert_eq!(card["weights_sha256"], sha, "{card}");
    assert_eq!(card["architecture"], "vit:vit_tiny_patch16_224.augreg_in21k_ft_in1k", "{card}");
    assert_eq!(card["output"], "class token", "{card}");
    assert_eq!(card["feature_dim"], 192, "{card}");
    assert!(card["source"].as_str().unwrap().ends_with("pytorch_model.safetensors"), "{card}");
    let f = store.get(&layout::features(&emb, &s.plan.tiling.id(), &SlideId::new("demo-000").unwrap())).await.unwrap();
    let bag = FeatureBag::from_parquet("f", f).unwrap();
    assert_eq!(bag.provenance.weights_sha256.as_deref(), Some(sha.as_str()));
}
