//! Applying a trained model to new slides (`wsimil predict`): external validation and deployment.
//!
//! A model ([`ModelCard`]) is a run's fold models (an ensemble: their class probabilities are
//! averaged), one fold's model, a run's final model (`--final-model`), a folder written by
//! `wsimil export-model` (from any store or machine), or a checkpoint trained elsewhere
//! (`wsimil import-model`). Whatever its source, it is registered in the store once under
//! `models/<id>/` with every member's weights, so workers read it from there.
//!
//! An application ([`ApplyPlan`], `applied/<name>/`) tiles the new slides with the model's tiling
//! and embeds them with its members' embedders (what the store already holds is reused: the keys
//! are content-addressed), scores each slide (a `score` job: probabilities, attention, heatmap),
//! and summarises: predictions as Parquet and CSV and, when the manifest has labels, metrics with
//! bootstrap 95% confidence intervals. Embedded and `--nats` alike, through the same dispatcher.

use crate::dispatch::{Dispatcher, StageOutcome};
use crate::manifest::{self, Purpose};
use crate::planner::{self, SlideRef};
use crate::predictions::{Prediction, SurvivalRow, SurvivalTable, Table};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use wsimil_common::attention::AttentionMap;
use wsimil_common::classifier::{AppliedSlide, ApplyPlan, Member, ModelCard, ModelId, ModelSource, TrainingSummary};
use wsimil_common::ids::{content_hash, sha256_hex, EmbedderId, RunId};
use wsimil_common::job::{FailureRecord, Job, JobKind, ScoreJob};
use wsimil_common::layout;
use wsimil_common::metrics::{evaluate_ci, MetricsCi};
use wsimil_common::models::zoo::Architecture;
use wsimil_common::plan::RunPlan;
use wsimil_common::records::{EmbedderCard, FinalReport, FoldReport};
use wsimil_common::store::{S3Options, Store};
use wsimil_worker::slide::remote::Buckets;

/// Which of a run's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Members {
    /// Every fold's model of the round, probabilities averaged.
    Folds,
    Fold(u32),
    /// The model trained on every slide (`wsimil run --final-model`).
    Final,
}

/// The model `spec` names, registered in `store`: a folder written by `export-model` (a path with
/// a `model.json`), a model already in the store (`models/<id>/`), or a run of the store as
/// `RUN`, `RUN:fold-K` or `RUN:final`, of its last round unless `round` is given.
pub async fn resolve(store: &Store, spec: &str, round: Option<u32>) -> anyhow::Result<ModelCard> {
    let dir = Path::new(spec);
    if dir.join("model.json").is_file() {
        return import_folder(store, dir).await;
    }
    if let Ok(id) = ModelId::new(spec) {
        if store.exists(&layout::model_card(&id)).await? {
            let bytes = store.get(&layout::model_card(&id)).await?;
            return ModelCard::parse(&bytes).map_err(|e| anyhow::anyhow!("model {id}: {e}"));
        }
    }
    let (run, which) = match spec.split_once(':') {
        None => (spec, Members::Folds),
        Some((run, "final")) => (run, Members::Final),
        Some((run, fold)) => {
            let k = fold
                .strip_prefix("fold-")
                .and_then(|k| k.parse().ok())
                .with_context(|| format!("--model {spec}: after the run, :fold-K or :final (e.g. {run}:fold-0)"))?;
            (run, Members::Fold(k))
        }
    };
    let run = RunId::new(run).with_context(|| format!("--model {spec}"))?;
    let key = layout::run_plan(&run);
    if !store.exists(&key).await? {
        bail!(
            "--model {spec}: no model folder at that path (with a model.json), no model {spec} and no run {run} in {}",
            store.location()
        );
    }
    let plan: RunPlan = store.get_json(&key).await?;
    let round = round.unwrap_or(if which == Members::Final { 0 } else { plan.icmil_rounds() });
    from_run(store, &plan, round, which).await
}

