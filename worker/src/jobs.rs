//! Executing one job: read inputs from the store, compute off the async runtime, write outputs
//! whole under their final keys, and report. Every job is idempotent: if its output already exists
//! it is skipped, so a redelivered job costs one existence check.
//!
//! Failures are [`JobError`]s, classified once in [`crate::error`].

use crate::bags::{BagBudget, BagEntry, BagLoader, BagMemory, Streamed};
use crate::device::{tune_batch, BatchChoice, Compute, TUNED_BATCHES};
use crate::embed::{embed_patches, EmbedError, EmbedOptions};
use crate::error::JobError;
use crate::heatmap;
use crate::slide::remote::SlideSources;
use crate::tiling::{png_bytes_rgb, tile_slide};
use crate::train::{self, Bag, BagSet};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{info, warn};
use wsimil_common::attention::{AttentionMap, PredictionProvenance};
use wsimil_common::classifier::{ApplyPlan, Member, ModelCard, ModelId};
use wsimil_common::features::{EmbeddingProvenance, FeatureBag};
use wsimil_common::grid::PatchGrid;
use wsimil_common::ids::{EmbedderId, RunId, SlideId, TilingId};
use wsimil_common::job::{EmbedJob, FinalJob, FinetuneJob, Job, PredictJob, ScoreJob, TileJob, TrainJob};
use wsimil_common::layout;
use wsimil_common::models::embedder::Embedder;
use wsimil_common::models::params::{load_safetensors, Params};
use wsimil_common::models::BagModel;
use wsimil_common::plan::{EmbedderSpec, RunPlan, SurvivalTarget};
use wsimil_common::records::{EpochRecord, FinalReport, FoldReport, ShardReport, SlidePrediction, SurvivalFold};
use wsimil_common::store::Store;

impl From<EmbedError> for JobError {
    fn from(e: EmbedError) -> Self {
        match e {
            EmbedError::Slide(s) => s.into(),
            EmbedError::Model { slide, source } => JobError::model(&format!("{slide}: embedder"), source),
        }
    }
}

/// A network's failures in `what`, classified (out of memory or not).
fn candle_err(what: &str) -> impl Fn(candle_core::Error) -> JobError + '_ {
    move |e| JobError::model(what, e)
}

/// What became of a job that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Computed and written.
    Computed,
    /// Its output was already in the store.
    AlreadyDone,
}

/// What a worker holds across jobs.
pub struct WorkerContext {
    pub store: Store,
    /// Where the networks run, and the embedders' precision and batch size.
    pub compute: Compute,
    /// Name recorded in failure records and status.
    pub name: String,
    /// Embedders loaded for inference.
    embedders: Mutex<HashMap<EmbedderId, Loaded>>,
    /// Trained models loaded for scoring.
    models: Mutex<HashMap<ModelId, Arc<LoadedModel>>>,
    /// Where slides are read from: local paths, or `s3://` URLs with a scratch folder.
    pub sources: Arc<SlideSources>,
    /// The memory all the worker's jobs may take for feature bags ([`crate::bags`]).
    pub bags: Arc<BagMemory>,
}

/// An embedder loaded for inference, with the batch size it runs at here.
type Loaded = (Arc<dyn Embedder>, usize);

impl WorkerContext {
    pub fn new(store: Store, compute: Compute, name: impl Into<String>) -> Self {
        WorkerContext {
            store,
            compute,
            name: name.into(),
            embedders: Mutex::new(HashMap::new()),
            models: Mutex::new(HashMap::new()),
            sources: Arc::new(SlideSources::local()),
            bags: BagMemory::new(BagBudget::machine_default()),
        }
    }

    /// Hold feature bags within `budget` (`--bag-cache-gb`, `--bag-precision`).
    pub fn with_bag_budget(mut self, budget: BagBudget) -> Self {
        self.bags = BagMemory::new(budget);
        self
    }

    /// A loader of `entries` within this worker's bag budget, its reads on the current runtime.
    fn bag_loader(&self, entries: Vec<BagEntry>) -> Result<BagLoader, JobError> {
        BagLoader::new(self.bags.clone(), self.store.clone(), entries, tokio::runtime::Handle::current())
    }

    /// Read slides through `sources` (the S3 settings and scratch folder of the CLI).
    pub fn with_sources(mut self, sources: SlideSources) -> Self {
        self.sources = Arc::new(sources);
        self
    }

    /// A trained model's members on this worker's device, loaded once.
    async fn model(&self, id: &ModelId) -> Result<Arc<LoadedModel>, JobError> {
        if let Some(m) = self.models.lock().unwrap().get(id) {
            return Ok(m.clone());
        }
        let card: ModelCard = self.store.get_json(&layout::model_card(id)).await?;
        card.check_compatible().map_err(|e| JobError::Config(format!("model {id}: {e}")))?;
        let mut weights = Vec::new();
        for m in &card.members {
            weights.push((m.clone(), self.store.get(&layout::model_member(id, &m.name)).await?));
        }
        let device = self.device().clone();
        let loaded = blocking(move || {
            let err = candle_err("loading the model");
            weights
                .into_iter()
                .map(|(m, bytes)| {
                    let p = Params::new(0);
                    p.preload(load_safetensors(&bytes, &device).map_err(&err)?)?;
                    let model = BagModel::new(&m.config, p.var_builder(&device)).map_err(&err)?;
                    Ok((m, model))
                })
                .collect::<Result<Vec<_>, JobError>>()
        })
        .await?;
        let loaded = Arc::new(loaded);
        self.models.lock().unwrap().insert(id.clone(), loaded.clone());
        Ok(loaded)
    }

    /// The device everything runs on.
    pub fn device(&self) -> &Device {
        &self.compute.device
    }

