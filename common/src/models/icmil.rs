//! ICMIL's arithmetic (Wang et al., MICCAI 2023: "Rethinking multiple instance learning for whole
//! slide image classification: a bag-level classifier is a good instance-level teacher"; the journal
//! version adds confidence weighting). The fine-tuning loop that uses it is the worker's
//! `finetune` module.
//!
//! - **Pseudo-labels.** The round-r bag classifier's instance-level path (its feature reduction and
//!   head applied to each patch on its own, no attention: [`super::BagModel::instance_path`]) turns
//!   the round-r features of a training patch into soft class probabilities, and its reduced
//!   features into a second target. Both come from the stored features, so the teacher's embedder
//!   never runs during fine-tuning.
//! - **Confidence.** Each patch is weighted by how decisively the bag classifier attended to it:
//!   `|2·minmax(a) − 1|^β`, so patches at either end of the attention range count fully and the
//!   ambiguous middle not at all. As the authors' code (`IcmilMethod::Paper`): `a` is the raw
//!   attention score ([`super::BagModel::attention_scores`]) and the min-max is over the batch of
//!   patches being trained on, drawn from every training slide. wsimil's first recipe
//!   (`IcmilMethod::First`): the softmax attention min-maxed per slide.
//! - **Loss** (`KL(p‖q) = Σ p (log p − log q)`, target first, PyTorch's `kl_div`): the authors'
//!   [`paper_loss`], in which only the distillation of the student embedder's view reaches the
//!   embedder; or the first recipe's per patch `KL(t ‖ s) + ½·KL(t ‖ h_T(s)) + ½·KL(r_T ‖ r_S)`,
//!   where `t` is the teacher's instance distribution, `s` the student's (its embedder on an
//!   augmented view, then its copies of the heads), `h_T(s)` the frozen teacher heads applied to the
//!   student's features, and `r` the reduced features read as distributions (softmax over their
//!   width), averaged with the confidence weights.
//! - **Merging shards.** The round's embedder is the patch-count-weighted average of every tensor
//!   the shards fine-tuned (federated averaging), BatchNorm running statistics included.

use candle_core::{DType, Result, Tensor, D};
use std::collections::BTreeMap;

/// `|2·minmax(a) − 1|^β` per instance. A slide whose attention is flat carries no confidence: all
/// zeros.
pub fn confidence_weights(attention: &[f32], beta: f64) -> Vec<f32> {
    let (lo, hi) = attention.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &a| (l.min(a), h.max(a)));
    if attention.is_empty() || hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![0.0; attention.len()];
    }
    attention.iter().map(|&a| ((2.0 * (a - lo) / (hi - lo) - 1.0).abs() as f64).powf(beta) as f32).collect()
}

/// KL(softmax(target) ‖ softmax(pred)) per row of [B, K] logits → [B].
pub fn kl_rows(target_logits: &Tensor, pred_logits: &Tensor) -> Result<Tensor> {
    let lt = candle_nn::ops::log_softmax(target_logits, D::Minus1)?;
    let lp = candle_nn::ops::log_softmax(pred_logits, D::Minus1)?;
    (lt.exp()? * (&lt - lp)?)?.sum(D::Minus1)
}

/// What the teacher says about a batch of patches (targets, no gradient).
pub struct Targets<'a> {
    /// Instance logits of the round-r classifier on the round-r features, [B, C].
    pub logits: &'a Tensor,
    /// Its reduced features, [B, R].
    pub reduced: &'a Tensor,
    /// Confidence weights, [B].
    pub weights: &'a Tensor,
}

/// What the student computes on the augmented batch.
pub struct StudentOut<'a> {
    /// Student heads on student features, [B, C].
    pub logits: &'a Tensor,
    /// Frozen teacher heads on student features, [B, C].
    pub teacher_head_logits: &'a Tensor,
    /// Student reduction of student features, [B, R].
    pub reduced: &'a Tensor,
}

/// Per-patch ICMIL loss (see the module docs), [B].
pub fn patch_losses(t: &Targets, s: &StudentOut) -> Result<Tensor> {
    let main = kl_rows(t.logits, s.logits)?;
    let heads = kl_rows(t.logits, s.teacher_head_logits)?;
    let reduced = kl_rows(t.reduced, s.reduced)?;
    main + ((heads + reduced)? * 0.5)?
}

/// The confidence-weighted mean of the per-patch losses: Σ w·l / Σ w (zero when Σ w = 0).
pub fn weighted_loss(t: &Targets, s: &StudentOut) -> Result<Tensor> {
    let l = patch_losses(t, s)?;
    let total = t.weights.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    (l * t.weights)?.sum_all()? / f64::from(total.max(f32::MIN_POSITIVE))
}

/// The student's heads on the teacher's own features (the stored round-r features of the
/// un-augmented patches): what keeps the heads consistent with the teacher's in the authors' loss.
pub struct HeadsOnTeacher<'a> {
    /// [B, C].
    pub logits: &'a Tensor,
    /// [B, R].
    pub reduced: &'a Tensor,
}

