//! A run, stage by stage: plan → tile → embed → train (one job per fold) → predict → summary,
//! then for each ICMIL round r ≥ 1: finetune (shards of each fold's training slides) → merge (the
//! fold's new embedder, content-addressed, with its lineage) → embed → train → predict → summary.
//!
//! The same driver serves every mode; only the [`Dispatcher`] differs. Each stage is re-planned
//! from the store, so running the same command again resumes where the last one stopped.

use crate::dispatch::{Dispatcher, StageOutcome};
use crate::manifest::{self, Manifest, Purpose};
use crate::planner::{self, FoldSettings};
use crate::predictions::{Prediction, SurvivalRow, SurvivalTable, Table};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use wsimil_common::attention::AttentionMap;
use wsimil_common::ids::{EmbedderId, RunId};
use wsimil_common::job::{FailureRecord, Job, JobKind, RunProgress};
use wsimil_common::layout;
use wsimil_common::metrics::{evaluate, mean_sd, Estimate, MeanSd, Metrics};
use wsimil_common::models::weights::WeightsFile;
use wsimil_common::models::zoo::Architecture;
use wsimil_common::plan::{
    EmbedderSpec, IcmilConfig, RunPlan, SurvivalTarget, Task, TilingSpec, TrainConfig, WeightsRef,
};
use wsimil_common::records::{EmbedderCard, FoldReport, WSIMIL_VERSION};
use wsimil_common::store::{S3Options, Store};
use wsimil_worker::slide::remote::Buckets;

/// Where an embedder's weights come from.
#[derive(Debug, Clone)]
pub enum Weights {
    /// A safetensors file (torchvision / efficientnet_pytorch names).
    File(PathBuf),
    /// Seeded random initialisation (tests, smoke runs).
    Random(u64),
}

#[derive(Debug, Clone)]
pub struct EmbedderChoice {
    pub architecture: Architecture,
    pub weights: Weights,
    pub batch_size: usize,
    pub corrupt_tiles: wsimil_common::plan::CorruptTiles,
}

/// Everything `wsimil run` needs, checked.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub manifest: PathBuf,
    pub classes: Option<Vec<String>>,
    pub run: Option<RunId>,
    pub tiling: TilingSpec,
    pub embedder: EmbedderChoice,
    pub train: TrainConfig,
    pub folds: FoldSettings,
    /// Train on features imported under this name (`wsimil import-bags`) instead of slides.
    pub imported: Option<EmbedderId>,
    /// Folds from CLAM's `splits_<k>.csv` files in this folder instead of the manifest or k-fold.
    pub clam_splits: Option<PathBuf>,
    /// ICMIL rounds after round 0.
    pub icmil: Option<IcmilConfig>,
    /// How `s3://` slides and manifests are reached (the store's S3 settings).
    pub s3: S3Options,
    /// Classification, or survival from the manifest's follow-up.
    pub task: Task,
}

/// Put the embedder's weights into the store under their content address and return its spec.
pub async fn register_embedder(store: &Store, choice: &EmbedderChoice) -> anyhow::Result<EmbedderSpec> {
    let spec = |weights: WeightsRef| EmbedderSpec {
        architecture: choice.architecture.clone(),
        weights,
        batch_size: choice.batch_size,
        corrupt_tiles: choice.corrupt_tiles,
    };
    match &choice.weights {
        Weights::Random(seed) => Ok(spec(WeightsRef::Random(*seed))),
        Weights::File(path) => {
            let (p, arch) = (path.clone(), choice.architecture.clone());
            let sha = tokio::task::spawn_blocking(move || file_sha256(&p)).await??;
            let spec = spec(WeightsRef::Sha256(sha.clone()));
            let id = spec.id();
            let key = layout::embedder_weights(&id);
            if !store.exists(&key).await? {
                // Check the file against the architecture and build it before anyone relies on it;
                // the store keeps the tensors the architecture uses, as safetensors, under the
                // publisher's names.
                let p = path.clone();
                let (bytes, feature_dim, output) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let file = WeightsFile::open(&p)?;
                    let tensors = arch.read_weights(&file)?;
                    let vb = candle_nn::VarBuilder::from_tensors(
                        tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        candle_core::DType::F32,
                        &candle_core::Device::Cpu,
                    );
                    let model =
                        arch.build(vb).with_context(|| format!("{}: weights do not fit {arch}", p.display()))?;
                    let bytes = wsimil_common::models::params::safetensors_bytes(&tensors)?;
                    Ok((bytes, model.feature_dim(), model.output()))
                })
                .await??;
                store.put(&key, bytes).await?;
                let card = EmbedderCard {
                    id: id.clone(),
                    architecture: choice.architecture.to_string(),
                    weights_sha256: sha,
                    source: Some(path.display().to_string()),
                    parent: None,
                    lineage: None,
                    output: Some(output),
                    feature_dim: Some(feature_dim),
                    wsimil_version: Some(WSIMIL_VERSION.into()),
                };
                store.put_json(&layout::embedder_card(&id), &card).await?;
            }
            Ok(spec)
        }
    }
}