/// A run's model, registered under `models/<id>/`.
pub async fn from_run(store: &Store, plan: &RunPlan, round: u32, which: Members) -> anyhow::Result<ModelCard> {
    let folds: Vec<u32> = match which {
        Members::Folds => (0..plan.folds.len() as u32).collect(),
        Members::Fold(k) if (k as usize) < plan.folds.len() => vec![k],
        Members::Fold(k) => bail!("run {} has {} folds: no fold {k}", plan.run, plan.folds.len()),
        Members::Final => Vec::new(),
    };
    let mut members = Vec::new();
    let mut weights = Vec::new();
    for k in folds {
        let key = layout::fold_metrics(&plan.run, round, k);
        if !store.exists(&key).await? {
            bail!(
                "run {} round {round}: fold {k} is not trained ({key} is missing); run it to the end first",
                plan.run
            );
        }
        let report: FoldReport = store.get_json(&key).await?;
        let bytes = store.get(&layout::fold_model(&plan.run, round, k)).await?;
        let embedder = plan.fold_embedder(store, round, k).await?;
        members.push(Member {
            name: format!("fold-{k}"),
            config: report.model,
            weights_sha256: sha256_hex(&bytes),
            embedder,
        });
        weights.push(bytes);
    }
    let mut epochs = None;
    if which == Members::Final {
        if round != 0 {
            bail!("run {}: the final model is trained on round 0's features, not round {round}'s", plan.run);
        }
        let key = layout::final_metrics(&plan.run, 0);
        if !store.exists(&key).await? {
            bail!("run {} has no final model: run it again with --final-model", plan.run);
        }
        let report: FinalReport = store.get_json(&key).await?;
        let bytes = store.get(&layout::final_model(&plan.run, 0)).await?;
        epochs = Some(report.epochs);
        members.push(Member {
            name: "final".into(),
            config: report.model,
            weights_sha256: sha256_hex(&bytes),
            embedder: plan.embedder.clone(),
        });
        weights.push(bytes);
    }
    let cv: Option<crate::run::RoundMetrics> = store.get_json(&layout::round_metrics(&plan.run, round)).await.ok();
    let per_class = (0..plan.classes.len()).map(|c| plan.slides.iter().filter(|s| s.label == c).count()).collect();
    let training = TrainingSummary {
        slides: plan.slides.len(),
        per_class,
        cv_auc_mean: cv.as_ref().and_then(|m| m.auc.map(|a| a.mean)),
        cv_auc_sd: cv.as_ref().and_then(|m| m.auc.map(|a| a.sd)),
        cv_auc_pooled: cv.as_ref().and_then(|m| m.pooled.as_ref().and_then(|p| p.auc)),
        epochs,
    };
    let what = match which {
        Members::Folds => "folds".to_string(),
        Members::Fold(k) => format!("fold-{k}"),
        Members::Final => "final".into(),
    };
    let source = ModelSource::Run { run: plan.run.clone(), round, members: what.clone() };
    let hint = format!("{}-r{round}-{what}", plan.run);
    let card = ModelCard::new(&hint, plan.classes.clone(), members, plan.tiling.clone(), source, Some(training))
        .with_head(plan.task.head());
    register(store, &card, weights).await?;
    Ok(card)
}

/// Put a model's members and card under `models/<id>/` unless already there.
pub async fn register(store: &Store, card: &ModelCard, weights: Vec<bytes::Bytes>) -> anyhow::Result<()> {
    if store.exists(&layout::model_card(&card.id)).await? {
        return Ok(());
    }
    for (m, bytes) in card.members.iter().zip(weights) {
        store.put(&layout::model_member(&card.id, &m.name), bytes).await?;
    }
    // The card last: its presence means the model is whole.
    store.put_json(&layout::model_card(&card.id), card).await?;
    Ok(())
}

/// Write `card`'s model as a self-contained folder: `model.json`, each member's safetensors, and
/// the embedders' weights and cards under `embedders/` (so that the folder alone applies anywhere).
pub async fn export(store: &Store, card: &ModelCard, out: &Path) -> anyhow::Result<()> {
    let io = |what: &Path| format!("{}: cannot write", what.display());
    std::fs::create_dir_all(out.join("embedders")).with_context(|| io(out))?;
    for m in &card.members {
        let bytes = store.get(&layout::model_member(&card.id, &m.name)).await?;
        let p = out.join(format!("{}.safetensors", m.name));
        std::fs::write(&p, &bytes).with_context(|| io(&p))?;
    }
    for e in card.embedders() {
        if !e.weights.stored() || e.architecture == Architecture::Imported {
            continue; // nothing to carry: seeded random weights, or features imported by name
        }
        let id = e.id();
        let weights = store.get(&layout::embedder_weights(&id)).await?;
        let p = out.join(format!("embedders/{id}.safetensors"));
        std::fs::write(&p, &weights).with_context(|| io(&p))?;
        if let Ok(c) = store.get(&layout::embedder_card(&id)).await {
            let p = out.join(format!("embedders/{id}.json"));
            std::fs::write(&p, &c).with_context(|| io(&p))?;
        }
    }
    let p = out.join("model.json");
    std::fs::write(&p, serde_json::to_vec_pretty(card)?).with_context(|| io(&p))?;
    Ok(())
}