    /// The embedder of `spec` in the worker's precision, loaded once per worker, and its batch size
    /// (the plan's, the worker's `--embed-batch`, or tuned on the device the first time).
    async fn embedder(&self, spec: &EmbedderSpec) -> Result<Loaded, JobError> {
        let id = spec.id();
        if let Some(e) = self.embedders.lock().unwrap().get(&id) {
            return Ok(e.clone());
        }
        let tensors = self.embedder_tensors(spec).await?;
        let (compute, arch, plan_batch) = (self.compute.clone(), spec.architecture.clone(), spec.batch_size);
        let e = blocking(move || -> Result<Loaded, JobError> {
            let vb = candle_nn::VarBuilder::from_tensors(tensors.into_iter().collect(), compute.dtype, &compute.device);
            let name = arch.to_string();
            let model: Arc<dyn Embedder> = Arc::from(arch.build(vb).map_err(candle_err(&name))?);
            let batch = match compute.batch {
                BatchChoice::Fixed(n) => n,
                BatchChoice::Auto if !compute.device.is_cpu() => {
                    let (lo, hi) = TUNED_BATCHES;
                    let (b, trials) = tune_batch(model.as_ref(), &compute.device, compute.dtype, lo, hi)
                        .map_err(candle_err(&name))?;
                    info!(embedder = %name, batch = b, ?trials, "batch size tuned on {}", compute.describe());
                    b
                }
                BatchChoice::Plan | BatchChoice::Auto => plan_batch,
            };
            Ok((model, batch.max(1)))
        })
        .await?;
        self.embedders.lock().unwrap().insert(id, e.clone());
        Ok(e)
    }

    /// Every tensor of `spec`'s checkpoint (f32): from the store, or seeded random ones.
    async fn embedder_tensors(&self, spec: &EmbedderSpec) -> Result<BTreeMap<String, Tensor>, JobError> {
        let device = self.compute.device.clone();
        let arch = spec.architecture.clone();
        if let Some(seed) = spec.weights.seed() {
            let p = Params::new(seed);
            let name = arch.to_string();
            arch.build(p.var_builder(&device)).map_err(candle_err(&name))?;
            return p.snapshot().map_err(candle_err(&name));
        }
        let bytes = self.store.get(&layout::embedder_weights(&spec.id())).await?;
        blocking(move || load_safetensors(&bytes, &device).map_err(candle_err(&arch.to_string()))).await
    }
}

/// Run `f` on the blocking pool, turning a panic into a permanent failure.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, JobError> + Send + 'static) -> Result<T, JobError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| JobError::Panicked(e.to_string()))?
}

/// Execute one job, counted in this process's [`telemetry`](wsimil_common::telemetry).
pub async fn execute(ctx: &WorkerContext, job: &Job) -> Result<Done, JobError> {
    use wsimil_common::telemetry::{telemetry, Outcome};
    let stage = job.kind().as_str();
    telemetry().started(stage);
    let started = Instant::now();
    let result = execute_uncounted(ctx, job).await;
    let outcome = match &result {
        Ok(Done::Computed) => Outcome::Computed,
        Ok(Done::AlreadyDone) => Outcome::AlreadyDone,
        Err(_) => Outcome::Failed,
    };
    telemetry().finished(stage, outcome, started.elapsed().as_secs_f64());
    result
}

async fn execute_uncounted(ctx: &WorkerContext, job: &Job) -> Result<Done, JobError> {
    match job {
        Job::Tile(j) => tile(ctx, j).await,
        Job::Embed(j) => embed(ctx, j).await,
        Job::Train(j) => train_fold(ctx, j).await,
        Job::Predict(j) => predict(ctx, j).await,
        Job::Finetune(j) => finetune(ctx, j).await,
        Job::TrainFinal(j) => train_final(ctx, j).await,
        Job::Score(j) => score(ctx, j).await,
    }
}

async fn tile(ctx: &WorkerContext, job: &TileJob) -> Result<Done, JobError> {
    let tiling = job.tiling.id();
    let grid_key = layout::patch_grid(&tiling, &job.slide);
    if ctx.store.exists(&grid_key).await? {
        return Ok(Done::AlreadyDone);
    }
    let started = Instant::now();
    let (j, sources) = (job.clone(), ctx.sources.clone());
    let tiled = blocking(move || {
        let s = sources.open(&j.path)?;
        Ok(tile_slide(s.as_ref(), j.slide.as_str(), &j.tiling, j.mpp)?)
    })
    .await?;
    ctx.store.put(&layout::thumbnail(&tiling, &job.slide), png_bytes_rgb(&tiled.thumbnail)).await?;
    ctx.store.put(&layout::tissue_mask(&tiling, &job.slide), crate::tiling::png_bytes_gray(&tiled.mask)).await?;
    let contours = crate::contours::geojson(&tiled.contours, tiled.grid.provenance.detect_downsample);
    ctx.store.put_json(&layout::tissue_contours(&tiling, &job.slide), &contours).await?;
    if tiled.grid.patches.is_empty() {
        // Nothing to embed or classify: fail here, once, with what to look at.
        let p = &tiled.grid.provenance;
        // Corrupt tiles read as glass: if there were any, they are the likelier story.
        if let Some(first) = &tiled.first_corrupt {
            return Err(JobError::Input(format!(
                "{}: no tissue patches found, and {} tile(s) of the overview could not be decoded; first: {first}",
                job.path, p.corrupt_tiles
            )));
        }
        return Err(JobError::Input(format!(
            "{}: no tissue patches found (saturation threshold {}, min tissue fraction {}); see {}",
            job.path,
            p.threshold_used,
            p.min_tissue_fraction,
            layout::tissue_mask(&tiling, &job.slide)
        )));
    }
    // The grid is written last: its presence means the whole tile job is done.
    ctx.store.put(&grid_key, tiled.grid.to_parquet()?).await?;
    wsimil_common::telemetry::telemetry().patches("tile", tiled.grid.patches.len());
    info!(slide = %job.slide, patches = tiled.grid.patches.len(), secs = started.elapsed().as_secs_f32(), "tiled");
    Ok(Done::Computed)
}