/// SHA-256 of a file, read in blocks (weights files run to gigabytes).
pub(crate) fn file_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read embedder weights", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("{}: cannot read embedder weights", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Every slide of the manifest must have imported features; list those that do not.
async fn check_imported(store: &Store, name: &EmbedderId, manifest: &Manifest) -> anyhow::Result<()> {
    let tiling = wsimil_common::ids::TilingId::new(wsimil_common::plan::IMPORTED_TILING).expect("safe");
    let mut missing = Vec::new();
    for r in &manifest.rows {
        if !store.exists(&layout::features(name, &tiling, &r.slide)).await? {
            missing.push(r.slide.to_string());
        }
    }
    if !missing.is_empty() {
        bail!(
            "--features {name}: no imported features for {} of {} slides (first: {}); import them into this store first (`wsimil import-bags` or `wsimil import-clam`)",
            missing.len(),
            manifest.rows.len(),
            missing[0]
        );
    }
    Ok(())
}

/// Validate the manifest, register the embedder and write (or check) the run's plan.
pub async fn prepare(store: &Store, settings: &RunSettings) -> anyhow::Result<(Manifest, RunPlan)> {
    let buckets = Buckets::new(settings.s3.clone());
    let purpose = if settings.task.is_classification() { Purpose::Training } else { Purpose::Survival };
    let manifest = manifest::load_for(&settings.manifest, settings.classes.as_deref(), purpose, &buckets).await?;
    if let Some(name) = settings.icmil.as_ref().and_then(|c| c.negative_class.as_deref()) {
        if !manifest.classes.iter().any(|c| c == name) {
            bail!(
                "--icmil-negative-class {name:?} is not a class of {} ({})",
                settings.manifest.display(),
                manifest.classes.join(", ")
            );
        }
    }
    if settings.icmil.is_some() && settings.imported.is_some() {
        bail!("ICMIL rounds fine-tune the patch embedder on slide pixels; imported features (--features) have none");
    }
    let embedder = match &settings.imported {
        Some(name) => {
            check_imported(store, name, &manifest).await?;
            EmbedderSpec {
                architecture: Architecture::Imported,
                weights: WeightsRef::Imported(name.to_string()),
                batch_size: settings.embedder.batch_size,
                corrupt_tiles: Default::default(),
            }
        }
        None => register_embedder(store, &settings.embedder).await?,
    };
    let folds = match &settings.clam_splits {
        Some(dir) => planner::load_clam_splits(dir, &manifest)?,
        None => planner::assign_folds(&manifest, settings.folds),
    };
    if !settings.task.is_classification() {
        planner::check_survival_folds(&manifest, &folds)?;
    }
    let parts = planner::PlanParts {
        tiling: settings.tiling.clone(),
        embedder,
        train: settings.train.clone(),
        folds,
        imported: settings.imported.clone(),
        icmil: settings.icmil.clone(),
        task: settings.task,
    };
    let plan = planner::make_plan(&manifest, settings.run.clone(), parts);
    if plan.imported.is_none() {
        let refs: Vec<planner::SlideRef> =
            plan.slides.iter().map(|s| planner::SlideRef { id: &s.id, path: &s.path, mpp: s.mpp }).collect();
        planner::check_slide_identity(store, &plan.tiling, &refs).await?;
    }
    let key = layout::run_plan(&plan.run);
    if store.exists(&key).await? {
        let existing: RunPlan = store.get_json(&key).await?;
        if existing != plan {
            bail!("run {} already exists with a different plan (cohort or settings changed); name another --run or remove {key}", plan.run);
        }
    } else {
        store.put_json(&key, &plan).await?;
    }
    Ok((manifest, plan))
}