/// Register a folder written by [`export`] (or `import-model`) in `store`: its card checked, every
/// member's weights checked against the SHA-256 the card records, its embedders' weights put under
/// their content addresses.
pub async fn import_folder(store: &Store, dir: &Path) -> anyhow::Result<ModelCard> {
    let path = dir.join("model.json");
    let card = ModelCard::parse(&std::fs::read(&path).with_context(|| format!("{}", path.display()))?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut weights = Vec::new();
    for m in &card.members {
        let p = dir.join(format!("{}.safetensors", m.name));
        let bytes =
            std::fs::read(&p).with_context(|| format!("{}: the model's member {} is missing", p.display(), m.name))?;
        if sha256_hex(&bytes) != m.weights_sha256 {
            bail!("{}: its SHA-256 is not the one model.json records (a damaged or replaced file)", p.display());
        }
        weights.push(bytes::Bytes::from(bytes));
    }
    for e in card.embedders() {
        if !e.weights.stored() || e.architecture == Architecture::Imported {
            continue;
        }
        let id = e.id();
        if store.exists(&layout::embedder_weights(&id)).await? {
            continue;
        }
        let p = dir.join(format!("embedders/{id}.safetensors"));
        let bytes =
            std::fs::read(&p).with_context(|| format!("{}: the model's embedder {id} is missing", p.display()))?;
        store.put(&layout::embedder_weights(&id), bytes).await?;
        let cp = dir.join(format!("embedders/{id}.json"));
        let embedder_card = match std::fs::read(&cp) {
            Ok(c) => serde_json::from_slice::<EmbedderCard>(&c).with_context(|| format!("{}", cp.display()))?,
            Err(_) => EmbedderCard {
                id: id.clone(),
                architecture: e.architecture.to_string(),
                weights_sha256: e.weights.to_string(),
                source: Some(p.display().to_string()),
                parent: None,
                lineage: None,
                output: None,
                feature_dim: None,
                wsimil_version: None,
            },
        };
        store.put_json(&layout::embedder_card(&id), &embedder_card).await?;
    }
    register(store, &card, weights).await?;
    Ok(card)
}

/// What `wsimil predict` is asked to do.
#[derive(Debug, Clone)]
pub struct ApplySettings {
    /// The new cohort: slide_id,path[,label][,mpp].
    pub manifest: PathBuf,
    /// The application's name (default: derived from the model and the cohort, so re-running
    /// resumes).
    pub name: Option<RunId>,
    /// Score features imported under this name (`import-bags`, `import-clam`) instead of slides.
    pub features: Option<EmbedderId>,
    /// How `s3://` slides and manifests are reached (the store's S3 settings).
    pub s3: S3Options,
}

/// The name features were imported under, for an embedder that stands for imported features.
fn imported_name(e: &wsimil_common::plan::EmbedderSpec) -> Option<&str> {
    match (&e.architecture, &e.weights) {
        (Architecture::Imported, wsimil_common::plan::WeightsRef::Imported(name)) => Some(name),
        _ => None,
    }
}

/// Check the cohort against the model and write (or check) the application's plan. Refused, each
/// naming what differs: labels the model does not know (every one at once, with its line),
/// imported features that are not the ones the model was trained on.
pub async fn prepare(store: &Store, card: &ModelCard, settings: &ApplySettings) -> anyhow::Result<ApplyPlan> {
    let buckets = Buckets::new(settings.s3.clone());
    // A survival model has no classes for labels to name: its cohort's follow-up is what judges it.
    let classes = card.head.is_classes().then_some(card.classes.as_slice());
    let m = manifest::load_for(&settings.manifest, classes, Purpose::Prediction, &buckets).await?;
    let embedders = card.embedders();
    match &settings.features {
        Some(name) => {
            // A model trained on imported features names them by the name they were imported under.
            let theirs = embedders.iter().find(|e| imported_name(e) == Some(name.as_str()));
            if theirs.is_none() || embedders.len() != 1 {
                bail!(
                    "--features {name}: model {} was trained on features from {}, not on {name}; its features must come from the embedder and tiling it was trained with",
                    card.id,
                    embedders.iter().map(|e| imported_name(e).map_or(e.id().to_string(), String::from)).collect::<Vec<_>>().join(", ")
                );
            }
        }
        None => {
            if let Some(name) = embedders.iter().find_map(|e| imported_name(e)) {
                bail!(
                    "model {} was trained on features imported as {name} (no embedder to embed slides with): score features imported the same way with --features {name}",
                    card.id,
                );
            }
            for e in &embedders {
                if e.weights.stored() && !store.exists(&layout::embedder_weights(&e.id())).await? {
                    bail!("model {}: its embedder {} is not in {} (export the model with its embedders: wsimil export-model)", card.id, e.id(), store.location());
                }
            }
        }
    }
    let slides: Vec<AppliedSlide> = m
        .rows
        .iter()
        .map(|r| AppliedSlide {
            id: r.slide.clone(),
            path: r.path.display().to_string(),
            label: if card.head.is_classes() { r.label.as_deref().map(|l| m.class_index(l)) } else { None },
            mpp: r.mpp,
            survival: r.survival,
            patient: r.patient.clone(),
        })
        .collect();
    if settings.features.is_none() {
        let refs: Vec<SlideRef> = slides.iter().map(|s| SlideRef { id: &s.id, path: &s.path, mpp: s.mpp }).collect();
        planner::check_slide_identity(store, &card.tiling, &refs).await?;
    }
    let name = match &settings.name {
        Some(n) => n.clone(),
        None => {
            let key = serde_json::to_vec(&(&card.id, &slides, &settings.features))?;
            RunId::new(format!("apply-{}", content_hash([key.as_slice()]))).expect("safe")
        }
    };
    let plan = ApplyPlan {
        name: name.clone(),
        model: card.id.clone(),
        classes: card.classes.clone(),
        slides,
        tiling: card.tiling.clone(),
        embedders,
        imported: settings.features.clone(),
        head: card.head,
    };
    let key = layout::applied_plan(&name);
    if store.exists(&key).await? {
        let existing: ApplyPlan = store.get_json(&key).await?;
        if existing != plan {
            bail!(
                "application {name} already exists with another model or cohort; name another --name or remove {key}"
            );
        }
    } else {
        store.put_json(&key, &plan).await?;
    }
    Ok(plan)
}

/// What an application found, written to `applied/<name>/metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyMetrics {
    pub name: RunId,
    pub model: ModelId,
    pub classes: Vec<String>,
    pub slides: usize,
    pub predicted: usize,
    /// Predicted slides with a label.
    pub labelled: usize,
    /// Over the labelled slides, with bootstrap 95% CIs (1,000 resamples).
    pub metrics: Option<MetricsCi>,
    pub failures: Vec<FailureRecord>,
    /// A survival model on slides with follow-up: Harrell's C-index with its 95% bootstrap interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c_index: Option<wsimil_common::metrics::Estimate>,
    /// Slides with follow-up, and of them with the event.
    #[serde(default)]
    pub followed: usize,
    #[serde(default)]
    pub events: usize,
    /// Where the manifest names patients: the figures over the patients' pooled predictions
    /// (their slides' mean probabilities or risks; `patients.csv` lists them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients: Option<crate::run::PatientMetrics>,
}