/// The authors' loss (`step2_train_teacherstudent_abmil_ax_semilearn.py` of Dootmaan/ICMIL):
///
/// ```text
/// mean_B(w · KL(t ‖ s)) / C  +  ½ · mean_B(KL(t ‖ h_S(f_T))) / C  +  ½ · mean_B(KL(r_T ‖ r_S(f_T))) / R
/// ```
///
/// PyTorch's `KLDivLoss` with its default mean over every element of [B, width] is the per-row KL
/// divided by the width, hence /C and /R; the confidence `w` weighs the first term only, a plain
/// mean (not normalised by Σw). `s` is the student embedder's features of an augmented view
/// through the student's heads: the only term that reaches the embedder. The other two hold the
/// student's heads to the teacher's on the teacher's features.
pub fn paper_loss(t: &Targets, student_logits: &Tensor, on_teacher: &HeadsOnTeacher) -> Result<Tensor> {
    let (b, c) = t.logits.dims2()?;
    let r = t.reduced.dim(1)?;
    let main = (kl_rows(t.logits, student_logits)? * t.weights)?.sum_all()? / (b * c) as f64;
    let heads = kl_rows(t.logits, on_teacher.logits)?.sum_all()? / (b * c) as f64;
    let reduced = kl_rows(t.reduced, on_teacher.reduced)?.sum_all()? / (b * r) as f64;
    main? + ((heads? + reduced?)? * 0.5)?
}

