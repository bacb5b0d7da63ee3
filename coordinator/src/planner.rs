//! Planning: turn a manifest and settings into a [`RunPlan`], and each stage into the jobs still
//! to do, given what the store already holds. Re-planning is how a run resumes: finished outputs
//! exist, so their jobs are simply not planned again.

use crate::manifest::{Manifest, Split};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use wsimil_common::ids::{content_hash, EmbedderId, RunId, SlideId};
use wsimil_common::job::{EmbedJob, FinetuneJob, Job, PredictJob, TileJob, TrainJob};
use wsimil_common::layout;
use wsimil_common::plan::{EmbedderSpec, Fold, IcmilConfig, PlannedSlide, RunPlan, Task, TilingSpec, TrainConfig};
use wsimil_common::rng::Rng;
use wsimil_common::store::{Store, StoreError};

/// How slides are split into folds when the manifest does not say.
#[derive(Debug, Clone, Copy)]
pub struct FoldSettings {
    pub k: usize,
    pub seed: u64,
}

/// Folds from the manifest (`fold` or `split` columns) or a seeded, label-stratified k-fold.
///
/// With k folds, fold i tests on its own slides, validates (early stopping) on fold i+1 mod k and
/// trains on the rest; with fewer than 3 folds there is no validation set.
pub fn assign_folds(manifest: &Manifest, settings: FoldSettings) -> Vec<Fold> {
    let ids = |f: &dyn Fn(&crate::manifest::Row) -> bool| -> Vec<SlideId> {
        manifest.rows.iter().filter(|r| f(r)).map(|r| r.slide.clone()).collect()
    };
    if manifest.rows.iter().all(|r| r.split.is_some()) && !manifest.rows.is_empty() {
        return vec![Fold {
            train: ids(&|r| r.split == Some(Split::Train)),
            val: ids(&|r| r.split == Some(Split::Val)),
            test: ids(&|r| r.split == Some(Split::Test)),
        }];
    }
    let fold_of: Vec<usize> = if manifest.rows.iter().all(|r| r.fold.is_some()) && !manifest.rows.is_empty() {
        // Manifest folds, renumbered densely in their sorted order.
        let mut distinct: Vec<u32> = manifest.rows.iter().filter_map(|r| r.fold).collect();
        distinct.sort_unstable();
        distinct.dedup();
        manifest.rows.iter().map(|r| distinct.binary_search(&r.fold.unwrap()).unwrap()).collect()
    } else {
        patient_folds(manifest, settings)
    };
    let k = fold_of.iter().copied().max().map_or(0, |m| m + 1);
    (0..k)
        .map(|i| {
            let val_fold = if k >= 3 { Some((i + 1) % k) } else { None };
            let pick = |pred: &dyn Fn(usize) -> bool| -> Vec<SlideId> {
                manifest.rows.iter().zip(&fold_of).filter(|(_, f)| pred(**f)).map(|(r, _)| r.slide.clone()).collect()
            };
            Fold {
                test: pick(&|f| f == i),
                val: pick(&|f| Some(f) == val_fold),
                train: pick(&|f| f != i && Some(f) != val_fold),
            }
        })
        .collect()
}

/// Folds from CLAM's split files (`create_splits_seq.py`): `splits_<k>.csv` in `dir`, each with the
/// columns `train`, `val`, `test` listing slide ids (pandas writes an unnamed index column first and
/// leaves the shorter columns' ends empty). Folds are ordered by k. Every id must be in the manifest.
pub fn load_clam_splits(dir: &Path, manifest: &Manifest) -> anyhow::Result<Vec<Fold>> {
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the CLAM splits folder", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let k = p.file_name()?.to_str()?.strip_prefix("splits_")?.strip_suffix(".csv")?.parse().ok()?;
            Some((k, p))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no splits_<k>.csv files (CLAM's create_splits_seq.py output)", dir.display());
    }
    let known: std::collections::HashSet<&str> = manifest.rows.iter().map(|r| r.slide.as_str()).collect();
    let mut folds = Vec::new();
    for (_, path) in files {
        let (mut rd, [tr, va, te]) = crate::import::open_csv_columns(&path, ["train", "val", "test"])?;
        let mut fold = Fold { train: Vec::new(), val: Vec::new(), test: Vec::new() };
        for (i, rec) in rd.records().enumerate() {
            let rec = rec.with_context(|| format!("{}:{}", path.display(), i + 2))?;
            for (c, set) in [(tr, &mut fold.train), (va, &mut fold.val), (te, &mut fold.test)] {
                let Some(id) = rec.get(c).map(str::trim).filter(|s| !s.is_empty()) else { continue };
                if !known.contains(id) {
                    bail!("{}:{}: slide {id:?} is not in the manifest", path.display(), i + 2);
                }
                set.push(SlideId::new(id).expect("manifest ids are valid"));
            }
        }
        folds.push(fold);
    }
    Ok(folds)
}