async fn embed(ctx: &WorkerContext, job: &EmbedJob) -> Result<Done, JobError> {
    let emb_id = job.embedder.id();
    let out_key = layout::features(&emb_id, &job.tiling, &job.slide);
    if ctx.store.exists(&out_key).await? {
        return Ok(Done::AlreadyDone);
    }
    let started = Instant::now();
    let grid_key = layout::patch_grid(&job.tiling, &job.slide);
    let grid = PatchGrid::from_parquet(grid_key.as_ref(), ctx.store.get(&grid_key).await?)?;
    let (model, batch_size) = ctx.embedder(&job.embedder).await?;
    let (path, device, sources) = (job.path.clone(), ctx.device().clone(), ctx.sources.clone());
    let opts = EmbedOptions { batch_size, dtype: ctx.compute.dtype, corrupt: job.embedder.corrupt_tiles };
    let (done, grid, model, fetched) = blocking(move || {
        let s = sources.open(&path)?;
        let f = embed_patches(s.as_ref(), &grid, model.as_ref(), &device, opts)?;
        Ok((f, grid, model, s.bytes_read()))
    })
    .await?;
    if job.release_slide {
        // The run's last read of the slide: a scratch copy of it goes now.
        ctx.sources.finished_with(&job.path);
    }
    if let Some((_, first)) = done.skipped.first() {
        warn!(slide = %job.slide, skipped = done.skipped.len(), "patches on corrupt tiles left out; first: {first}");
    }
    let bag = FeatureBag {
        xs: done.kept.iter().map(|&i| grid.patches[i].x).collect(),
        ys: done.kept.iter().map(|&i| grid.patches[i].y).collect(),
        dim: model.feature_dim(),
        features: done.features,
        provenance: EmbeddingProvenance {
            slide: job.slide.to_string(),
            embedder: emb_id.to_string(),
            architecture: model.architecture().to_string(),
            feature_dim: model.feature_dim(),
            preprocessing: Some(model.preprocessing()),
            tiling_id: Some(job.tiling.to_string()),
            tiling: Some(grid.provenance.clone()),
            patches_skipped: done.skipped.len(),
            imported_from: None,
            compute: Some(ctx.compute.describe()),
            weights_sha256: job.embedder.weights.sha256().map(str::to_string),
            weights_seed: job.embedder.weights.seed(),
            output: Some(model.output()),
        },
    };
    ctx.store.put(&out_key, bag.to_parquet()?).await?;
    wsimil_common::telemetry::telemetry().patches("embed", bag.len());
    let secs = started.elapsed().as_secs_f32();
    if fetched > 0 {
        // A slide in a bucket: what its ranged reads cost.
        let per_patch_kib = fetched as f64 / 1024.0 / bag.len().max(1) as f64;
        info!(slide = %job.slide, fetched_mib = fetched as f64 / (1 << 20) as f64, per_patch_kib, "read from the bucket");
    }
    info!(slide = %job.slide, patches = bag.len(), secs, rate = bag.len() as f32 / secs, "embedded");
    Ok(Done::Computed)
}

/// The run's plan, from the store.
pub async fn load_plan(store: &Store, run: &RunId) -> Result<RunPlan, JobError> {
    Ok(store.get_json(&layout::run_plan(run)).await?)
}

/// The feature bag of `slide` under `features/<emb>/<tiling>/` (`None`: no features, or none
/// with patches), decoded once, with its share of the worker's bag budget held until dropped.
async fn load_bag(
    ctx: &WorkerContext,
    ids: &(EmbedderId, TilingId),
    slide: &SlideId,
) -> Result<Option<(FeatureBag, OwnedSemaphorePermit)>, JobError> {
    Ok(load_bags(ctx, std::slice::from_ref(ids), slide).await?.map(|(mut bags, held)| (bags.remove(0), held)))
}

/// The features of `slide` from each of `sources`, each read once, their share of the bag budget
/// held together (so that a job never waits for room it holds itself); none when one of them has
/// no features, an error naming the slide when the budget could never hold them all.
async fn load_bags(
    ctx: &WorkerContext,
    sources: &[(EmbedderId, TilingId)],
    slide: &SlideId,
) -> Result<Option<(Vec<FeatureBag>, OwnedSemaphorePermit)>, JobError> {
    let mut shapes = Vec::new();
    for (emb, tiling) in sources {
        let key = layout::features(emb, tiling, slide);
        match crate::bags::shape_of(&ctx.store, &key).await? {
            Some(shape) if shape.patches > 0 => shapes.push((key, shape)),
            _ => return Ok(None),
        }
    }
    // Their files and the decoded features (f32: a bag applied whole is scored as read).
    let need = shapes.iter().map(|(_, s)| s.file_bytes + s.decoded_bytes(4)).sum();
    let what = shapes
        .iter()
        .map(|(_, s)| format!("{} patches × {} features", s.patches, s.dim))
        .collect::<Vec<_>>()
        .join(" and ");
    let held = ctx.bags.hold(need, &format!("slide {slide}'s bag ({what})")).await?;
    let mut bags = Vec::new();
    for (key, _) in shapes {
        let bytes = ctx.store.get(&key).await?;
        let name = key.to_string();
        bags.push(blocking(move || Ok(FeatureBag::from_parquet(&name, bytes)?)).await?);
    }
    Ok(Some((bags, held)))
}

/// What a run's models are trained for; a survival run's time bins come from `train_slides`.
fn objective_of<'a>(plan: &RunPlan, train_slides: impl Iterator<Item = &'a str>) -> train::Objective {
    match plan.task.survival() {
        None => train::Objective::Classify,
        Some(cfg) => {
            let slides: Vec<&str> = train_slides.collect();
            train::Objective::survival(*cfg, plan.survival_targets(), &slides)
        }
    }
}