/// The cohort-level result of one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub run: RunId,
    pub round: u32,
    pub classes: Vec<String>,
    pub slides: usize,
    /// Slides with an out-of-fold prediction.
    pub predicted: usize,
    /// Metrics over all out-of-fold predictions pooled.
    pub pooled: Option<Metrics>,
    pub per_fold: Vec<Option<Metrics>>,
    pub auc: Option<MeanSd>,
    pub accuracy: Option<MeanSd>,
    pub balanced_accuracy: Option<MeanSd>,
    pub f1: Option<MeanSd>,
    pub failures: Vec<FailureRecord>,
    /// How well the classifier finds the lesions, where the manifest gives slides' truth
    /// (`wsimil_common::truth::InstanceFigures` over the out-of-fold attention maps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<wsimil_common::truth::InstanceMetrics>,
    /// A survival run's figures (the class figures above are empty there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub survival: Option<SurvivalMetrics>,
    /// The figures per patient, where the manifest names the slides' patients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients: Option<PatientMetrics>,
}

/// The mean of a group of rows' class probabilities.
pub fn mean_probs(group: &[usize], rows: &[&Prediction]) -> Vec<f64> {
    let k = rows[group[0]].probs.len();
    (0..k).map(|c| group.iter().map(|&i| rows[i].probs[c]).sum::<f64>() / group.len() as f64).collect()
}

/// A round's out-of-fold figures with each patient's slides pooled: a patient's class
/// probabilities (or risk) are the mean of its slides'. A patient's slides share a fold, so each
/// patient is scored by one fold's model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatientMetrics {
    /// Patients with an out-of-fold prediction, and of them those with more than one slide.
    pub patients: usize,
    pub with_several_slides: usize,
    /// Over the patients' pooled class probabilities (a classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled: Option<Metrics>,
    /// Harrell's C-index of the patients' mean risks, with its bootstrap interval (survival).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c_index: Option<Estimate>,
}

impl PatientMetrics {
    /// The patients' mean class probabilities and their labels, from the slides' `rows`.
    fn classes(plan: &RunPlan, rows: &[Prediction]) -> Option<Self> {
        if !plan.has_patients() || rows.is_empty() {
            return None;
        }
        let rows: Vec<&Prediction> = rows.iter().collect();
        let groups = plan.patient_groups(&rows.iter().map(|r| r.slide.as_str()).collect::<Vec<_>>());
        Some(Self::pooled_classes(&groups, &rows, plan.classes.len()))
    }

    /// Labelled `rows` grouped by patient (`groups`: positions in `rows`): each patient's mean
    /// class probabilities against its label (a patient's slides share it: the manifest says so).
    pub fn pooled_classes(groups: &[Vec<usize>], rows: &[&Prediction], classes: usize) -> Self {
        let probs: Vec<Vec<f64>> = groups.iter().map(|g| mean_probs(g, rows)).collect();
        let labels: Vec<usize> = groups.iter().map(|g| rows[g[0]].label.expect("labelled rows")).collect();
        PatientMetrics {
            patients: groups.len(),
            with_several_slides: groups.iter().filter(|g| g.len() > 1).count(),
            pooled: Some(evaluate(&probs, &labels, classes)),
            c_index: None,
        }
    }

    /// The patients' mean risks against their follow-up, from the slides' `rows`.
    fn survival(plan: &RunPlan, rows: &[SurvivalRow]) -> Option<Self> {
        let known: Vec<&SurvivalRow> = rows.iter().filter(|r| r.follow_up.is_some()).collect();
        if !plan.has_patients() || known.is_empty() {
            return None;
        }
        let groups = plan.patient_groups(&known.iter().map(|r| r.slide.as_str()).collect::<Vec<_>>());
        Some(Self::pooled_risks(&groups, &known))
    }

    /// Rows with follow-up grouped by patient (`groups`: positions in `known`): each patient's
    /// mean risk against its follow-up, by Harrell's C-index.
    pub fn pooled_risks(groups: &[Vec<usize>], known: &[&SurvivalRow]) -> Self {
        let risk: Vec<f64> =
            groups.iter().map(|g| g.iter().map(|&i| known[i].risk).sum::<f64>() / g.len() as f64).collect();
        // A patient's slides share its follow-up (the manifest refuses them otherwise).
        let follow_up: Vec<SurvivalTarget> = groups.iter().map(|g| known[g[0]].follow_up.expect("known")).collect();
        let time: Vec<f64> = follow_up.iter().map(|t| t.time).collect();
        let event: Vec<bool> = follow_up.iter().map(|t| t.event).collect();
        PatientMetrics {
            patients: groups.len(),
            with_several_slides: groups.iter().filter(|g| g.len() > 1).count(),
            pooled: None,
            c_index: wsimil_common::survival::concordance_ci(&risk, &time, &event, 1000, 0),
        }
    }