/// Weighted average of shard results, tensor by tensor (`weights`: patches each shard trained
/// on). Every shard must hold the same names and shapes; non-float tensors (BatchNorm step
/// counters) are taken from the first shard.
pub fn average(shards: &[(BTreeMap<String, Tensor>, f64)]) -> Result<BTreeMap<String, Tensor>> {
    let Some((first, _)) = shards.first() else { candle_core::bail!("no shard results to average") };
    let total: f64 = shards.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        candle_core::bail!("shard weights sum to {total}: nothing was fine-tuned")
    }
    let mut out = BTreeMap::new();
    for (name, t0) in first {
        if !t0.dtype().is_float() {
            out.insert(name.clone(), t0.clone());
            continue;
        }
        let mut acc = t0.zeros_like()?.to_dtype(DType::F64)?;
        for (i, (tensors, w)) in shards.iter().enumerate() {
            let t = tensors.get(name).ok_or_else(|| candle_core::Error::Msg(format!("shard {i} lacks {name}")))?;
            if t.dims() != t0.dims() {
                candle_core::bail!("shard {i}: {name} has shape {:?}, shard 0 {:?}", t.dims(), t0.dims())
            }
            acc = (acc + (t.to_dtype(DType::F64)? * (w / total))?)?;
        }
        out.insert(name.clone(), acc.to_dtype(t0.dtype())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn confidence_is_high_at_both_ends_of_the_attention_range_and_zero_in_the_middle() {
        let w = confidence_weights(&[0.1, 0.3, 0.5, 0.2], 1.0);
        // minmax: 0, 0.5, 1, 0.25 → |2m − 1|: 1, 0, 1, 0.5
        let want = [1.0, 0.0, 1.0, 0.5];
        assert!(w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{w:?}");
        let sharp = confidence_weights(&[0.1, 0.3, 0.5, 0.2], 2.0);
        assert!((sharp[3] - 0.25).abs() < 1e-6, "β sharpens: {sharp:?}");
        assert_eq!(confidence_weights(&[0.2, 0.2], 1.0), vec![0.0, 0.0], "flat attention: no confidence");
        assert!(confidence_weights(&[], 1.0).is_empty());
    }

    #[test]
    fn kl_rows_matches_the_definition_and_is_zero_for_equal_distributions() {
        let target = t(&[2.0, 0.0, 1.0, 1.0], (2, 2));
        let pred = t(&[0.0, 1.0, 1.0, 1.0], (2, 2));
        let got = kl_rows(&target, &pred).unwrap().to_vec1::<f32>().unwrap();
        let sm = |a: f32, b: f32| {
            let (ea, eb) = (a.exp(), b.exp());
            (ea / (ea + eb), eb / (ea + eb))
        };
        let (p0, p1) = sm(2.0, 0.0);
        let (q0, q1) = sm(0.0, 1.0);
        let want = p0 * (p0 / q0).ln() + p1 * (p1 / q1).ln();
        assert!((got[0] - want).abs() < 1e-6, "{got:?} vs {want}");
        assert!(got[1].abs() < 1e-7, "equal rows: {}", got[1]);
        // Not symmetric: it is the target's expectation.
        let back = kl_rows(&pred, &target).unwrap().to_vec1::<f32>().unwrap();
        assert!((back[0] - got[0]).abs() > 1e-3);
    }

    /// Two patches: teacher logits and reduced features, student logits, a second pair of
    /// logits and reduced features (teacher heads on the student / student heads on the teacher).
    fn two_patches() -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        (
            t(&[3.0, 0.0, 0.0, 3.0], (2, 2)),
            t(&[1.0, 0.0, 2.0, 0.5, 0.0, 1.0], (2, 3)),
            t(&[0.0, 0.0, 1.0, 0.0], (2, 2)),
            t(&[1.0, 0.0, 0.0, 0.5], (2, 2)),
            t(&[0.0, 0.0, 0.0, 1.0, 1.0, 1.0], (2, 3)),
        )
    }

    #[test]
    fn the_loss_combines_three_terms_and_weights_patches_by_confidence() {
        let (tl, tr, sl, sh, sr) = two_patches();
        let s = StudentOut { logits: &sl, teacher_head_logits: &sh, reduced: &sr };
        let k = |a: &Tensor, b: &Tensor| kl_rows(a, b).unwrap().to_vec1::<f32>().unwrap();
        let (m, h, r) = (k(&tl, &sl), k(&tl, &sh), k(&tr, &sr));
        let w = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let per = patch_losses(&Targets { logits: &tl, reduced: &tr, weights: &w }, &s).unwrap();
        let per = per.to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((per[i] - (m[i] + 0.5 * h[i] + 0.5 * r[i])).abs() < 1e-5, "patch {i}");
        }
        // Weight 0 on patch 1: the batch loss is patch 0's alone; weights 1, 3: a weighted mean.
        let l = weighted_loss(&Targets { logits: &tl, reduced: &tr, weights: &w }, &s).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - per[0]).abs() < 1e-6);
        let w13 = Tensor::new(&[1.0f32, 3.0], &Device::Cpu).unwrap();
        let l = weighted_loss(&Targets { logits: &tl, reduced: &tr, weights: &w13 }, &s).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - (per[0] + 3.0 * per[1]) / 4.0).abs() < 1e-5);
    }

    #[test]
    fn the_papers_loss_weighs_only_the_students_view_and_averages_as_kl_div_does() {
        let (tl, tr, sl, hl, hr) = two_patches();
        let k = |a: &Tensor, b: &Tensor| kl_rows(a, b).unwrap().to_vec1::<f32>().unwrap();
        let (m, h, r) = (k(&tl, &sl), k(&tl, &hl), k(&tr, &hr));
        let w = Tensor::new(&[1.0f32, 0.25], &Device::Cpu).unwrap();
        let targets = Targets { logits: &tl, reduced: &tr, weights: &w };
        let got = paper_loss(&targets, &sl, &HeadsOnTeacher { logits: &hl, reduced: &hr }).unwrap();
        // PyTorch: KLDivLoss()(log q, p) is the mean over all B·width elements.
        let want = (m[0] * 1.0 + m[1] * 0.25) / 4.0 + 0.5 * (h[0] + h[1]) / 4.0 + 0.5 * (r[0] + r[1]) / 6.0;
        assert!((got.to_scalar::<f32>().unwrap() - want).abs() < 1e-6, "{got} vs {want}");
        // Zero confidence everywhere leaves the heads' consistency terms.
        let zero = Tensor::new(&[0.0f32, 0.0], &Device::Cpu).unwrap();
        let got = paper_loss(
            &Targets { logits: &tl, reduced: &tr, weights: &zero },
            &sl,
            &HeadsOnTeacher { logits: &hl, reduced: &hr },
        )
        .unwrap();
        let want = 0.5 * (h[0] + h[1]) / 4.0 + 0.5 * (r[0] + r[1]) / 6.0;
        assert!((got.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    }

    #[test]
    fn averaging_weighs_shards_by_patches_and_keeps_counters() {
        let d = Device::Cpu;
        let shard = |v: f32, steps: i64| {
            let mut m = BTreeMap::new();
            m.insert("w".to_string(), Tensor::new(&[v, 2.0 * v], &d).unwrap());
            m.insert("bn.num_batches_tracked".to_string(), Tensor::new(&[steps], &d).unwrap());
            m
        };
        let avg = average(&[(shard(1.0, 5), 30.0), (shard(3.0, 9), 10.0)]).unwrap();
        let w = avg["w"].to_vec1::<f32>().unwrap();
        assert!((w[0] - 1.5).abs() < 1e-6 && (w[1] - 3.0).abs() < 1e-6, "{w:?}"); // (30·1 + 10·3) / 40
        assert_eq!(avg["bn.num_batches_tracked"].to_vec1::<i64>().unwrap(), vec![5]);
        let mut odd = shard(1.0, 0);
        odd.insert("w".into(), Tensor::new(&[1.0f32], &d).unwrap());
        let err = average(&[(shard(1.0, 0), 1.0), (odd, 1.0)]).unwrap_err().to_string();
        assert!(err.contains("w has shape"), "{err}");
        assert!(average(&[(shard(1.0, 0), 0.0)]).is_err(), "no patches, no average");
    }
}