pub struct ApplySummary {
    pub plan: ApplyPlan,
    pub card: ModelCard,
    pub stages: Vec<crate::run::StageReport>,
    pub metrics: ApplyMetrics,
}

/// Tile, embed and score the application's slides (what is done is not done again), then summarise.
pub async fn apply(
    store: &Store,
    d: &dyn Dispatcher,
    plan: &ApplyPlan,
    card: &ModelCard,
) -> anyhow::Result<ApplySummary> {
    let slides: Vec<SlideRef> = plan.slides.iter().map(|s| SlideRef { id: &s.id, path: &s.path, mpp: s.mpp }).collect();
    let mut stages = Vec::new();
    let kinds: &[JobKind] =
        if plan.imported.is_some() { &[JobKind::Score] } else { &[JobKind::Tile, JobKind::Embed, JobKind::Score] };
    for &kind in kinds {
        let jobs = match kind {
            JobKind::Tile => planner::tile_jobs_for(store, &slides, &plan.tiling).await?,
            JobKind::Embed => planner::embed_jobs_for(store, &slides, &plan.tiling, &plan.embedders, true).await?,
            _ => score_jobs(store, plan).await?,
        };
        let planned = jobs.len();
        let outcome = if planned == 0 {
            eprintln!("  {:<8} nothing to do", kind.as_str());
            StageOutcome::default()
        } else {
            wsimil_common::telemetry::telemetry().planned(kind.as_str(), planned);
            let o = d.run_stage(kind, jobs.clone()).await?;
            crate::run::record_failures(store, &layout::applied_failures_prefix(&plan.name), &jobs, &o).await?;
            o
        };
        stages.push(crate::run::StageReport { round: 0, kind, label: kind.as_str().into(), planned, outcome });
    }
    let metrics = summarise(store, plan).await?;
    // A view of what the store holds: failing to draw it loses nothing.
    if let Err(e) = crate::report::write_applied_report(store, &plan.name).await {
        tracing::warn!("application {}: report.html not written: {e:#}", plan.name);
    }
    Ok(ApplySummary { plan: plan.clone(), card: card.clone(), stages, metrics })
}

/// Score jobs for slides whose features every member needs are there and that are not scored yet.
async fn score_jobs(store: &Store, plan: &ApplyPlan) -> anyhow::Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for s in &plan.slides {
        let mut ready = true;
        for (emb, tiling) in plan.feature_ids() {
            ready &= store.exists(&layout::features(&emb, &tiling, &s.id)).await?;
        }
        if ready && !store.exists(&layout::applied_attention(&plan.name, &s.id)).await? {
            jobs.push(Job::Score(ScoreJob { app: plan.name.clone(), slide: s.id.clone() }));
        }
    }
    Ok(jobs)
}

/// The application's scored slides with the model's outputs for each (from its attention map's
/// provenance), in the plan's order.
async fn scored<'a>(
    store: &Store,
    plan: &'a ApplyPlan,
) -> anyhow::Result<Vec<(&'a wsimil_common::classifier::AppliedSlide, Vec<f64>)>> {
    let mut out = Vec::new();
    for s in &plan.slides {
        let key = layout::applied_attention(&plan.name, &s.id);
        if store.exists(&key).await? {
            out.push((s, AttentionMap::from_parquet(key.as_ref(), store.get(&key).await?)?.provenance.probs));
        }
    }
    Ok(out)
}