    /// One line for the run's summary.
    pub fn describe(&self) -> String {
        let figures = match (&self.pooled, &self.c_index) {
            (Some(m), _) => format!(
                "AUC {}, accuracy {:.3}, balanced accuracy {:.3}",
                m.auc.map(|a| format!("{a:.3}")).unwrap_or_else(|| "n/a".into()),
                m.accuracy,
                m.balanced_accuracy
            ),
            (None, Some(c)) => format!("C-index {c}"),
            (None, None) => "no figures".into(),
        };
        format!(
            "per patient ({} patients, {} with several slides, their slides' {} averaged): {figures}",
            self.patients,
            self.with_several_slides,
            if self.pooled.is_some() { "probabilities" } else { "risks" }
        )
    }
}

/// A survival round's figures over its out-of-fold risks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SurvivalMetrics {
    /// Slides with an out-of-fold risk, and of them those whose event was observed.
    pub slides: usize,
    pub events: usize,
    /// Harrell's C-index of the out-of-fold risks pooled, with its 95% bootstrap interval (1,000
    /// resamples). Each fold's model has its own risk scale: the per-fold figures are the primary
    /// ones, as for AUC.
    pub c_index: Option<Estimate>,
    pub per_fold: Vec<Option<f64>>,
    pub c_index_folds: Option<MeanSd>,
    /// The test slides above their fold's training median risk (high) against the rest (low).
    pub high: RiskGroup,
    pub low: RiskGroup,
    /// The log-rank test of the two groups.
    pub log_rank_chi2: f64,
    pub log_rank_p: f64,
    /// The cumulative/dynamic AUC of the out-of-fold risks pooled (cases: the event by t;
    /// controls: event-free after t; inverse probability of censoring weights from the cohort) at
    /// the quartiles of the event times; none where undefined.
    #[serde(default)]
    pub td_auc: Vec<(f64, Option<f64>)>,
}

/// One risk group: its size, events and Kaplan-Meier curve (time, survival just after it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RiskGroup {
    pub slides: usize,
    pub events: usize,
    pub kaplan_meier: Vec<(f64, f64)>,
    /// The first time its survival is at or below one half (none while it stays above).
    pub median_survival: Option<f64>,
}

impl RiskGroup {
    fn of(time: &[f64], event: &[bool]) -> Self {
        let kaplan_meier = wsimil_common::survival::kaplan_meier(time, event);
        let median_survival = kaplan_meier.iter().find(|(_, s)| *s <= 0.5).map(|p| p.0);
        RiskGroup { slides: time.len(), events: event.iter().filter(|e| **e).count(), kaplan_meier, median_survival }
    }
}

/// Each fold's report of `round`, none for a fold not trained.
async fn fold_reports(store: &Store, plan: &RunPlan, round: u32) -> anyhow::Result<Vec<Option<FoldReport>>> {
    let mut out = Vec::new();
    for k in 0..plan.folds.len() as u32 {
        let key = layout::fold_metrics(&plan.run, round, k);
        out.push(if store.exists(&key).await? { Some(store.get_json(&key).await?) } else { None });
    }
    Ok(out)
}

