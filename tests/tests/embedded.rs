//! The whole pipeline in embedded mode on real tissue: a small semi-synthetic cohort built from the
//! CMU slide and the tumour image, plus one corrupt slide that must fail alone; then resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use wsimil_common::grid::TissueParams;
use wsimil_common::ids::SlideId;
use wsimil_common::job::JobKind;
use wsimil_common::layout;
use wsimil_common::plan::{TilingSpec, TrainConfig};
use wsimil_common::store::{S3Options, Store};
use wsimil_coordinator::dispatch::{LocalDispatcher, RetryPolicy};
use wsimil_coordinator::planner::FoldSettings;
use wsimil_coordinator::run::{self, EmbedderChoice, RunSettings, RunSummary, Weights};
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
            architecture: "efficientnet-lite0".into(),
            weights: Weights::File(data("efficientnet-lite0.safetensors")),
            batch_size: 8,
        },
        train: TrainConfig { max_epochs: 3, patience: 3, landmarks: 16, ..TrainConfig::default() },
        folds: FoldSettings { k: 2, seed: 0 },
    }
}

async fn run_once(store: &Store, settings: &RunSettings) -> RunSummary {
    let (_, plan) = run::prepare(store, settings).await.unwrap();
    let ctx = Arc::new(WorkerContext::new(store.clone(), candle_core::Device::Cpu, "test"));
    let d = LocalDispatcher::new(ctx, RetryPolicy { max_attempts: 2, backoff: std::time::Duration::from_millis(10) });
    run::run(store, &d, &plan).await.unwrap()
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
    assert!(failure.reason.contains("corrupt.svs"), "{}", failure.reason);
    assert_eq!(failure.attempts, 1, "a corrupt slide is not retried");
    assert_eq!(stage(&s, JobKind::Embed).outcome.computed, 6);
    assert_eq!(stage(&s, JobKind::Train).outcome.computed, 2);
    assert_eq!(stage(&s, JobKind::Predict).outcome.computed, 6);

    // Outputs where the layout says, for every slide that could be read.
    let run = &s.plan.run;
    let m = &s.metrics;
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

#[tokio::test]
async fn a_changed_plan_under_the_same_run_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let slides = dir.path().join("s");
    std::fs::create_dir_all(&slides).unwrap();
    for n in ["a", "b"] {
        std::fs::copy(data("small.svs"), slides.join(format!("{n}.svs"))).unwrap();
    }
    let manifest = dir.path().join("m.csv");
    std::fs::write(&manifest, "slide_id,path,label\na,s/a.svs,normal\nb,s/b.svs,tumor\n").unwrap();
    let store = Store::memory();
    let mut st = settings(manifest);
    st.run = Some(wsimil_common::ids::RunId::new("mine").unwrap());
    st.embedder.weights = Weights::Random(1);
    run::prepare(&store, &st).await.unwrap();
    st.train.lr = 1.0;
    let err = run::prepare(&store, &st).await.unwrap_err().to_string();
    assert!(err.contains("run mine already exists with a different plan"), "{err}");
}