/// Gather the scored slides into predictions (Parquet and CSV) and, over the labelled ones, metrics
/// with bootstrap 95% confidence intervals.
pub async fn summarise(store: &Store, plan: &ApplyPlan) -> anyhow::Result<ApplyMetrics> {
    if !plan.head.is_classes() {
        return summarise_survival(store, plan).await;
    }
    let rows: Vec<Prediction> = scored(store, plan)
        .await?
        .into_iter()
        .map(|(s, probs)| Prediction { slide: s.id.to_string(), label: s.label, fold: None, probs })
        .collect();
    let labelled: Vec<&Prediction> = rows.iter().filter(|r| r.label.is_some()).collect();
    let metrics = (!labelled.is_empty()).then(|| {
        let probs: Vec<Vec<f64>> = labelled.iter().map(|r| r.probs.clone()).collect();
        let labels: Vec<usize> = labelled.iter().map(|r| r.label.expect("labelled")).collect();
        evaluate_ci(&probs, &labels, plan.classes.len(), 1000, 0)
    });
    let patients = (plan.has_patients() && !labelled.is_empty()).then(|| {
        let groups = plan.patient_groups(&labelled.iter().map(|r| r.slide.as_str()).collect::<Vec<_>>());
        crate::run::PatientMetrics::pooled_classes(&groups, &labelled, plan.classes.len())
    });
    if plan.has_patients() {
        let all: Vec<&Prediction> = rows.iter().collect();
        let groups = plan.patient_groups(&all.iter().map(|r| r.slide.as_str()).collect::<Vec<_>>());
        let mut csv = format!(
            "patient,slides,label,{}\n",
            plan.classes.iter().map(|c| format!("prob_{c}")).collect::<Vec<_>>().join(",")
        );
        for g in &groups {
            let label = all[g[0]].label.map(|l| plan.classes[l].clone()).unwrap_or_default();
            let probs: Vec<String> = crate::run::mean_probs(g, &all).iter().map(|p| format!("{p:.6}")).collect();
            csv.push_str(&format!(
                "{},{},{label},{}\n",
                patient_name(plan, &all[g[0]].slide),
                g.len(),
                probs.join(",")
            ));
        }
        store.put(&layout::applied_patients_csv(&plan.name), csv.into_bytes()).await?;
    }
    let failures = crate::run::read_failures(store, &layout::applied_failures_prefix(&plan.name)).await?;
    let m = ApplyMetrics {
        name: plan.name.clone(),
        model: plan.model.clone(),
        classes: plan.classes.clone(),
        slides: plan.slides.len(),
        predicted: rows.len(),
        labelled: labelled.len(),
        metrics,
        failures,
        c_index: None,
        followed: 0,
        events: 0,
        patients,
    };
    let table = Table {
        csv: layout::applied_predictions_csv(&plan.name),
        parquet: layout::applied_predictions_parquet(&plan.name),
        classes: &plan.classes,
        folds: false,
        provenance: serde_json::json!({"application": plan.name, "model": plan.model, "kind": "predictions of a trained model"}),
    };
    table.write(store, &rows).await?;
    store.put_json(&layout::applied_metrics(&plan.name), &m).await?;
    Ok(m)
}

/// A survival model's application: each slide's risk (the members' outputs averaged, then read),
/// and the C-index over the slides whose follow-up the manifest gives.
async fn summarise_survival(store: &Store, plan: &ApplyPlan) -> anyhow::Result<ApplyMetrics> {
    let rows: Vec<SurvivalRow> = scored(store, plan)
        .await?
        .into_iter()
        .map(|(s, outputs)| SurvivalRow {
            slide: s.id.to_string(),
            fold: None,
            follow_up: s.survival,
            risk: plan.head.risk(&outputs).unwrap_or(f64::NAN),
            high_risk: None,
        })
        .collect();
    let (risk, time, event) = SurvivalRow::columns(&rows);
    let known: Vec<&SurvivalRow> = rows.iter().filter(|r| r.follow_up.is_some()).collect();
    let patients = (plan.has_patients() && !known.is_empty()).then(|| {
        let groups = plan.patient_groups(&known.iter().map(|r| r.slide.as_str()).collect::<Vec<_>>());
        crate::run::PatientMetrics::pooled_risks(&groups, &known)
    });
    if plan.has_patients() {
        let groups = plan.patient_groups(&rows.iter().map(|r| r.slide.as_str()).collect::<Vec<_>>());
        let mut csv = String::from("patient,slides,risk,time,event\n");
        for g in &groups {
            let first = &rows[g[0]];
            let risk = g.iter().map(|&i| rows[i].risk).sum::<f64>() / g.len() as f64;
            let (time, event) =
                first.follow_up.map(|f| (f.time.to_string(), u8::from(f.event).to_string())).unwrap_or_default();
            csv.push_str(&format!("{},{},{risk:.6},{time},{event}\n", patient_name(plan, &first.slide), g.len()));
        }
        store.put(&layout::applied_patients_csv(&plan.name), csv.into_bytes()).await?;
    }
    let failures = crate::run::read_failures(store, &layout::applied_failures_prefix(&plan.name)).await?;
    let m = ApplyMetrics {
        name: plan.name.clone(),
        model: plan.model.clone(),
        classes: plan.classes.clone(),
        slides: plan.slides.len(),
        predicted: rows.len(),
        labelled: 0,
        metrics: None,
        failures,
        c_index: wsimil_common::survival::concordance_ci(&risk, &time, &event, 1000, 0),
        followed: time.len(),
        events: event.iter().filter(|e| **e).count(),
        patients,
    };
    let table = SurvivalTable {
        csv: layout::applied_predictions_csv(&plan.name),
        parquet: layout::applied_predictions_parquet(&plan.name),
        folds: false,
        provenance: serde_json::json!({"application": plan.name, "model": plan.model, "kind": "survival risks of a trained model"}),
    };
    table.write(store, &rows).await?;
    store.put_json(&layout::applied_metrics(&plan.name), &m).await?;
    Ok(m)
}

/// A group's patient as `patients.csv` names it: the manifest's, or the slide's own id for a
/// slide without one.
fn patient_name(plan: &ApplyPlan, slide: &str) -> String {
    plan.patient_of(slide).unwrap_or(slide).to_string()
}