/// A survival round's out-of-fold table and figures.
async fn summarise_survival(store: &Store, plan: &RunPlan, round: u32) -> anyhow::Result<RoundMetrics> {
    let targets = plan.survival_targets();
    let mut rows: Vec<SurvivalRow> = Vec::new();
    let mut per_fold = Vec::new();
    for (k, report) in fold_reports(store, plan, round).await?.into_iter().enumerate() {
        let k = k as u32;
        let Some(report) = report else {
            per_fold.push(None);
            continue;
        };
        let median = report.survival.as_ref().map(|s| s.train_median_risk);
        per_fold.push(report.survival.as_ref().and_then(|s| s.c_index));
        rows.extend(report.predictions.iter().filter_map(|p| {
            let risk = p.risk?;
            Some(SurvivalRow {
                slide: p.slide.clone(),
                fold: Some(k),
                follow_up: targets.get(&p.slide).copied(),
                risk,
                high_risk: median.filter(|m| m.is_finite()).map(|m| risk > m),
            })
        }));
    }
    rows.sort_by(|a, b| a.slide.cmp(&b.slide));
    let known: Vec<&SurvivalRow> = rows.iter().filter(|r| r.follow_up.is_some()).collect();
    let (risk, time, event) = SurvivalRow::columns(&rows);
    let high: Vec<bool> = known.iter().map(|r| r.high_risk.unwrap_or(false)).collect();
    let group = |want: bool| {
        let idx: Vec<usize> = (0..known.len()).filter(|&i| high[i] == want).collect();
        RiskGroup::of(
            &idx.iter().map(|&i| time[i]).collect::<Vec<_>>(),
            &idx.iter().map(|&i| event[i]).collect::<Vec<_>>(),
        )
    };
    let (log_rank_chi2, log_rank_p) = wsimil_common::survival::log_rank(&time, &event, &high);
    let censoring = wsimil_common::survival::censoring_survival(&time, &event);
    let mut event_times: Vec<f64> = (0..time.len()).filter(|&i| event[i]).map(|i| time[i]).collect();
    event_times.sort_by(f64::total_cmp);
    let td_auc = [0.25, 0.5, 0.75]
        .iter()
        .filter(|_| !event_times.is_empty())
        .map(|q| {
            let t = event_times[((event_times.len() - 1) as f64 * q).round() as usize];
            (t, wsimil_common::survival::cumulative_dynamic_auc(&risk, &time, &event, t, &censoring))
        })
        .collect();
    let survival = SurvivalMetrics {
        slides: known.len(),
        events: event.iter().filter(|e| **e).count(),
        c_index: wsimil_common::survival::concordance_ci(&risk, &time, &event, 1000, 0),
        c_index_folds: mean_sd(&per_fold.iter().flatten().copied().collect::<Vec<_>>()),
        per_fold,
        high: group(true),
        low: group(false),
        log_rank_chi2,
        log_rank_p,
        td_auc,
    };
    let failures = read_failures(store, &layout::failures_prefix(&plan.run)).await?;
    let metrics = RoundMetrics {
        run: plan.run.clone(),
        round,
        classes: Vec::new(),
        slides: plan.slides.len(),
        predicted: rows.len(),
        pooled: None,
        per_fold: vec![None; plan.folds.len()],
        auc: None,
        accuracy: None,
        balanced_accuracy: None,
        f1: None,
        failures,
        instance: None,
        survival: Some(survival),
        patients: PatientMetrics::survival(plan, &rows),
    };
    let table = SurvivalTable {
        csv: layout::predictions_csv(&plan.run, round),
        parquet: layout::predictions_parquet(&plan.run, round),
        folds: true,
        provenance: serde_json::json!({"run": plan.run, "round": round, "kind": "out-of-fold survival risks"}),
    };
    table.write(store, &rows).await?;
    store.put_json(&layout::round_metrics(&plan.run, round), &metrics).await?;
    Ok(metrics)
}

#[derive(Debug, Clone)]
pub struct StageReport {
    pub round: u32,
    pub kind: JobKind,
    /// How the report names it: the kind, with its round after round 0, or `final`.
    pub label: String,
    pub planned: usize,
    pub outcome: StageOutcome,
}

pub struct RunSummary {
    pub plan: RunPlan,
    pub stages: Vec<StageReport>,
    /// Every round's metrics, in order (round 0, then each ICMIL round); none when the run stopped
    /// before predicting (`--until`).
    pub rounds: Vec<RoundMetrics>,
}

impl RunSummary {
    /// The last round's metrics.
    pub fn metrics(&self) -> Option<&RoundMetrics> {
        self.rounds.last()
    }
}

/// The failed jobs' records under `prefix` (`runs/<run>/failures`, `applied/<name>/failures`).
pub(crate) async fn read_failures(
    store: &Store,
    prefix: &object_store::path::Path,
) -> anyhow::Result<Vec<FailureRecord>> {
    let mut failures = Vec::new();
    for key in store.list(prefix).await? {
        failures.push(store.get_json::<FailureRecord>(&key).await?);
    }
    Ok(failures)
}

/// Each failed job's record under `prefix` (`runs/<run>/failures`, `applied/<name>/failures`); a
/// job that succeeded this time clears its old one.
pub(crate) async fn record_failures(
    store: &Store,
    prefix: &object_store::path::Path,
    jobs: &[Job],
    outcome: &StageOutcome,
) -> anyhow::Result<()> {
    let key = |job: &wsimil_common::ids::JobId| object_store::path::Path::from(format!("{prefix}/{job}.json"));
    for f in &outcome.failed {
        store.put_json(&key(&f.job), f).await?;
    }
    for j in jobs {
        if !outcome.failed.iter().any(|f| f.job == j.id()) {
            store.delete(&key(&j.id())).await?;
        }
    }
    Ok(())
}

async fn stage(
    store: &Store,
    d: &dyn Dispatcher,
    plan: &RunPlan,
    round: u32,
    kind: JobKind,
    jobs: Vec<Job>,
) -> anyhow::Result<StageReport> {
    let label = if round == 0 { kind.as_str().to_string() } else { format!("r{round} {kind}") };
    run_stage(store, d, plan, round, kind, label, jobs).await
}