/// The stratified k-fold of the manifest's patients: a patient's slides (the `patient` column; a
/// slide without one is its own patient) are dealt as one, by their shared label, so no patient is
/// in two folds. Without a `patient` column this is [`stratified_folds`] of the slides, unchanged.
///
/// Where the manifest names sites (the `site` column: the lab or scanner a slide comes from, TCGA's
/// tissue source site), each class's patients are dealt site by site, so every fold holds each
/// site's slides of each class in the same share (within one). Otherwise the luck of a small split
/// can give a fold training slides on which a site's stain predicts the label, and test slides on
/// which it predicts the opposite: a classifier that learns the stain is then worse than chance on
/// them (docs/icmil.md, "the stain sites"). Without a `site` column the folds are as they were.
pub fn patient_folds(manifest: &Manifest, settings: FoldSettings) -> Vec<usize> {
    let mut group_of = Vec::with_capacity(manifest.rows.len());
    let mut first: Vec<usize> = Vec::new(); // each group's first row, in order of appearance
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, r) in manifest.rows.iter().enumerate() {
        let g = match r.patient.as_deref() {
            Some(p) => *index.entry(p).or_insert_with(|| {
                first.push(i);
                first.len() - 1
            }),
            None => {
                first.push(i);
                first.len() - 1
            }
        };
        group_of.push(g);
    }
    let labels: Vec<usize> = first.iter().map(|&i| manifest.label_index(&manifest.rows[i])).collect();
    // A patient's site is its first slide's (the manifest refuses a patient's slides that differ).
    let sites: std::collections::BTreeSet<Option<&str>> = manifest.rows.iter().map(|r| r.site.as_deref()).collect();
    let site_of: Vec<usize> = first
        .iter()
        .map(|&i| sites.iter().position(|s| *s == manifest.rows[i].site.as_deref()).expect("a listed site"))
        .collect();
    let fold_of_group = stratified_folds_within(&labels, &site_of, settings);
    group_of.iter().map(|&g| fold_of_group[g]).collect()
}

/// Deal each class's shuffled slides round-robin over k folds (k capped by the smallest class).
pub fn stratified_folds(labels: &[usize], settings: FoldSettings) -> Vec<usize> {
    stratified_folds_within(labels, &vec![0; labels.len()], settings)
}

/// [`stratified_folds`], each class's slides dealt stratum by stratum (`strata[i]`: slide i's site):
/// the round-robin runs on through a class's strata, so each fold gets each (class, stratum) cell's
/// share within one and each class's share as before. One stratum: exactly [`stratified_folds`].
pub fn stratified_folds_within(labels: &[usize], strata: &[usize], settings: FoldSettings) -> Vec<usize> {
    assert_eq!(labels.len(), strata.len(), "one stratum per slide");
    let n_classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let smallest =
        (0..n_classes).map(|c| labels.iter().filter(|l| **l == c).count()).filter(|n| *n > 0).min().unwrap_or(0);
    let k = settings.k.min(smallest.max(2)).max(2);
    let mut rng = Rng::new(settings.seed);
    let mut out = vec![0; labels.len()];
    let mut next = 0;
    for c in 0..n_classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|i| labels[*i] == c).collect();
        rng.shuffle(&mut idx);
        idx.sort_by_key(|&i| strata[i]); // stable: shuffled within each stratum
        for i in idx {
            out[i] = next % k;
            next += 1;
        }
    }
    out
}