/// The report a person reads.
pub fn render(s: &ApplySummary, store: &Store) -> String {
    let card = &s.card;
    let mut out = format!(
        "\napplication {}: model {} ({}, classes {}) on {} slides\n",
        s.plan.name,
        card.id,
        card.ensemble,
        card.classes.join("/"),
        s.plan.slides.len()
    );
    for st in &s.stages {
        let o = &st.outcome;
        out.push_str(&format!(
            "  {:<11} {:>4} planned, {:>4} computed, {:>4} already done, {:>3} failed  {:>7.1} s\n",
            st.label,
            st.planned,
            o.computed,
            o.already_done,
            o.failed.len(),
            o.seconds
        ));
    }
    let m = &s.metrics;
    match &m.metrics {
        None if !card.head.is_classes() => match &m.c_index {
            Some(c) => out.push_str(&format!(
                "survival ({} slides with follow-up, {} events): C-index {:.3} (95% CI {:.3}–{:.3})\n",
                m.followed, m.events, c.value, c.ci95.0, c.ci95.1
            )),
            None => {
                out.push_str(&format!("{} slides given a risk (no follow-up with an event: no C-index)\n", m.predicted))
            }
        },
        Some(c) => {
            let auc = c.auc.map(|a| a.to_string()).unwrap_or_else(|| "n/a (one class)".into());
            out.push_str(&format!(
                "external validation ({} labelled slides): AUC {auc}\n  accuracy {}  balanced accuracy {}  F1 {}\n",
                m.labelled, c.accuracy, c.balanced_accuracy, c.f1
            ));
        }
        None => out.push_str(&format!("{} slides predicted (no labels: no metrics)\n", m.predicted)),
    }
    if let Some(p) = &m.patients {
        out.push_str(&format!("{}\n", p.describe()));
    }
    for f in &m.failures {
        out.push_str(&format!(
            "  failed {} {}: {}\n",
            f.kind,
            f.slide.as_ref().map(|s| s.to_string()).unwrap_or_else(|| f.job.to_string()),
            f.reason
        ));
    }
    let at = |key: &object_store::path::Path| {
        store.local_path(key).map(|p| p.display().to_string()).unwrap_or_else(|| format!("{}/{key}", store.location()))
    };
    out.push_str(&format!("predictions: {}\n", at(&layout::applied_predictions_csv(&m.name))));
    if s.plan.has_patients() {
        out.push_str(&format!("patients:    {}\n", at(&layout::applied_patients_csv(&m.name))));
    }
    out.push_str(&format!("metrics:     {}\n", at(&layout::applied_metrics(&m.name))));
    out.push_str(&format!("report:      {}\n", at(&layout::applied_report(&m.name))));
    if s.plan.imported.is_none() {
        out.push_str(&format!(
            "heatmaps:    {}/\n",
            at(&object_store::path::Path::from(format!("applied/{}/heatmaps", m.name)))
        ));
    }
    out
}

/// A checkpoint trained elsewhere that `import-model` maps onto a wsimil bag classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// The official TransMIL code's model (github.com/szc19990412/TransMIL, `models/TransMIL.py`):
    /// wsimil's TransMIL has its parameter names; nystrom-attention 0.0.9's row order, as its
    /// requirements pin.
    OfficialTransmil,
    /// CLAM's `CLAM_SB` or `CLAM_MB` (github.com/mahmoodlab/CLAM, `models/model_clam.py`), as its
    /// training saves them: wsimil's CLAM has their parameter names (instance classifiers included).
    Clam,
    /// DSMIL's `MILNet` on features (github.com/binli123/dsmil-wsi, `dsmil.py`: `FCLayer` and
    /// `BClassifier`), as its training saves it: wsimil's DSMIL has its parameter names. One score
    /// stream is a two-class model (class 1's), several are one per class.
    Dsmil,
    /// DTFD-MIL's `best_model.pth` (github.com/hrzhang1123/DTFD-MIL: its four modules' state
    /// dicts under `classifier`, `dim_reduction`, `attention` and `att_classifier`): wsimil's
    /// DTFD-MIL has their names. The file does not say how it distilled: given here.
    Dtfd(wsimil_common::models::dtfd::Distill),
}

/// The state dicts DTFD-MIL's `best_model.pth` holds.
const DTFD_KEYS: [&str; 4] = ["classifier", "dim_reduction", "attention", "att_classifier"];

impl Checkpoint {
    pub fn describe(self) -> &'static str {
        match self {
            Checkpoint::OfficialTransmil => "TransMIL checkpoint (the official code's)",
            Checkpoint::Clam => "CLAM checkpoint (CLAM_SB or CLAM_MB, CLAM's)",
            Checkpoint::Dsmil => "DSMIL checkpoint (MILNet on features, DSMIL's)",
            Checkpoint::Dtfd(_) => "DTFD-MIL checkpoint (best_model.pth, DTFD-MIL's)",
        }
    }
}