async fn run_stage(
    store: &Store,
    d: &dyn Dispatcher,
    plan: &RunPlan,
    round: u32,
    kind: JobKind,
    label: String,
    jobs: Vec<Job>,
) -> anyhow::Result<StageReport> {
    let planned = jobs.len();
    wsimil_common::telemetry::telemetry().planned(kind.as_str(), planned);
    d.progress(RunProgress::new(&plan.run, round, plan.icmil_rounds(), &label)).await;
    if planned == 0 {
        eprintln!("  {label:<8} nothing to do");
        return Ok(StageReport { round, kind, label, planned, outcome: StageOutcome::default() });
    }
    if round > 0 {
        eprintln!("round {round} of {}: {}", plan.icmil_rounds(), kind.as_str());
    }
    let outcome = d.run_stage(kind, jobs.clone()).await?;
    record_failures(store, &layout::failures_prefix(&plan.run), &jobs, &outcome).await?;
    Ok(StageReport { round, kind, label, planned, outcome })
}

fn round_suffix(round: u32) -> String {
    if round == 0 {
        String::new()
    } else {
        format!(" (round {round})")
    }
}

/// The stages of one round, in order: round 0 tiles, embeds, trains and predicts; an ICMIL round
/// fine-tunes (then merges) before it embeds.
fn round_stages(round: u32) -> &'static [JobKind] {
    if round == 0 {
        &[JobKind::Tile, JobKind::Embed, JobKind::Train, JobKind::Predict]
    } else {
        &[JobKind::Finetune, JobKind::Embed, JobKind::Train, JobKind::Predict]
    }
}

/// Run round 0's stages up to and including `until`, then (when `until` is the last stage) every
/// ICMIL round of the plan; summarise each round that predicted; then, with `final_model`, train
/// the model on every slide (round 0's features, the folds' median best epoch).
pub async fn run(
    store: &Store,
    dispatcher: &dyn Dispatcher,
    plan: &RunPlan,
    until: JobKind,
    final_model: bool,
) -> anyhow::Result<RunSummary> {
    let mut stages = Vec::new();
    let mut rounds = Vec::new();
    let last_round = if until == JobKind::Predict { plan.icmil_rounds() } else { 0 };
    for round in 0..=last_round {
        for &kind in round_stages(round) {
            let jobs = match kind {
                JobKind::Tile => planner::tile_jobs(store, plan).await?,
                JobKind::Embed => planner::embed_jobs(store, plan, round).await?,
                JobKind::Train => planner::train_jobs(store, plan, round).await?,
                JobKind::Predict => planner::predict_jobs(store, plan, round).await?,
                JobKind::Finetune => planner::finetune_jobs(store, plan, round).await?,
                JobKind::Score => Vec::new(), // applications only (crate::apply)
            };
            let report = stage(store, dispatcher, plan, round, kind, jobs).await?;
            let failed: Vec<&FailureRecord> = report.outcome.failed.iter().collect();
            if kind == JobKind::Train && failed.len() == plan.folds.len() {
                bail!(
                    "no fold could be trained{}: {}",
                    round_suffix(round),
                    failed.iter().map(|f| f.reason.clone()).collect::<Vec<_>>().join("; ")
                );
            }
            stages.push(report);
            if kind == JobKind::Finetune {
                for k in 0..plan.folds.len() as u32 {
                    crate::icmil::merge(store, plan, round, k).await?;
                }
            }
            if round == 0 && kind == until {
                break;
            }
        }
        if until == JobKind::Predict {
            rounds.push(summarise(store, plan, round).await?);
            // The page is a view of what the store holds: failing to draw it loses nothing.
            if let Err(e) = crate::report::write_run_report(store, &plan.run).await {
                tracing::warn!("run {}: report.html not written: {e:#}", plan.run);
            }
        }
    }
    if final_model && until == JobKind::Predict {
        let mut jobs = Vec::new();
        if !store.exists(&layout::final_metrics(&plan.run, 0)).await? {
            jobs.push(Job::TrainFinal(wsimil_common::job::FinalJob { run: plan.run.clone(), round: 0 }));
        }
        let report = run_stage(store, dispatcher, plan, 0, JobKind::Train, "final".into(), jobs).await?;
        if let Some(f) = report.outcome.failed.first() {
            bail!("the final model could not be trained: {}", f.reason);
        }
        stages.push(report);
    }
    dispatcher.progress(RunProgress::new(&plan.run, last_round, plan.icmil_rounds(), "done")).await;
    Ok(RunSummary { plan: plan.clone(), stages, rounds })
}