/// A survival run's folds, checked before any work: each fold must have an event among the slides
/// it trains on (else no risk is learned) and among those it tests on (else its C-index is not
/// defined). The error names the fold and its slides with their manifest lines.
pub fn check_survival_folds(manifest: &Manifest, folds: &[Fold]) -> anyhow::Result<()> {
    let event =
        |id: &SlideId| manifest.rows.iter().find(|r| &r.slide == id).and_then(|r| r.survival).is_some_and(|s| s.event);
    let mut problems = Vec::new();
    for (k, f) in folds.iter().enumerate() {
        for (what, set) in [("trains on", &f.train), ("tests on", &f.test)] {
            if !set.is_empty() && !set.iter().any(&event) {
                let lines: Vec<String> = set
                    .iter()
                    .map(|id| {
                        let line = manifest.rows.iter().position(|r| &r.slide == id).map_or(0, |i| i + 2);
                        format!("{id} (line {line})")
                    })
                    .take(20)
                    .collect();
                let more = if set.len() > 20 { format!(" and {} more", set.len() - 20) } else { String::new() };
                problems.push(format!(
                    "fold {k}: none of the {} slides it {what} had the event ({}{more}): \
                     use fewer folds, or give folds that spread the events",
                    set.len(),
                    lines.join(", ")
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}: {}", manifest.source.display(), problems.join("\n"))
    }
}

/// What a run does besides its cohort: everything [`make_plan`] hashes into the run id.
pub struct PlanParts {
    pub tiling: TilingSpec,
    pub embedder: EmbedderSpec,
    pub train: TrainConfig,
    pub folds: Vec<Fold>,
    pub imported: Option<EmbedderId>,
    pub icmil: Option<IcmilConfig>,
    pub task: Task,
}

/// The run's plan. Its id, unless given, is a hash of everything that determines its results, so
/// re-running the same command resumes the same run and changing anything starts a new one.
pub fn make_plan(manifest: &Manifest, run: Option<RunId>, parts: PlanParts) -> RunPlan {
    let PlanParts { tiling, embedder, train, folds, imported, icmil, task } = parts;
    let slides: Vec<PlannedSlide> = manifest
        .rows
        .iter()
        .map(|r| PlannedSlide {
            id: r.slide.clone(),
            path: r.path.display().to_string(),
            label: manifest.label_index(r),
            mpp: r.mpp,
            truth: r.truth.as_ref().map(|t| t.display().to_string()),
            survival: r.survival,
            patient: r.patient.clone(),
        })
        .collect();
    let mut plan = RunPlan {
        run: run.clone().unwrap_or_else(|| RunId::new("unnamed").expect("safe")),
        classes: manifest.classes.clone(),
        slides,
        folds,
        tiling,
        embedder,
        train,
        imported,
        icmil,
        task,
    };
    if run.is_none() {
        plan.run = derived_run_id(&plan);
    }
    plan
}

/// The id of a run that was not named: a hash of its cohort and settings, so running the same
/// command again finds the same run. The plan's JSON names and layout are part of it: changing how a
/// setting is written changes the ids of existing runs (a test holds an old plan to this).
pub fn derived_run_id(plan: &RunPlan) -> RunId {
    let RunPlan { classes, slides, folds, tiling, embedder, train, imported, icmil, task, .. } = plan;
    let key = serde_json::to_vec(&(classes, slides, folds, tiling, embedder, train, imported)).expect("json");
    // ICMIL settings and a survival task join the hash only when given, so runs without them keep
    // their ids.
    let extra = icmil.as_ref().map(|c| serde_json::to_vec(c).expect("json"));
    let survival = task.survival().map(|c| serde_json::to_vec(c).expect("json"));
    let parts = std::iter::once(key.as_slice()).chain(extra.as_deref()).chain(survival.as_deref());
    RunId::new(format!("run-{}", content_hash(parts))).expect("safe")
}

/// A slide as the tile and embed stages see it: its id, file and manifest resolution.
pub struct SlideRef<'a> {
    pub id: &'a SlideId,
    pub path: &'a str,
    pub mpp: Option<f64>,
}

/// Refuse slide ids that already name another slide in this store: tiles and features are keyed by
/// slide id, so a second cohort reusing an id would silently get the first one's patches. Every
/// conflict at once (the grids are read 16 at a time).
pub async fn check_slide_identity(store: &Store, tiling: &TilingSpec, slides: &[SlideRef<'_>]) -> anyhow::Result<()> {
    use futures::StreamExt;
    let id = tiling.id();
    let found: Vec<anyhow::Result<Option<String>>> = futures::stream::iter(slides.iter().map(|s| {
        let key = layout::patch_grid(&id, s.id);
        async move {
            if !store.exists(&key).await? {
                return Ok(None);
            }
            let grid = wsimil_common::grid::PatchGrid::from_parquet(key.as_ref(), store.get(&key).await?)?;
            let theirs = grid.provenance.source_path;
            Ok((theirs != s.path).then(|| format!("{} (here {}, tiled from {theirs})", s.id, s.path)))
        }
    }))
    .buffered(16)
    .collect()
    .await;
    let conflicts: Vec<String> = found.into_iter().collect::<anyhow::Result<Vec<_>>>()?.into_iter().flatten().collect();
    if !conflicts.is_empty() {
        bail!(
            "{} slide id(s) already name other slides in {}: {}{}; slide ids must be unique within a store: rename them in the manifest or use another --store (a slide that only moved: remove tiles/{id}/<slide>.* to tile it again)",
            conflicts.len(),
            store.location(),
            conflicts.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
            if conflicts.len() > 5 { format!("; … {} more", conflicts.len() - 5) } else { String::new() }
        );
    }
    Ok(())
}

/// Tile jobs for slides without a patch grid.
pub async fn tile_jobs(store: &Store, plan: &RunPlan) -> Result<Vec<Job>, StoreError> {
    if plan.imported.is_some() {
        return Ok(Vec::new()); // imported features: nothing to tile
    }
    let slides: Vec<SlideRef> = plan.slides.iter().map(|s| SlideRef { id: &s.id, path: &s.path, mpp: s.mpp }).collect();
    tile_jobs_for(store, &slides, &plan.tiling).await
}

/// Tile jobs for those of `slides` without a patch grid of `tiling` (runs and applications alike).
pub async fn tile_jobs_for(
    store: &Store,
    slides: &[SlideRef<'_>],
    tiling: &TilingSpec,
) -> Result<Vec<Job>, StoreError> {
    let id = tiling.id();
    let mut jobs = Vec::new();
    for s in slides {
        if !store.exists(&layout::patch_grid(&id, s.id)).await? {
            jobs.push(Job::Tile(TileJob {
                slide: s.id.clone(),
                path: s.path.to_string(),
                mpp: s.mpp,
                tiling: tiling.clone(),
            }));
        }
    }
    Ok(jobs)
}

/// The embedders of `round`, each once: the run's in round 0 (every fold's), each fold's
/// fine-tuned one in an ICMIL round.
async fn round_embedders(store: &Store, plan: &RunPlan, round: u32) -> Result<Vec<EmbedderSpec>, StoreError> {
    let mut specs: Vec<EmbedderSpec> = Vec::new();
    for k in 0..plan.folds.len() as u32 {
        let spec = plan.fold_embedder(store, round, k).await?;
        if !specs.iter().any(|s| s.id() == spec.id()) {
            specs.push(spec);
        }
    }
    Ok(specs)
}

/// Embed jobs for slides that have a patch grid but no features from `round`'s embedders. Every
/// fold's ICMIL embedder embeds every slide: the fold trains, validates and tests on its own.
pub async fn embed_jobs(store: &Store, plan: &RunPlan, round: u32) -> Result<Vec<Job>, StoreError> {
    if plan.imported.is_some() {
        return Ok(Vec::new()); // imported features: nothing to embed
    }
    let specs = round_embedders(store, plan, round).await?;
    let slides: Vec<SlideRef> = plan.slides.iter().map(|s| SlideRef { id: &s.id, path: &s.path, mpp: s.mpp }).collect();
    // The last round reads the slides for the last time (earlier ones: ICMIL fine-tunes and
    // re-embeds from them again).
    embed_jobs_for(store, &slides, &plan.tiling, &specs, round == plan.icmil_rounds()).await
}

/// Embed jobs for those of `slides` that have a patch grid of `tiling` but no features from one of
/// `specs` (runs and applications alike). With `last_read`, each slide's last job releases the
/// slide (a worker's scratch copy of it).
pub async fn embed_jobs_for(
    store: &Store,
    slides: &[SlideRef<'_>],
    tiling: &TilingSpec,
    specs: &[EmbedderSpec],
    last_read: bool,
) -> Result<Vec<Job>, StoreError> {
    let tiling = tiling.id();
    let mut jobs = Vec::new();
    for s in slides {
        if !store.exists(&layout::patch_grid(&tiling, s.id)).await? {
            continue;
        }
        let first = jobs.len();
        for spec in specs {
            if !store.exists(&layout::features(&spec.id(), &tiling, s.id)).await? {
                jobs.push(Job::Embed(EmbedJob {
                    slide: s.id.clone(),
                    path: s.path.to_string(),
                    tiling: tiling.clone(),
                    embedder: spec.clone(),
                    release_slide: false,
                }));
            }
        }
        if let (true, Some(Job::Embed(last))) = (last_read && jobs.len() > first, jobs.last_mut()) {
            last.release_slide = true;
        }
    }
    Ok(jobs)
}

/// ICMIL fine-tuning jobs producing `round`'s embedders: every shard of every fold whose round
/// embedder is not merged yet and whose shard report is missing.
pub async fn finetune_jobs(store: &Store, plan: &RunPlan, round: u32) -> Result<Vec<Job>, StoreError> {
    let mut jobs = Vec::new();
    let Some(cfg) = &plan.icmil else { return Ok(jobs) };
    for k in 0..plan.folds.len() as u32 {
        if store.exists(&layout::fold_embedder(&plan.run, round, k)).await? {
            continue;
        }
        for s in 0..cfg.shards {
            if !store.exists(&layout::finetune_shard_report(&plan.run, round, k, s)).await? {
                jobs.push(Job::Finetune(FinetuneJob {
                    run: plan.run.clone(),
                    round,
                    fold: k,
                    shard: s,
                    shards: cfg.shards,
                }));
            }
        }
    }
    Ok(jobs)
}

/// Train jobs for folds without a report.
pub async fn train_jobs(store: &Store, plan: &RunPlan, round: u32) -> Result<Vec<Job>, StoreError> {
    let mut jobs = Vec::new();
    for k in 0..plan.folds.len() as u32 {
        if !store.exists(&layout::fold_metrics(&plan.run, round, k)).await? {
            jobs.push(Job::Train(TrainJob { run: plan.run.clone(), round, fold: k }));
        }
    }
    Ok(jobs)
}

/// Predict jobs for test slides with features but no attention map yet.
pub async fn predict_jobs(store: &Store, plan: &RunPlan, round: u32) -> Result<Vec<Job>, StoreError> {
    let mut jobs = Vec::new();
    let mut fold_ids = Vec::new();
    for k in 0..plan.folds.len() as u32 {
        fold_ids.push(plan.round_feature_ids(store, round, k).await?);
    }
    for s in &plan.slides {
        let Some(fold) = plan.test_fold_of(&s.id) else { continue };
        let (emb, tiling) = &fold_ids[fold as usize];
        if store.exists(&layout::features(emb, tiling, &s.id)).await?
            && !store.exists(&layout::attention(&plan.run, round, &s.id)).await?
        {
            jobs.push(Job::Predict(PredictJob { run: plan.run.clone(), round, slide: s.id.clone() }));
        }
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Row;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// Plans written by wsimil 0.1.0 before its settings were typed (`wsimil run ... --until tile`
    /// with that build; `coordinator/tests/fixtures/plan-0.1.0-*.json`): they must still read, and
    /// their settings must hash to the same run id, or existing runs would not resume.
    #[test]
    fn plans_written_before_the_typed_settings_parse_to_the_same_run_id() {
        for name in ["plan-0.1.0-transmil.json", "plan-0.1.0-abmil-icmil.json"] {
            let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            let plan: RunPlan = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(derived_run_id(&plan), plan.run, "{name}");
            // Compared as written (f32 settings such as dropout print as they were given).
            let again: serde_json::Value = serde_json::from_slice(&serde_json::to_vec(&plan).unwrap()).unwrap();
            assert_eq!(
                again,
                serde_json::from_str::<serde_json::Value>(&text).unwrap(),
                "{name}: written back the same"
            );
        }
    }

    fn manifest(labels: &[&str], folds: Option<&[u32]>) -> Manifest {
        let rows = labels
            .iter()
            .enumerate()
            .map(|(i, l)| Row {
                slide: SlideId::new(format!("s{i}")).unwrap(),
                path: PathBuf::from(format!("/s{i}.svs")),
                label: Some(l.to_string()),
                fold: folds.map(|f| f[i]),
                split: None,
                mpp: None,
                truth: None,
                patient: None,
                site: None,
                survival: None,
            })
            .collect();
        Manifest { source: PathBuf::from("m.csv"), rows, classes: vec!["a".into(), "b".into()] }
    }

    #[test]
    fn clam_split_files_become_folds_in_their_order() {
        let m = manifest(&["a", "b", "a", "b", "a", "b"], None);
        let dir = tempfile::tempdir().unwrap();
        // As pandas writes them: an unnamed index column, shorter columns padded with empty cells.
        std::fs::write(dir.path().join("splits_1.csv"), ",train,val,test\n0,s2,s0,s1\n1,s3,,\n2,s4,,\n3,s5,,\n")
            .unwrap();
        std::fs::write(dir.path().join("splits_0.csv"), ",train,val,test\n0,s0,s4,s5\n1,s1,,\n2,s2,,\n3,s3,,\n")
            .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a split").unwrap();
        let folds = load_clam_splits(dir.path(), &m).unwrap();
        let ids = |v: &[SlideId]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(folds.len(), 2);
        assert_eq!(ids(&folds[0].train), ["s0", "s1", "s2", "s3"]);
        assert_eq!((ids(&folds[0].val), ids(&folds[0].test)), (vec!["s4".to_string()], vec!["s5".to_string()]));
        assert_eq!(ids(&folds[1].test), ["s1"]);
        // An id the manifest does not know is named with its file and line.
        std::fs::write(dir.path().join("splits_2.csv"), ",train,val,test\n0,s0,s9,s1\n").unwrap();
        let e = load_clam_splits(dir.path(), &m).unwrap_err().to_string();
        assert!(e.contains("splits_2.csv:2") && e.contains("\"s9\" is not in the manifest"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert!(load_clam_splits(empty.path(), &m).unwrap_err().to_string().contains("no splits_<k>.csv"));
    }

    #[test]
    fn a_patients_slides_share_a_fold_and_without_patients_the_folds_are_unchanged() {
        let labels = ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b", "a", "b"];
        let plain = manifest(&labels, None);
        let settings = FoldSettings { k: 3, seed: 4 };
        let before = stratified_folds(&plain.rows.iter().map(|r| plain.label_index(r)).collect::<Vec<_>>(), settings);
        assert_eq!(patient_folds(&plain, settings), before, "no patient column: the same folds as ever");
        let mut m = plain.clone();
        // Slides 0, 4 and 6 are one patient's; 2 and 3 another's; the rest their own.
        for (i, p) in [(0, "P1"), (4, "P1"), (6, "P1"), (2, "P2"), (3, "P2")] {
            m.rows[i].patient = Some(p.into());
        }
        m.rows[3].label = Some("b".into());
        for seed in 0..20 {
            let f = patient_folds(&m, FoldSettings { k: 3, seed });
            assert!(f[0] == f[4] && f[4] == f[6] && f[2] == f[3], "seed {seed}: {f:?}");
            let folds = assign_folds(&m, FoldSettings { k: 3, seed });
            for fold in &folds {
                let test: Vec<&str> = fold.test.iter().map(|s| s.as_str()).collect();
                let train: Vec<&str> = fold.train.iter().map(|s| s.as_str()).collect();
                for (a, b) in [("s0", "s4"), ("s4", "s6"), ("s2", "s3")] {
                    assert!(!(test.contains(&a) && train.contains(&b)), "a patient in train and test: {fold:?}");
                }
            }
        }
    }

    /// Every fold gets each (class, site) cell's share within one, whatever the seed and k; sites
    /// named the same everywhere change nothing; patients still stay whole.
    #[test]
    fn sites_are_dealt_evenly_over_the_folds() {
        // 40 slides as the demo deals them: slide i from site i mod 3; labels drawn independently.
        let mut rng = Rng::new(7);
        let labels: Vec<&str> = (0..40).map(|_| if rng.next_u64().is_multiple_of(2) { "a" } else { "b" }).collect();
        let plain = manifest(&labels, None);
        let mut m = plain.clone();
        for (i, r) in m.rows.iter_mut().enumerate() {
            r.site = Some(format!("site{}", i % 3));
        }
        // The widest spread over the folds of any (class, site) cell's count, and of any class's.
        let spread = |m: &Manifest, f: &[usize], k: usize, by_site: bool| -> usize {
            let mut cells: BTreeMap<(usize, Option<&str>), Vec<usize>> = BTreeMap::new();
            for (r, &fold) in m.rows.iter().zip(f) {
                let site = if by_site { r.site.as_deref() } else { None };
                cells.entry((m.label_index(r), site)).or_insert_with(|| vec![0; k])[fold] += 1;
            }
            cells.values().map(|c| c.iter().max().unwrap() - c.iter().min().unwrap()).max().unwrap()
        };
        let mut one_site = plain.clone();
        one_site.rows.iter_mut().for_each(|r| r.site = Some("X".into()));
        let mut lopsided_without = 0;
        for k in [2, 3, 5] {
            for seed in 0..30 {
                let settings = FoldSettings { k, seed };
                let f = patient_folds(&m, settings);
                assert!(spread(&m, &f, k, true) <= 1, "k {k} seed {seed}: {f:?}");
                assert!(spread(&m, &f, k, false) <= 1, "k {k} seed {seed}: classes unbalanced");
                let without = patient_folds(&plain, settings);
                lopsided_without += (spread(&m, &without, k, true) > 1) as usize;
                assert_eq!(patient_folds(&one_site, settings), without, "one site: the folds as without");
            }
        }
        assert!(lopsided_without > 0, "without sites some split is lopsided by site (else this test shows nothing)");
        // Patients stay whole: slides 0, 3 and 6 (all site 0) are one patient's.
        for i in [0, 3, 6] {
            m.rows[i].patient = Some("P".into());
            m.rows[i].label = Some("a".into());
        }
        for seed in 0..20 {
            let f = patient_folds(&m, FoldSettings { k: 3, seed });
            assert!(f[0] == f[3] && f[3] == f[6], "seed {seed}: {f:?}");
        }
    }

    /// Survival folds are stratified by event, and a fold with no event to train or test on is
    /// refused with its slides and their lines.
    #[test]
    fn a_survival_fold_without_events_is_refused_naming_its_slides() {
        use wsimil_common::plan::SurvivalTarget;
        let labels = ["event", "censored", "censored", "event", "censored", "censored"];
        let mut m = manifest(&labels, None);
        m.classes = vec!["censored".into(), "event".into()];
        for (r, l) in m.rows.iter_mut().zip(labels) {
            r.survival = Some(SurvivalTarget { time: 10.0, event: l == "event" });
        }
        let folds = assign_folds(&m, FoldSettings { k: 2, seed: 0 });
        check_survival_folds(&m, &folds).unwrap();
        // Given folds that put both events in fold 0: fold 1 tests on none and fold 0 trains on none.
        for (r, f) in m.rows.iter_mut().zip([0, 1, 1, 0, 1, 1]) {
            r.fold = Some(f);
        }
        let folds = assign_folds(&m, FoldSettings { k: 2, seed: 0 });
        let err = check_survival_folds(&m, &folds).unwrap_err().to_string();
        assert!(
            err.contains("fold 0: none of the 4 slides it trains on had the event (s1 (line 3), s2 (line 4)"),
            "{err}"
        );
        assert!(err.contains("fold 1: none of the 4 slides it tests on had the event"), "{err}");
    }

    #[test]
    fn stratified_folds_balance_classes_and_are_seeded() {
        let labels: Vec<usize> = (0..20).map(|i| (i % 4 == 0) as usize).collect(); // 5 positives
        let f = stratified_folds(&labels, FoldSettings { k: 5, seed: 1 });
        for k in 0..5 {
            let pos = (0..20).filter(|i| f[*i] == k && labels[*i] == 1).count();
            let all = (0..20).filter(|i| f[*i] == k).count();
            assert_eq!(pos, 1, "fold {k}");
            assert_eq!(all, 4, "fold {k}");
        }
        assert_eq!(f, stratified_folds(&labels, FoldSettings { k: 5, seed: 1 }));
        assert_ne!(f, stratified_folds(&labels, FoldSettings { k: 5, seed: 2 }));
        // k is capped by the smallest class.
        let g = stratified_folds(&labels, FoldSettings { k: 10, seed: 1 });
        assert_eq!(g.iter().max(), Some(&4));
    }

    #[test]
    fn folds_partition_the_cohort_with_disjoint_train_val_test() {
        let m = manifest(&["a", "b", "a", "b", "a", "b", "a", "b"], None);
        let folds = assign_folds(&m, FoldSettings { k: 4, seed: 0 });
        assert_eq!(folds.len(), 4);
        let mut tested: Vec<SlideId> = folds.iter().flat_map(|f| f.test.clone()).collect();
        tested.sort();
        assert_eq!(tested.len(), 8, "every slide is tested exactly once");
        tested.dedup();
        assert_eq!(tested.len(), 8);
        for f in &folds {
            assert!(!f.val.is_empty());
            assert_eq!(f.train.len() + f.val.len() + f.test.len(), 8);
            assert!(f.train.iter().all(|s| !f.val.contains(s) && !f.test.contains(s)));
        }
    }

    #[test]
    fn manifest_folds_are_used_as_test_folds() {
        let m = manifest(&["a", "b", "a", "b"], Some(&[7, 7, 9, 9]));
        let folds = assign_folds(&m, FoldSettings { k: 5, seed: 0 });
        assert_eq!(folds.len(), 2);
        assert_eq!(folds[0].test, vec![SlideId::new("s0").unwrap(), SlideId::new("s1").unwrap()]);
        assert!(folds[0].val.is_empty(), "two folds leave no validation fold");
        assert_eq!(folds[0].train.len(), 2);
    }

    #[test]
    fn run_id_depends_on_the_inputs() {
        use wsimil_common::grid::TissueParams;
        let m = manifest(&["a", "b", "a", "b"], None);
        let t = TilingSpec {
            patch_px: 256,
            target_mpp: 0.5,
            step_fraction: 1.0,
            min_tissue_fraction: 0.25,
            tissue: TissueParams::tcga(),
        };
        let e = EmbedderSpec {
            architecture: wsimil_common::models::zoo::Architecture::ResNet50Trunc,
            weights: wsimil_common::plan::WeightsRef::Random(1),
            batch_size: 8,
            corrupt_tiles: Default::default(),
        };
        let fs = FoldSettings { k: 2, seed: 0 };
        let plan = |train: TrainConfig, icmil: Option<IcmilConfig>| {
            let folds = assign_folds(&m, fs);
            make_plan(
                &m,
                None,
                PlanParts {
                    tiling: t.clone(),
                    embedder: e.clone(),
                    train,
                    folds,
                    imported: None,
                    icmil,
                    task: Task::Classification,
                },
            )
        };
        let a = plan(TrainConfig::default(), None);
        assert_eq!(a.run, plan(TrainConfig::default(), None).run);
        assert_ne!(a.run, plan(TrainConfig { lr: 1e-3, ..TrainConfig::default() }, None).run);
        let one_round = plan(TrainConfig::default(), Some(IcmilConfig::default()));
        assert_ne!(a.run, one_round.run, "ICMIL rounds are part of the run");
        let two_rounds = plan(TrainConfig::default(), Some(IcmilConfig { rounds: 2, ..IcmilConfig::default() }));
        assert_ne!(one_round.run, two_rounds.run);
        // That earlier versions' runs keep their ids is held by the test on their own plans below.
    }
}
