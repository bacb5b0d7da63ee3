//! ICMIL's merge: after a round's fine-tuning shards of a fold are done, the fold's new embedder is
//! their patch-count-weighted average ([`wsimil_common::models::icmil::average`]), stored under its
//! content address (`embedders/<architecture>-<sha256 prefix>/`) with a card naming its parent
//! embedder, run, round, fold and shards, and recorded as the fold's embedder of the round. Merging
//! is cheap (one pass over the weights), so the coordinator does it between the finetune and embed
//! stages; it is idempotent like every job: a merged fold is not merged again.

use anyhow::{bail, Context};
use wsimil_common::layout;
use wsimil_common::models::{icmil, params};
use wsimil_common::plan::{EmbedderSpec, RunPlan};
use wsimil_common::store::Store;
use wsimil_worker::finetune::ShardReport;

/// Merge fold `fold`'s fine-tuning shards of ICMIL round `round` (≥ 1) into its embedder.
pub async fn merge(store: &Store, plan: &RunPlan, round: u32, fold: u32) -> anyhow::Result<EmbedderSpec> {
    let key = layout::fold_embedder(&plan.run, round, fold);
    if store.exists(&key).await? {
        return Ok(store.get_json(&key).await?);
    }
    let cfg = plan.icmil.as_ref().context("the run has no ICMIL rounds")?;
    let parent = plan.fold_embedder(store, round - 1, fold).await?;
    let mut shards = Vec::new();
    let mut reports = Vec::new();
    for s in 0..cfg.shards {
        let report_key = layout::finetune_shard_report(&plan.run, round, fold, s);
        if !store.exists(&report_key).await? {
            continue; // failed: its reason is among the run's failures
        }
        let report: ShardReport = store.get_json(&report_key).await?;
        if report.patches > 0 {
            let bytes = store.get(&layout::finetune_shard_weights(&plan.run, round, fold, s)).await?;
            let tensors = params::load_safetensors(&bytes, &candle_core::Device::Cpu)
                .with_context(|| format!("ICMIL round {round}, fold {fold}, shard {s}: unreadable weights"))?;
            shards.push((tensors, report.patches as f64));
        }
        reports.push(report);
    }
    if shards.is_empty() {
        bail!(
            "ICMIL round {round}, fold {fold}: no fine-tuning shard produced weights ({} of {} shards finished, none \
             with a confident patch); see the failed finetune jobs",
            reports.len(),
            cfg.shards
        );
    }
    let bytes = tokio::task::spawn_blocking(move || -> candle_core::Result<Vec<u8>> {
        params::safetensors_bytes(&icmil::average(&shards)?)
    })
    .await??;
    let sha = crate::run::hex_sha256(&bytes);
    let spec = EmbedderSpec { weights: sha.clone(), ..parent.clone() };
    let id = spec.id();
    if !store.exists(&layout::embedder_weights(&id)).await? {
        store.put(&layout::embedder_weights(&id), bytes).await?;
    }
    let card = serde_json::json!({
        "id": id,
        "architecture": spec.architecture,
        "weights_sha256": sha,
        "parent": parent.id(),
        "lineage": {"run": plan.run, "round": round, "fold": fold, "method": "icmil", "settings": cfg, "shards": reports},
    });
    store.put_json(&layout::embedder_card(&id), &card).await?;
    store.put_json(&key, &spec).await?;
    tracing::info!(round, fold, embedder = %id, parent = %parent.id(), "ICMIL embedder merged");
    Ok(spec)
}

/// One training patch as the teacher sees it.
struct PatchRow {
    /// Pseudo-label P(tumour).
    p: f64,
    /// Half of the patch or more is planted tumour.
    tumour: bool,
    weight: f64,
    positive_slide: bool,
}