/// A survival fold's figures from its test predictions and its training slides' risks.
fn survival_fold(
    test: &[SlidePrediction],
    on_train: &[SlidePrediction],
    targets: &std::collections::HashMap<String, SurvivalTarget>,
    edges: &[f64],
) -> SurvivalFold {
    let target = |p: &SlidePrediction| targets.get(&p.slide).copied();
    let known: Vec<(f64, SurvivalTarget)> = test.iter().filter_map(|p| Some((p.risk?, target(p)?))).collect();
    let risk: Vec<f64> = known.iter().map(|k| k.0).collect();
    let time: Vec<f64> = known.iter().map(|k| k.1.time).collect();
    let event: Vec<bool> = known.iter().map(|k| k.1.event).collect();
    let mut train_risks: Vec<f64> = on_train.iter().filter_map(|p| p.risk).collect();
    train_risks.sort_by(f64::total_cmp);
    let train_median_risk = match train_risks.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => train_risks[n / 2],
        n => 0.5 * (train_risks[n / 2 - 1] + train_risks[n / 2]),
    };
    SurvivalFold {
        c_index: wsimil_common::survival::concordance(&risk, &time, &event),
        events: event.iter().filter(|e| **e).count(),
        bin_edges: edges.to_vec(),
        train_median_risk,
    }
}

fn label_of(plan: &RunPlan, slide: &str) -> usize {
    plan.slides.iter().find(|s| s.id.as_str() == slide).map(|s| s.label).unwrap_or(0)
}

async fn train_fold(ctx: &WorkerContext, job: &TrainJob) -> Result<Done, JobError> {
    let metrics_key = layout::fold_metrics(&job.run, job.round, job.fold);
    if ctx.store.exists(&metrics_key).await? {
        return Ok(Done::AlreadyDone);
    }
    let started = Instant::now();
    let plan = load_plan(&ctx.store, &job.run).await?;
    let fold = plan
        .folds
        .get(job.fold as usize)
        .ok_or_else(|| JobError::Input(format!("run {} has no fold {}", job.run, job.fold)))?
        .clone();
    let ids = plan.round_feature_ids(&ctx.store, job.round, job.fold).await?;
    // Every bag's shape from its footer, then the bags themselves as the steps need them.
    let sets = [&fold.train, &fold.val, &fold.test];
    let wanted: Vec<(SlideId, usize)> =
        sets.iter().flat_map(|v| v.iter()).map(|s| (s.clone(), label_of(&plan, s.as_str()))).collect();
    let (entries, missing) = crate::bags::index(&ctx.store, &ids, &wanted).await?;
    if !missing.is_empty() {
        warn!(fold = job.fold, ?missing, "slides without features are left out of this fold");
    }
    let member = |set: &[SlideId]| -> Vec<usize> {
        let ids: std::collections::HashSet<&SlideId> = set.iter().collect();
        (0..entries.len()).filter(|&i| ids.contains(&entries[i].slide)).collect()
    };
    let (tr, va, te) = (member(&fold.train), member(&fold.val), member(&fold.test));
    if tr.is_empty() {
        return Err(JobError::Input(format!("fold {}: no training slide has features", job.fold)));
    }
    let in_dim = entries[tr[0]].shape.dim;
    let n_classes = plan.classes.len();
    let model_cfg = plan.bag_model(in_dim);
    let objective = objective_of(&plan, tr.iter().map(|&i| entries[i].slide.as_str()));
    let loader = ctx.bag_loader(entries)?;
    let device = ctx.device().clone();
    let (fold_no, round, cfg) = (job.fold, job.round, plan.train.clone());
    let plan2 = plan.clone();
    let (report, weights) = blocking(move || {
        let err = candle_err("training");
        let fail = |e: candle_core::Error| loader.take_failure().unwrap_or_else(|| err(e));
        // The authors retrain each round's classifier from scratch; here from the same
        // initialisation and sample order as round 0's, so that a round's change is the features'
        // doing, not a new draw (the first recipe drew anew each round).
        let paper = plan2.icmil.as_ref().is_some_and(|c| c.method == wsimil_common::plan::IcmilMethod::Paper);
        let seed = cfg.seed ^ (if paper { 0 } else { (round as u64) << 32 }) ^ fold_no as u64;
        let mut log = |e: &EpochRecord| {
            tracing::debug!(fold = fold_no, epoch = e.epoch, train_loss = e.train_loss, val_loss = e.val_loss)
        };
        let (tr, va, te) = (Streamed::new(&loader, tr), Streamed::new(&loader, va), Streamed::new(&loader, te));
        let trained = train::train(&model_cfg, &cfg, &tr, &va, &objective, train::Stop::Early, seed, &device, &mut log)
            .map_err(fail)?;
        let head = objective.head();
        let (predictions, test_metrics) = train::test(&trained.model, &te, n_classes, head, &device).map_err(fail)?;
        let survival = match &objective {
            train::Objective::Classify => None,
            train::Objective::Survival { targets, edges, .. } => {
                // The training slides' risks: their median splits the test slides into risk groups.
                let (on_train, _) = train::test(&trained.model, &tr, n_classes, head, &device).map_err(fail)?;
                Some(survival_fold(&predictions, &on_train, targets, edges))
            }
        };
        let stats = loader.stats();
        info!(
            fold = fold_no,
            reads = stats.reads,
            hits = stats.hits,
            read_gib = stats.bytes_read as f64 / (1u64 << 30) as f64,
            waited_s = stats.waited_s,
            "bags"
        );
        let report = FoldReport {
            fold: fold_no,
            model: model_cfg,
            train: cfg,
            n_train: tr.len(),
            n_val: va.len(),
            n_test: te.len(),
            epochs_run: trained.curve.len(),
            best_epoch: trained.best_epoch,
            curve: trained.curve,
            test: test_metrics,
            predictions,
            seconds: started.elapsed().as_secs_f64(),
            bags: Some(stats),
            survival,
        };
        Ok((report, trained.params.to_safetensors().map_err(&err)?))
    })
    .await?;
    ctx.store.put(&layout::fold_model(&job.run, job.round, job.fold), weights).await?;
    ctx.store.put_json(&metrics_key, &report).await?;
    info!(
        fold = job.fold,
        epochs = report.epochs_run,
        best_epoch = report.best_epoch,
        test_auc = ?report.test.and_then(|m| m.auc),
        c_index = ?report.survival.as_ref().and_then(|s| s.c_index),
        secs = report.seconds,
        "trained"
    );
    Ok(Done::Computed)
}