/// Gather fold reports into out-of-fold predictions (Parquet and CSV) and the round's metrics.
pub async fn summarise(store: &Store, plan: &RunPlan, round: u32) -> anyhow::Result<RoundMetrics> {
    if plan.task.survival().is_some() {
        return summarise_survival(store, plan, round).await;
    }
    let n_classes = plan.classes.len();
    let mut rows: Vec<Prediction> = Vec::new();
    let mut per_fold = Vec::new();
    for (k, report) in fold_reports(store, plan, round).await?.into_iter().enumerate() {
        let k = k as u32;
        let Some(report) = report else {
            per_fold.push(None);
            continue;
        };
        per_fold.push(report.test);
        rows.extend(report.predictions.iter().map(|p| Prediction::out_of_fold(p, k)));
    }
    rows.sort_by(|a, b| a.slide.cmp(&b.slide));
    let probs: Vec<Vec<f64>> = rows.iter().map(|r| r.probs.clone()).collect();
    let labels: Vec<usize> = rows.iter().map(|r| r.label.expect("out-of-fold rows are labelled")).collect();
    let pooled = (!rows.is_empty()).then(|| evaluate(&probs, &labels, n_classes));
    let folds: Vec<&Metrics> = per_fold.iter().flatten().collect();
    let collect = |f: &dyn Fn(&Metrics) -> Option<f64>| mean_sd(&folds.iter().filter_map(|m| f(m)).collect::<Vec<_>>());
    let failures = read_failures(store, &layout::failures_prefix(&plan.run)).await?;
    // The instance-level figures from the attention maps of the slides with truth, one at a time.
    let mut instance = wsimil_common::truth::InstanceFigures::default();
    for s in plan.slides.iter().filter(|s| s.truth.is_some()) {
        let key = layout::attention(&plan.run, round, &s.id);
        if store.exists(&key).await? {
            instance.add(&AttentionMap::from_parquet(key.as_ref(), store.get(&key).await?)?);
        }
    }
    let metrics = RoundMetrics {
        instance: instance.finish(),
        run: plan.run.clone(),
        round,
        classes: plan.classes.clone(),
        slides: plan.slides.len(),
        predicted: rows.len(),
        pooled,
        auc: collect(&|m| m.auc),
        accuracy: collect(&|m| Some(m.accuracy)),
        balanced_accuracy: collect(&|m| Some(m.balanced_accuracy)),
        f1: collect(&|m| Some(m.f1)),
        patients: PatientMetrics::classes(plan, &rows),
        per_fold,
        failures,
        survival: None,
    };
    let table = Table {
        csv: layout::predictions_csv(&plan.run, round),
        parquet: layout::predictions_parquet(&plan.run, round),
        classes: &plan.classes,
        folds: true,
        provenance: serde_json::json!({"run": plan.run, "round": round, "kind": "out-of-fold predictions"}),
    };
    table.write(store, &rows).await?;
    store.put_json(&layout::round_metrics(&plan.run, round), &metrics).await?;
    Ok(metrics)
}

fn fmt_opt(m: Option<f64>) -> String {
    m.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
}

