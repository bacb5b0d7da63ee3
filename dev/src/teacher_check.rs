//! `wsimil-dev icmil-teacher-check`: how good a round's ICMIL teachers are, measured against the
//! patch-level truth of a semi-synthetic cohort (`wsimil demo-cohort`).

use anyhow::Context;
use wsimil_common::layout;
use wsimil_common::models::params;
use wsimil_common::plan::RunPlan;
use wsimil_common::records::FoldReport;
use wsimil_common::store::Store;

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
        let report: FoldReport = store.get_json(&layout::fold_metrics(&plan.run, round, k)).await?;
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
            let logits = classifier.instance_path(&feats)?.1.to_vec2::<f32>()?;
            let side = bag.provenance.tiling.as_ref().map_or(512, |p| p.patch_level0);
            let cover = match &truth.truth_mask {
                Some(m) => patch_truth(&image::open(cohort.join(m))?.to_luma8(), &bag.xs, &bag.ys, side),
                None => vec![0.0; bag.len()],
            };
            let positive = truth.label == "tumor";
            for ((l, c), w) in logits.iter().zip(&cover).zip(&t.weights) {
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