async fn predict(ctx: &WorkerContext, job: &PredictJob) -> Result<Done, JobError> {
    let att_key = layout::attention(&job.run, job.round, &job.slide);
    if ctx.store.exists(&att_key).await? {
        return Ok(Done::AlreadyDone);
    }
    let plan = load_plan(&ctx.store, &job.run).await?;
    let fold = plan
        .test_fold_of(&job.slide)
        .ok_or_else(|| JobError::Input(format!("{}: in no test fold of run {}", job.slide, job.run)))?;
    let report: FoldReport = ctx.store.get_json(&layout::fold_metrics(&job.run, job.round, fold)).await?;
    let weights = ctx.store.get(&layout::fold_model(&job.run, job.round, fold)).await?;
    let ids = plan.round_feature_ids(&ctx.store, job.round, fold).await?;
    let Some((mut bag, held)) = load_bag(ctx, &ids, &job.slide).await? else {
        return Err(JobError::Input(format!("{}: no features to predict from", job.slide)));
    };
    let device = ctx.device().clone();
    let model_cfg = report.model.clone();
    let label = label_of(&plan, job.slide.as_str());
    let head = plan.task.head();
    let (probs, attention, instance, bag) = blocking(move || {
        let err = candle_err("prediction");
        let params = Params::new(0);
        params.preload(load_safetensors(&weights, &device).map_err(&err)?)?;
        let model = BagModel::new(&model_cfg, params.var_builder(&device)).map_err(&err)?;
        let b = Bag::from_features(&mut bag, label, &device).map_err(&err)?;
        let (probs, att) = train::predict(&model, &b.features, true, head).map_err(&err)?;
        let instance =
            if head.is_classes() { train::instance_positive(&model, &b.features).map_err(&err)? } else { None };
        Ok((probs, att.unwrap_or_default(), instance, bag))
    })
    .await?;
    drop(held);
    let truth = match plan.slide(&job.slide).and_then(|s| s.truth.clone()) {
        Some(t) => slide_truth(ctx, &t, &bag).await,
        None => None,
    };
    let map = AttentionMap {
        xs: bag.xs.clone(),
        ys: bag.ys.clone(),
        attention: attention.clone(),
        instance,
        truth,
        provenance: PredictionProvenance {
            slide: job.slide.to_string(),
            round: job.round,
            fold,
            classes: plan.classes.clone(),
            label: Some(label),
            probs,
            model: plan.train.model.to_string(),
            embedder: bag.provenance.embedder.clone(),
        },
    };
    write_heatmap(ctx, &job.slide, &bag, &attention, &layout::heatmap(&job.run, job.round, &job.slide)).await?;
    write_geojson(ctx, &bag, &map, &layout::attention_geojson(&job.run, job.round, &job.slide)).await?;
    ctx.store.put(&att_key, map.to_parquet()?).await?;
    Ok(Done::Computed)
}

/// The lesion coverage of each of `bag`'s patches from the slide's truth file (local or `s3://`),
/// or `None` with a warning when it cannot be had: the prediction stands without it.
async fn slide_truth(ctx: &WorkerContext, location: &str, bag: &FeatureBag) -> Option<Vec<f32>> {
    let tp = bag.provenance.tiling.as_ref()?;
    let bytes = if crate::slide::remote::is_remote(location) {
        ctx.sources.buckets().get(location).await.map(|b| b.to_vec()).map_err(|e| e.to_string())
    } else {
        std::fs::read(location).map_err(|e| format!("{location}: {e}"))
    };
    let truth =
        bytes.and_then(|b| wsimil_common::truth::Truth::from_bytes(location, &b, (tp.level0_width, tp.level0_height)));
    match truth {
        Ok(t) => Some(t.coverage(&bag.xs, &bag.ys, tp.patch_level0)),
        Err(e) => {
            warn!(slide = %bag.provenance.slide, "its truth is left out of the instance-level figures: {e}");
            None
        }
    }
}

/// The attention map as QuPath tiles under `key`, when the patches' size is known (slides wsimil
/// tiled).
async fn write_geojson(
    ctx: &WorkerContext,
    bag: &FeatureBag,
    map: &AttentionMap,
    key: &object_store::path::Path,
) -> Result<(), JobError> {
    let Some(tp) = &bag.provenance.tiling else { return Ok(()) };
    let bytes = heatmap::geojson(&map.xs, &map.ys, tp.patch_level0, &map.attention, map.instance.as_deref());
    ctx.store.put(key, bytes).await?;
    Ok(())
}

/// The attention heatmap of `bag`'s slide under `key`, when wsimil tiled the slide (the thumbnail and
/// the patch geometry are needed).
async fn write_heatmap(
    ctx: &WorkerContext,
    slide: &SlideId,
    bag: &FeatureBag,
    attention: &[f32],
    key: &object_store::path::Path,
) -> Result<(), JobError> {
    let (Some(tp), Some(tid)) = (&bag.provenance.tiling, &bag.provenance.tiling_id) else { return Ok(()) };
    let tiling = TilingId::new(tid.clone()).map_err(|e| JobError::Input(e.to_string()))?;
    let thumb_bytes = ctx.store.get(&layout::thumbnail(&tiling, slide)).await?;
    let thumb = image::load_from_memory(&thumb_bytes)
        .map_err(|e| JobError::Input(format!("{slide}: thumbnail: {e}")))?
        .to_rgb8();
    let img = heatmap::render(&thumb, tp.level0_width, &bag.xs, &bag.ys, tp.patch_level0, attention);
    ctx.store.put(key, png_bytes_rgb(&img)).await?;
    Ok(())
}