/// A checkpoint's tensors renamed to wsimil's, and the configuration its shapes give.
fn map_checkpoint(
    format: Checkpoint,
    tensors: std::collections::BTreeMap<String, candle_core::Tensor>,
) -> anyhow::Result<(wsimil_common::models::BagModelConfig, std::collections::BTreeMap<String, candle_core::Tensor>)> {
    use wsimil_common::models::{
        clam::ClamConfig, dsmil::DsmilConfig, dtfd::DtfdConfig, transmil::TransMilConfig, BagModelConfig,
    };
    // A Lightning module keeps the network as `self.model`.
    let strip = |t: std::collections::BTreeMap<String, candle_core::Tensor>, prefix: &str| {
        if !t.is_empty() && t.keys().all(|k| k.starts_with(prefix)) {
            t.into_iter().map(|(k, v)| (k[prefix.len()..].to_string(), v)).collect()
        } else {
            t
        }
    };
    let tensors = strip(tensors, "model.");
    let dims = |name: &str| -> anyhow::Result<Vec<usize>> {
        Ok(tensors
            .get(name)
            .with_context(|| format!("no tensor {name}: not the state dict of a {}", format.describe()))?
            .dims()
            .to_vec())
    };
    match format {
        Checkpoint::OfficialTransmil => {
            let (fc1, fc2) = (dims("_fc1.0.weight")?, dims("_fc2.weight")?);
            let cfg = BagModelConfig::Transmil(TransMilConfig { dim: fc1[0], ..TransMilConfig::paper(fc1[1], fc2[0]) });
            Ok((cfg, tensors))
        }
        Checkpoint::Clam => {
            // attention_net = [Linear, ReLU, (Dropout,) Attn_Net_Gated]: the gate at 2 or 3; wsimil's
            // CLAM names it as the authors' default (with dropout) does, at 3.
            let gate = if tensors.contains_key("attention_net.3.attention_a.0.weight") { 3 } else { 2 };
            if tensors.keys().any(|k| k.starts_with("attention_net.") && k.contains(".module.")) {
                bail!("a CLAM checkpoint without gated attention (gate=False): only CLAM's default, gated attention, is read");
            }
            let fc = dims("attention_net.0.weight")?;
            let att = dims(&format!("attention_net.{gate}.attention_a.0.weight"))?;
            let branches = dims(&format!("attention_net.{gate}.attention_c.weight"))?[0];
            let multi_branch = tensors.contains_key("classifiers.0.weight");
            let n_classes = if multi_branch { branches } else { dims("classifiers.weight")?[0] };
            let cfg = BagModelConfig::Clam(ClamConfig {
                hidden: fc[0],
                attention: att[0],
                ..ClamConfig::new(fc[1], n_classes, multi_branch)
            });
            let from = format!("attention_net.{gate}.");
            let mapped = tensors
                .into_iter()
                .map(|(k, v)| match k.strip_prefix(&from) {
                    Some(r) => (format!("attention_net.3.{r}"), v),
                    None => (k, v),
                })
                .collect();
            Ok((cfg, mapped))
        }
        Checkpoint::Dsmil => {
            let fcc = dims("b_classifier.fcc.weight")?;
            let q = dims("b_classifier.q.0.weight").or_else(|_| dims("b_classifier.q.weight"))?;
            let streams = fcc[0];
            let cfg = BagModelConfig::Dsmil(DsmilConfig {
                streams,
                query: q[0],
                nonlinear: tensors.contains_key("b_classifier.q.2.weight"),
                passing_v: tensors.contains_key("b_classifier.v.1.weight"),
                ..DsmilConfig::new(fcc[2], if streams == 1 { 2 } else { streams })
            });
            Ok((cfg, tensors))
        }
        Checkpoint::Dtfd(distill) => {
            let fc1 = dims("dim_reduction.fc1.weight")?;
            let res_layers = tensors
                .keys()
                .filter(|k| k.starts_with("dim_reduction.resBlocks.") && k.ends_with(".block.0.weight"))
                .count();
            let cfg = BagModelConfig::Dtfd(DtfdConfig {
                hidden: fc1[0],
                attention: dims("attention.attention_V.0.weight")?[0],
                res_layers,
                distill,
                ..DtfdConfig::new(fc1[1], dims("classifier.fc.weight")?[0])
            });
            Ok((cfg, tensors))
        }
    }
}