/// How good a round's teachers are, on a semi-synthetic cohort (`wsimil demo-cohort`, whose
/// `truth.json` and tumour masks give patch-level truth): per fold, over its training slides, the
/// AUC of the pseudo-label P(tumour) against truth (a patch is tumour when half of it is), and how
/// the confidence weight splits between tumour patches, normal patches of positive slides and
/// patches of negative slides, with the weighted mean pseudo-label of each.
pub async fn teacher_check(
    store: &Store,
    plan: &RunPlan,
    round: u32,
    cohort: &std::path::Path,
) -> anyhow::Result<String> {
    use wsimil_common::features::FeatureBag;
    use wsimil_worker::synth::{patch_truth, SynthSlide};
    let truth_json = cohort.join("truth.json");
    let slides: Vec<SynthSlide> = serde_json::from_slice(
        &std::fs::read(&truth_json).with_context(|| format!("{}: not a demo cohort", truth_json.display()))?,
    )?;
    let beta = plan.icmil.as_ref().map_or(1.0, |c| c.beta);
    let tumour_class = plan.classes.iter().position(|c| c == "tumor").context("no class \"tumor\"")?;
    let mut out = String::new();
    for (k, fold) in plan.folds.iter().enumerate() {
        let k = k as u32;
        let report: wsimil_worker::train::FoldReport =
            store.get_json(&layout::fold_metrics(&plan.run, round, k)).await?;
        let weights = store.get(&layout::fold_model(&plan.run, round, k)).await?;
        let dev = candle_core::Device::Cpu;
        let heads = params::load_safetensors(&weights, &dev)?;
        let classifier = wsimil_worker::finetune::classifier(&report.model, &heads, &dev)?;
        let (emb, tiling) = plan.round_feature_ids(store, round, k).await?;
        let mut rows: Vec<PatchRow> = Vec::new();
        for id in &fold.train {
            // Slides outside the synthetic cohort or without features (unreadable) are left out.
            let Some(truth) = slides.iter().find(|s| s.slide_id == id.as_str()) else { continue };
            let key = layout::features(&emb, &tiling, id);
            if !store.exists(&key).await? {
                continue;
            }
            let bag = FeatureBag::from_parquet(key.as_ref(), store.get(&key).await?)?;
            let feats = candle_core::Tensor::from_vec(bag.features.clone(), (bag.len(), bag.dim), &dev)?;
            let t = wsimil_worker::finetune::slide_targets(&classifier, &feats, beta)?;
            let side = bag.provenance.tiling.as_ref().map_or(512, |p| p.patch_level0);
            let cover = match &truth.truth_mask {
                Some(m) => patch_truth(&image::open(cohort.join(m))?.to_luma8(), &bag.xs, &bag.ys, side),
                None => vec![0.0; bag.len()],
            };
            let positive = truth.label == "tumor";
            for ((l, c), w) in t.logits.iter().zip(&cover).zip(&t.weights) {
                let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = l.iter().map(|v| (v - m).exp()).sum();
                let p = ((l[tumour_class] - m).exp() / z) as f64;
                rows.push(PatchRow { p, tumour: *c >= 0.5, weight: *w as f64, positive_slide: positive });
            }
        }
        let scores: Vec<f64> = rows.iter().map(|r| r.p).collect();
        let truth: Vec<bool> = rows.iter().map(|r| r.tumour).collect();
        let auc = wsimil_common::metrics::binary_auc(&scores, &truth);
        let total_w: f64 = rows.iter().map(|r| r.weight).sum();
        let group = |f: &dyn Fn(&PatchRow) -> bool| {
            let g: Vec<_> = rows.iter().filter(|r| f(r)).collect();
            let w: f64 = g.iter().map(|r| r.weight).sum();
            let p = if w > 0.0 { g.iter().map(|r| r.p * r.weight).sum::<f64>() / w } else { f64::NAN };
            format!("{} patches, {:.0}% of weight, weighted P(tumour) {p:.2}", g.len(), 100.0 * w / total_w.max(1e-12))
        };
        out.push_str(&format!(
            "round {round} fold {k}: pseudo-label AUC vs truth {} over {} training patches\n  tumour: {}\n  normal in positive slides: {}\n  negative slides: {}\n",
            auc.map_or("n/a".into(), |a| format!("{a:.3}")),
            rows.len(),
            group(&|r| r.tumour),
            group(&|r| !r.tumour && r.positive_slide),
            group(&|r| !r.positive_slide),
        ));
    }
    Ok(out)
}