/// A run's final model: every slide of the cohort trains, for the median of the folds' best
/// epochs, no validation set (the cross-validation chose the epochs). Round 0 only: an ICMIL
/// round gives each fold an embedder of its own.
async fn train_final(ctx: &WorkerContext, job: &FinalJob) -> Result<Done, JobError> {
    let report_key = layout::final_metrics(&job.run, job.round);
    if ctx.store.exists(&report_key).await? {
        return Ok(Done::AlreadyDone);
    }
    if job.round != 0 {
        return Err(JobError::Config(format!(
            "run {}: a final model trains on round 0's features (ICMIL round {} gives each fold its own embedder)",
            job.run, job.round
        )));
    }
    let started = Instant::now();
    let plan = load_plan(&ctx.store, &job.run).await?;
    let mut best_epochs = Vec::new();
    for k in 0..plan.folds.len() as u32 {
        let report: FoldReport = ctx.store.get_json(&layout::fold_metrics(&job.run, job.round, k)).await?;
        best_epochs.push(report.best_epoch);
    }
    if best_epochs.is_empty() {
        return Err(JobError::Input(format!("run {}: no fold was trained to choose the epochs from", job.run)));
    }
    let mut sorted = best_epochs.clone();
    sorted.sort_unstable();
    let epochs = sorted[sorted.len() / 2] + 1;
    let wanted: Vec<(SlideId, usize)> = plan.slides.iter().map(|s| (s.id.clone(), s.label)).collect();
    let (entries, missing) =
        crate::bags::index(&ctx.store, &plan.round_feature_ids(&ctx.store, 0, 0).await?, &wanted).await?;
    if !missing.is_empty() {
        warn!(?missing, "slides without features are left out of the final model");
    }
    if entries.is_empty() {
        return Err(JobError::Input(format!("run {}: no slide has features", job.run)));
    }
    let model_cfg = plan.bag_model(entries[0].shape.dim);
    let objective = objective_of(&plan, entries.iter().map(|e| e.slide.as_str()));
    let all: Vec<usize> = (0..entries.len()).collect();
    let loader = ctx.bag_loader(entries)?;
    let (device, cfg) = (ctx.device().clone(), plan.train.clone());
    let (report, weights) = blocking(move || {
        let err = candle_err("training the final model");
        let fail = |e: candle_core::Error| loader.take_failure().unwrap_or_else(|| err(e));
        let bags = Streamed::new(&loader, all);
        let seed = cfg.seed ^ 0xf1a1;
        let none: Vec<&Bag> = Vec::new();
        let trained = train::train(
            &model_cfg,
            &cfg,
            &bags,
            &none,
            &objective,
            train::Stop::After(epochs),
            seed,
            &device,
            &mut |_| {},
        )
        .map_err(fail)?;
        let report = FinalReport {
            model: model_cfg,
            train: cfg,
            n_train: bags.len(),
            epochs,
            fold_best_epochs: best_epochs,
            curve: trained.curve,
            seconds: started.elapsed().as_secs_f64(),
            bags: Some(loader.stats()),
        };
        Ok((report, trained.params.to_safetensors().map_err(&err)?))
    })
    .await?;
    ctx.store.put(&layout::final_model(&job.run, job.round), weights).await?;
    ctx.store.put_json(&report_key, &report).await?;
    info!(run = %job.run, epochs = report.epochs, slides = report.n_train, "final model trained");
    Ok(Done::Computed)
}

/// A model's members, built on this worker's device: loaded once per worker and model.
pub type LoadedModel = Vec<(Member, BagModel)>;

/// Apply a model to one slide of an application: each member's probabilities and attention from
/// the slide's features from the member's embedder, the probabilities averaged, the attention
/// averaged when the members saw the same patches (else the first member's). The attention map,
/// with the prediction in its provenance, is written last (the slide's "done").
async fn score(ctx: &WorkerContext, job: &ScoreJob) -> Result<Done, JobError> {
    let att_key = layout::applied_attention(&job.app, &job.slide);
    if ctx.store.exists(&att_key).await? {
        return Ok(Done::AlreadyDone);
    }
    let app: ApplyPlan = ctx.store.get_json(&layout::applied_plan(&job.app)).await?;
    let slide = app
        .slide(&job.slide)
        .ok_or_else(|| JobError::Input(format!("{}: not in application {}", job.slide, job.app)))?
        .clone();
    let model = ctx.model(&app.model).await?;
    // Each member's features: the members of one embedder and tiling (a run's folds) share one bag.
    let mut sources: Vec<(EmbedderId, TilingId)> = Vec::new();
    let mut which = Vec::new();
    for (m, _) in model.iter() {
        let ids = app.features_of(&m.embedder);
        let i = sources.iter().position(|s| *s == ids).unwrap_or_else(|| {
            sources.push(ids);
            sources.len() - 1
        });
        which.push(i);
    }
    let Some((bags, held)) = load_bags(ctx, &sources, &job.slide).await? else {
        let names: Vec<&str> = sources.iter().map(|s| s.0.as_str()).collect();
        return Err(JobError::Input(format!("{}: no features from {} to score with", job.slide, names.join(" or "))));
    };
    for ((m, _), &i) in model.iter().zip(&which) {
        // Features must come from the embedder (and tiling) the member was trained on.
        let (p, ids) = (&bags[i].provenance, &sources[i]);
        if p.embedder != ids.0.as_str() || p.feature_dim != m.config.in_dim() {
            return Err(JobError::Input(format!(
                "{}: features from {} ({} wide), but {} of model {} was trained on {} ({} wide)",
                job.slide,
                p.embedder,
                p.feature_dim,
                m.name,
                app.model,
                ids.0,
                m.config.in_dim()
            )));
        }
    }
    let device = ctx.device().clone();
    let model2 = model.clone();
    let head = app.head;
    let (probs, attention, instance, bags) = blocking(move || {
        let err = candle_err("scoring");
        let mut bags2 = bags;
        let mut probs: Vec<f64> = Vec::new();
        let mut attention: Vec<Vec<f32>> = Vec::new();
        let mut instance: Vec<Option<Vec<f32>>> = Vec::new();
        let inputs: Vec<Tensor> = bags2
            .iter_mut()
            .map(|bag| Tensor::from_vec(std::mem::take(&mut bag.features), (1, bag.len(), bag.dim), &device))
            .collect::<candle_core::Result<_>>()
            .map_err(&err)?;
        for ((_, m), &i) in model2.iter().zip(&which) {
            let x = &inputs[i];
            let (p, a) = train::predict(m, x, true, head).map_err(&err)?;
            if probs.is_empty() {
                probs = vec![0.0; p.len()];
            }
            probs.iter_mut().zip(&p).for_each(|(s, v)| *s += v / model2.len() as f64);
            attention.push(a.unwrap_or_default());
            instance.push(if head.is_classes() { train::instance_positive(m, x).map_err(&err)? } else { None });
        }
        // Members on the same patches: their per-patch figures averaged; else the first member's.
        let same = bags2.iter().all(|b| b.xs == bags2[0].xs && b.ys == bags2[0].ys);
        let mean = |v: &[Vec<f32>]| -> Vec<f32> {
            let n = v.len() as f32;
            (0..v[0].len()).map(|i| v.iter().map(|a| a[i]).sum::<f32>() / n).collect()
        };
        let att = if same { mean(&attention) } else { attention.swap_remove(0) };
        let inst = match instance.iter().cloned().collect::<Option<Vec<_>>>() {
            Some(all) if same => Some(mean(&all)),
            _ => instance.swap_remove(0),
        };
        Ok((probs, att, inst, bags2))
    })
    .await?;
    drop(held);
    let bag = &bags[0];
    let map = AttentionMap {
        xs: bag.xs.clone(),
        ys: bag.ys.clone(),
        attention: attention.clone(),
        instance,
        truth: None,
        provenance: PredictionProvenance {
            slide: job.slide.to_string(),
            round: 0,
            fold: 0,
            classes: app.classes.clone(),
            label: slide.label,
            probs,
            model: app.model.to_string(),
            embedder: bag.provenance.embedder.clone(),
        },
    };
    write_heatmap(ctx, &job.slide, bag, &attention, &layout::applied_heatmap(&job.app, &job.slide)).await?;
    write_geojson(ctx, bag, &map, &layout::applied_attention_geojson(&job.app, &job.slide)).await?;
    ctx.store.put(&att_key, map.to_parquet()?).await?;
    Ok(Done::Computed)
}