/// `wsimil import-model`: a checkpoint trained elsewhere as a model folder. Refused, each naming
/// what differs: a state dict that is not the format's (tensors missing, unexpected or misshaped),
/// classes that are not the checkpoint's count, features of another width than the embedder's.
pub async fn import_checkpoint(
    format: Checkpoint,
    file: &Path,
    classes: &[String],
    embedder: &crate::run::EmbedderChoice,
    tiling: wsimil_common::plan::TilingSpec,
    out: &Path,
) -> anyhow::Result<ModelCard> {
    use wsimil_common::models::params::{safetensors_bytes, Params};
    use wsimil_common::models::weights::{check_shapes, WeightsFile};
    let scratch = Store::memory();
    let spec = crate::run::register_embedder(&scratch, embedder).await?;
    let feature_dim = embedder.architecture.feature_dim().context("imported features have no embedder")?;
    let f = file.to_path_buf();
    let sha = tokio::task::spawn_blocking({
        let f = f.clone();
        move || crate::run::file_sha256(&f)
    })
    .await??;
    let n_classes = classes.len();
    let (config, bytes) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let state = match format {
            Checkpoint::Dtfd(_) => wsimil_common::models::weights::read_torch_nested(&f, &DTFD_KEYS)?,
            _ => WeightsFile::open(&f)?.read(None)?,
        };
        let (config, tensors) = map_checkpoint(format, state)?;
        // What wsimil's model reads, by name and shape, against what the checkpoint holds.
        let p = Params::new(0);
        wsimil_common::models::BagModel::new(&config, p.var_builder(&candle_core::Device::Cpu))?;
        let needed: Vec<wsimil_common::models::vit::TensorSpec> = p
            .named_vars()
            .into_iter()
            .map(|(name, v)| wsimil_common::models::vit::TensorSpec { name, shape: v.dims().to_vec() })
            .collect();
        let shapes = tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
        check_shapes(&f, &shapes, format.describe(), &needed, &|_| false)?;
        Ok((config, safetensors_bytes(&tensors)?))
    })
    .await??;
    if config.n_classes() != n_classes {
        bail!(
            "{}: the checkpoint predicts {} classes; --classes names {n_classes} ({})",
            file.display(),
            config.n_classes(),
            classes.join(", ")
        );
    }
    if config.in_dim() != feature_dim {
        bail!(
            "{}: the checkpoint takes {}-wide features, but {} gives {feature_dim}: its features must come from the embedder it was trained on",
            file.display(),
            config.in_dim(),
            embedder.architecture
        );
    }
    let member = Member { name: "imported".into(), config, weights_sha256: sha256_hex(&bytes), embedder: spec };
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("checkpoint");
    let source =
        ModelSource::Imported { file: file.display().to_string(), sha256: sha, format: format.describe().into() };
    let card = ModelCard::new(&format!("imported-{stem}"), classes.to_vec(), vec![member], tiling, source, None);
    register(&scratch, &card, vec![bytes.into()]).await?;
    export(&scratch, &card, out).await?;
    Ok(card)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::BTreeMap;
    use wsimil_common::models::{BagModel, BagModelConfig, Mode};

    /// CLAM's state dicts as its training saves them (the parity fixture made with the authors'
    /// code): CLAM_MB is told from CLAM_SB by its per-class classifiers, the widths and classes come
    /// from the shapes, and a model built without dropout (its gate at `attention_net.2`) maps too.
    #[test]
    fn clam_checkpoints_map_onto_wsimils_clam_single_and_multi_branch() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../common/tests/fixtures/clam_parity.safetensors");
        let f = wsimil_common::models::params::load_safetensors(&std::fs::read(path).unwrap(), &Device::Cpu).unwrap();
        let state = |name: &str, gate: &str| -> BTreeMap<String, Tensor> {
            let prefix = format!("{name}.param.");
            f.iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.replace("attention_net.3.", gate), v.clone())))
                .collect()
        };
        for (name, classes, multi) in [("sb", 2, false), ("mb", 3, true)] {
            for gate in ["attention_net.3.", "attention_net.2."] {
                let (cfg, mapped) = map_checkpoint(Checkpoint::Clam, state(name, gate)).unwrap();
                let BagModelConfig::Clam(c) = &cfg else { panic!("{cfg:?}") };
                assert_eq!((c.n_classes, c.multi_branch, c.in_dim, c.hidden, c.attention), (classes, multi, 24, 16, 8));
                let p = wsimil_common::models::params::Params::new(0);
                p.preload(mapped).unwrap();
                let m = BagModel::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
                let got = m.forward(&f["bag"], &mut Mode::Eval, false).unwrap().logits;
                let d = (got - &f[&format!("{name}.logits")]).unwrap().abs().unwrap().max_all().unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{name} {gate}");
            }
        }
        let mut gateless = state("sb", "attention_net.3.");
        gateless.retain(|k, _| !k.contains("attention_b"));
        let renamed: BTreeMap<String, Tensor> = gateless
            .into_iter()
            .map(|(k, v)| (k.replace("attention_a.0.", "module.0.").replace("attention_c.", "module.2."), v))
            .collect();
        let err = map_checkpoint(Checkpoint::Clam, renamed).unwrap_err().to_string();
        assert!(err.contains("without gated attention (gate=False)"), "{err}");
    }

    /// DSMIL's state dicts as its training saves them (the parity fixture made with the authors'
    /// code): one score stream is a two-class model, three streams three classes, the value network
    /// and the query width come from the tensors; a CLAM file is not taken for one.
    #[test]
    fn dsmil_checkpoints_map_onto_wsimils_dsmil() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../common/tests/fixtures/dsmil_parity.safetensors");
        let f = wsimil_common::models::params::load_safetensors(&std::fs::read(path).unwrap(), &Device::Cpu).unwrap();
        let bag = f["bag"].unsqueeze(0).unwrap();
        for (name, classes, streams, passing_v) in [("bin", 2, 1, false), ("multi", 3, 3, false), ("passv", 2, 1, true)]
        {
            let prefix = format!("{name}.param.");
            let state: BTreeMap<String, Tensor> =
                f.iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v.clone()))).collect();
            let (cfg, mapped) = map_checkpoint(Checkpoint::Dsmil, state).unwrap();
            let BagModelConfig::Dsmil(c) = &cfg else { panic!("{cfg:?}") };
            assert_eq!(
                (c.n_classes, c.streams, c.in_dim, c.query, c.nonlinear, c.passing_v),
                (classes, streams, 24, 16, true, passing_v)
            );
            let p = wsimil_common::models::params::Params::new(0);
            p.preload(mapped).unwrap();
            let m = BagModel::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
            let out = m.forward(&bag, &mut Mode::Eval, false).unwrap();
            let Some(wsimil_common::models::Aux::Dsmil(state)) = &out.aux else { panic!("{name}") };
            let d = (&state.bag - &f[&format!("{name}.bag")]).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "{name}");
        }
        let clam: BTreeMap<String, Tensor> = f
            .keys()
            .filter(|k| k.starts_with("bin.param."))
            .map(|k| (k.replace("bin.param.b_classifier", "clam"), f[k].clone()))
            .collect();
        let err = map_checkpoint(Checkpoint::Dsmil, clam).unwrap_err().to_string();
        assert!(err.contains("no tensor b_classifier.fcc.weight: not the state dict of a DSMIL checkpoint"), "{err}");
    }
}