/// The end-of-run report a person reads.
pub fn render_summary(s: &RunSummary, store: &Store) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\nrun {}: {} slides, {}, {} fold{}\n",
        s.plan.run,
        s.plan.slides.len(),
        match s.plan.task.survival() {
            Some(c) => format!(
                "survival ({} loss)",
                if c.loss == wsimil_common::plan::SurvivalLoss::Cox { "Cox" } else { "discrete-time NLL" }
            ),
            None => format!("classes {}", s.plan.classes.join("/")),
        },
        s.plan.folds.len(),
        if s.plan.folds.len() == 1 { "" } else { "s" }
    ));
    for st in &s.stages {
        let o = &st.outcome;
        let name = &st.label;
        out.push_str(&format!(
            "  {:<11} {:>4} planned, {:>4} computed, {:>4} already done, {:>3} failed  {:>7.1} s\n",
            name,
            st.planned,
            o.computed,
            o.already_done,
            o.failed.len(),
            o.seconds
        ));
    }
    let Some(m) = s.metrics() else {
        let last = s.stages.last().map_or("plan", |st| st.kind.as_str());
        out.push_str(&format!("stopped after {last} (--until); run again without it to continue\n"));
        for st in &s.stages {
            for f in &st.outcome.failed {
                out.push_str(&format!(
                    "  failed {} {}: {}\n",
                    f.kind,
                    f.slide.as_ref().map(|s| s.to_string()).unwrap_or_else(|| f.job.to_string()),
                    f.reason
                ));
            }
        }
        return out;
    };
    if let Some(sv) = &m.survival {
        let e = |e: &Estimate| format!("{:.3} (95% CI {:.3}–{:.3})", e.value, e.ci95.0, e.ci95.1);
        out.push_str(&format!(
            "survival, out-of-fold ({} slides, {} events): C-index {}\n",
            sv.slides,
            sv.events,
            sv.c_index.as_ref().map(e).unwrap_or_else(|| "n/a".into())
        ));
        out.push_str(&format!(
            "per fold (mean ± sd): C-index {}\n",
            sv.c_index_folds.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into())
        ));
        if !sv.td_auc.is_empty() {
            let at: Vec<String> = sv.td_auc.iter().map(|(t, a)| format!("{} at t = {t}", fmt_opt(*a))).collect();
            out.push_str(&format!("time-dependent AUC (cumulative/dynamic, IPCW): {}\n", at.join(", ")));
        }
        let med = |g: &RiskGroup| g.median_survival.map_or("not reached".into(), |t| format!("{t}"));
        out.push_str(&format!(
            "risk groups (split at each fold's training median): high {} slides, {} events, median survival {}; low {} slides, {} events, median survival {}; log-rank p = {:.3e}\n",
            sv.high.slides,
            sv.high.events,
            med(&sv.high),
            sv.low.slides,
            sv.low.events,
            med(&sv.low),
            sv.log_rank_p
        ));
    }
    if let Some(p) = &m.pooled {
        out.push_str(&format!(
            "cohort, out-of-fold ({} slides): AUC {}  accuracy {:.3}  balanced accuracy {:.3}  F1 {:.3}\n",
            m.predicted,
            fmt_opt(p.auc),
            p.accuracy,
            p.balanced_accuracy,
            p.f1
        ));
    }
    let ms = |x: &Option<MeanSd>| x.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into());
    if m.survival.is_none() {
        out.push_str(&format!(
            "per fold (mean ± sd): AUC {}  accuracy {}  balanced accuracy {}\n",
            ms(&m.auc),
            ms(&m.accuracy),
            ms(&m.balanced_accuracy)
        ));
    }
    if let Some(p) = &m.patients {
        out.push_str(&format!("{}\n", p.describe()));
    }
    if let Some(i) = &m.instance {
        out.push_str(&format!(
            "instance level ({} slides with truth, {} patches, {} lesion): instance-path AUC {}  attention AUC {}\n",
            i.slides,
            i.patches,
            i.lesion_patches,
            fmt_opt(i.instance_auc),
            fmt_opt(i.attention_auc)
        ));
    }
    if s.rounds.len() > 1 {
        out.push_str("ICMIL rounds, side by side (out-of-fold, pooled | per fold mean ± sd):\n");
        for r in &s.rounds {
            let (auc, acc, bacc) = r
                .pooled
                .as_ref()
                .map_or(("n/a".into(), f64::NAN, f64::NAN), |p| (fmt_opt(p.auc), p.accuracy, p.balanced_accuracy));
            let instance = r.instance.map_or(String::new(), |i| {
                format!(" | instance AUC {} attention AUC {}", fmt_opt(i.instance_auc), fmt_opt(i.attention_auc))
            });
            out.push_str(&format!(
                "  round {}: AUC {auc}  accuracy {acc:.3}  balanced accuracy {bacc:.3} | AUC {}{instance}\n",
                r.round,
                ms(&r.auc)
            ));
        }
    }
    if !m.failures.is_empty() {
        out.push_str(&format!("{} job(s) failed:\n", m.failures.len()));
        for f in &m.failures {
            out.push_str(&format!(
                "  {} {}: {}\n",
                f.kind,
                f.slide.as_ref().map(|s| s.to_string()).unwrap_or_else(|| f.job.to_string()),
                f.reason
            ));
        }
    }
    let where_ = |key: &object_store::path::Path| {
        store
            .local_path(key)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("{}/{}", store.location(), key))
    };
    out.push_str(&format!("predictions: {}\n", where_(&layout::predictions_csv(&m.run, m.round))));
    out.push_str(&format!("metrics:     {}\n", where_(&layout::round_metrics(&m.run, m.round))));
    out.push_str(&format!("report:      {}\n", where_(&layout::run_report(&m.run))));
    if s.plan.imported.is_none() {
        // Imported bags have no slide geometry to draw attention on.
        let heat = layout::round_dir(&m.run, m.round);
        out.push_str(&format!("heatmaps:    {}/heatmaps/\n", where_(&object_store::path::Path::from(heat))));
    }
    out
}