/// ICMIL: fine-tune one shard of a fold's training slides (see [`crate::finetune`]). The weights
/// are written first, the report last: the report's presence means the shard is done.
async fn finetune(ctx: &WorkerContext, job: &FinetuneJob) -> Result<Done, JobError> {
    let report_key = layout::finetune_shard_report(&job.run, job.round, job.fold, job.shard);
    if ctx.store.exists(&report_key).await? {
        return Ok(Done::AlreadyDone);
    }
    if job.round == 0 {
        return Err(JobError::Input("ICMIL fine-tuning starts at round 1".into()));
    }
    let started = Instant::now();
    let plan = load_plan(&ctx.store, &job.run).await?;
    let cfg = plan.icmil.clone().ok_or_else(|| JobError::Input(format!("run {} has no ICMIL rounds", job.run)))?;
    let prev = job.round - 1;
    let teacher = plan.fold_embedder(&ctx.store, prev, job.fold).await?;
    let ids = (teacher.id(), plan.tiling.id());
    let slides = plan.shard_slides(job.fold as usize, job.shard, job.shards);
    let wanted: Vec<(SlideId, usize)> = slides.iter().map(|s| (s.clone(), label_of(&plan, s.as_str()))).collect();
    let (entries, missing) = crate::bags::index(&ctx.store, &ids, &wanted).await?;
    if !missing.is_empty() {
        warn!(fold = job.fold, shard = job.shard, ?missing, "training slides without features are left out");
    }
    let fold_report: FoldReport = ctx.store.get_json(&layout::fold_metrics(&job.run, prev, job.fold)).await?;
    let heads = ctx.store.get(&layout::fold_model(&job.run, prev, job.fold)).await?;
    let mut slides = Vec::new();
    for e in &entries {
        let grid_key = layout::patch_grid(&ids.1, &e.slide);
        let grid = PatchGrid::from_parquet(grid_key.as_ref(), ctx.store.get(&grid_key).await?)?;
        let path = plan.slide(&e.slide).map(|s| s.path.clone()).unwrap_or_default();
        slides.push((path, grid));
    }
    let slide_names: Vec<String> = entries.iter().map(|e| e.slide.to_string()).collect();
    // The negative class, if the run names one: its slides' patches are taught it outright.
    let negative_class = match &cfg.negative_class {
        Some(name) => Some(plan.classes.iter().position(|c| c == name).ok_or_else(|| {
            JobError::Input(format!("ICMIL's negative class {name:?} is not one of the run's classes"))
        })?),
        None => None,
    };
    // The teacher's rows come from the bags as batches need them, a batch's slides held at once.
    let why = format!(
        "ICMIL fine-tuning mixes the patches of up to {} slides in a batch, each slide's bag held meanwhile",
        crate::finetune::SLIDES_HELD
    );
    let loader = BagLoader::holding(
        ctx.bags.clone(),
        ctx.store.clone(),
        entries,
        tokio::runtime::Handle::current(),
        crate::finetune::SLIDES_HELD,
        &why,
    )?
    .with_coords();
    let teacher_tensors = ctx.embedder_tensors(&teacher).await?;
    let device = ctx.device().clone();
    let seed = plan.train.seed ^ 0x1c31 ^ ((job.round as u64) << 40) ^ ((job.fold as u64) << 20) ^ job.shard as u64;
    let (arch, model_cfg, teacher_id) = (teacher.architecture.clone(), fold_report.model.clone(), teacher.id());
    let sources = ctx.sources.clone();
    let (result, patches) = blocking(move || {
        let err = candle_err("ICMIL fine-tuning");
        let bag_failure = |e: candle_core::Error| loader.take_failure().unwrap_or_else(|| err(e));
        let heads = load_safetensors(&heads, &device).map_err(&err)?;
        let classifier = crate::finetune::classifier(&model_cfg, &heads, &device).map_err(&err)?;
        let mut data = crate::finetune::TeacherData::default();
        let mut rng = wsimil_common::rng::Rng::new(seed);
        let pre = arch
            .preprocessing()
            .ok_or_else(|| JobError::Input(format!("embedder {arch} has no patches to fine-tune")))?;
        let paper = cfg.method == wsimil_common::plan::IcmilMethod::Paper;
        // One pass over the shard's bags: each slide's confidence, and the patches it gives.
        let all: Vec<usize> = (0..slides.len()).collect();
        let mut pass = loader.pass(&all);
        for si in all {
            let Some(bag) = pass.next_bag() else {
                return Err(loader.take_failure().unwrap_or_else(|| JobError::Input("the bag reader stopped".into())));
            };
            let feats = crate::bags::on_device(&bag.features, &device).and_then(|f| f.squeeze(0)).map_err(&err)?;
            let targets = crate::finetune::slide_targets(&classifier, &feats, cfg.beta).map_err(&err)?;
            let (xs, ys) = bag.coords.as_deref().expect("the loader reads corners");
            // The authors learn from every patch (their confidence weighs it per batch); the first
            // recipe from the patches its per-slide confidence keeps. The slide's top-k, if asked
            // for, are always drawn (the teacher rows teach them the slide's class).
            let candidates: Vec<usize> = (0..xs.len()).filter(|&i| paper || targets.weights[i] > 0.0).collect();
            let label = loader.entries()[si].label;
            let top = if cfg.top_k > 0 && negative_class != Some(label) {
                let (_, logits) = classifier.instance_path(&feats).map_err(&err)?;
                crate::finetune::top_rows(&logits, label, cfg.top_k).map_err(&err)?
            } else {
                Vec::new()
            };
            for row in crate::finetune::draw_rows(candidates, &top, cfg.patches_per_slide, &mut rng) {
                data.push(&targets, crate::finetune::PatchRef { slide: si, row, x: xs[row], y: ys[row] });
            }
        }
        drop(pass);
        let patches = data.len();
        if patches < 2 {
            return Ok((None, patches));
        }
        // Pixels are read batch by batch, the slides opened as batches need them and the least
        // recently used closed past 2·SLIDES_MIXED (a batch mixes the patches of at most that many:
        // `finetune::epoch_order`); a slide no patch was drawn from is never opened. A read that
        // fails keeps its slide error (transient or not) for the job to report, not a training error.
        let failed: std::sync::Mutex<Option<crate::slide::SlideError>> = std::sync::Mutex::new(None);
        let fail = |e: crate::slide::SlideError| {
            let msg = e.to_string();
            failed.lock().unwrap().get_or_insert(e);
            candle_core::Error::Msg(msg)
        };
        type Open = (usize, Arc<Box<dyn crate::slide::SlideReader>>);
        let open: Mutex<Vec<Open>> = Mutex::new(Vec::new());
        let keep = 2 * crate::finetune::SLIDES_MIXED;
        let read = |idx: &[usize]| -> candle_core::Result<Vec<image::RgbImage>> {
            let need: std::collections::BTreeSet<usize> = idx.iter().map(|&i| data.patches[i].slide).collect();
            let readers: HashMap<usize, Arc<Box<dyn crate::slide::SlideReader>>> = {
                let mut open = open.lock().unwrap();
                for &s in &need {
                    match open.iter().position(|(k, _)| *k == s) {
                        Some(at) => {
                            let e = open.remove(at);
                            open.push(e);
                        }
                        None => open.push((s, Arc::new(sources.open(&slides[s].0).map_err(fail)?))),
                    }
                }
                while open.len() > keep.max(need.len()) {
                    let Some(at) = open.iter().position(|(k, _)| !need.contains(k)) else { break };
                    open.remove(at);
                }
                open.iter().filter(|(k, _)| need.contains(k)).map(|(k, r)| (*k, r.clone())).collect()
            };
            idx.par_iter()
                .map(|&i| {
                    let p = data.patches[i];
                    let patch = wsimil_common::grid::Patch { x: p.x, y: p.y, tissue: 0.0 };
                    crate::embed::read_patch(readers[&p.slide].as_ref().as_ref(), &slides[p.slide].1, &patch, &pre)
                        .map_err(fail)
                })
                .collect()
        };
        let rows = crate::finetune::StreamedRows::new(&loader, &classifier, &data.patches, &device)
            .with_negative_class(negative_class)
            .with_top_k(cfg.top_k);
        let out = crate::finetune::finetune(
            &arch,
            &teacher_tensors,
            (&model_cfg, &heads),
            &data,
            &read,
            &|idx: &[usize]| rows.batch(idx),
            &cfg,
            seed,
            &device,
        );
        if let Some(e) = failed.into_inner().unwrap() {
            return Err(e.into());
        }
        let out = out.map_err(bag_failure)?;
        let bytes = wsimil_common::models::params::safetensors_bytes(&out.tensors).map_err(&err)?;
        Ok((Some((bytes, out.steps, out.epoch_losses)), patches))
    })
    .await?;
    let (steps, epoch_losses, patches) = match result {
        Some((bytes, steps, losses)) => {
            ctx.store.put(&layout::finetune_shard_weights(&job.run, job.round, job.fold, job.shard), bytes).await?;
            (steps, losses, patches)
        }
        // Fewer than two confident patches: nothing to learn from; the shard weighs nothing.
        None => (0, Vec::new(), 0),
    };
    let report = ShardReport {
        shard: job.shard,
        teacher: teacher_id.to_string(),
        slides: slide_names,
        patches,
        steps,
        epoch_losses,
        seconds: started.elapsed().as_secs_f64(),
    };
    ctx.store.put_json(&report_key, &report).await?;
    info!(round = job.round, fold = job.fold, shard = job.shard, patches, steps, secs = report.seconds, "fine-tuned");
    Ok(Done::Computed)
}
