//! DTFD-MIL (Zhang et al., "DTFD-MIL: Double-Tier Feature Distillation Multiple Instance Learning
//! for Histopathology Whole Slide Image Classification", CVPR 2022), on precomputed instance
//! features, as the authors' code (github.com/hrzhang1123/DTFD-MIL, `Main_DTFD_MIL.py` with
//! `Model/Attention.py` and `Model/network.py`) builds and trains it, with the names its
//! `best_model.pth` holds (its four state dicts' keys before each name), so that its checkpoints
//! load as they are:
//!
//! ```text
//! H = ReLU(dim_reduction.fc1(x))   (+ residual blocks)        [N, 512]   no bias
//! the bag split at random into G pseudo-bags (numGroup, 4)
//! per pseudo-bag g:
//!   a_g = softmax_g(w(tanh(V H_g) ⊙ sigmoid(U H_g)))          attention.attention_{V,U,weights}
//!   f_g = Σ a_g,i H_g,i                                        [1, 512]
//!   tier-1 logits_g = classifier.fc(f_g)                       [1, C]     the bag's label for each
//!   distilled: f_g (AFS), or the instances whose class-activation
//!   softmax (classifier.fc's weight on a_g,i H_g,i) for the last class is highest (MaxS), or
//!   highest and lowest (MaxMinS), total_instance / G of each
//! tier 2: ABMIL's gated attention and classifier over the distilled features (att_classifier.*)
//! ```
//!
//! Training is the authors': the tier-1 loss (cross-entropy of each pseudo-bag's logits against the
//! slide's label, averaged) trains the reduction, attention and classifier of tier 1; the tier-2
//! loss (the slide's cross-entropy) trains tier 2 alone. In the authors' code that separation comes
//! from the order of the steps: tier 1's optimizer steps before the tier-2 loss is back-propagated,
//! and what that loss leaves in tier 1's gradients is zeroed before tier 1's next step. (With their
//! default `--distill_type AFS`, that order fails on current PyTorch, "modified by an inplace
//! operation": tier 2's backward passes through tier 1's attention, whose weights have just been
//! stepped.) Here the distilled features enter tier 2 detached while training, which is the same
//! gradients in one step. The pipeline's logits are tier 2's.
//!
//! The split is random per forward pass (the authors shuffle with Python's `random`), drawn from the
//! training generator while training; in evaluation from a generator seeded by the bag's size alone,
//! so a slide always gets the same prediction (the authors' test draws at random too, and averages
//! `num_MeanInference` draws, 1 by default). A bag of fewer instances than G has one pseudo-bag per
//! instance (the authors' `array_split` would give empty ones).

use super::abmil::Gated;
use super::ops::dropout;
use super::params::{linear, Linear};
use super::{softmax, BagOutput, Mode};
use crate::rng::Rng;
use candle_core::{DType, Module, Result, Tensor};
use serde::{Deserialize, Serialize};

/// What tier 2 receives from each pseudo-bag (the authors' `--distill_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Distill {
    /// The pseudo-bag's attention-pooled feature (the authors' default).
    Afs,
    /// Its instances with the highest last-class activation.
    Maxs,
    /// Its instances with the highest and the lowest.
    Maxmins,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DtfdConfig {
    pub in_dim: usize,
    pub n_classes: usize,
    /// Width of the reduced features (the authors' `mDim`, 512).
    pub hidden: usize,
    /// Width of both gated attentions (their `Attention_Gated`'s D, 128).
    pub attention: usize,
    /// Residual blocks after the reduction (`numLayer_Res`, 0).
    pub res_layers: usize,
    /// Pseudo-bags per bag (`numGroup`, 4).
    pub groups: usize,
    /// Instances distilled per bag, split over its pseudo-bags (`total_instance`, 4: one each).
    pub instances: usize,
    pub distill: Distill,
    /// Dropout before tier 1's classifier (`droprate`, 0) and tier 2's (`droprate_2`, 0).
    pub dropout: f32,
    pub dropout_2: f32,
}

impl DtfdConfig {
    /// The defaults of the authors' `Main_DTFD_MIL.py`.
    pub fn new(in_dim: usize, n_classes: usize) -> Self {
        DtfdConfig {
            in_dim,
            n_classes,
            hidden: 512,
            attention: 128,
            res_layers: 0,
            groups: 4,
            instances: 4,
            distill: Distill::Afs,
            dropout: 0.0,
            dropout_2: 0.0,
        }
    }

    /// Instances taken from each side of a pseudo-bag (`total_instance // numGroup`, at least 1).
    fn per_group(&self) -> usize {
        (self.instances / self.groups.max(1)).max(1)
    }
}

/// What a forward pass keeps: each pseudo-bag's logits [G, C] (for the tier-1 loss) and what
/// tier 2 was given.
pub struct DtfdState {
    pub pseudo_logits: Tensor,
    pub distilled: Tensor,
}

pub struct Dtfd {
    fc1: Linear,
    /// Residual blocks: two bias-free linears each (`resBlocks.<i>.block.{0,2}`).
    res: Vec<(Linear, Linear)>,
    attention: Gated,
    classifier: Linear,
    attention_2: Gated,
    classifier_2: Linear,
    cfg: DtfdConfig,
}

impl Dtfd {
    pub fn new(cfg: &DtfdConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        let (h, a) = (cfg.hidden, cfg.attention);
        let dr = vb.pp("dim_reduction");
        let res = (0..cfg.res_layers)
            .map(|i| {
                let b = dr.pp(format!("resBlocks.{i}.block"));
                Ok((linear(h, h, false, b.pp("0"))?, linear(h, h, false, b.pp("2"))?))
            })
            .collect::<Result<_>>()?;
        let tier2 = vb.pp("att_classifier");
        Ok(Dtfd {
            fc1: linear(cfg.in_dim, h, false, dr.pp("fc1"))?,
            res,
            attention: Gated::new(h, a, vb.pp("attention"))?,
            classifier: linear(h, cfg.n_classes, true, vb.pp("classifier.fc"))?,
            attention_2: Gated::new(h, a, tier2.pp("attention"))?,
            classifier_2: linear(h, cfg.n_classes, true, tier2.pp("classifier.fc"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DtfdConfig {
        &self.cfg
    }

    /// The reduced features `H` of instances `x` [N, in] → [N, L].
    fn reduce(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.fc1.forward(x)?.relu()?;
        for (a, b) in &self.res {
            let t = b.forward(&a.forward(&h)?.relu()?)?.relu()?;
            h = (h + t)?;
        }
        Ok(h)
    }

    fn drop(x: Tensor, p: f32, mode: &mut Mode) -> Result<Tensor> {
        match mode.rng() {
            Some(rng) if p > 0.0 => dropout(&x, p, rng),
            _ => Ok(x),
        }
    }

    /// Tier 2: gated attention pooling of `h` [n, L] and its classifier on the pooled feature,
    /// the logits [1, C].
    fn tier2(&self, h: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let a = softmax(&self.attention_2.logits(h)?, mode.is_train())?; // [1, n]
        let feature = super::ops::matmul(&a, h)?; // [1, L]
        self.classifier_2.forward(&Self::drop(feature, self.cfg.dropout_2, mode)?)
    }

    /// The authors' split: the instances shuffled, then cut into `groups` runs whose sizes differ
    /// by one at most, the longer first (numpy's `array_split`). Fewer instances than groups: one
    /// instance each.
    pub fn split(order: &[usize], groups: usize) -> Vec<Vec<usize>> {
        let (n, g) = (order.len(), groups.min(order.len()).max(1));
        let (base, extra) = (n / g, n % g);
        let mut out = Vec::with_capacity(g);
        let mut at = 0;
        for i in 0..g {
            let len = base + usize::from(i < extra);
            out.push(order[at..at + len].to_vec());
            at += len;
        }
        out
    }

    /// The random split of `n` instances a forward pass uses (see the module docs).
    fn draw(&self, n: usize, mode: &mut Mode) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..n).collect();
        match mode.rng() {
            Some(rng) => rng.shuffle(&mut order),
            None => Rng::new(n as u64).shuffle(&mut order),
        }
        Self::split(&order, self.cfg.groups)
    }

    /// The patches each pseudo-bag hands tier 2 (MaxS, MaxMinS), as positions in the bag: its
    /// patches ranked by the softmax over the classes of the class activations of their
    /// attention-weighted features (`get_cam_1d`: tier 1's classifier weight, no bias) for the last
    /// class, the highest `total_instance / G` (and the lowest). `a` [G, N] is each pseudo-bag's
    /// attention (0 outside it), `h` the reduced features [N, L].
    fn distilled_patches(&self, groups: &[Vec<usize>], a: &Tensor, h: &Tensor) -> Result<Vec<u32>> {
        // a_i·h_i·Wᵀ = a_i·(h_i·Wᵀ): the activations without the attention, once for the bag.
        let hw = super::ops::matmul(&h.detach(), &self.classifier.weight().detach().t()?)?;
        let hw = hw.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let a = a.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let c = self.cfg.n_classes;
        let mut take = Vec::new();
        for (g, members) in groups.iter().enumerate() {
            let last: Vec<f32> = members
                .iter()
                .map(|&i| {
                    let cam: Vec<f32> = hw[i].iter().map(|v| v * a[g][i]).collect();
                    let top = cam.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = cam.iter().map(|v| (v - top).exp()).sum();
                    (cam[c - 1] - top).exp() / z
                })
                .collect();
            let mut rank: Vec<usize> = (0..members.len()).collect();
            // Highest first; equal values keep their order.
            rank.sort_by(|&i, &j| last[j].total_cmp(&last[i]));
            let k = self.cfg.per_group().min(rank.len());
            take.extend(rank[..k].iter().map(|&r| members[r] as u32));
            if self.cfg.distill == Distill::Maxmins {
                take.extend(rank[rank.len() - k..].iter().map(|&r| members[r] as u32));
            }
        }
        Ok(take)
    }

    /// Both tiers over `groups` (positions in the bag) of instances `x` [N, in]. Tier 1 runs every
    /// pseudo-bag at once: the bag's attention logits computed once (each instance's own), each
    /// pseudo-bag's softmax over its members alone (the others masked out), one product for the
    /// pooled features and one for their logits.
    pub fn forward_groups(
        &self,
        x: &Tensor,
        groups: &[Vec<usize>],
        mode: &mut Mode,
        want_attention: bool,
    ) -> Result<BagOutput> {
        let h = self.reduce(x)?;
        let n = h.dim(0)?;
        let raw = self.attention.logits(&h)?; // [1, N]
        let mut mask = vec![f32::NEG_INFINITY; groups.len() * n];
        for (g, members) in groups.iter().enumerate() {
            for &i in members {
                mask[g * n + i] = 0.0;
            }
        }
        let mask = Tensor::from_vec(mask, (groups.len(), n), x.device())?.to_dtype(raw.dtype())?;
        let a = softmax(&raw.broadcast_add(&mask)?, mode.is_train())?; // [G, N]
        let pooled = super::ops::matmul(&a, &h)?; // [G, L]
        let pseudo_logits = self.classifier.forward(&Self::drop(pooled.clone(), self.cfg.dropout, mode)?)?;
        let distilled = match self.cfg.distill {
            Distill::Afs => pooled,
            Distill::Maxs | Distill::Maxmins => {
                let take = self.distilled_patches(groups, &a, &h)?;
                h.index_select(&Tensor::new(take.as_slice(), x.device())?, 0)?
            }
        };
        // Tier 2 trains on what tier 1 hands it, not through it (the module docs say why).
        let given = if mode.is_train() { distilled.detach() } else { distilled.clone() };
        let logits = self.tier2(&given, mode)?;
        let attention = if want_attention {
            // Tier 1's attention over the whole bag: its instances' logits under one softmax.
            Some(candle_nn::ops::softmax_last_dim(&raw.contiguous()?)?.squeeze(0)?)
        } else {
            None
        };
        Ok(BagOutput { logits, attention, aux: Some(super::Aux::Dtfd(DtfdState { pseudo_logits, distilled })) })
    }

    /// `bag`: [1, N, in_dim] → tier 2's logits [1, C]; the attention shown is tier 1's over the
    /// whole bag (softmax over all its instances).
    pub fn forward(&self, bag: &Tensor, mode: &mut Mode, want_attention: bool) -> Result<BagOutput> {
        let x = bag.squeeze(0)?;
        let groups = self.draw(x.dim(0)?, mode);
        self.forward_groups(&x, &groups, mode, want_attention)
    }

    /// The tier-1 loss: each pseudo-bag's cross-entropy against the slide's label, averaged.
    pub fn pseudo_loss(&self, state: &DtfdState, label: usize) -> Result<Tensor> {
        let logits = state.pseudo_logits.to_dtype(DType::F32)?;
        let g = logits.dim(0)?;
        let targets = Tensor::new(vec![label as u32; g].as_slice(), logits.device())?;
        candle_nn::loss::cross_entropy(&logits, &targets)
    }

    /// Tier 1's raw attention logits of instances `feats` [N, in], [N]: each instance's own.
    pub fn attention_logits(&self, feats: &Tensor) -> Result<Tensor> {
        self.attention.logits(&self.reduce(feats)?)?.squeeze(0)
    }

    /// Instance-level path (ICMIL's teacher): what a one-instance bag gets, whose pseudo-bag and
    /// distilled feature are the instance's reduced feature (every distillation alike) and whose
    /// tier-2 attention is 1: tier 2's classifier on `H`. `(H [N, L], logits [N, C])`.
    pub fn instance_path(&self, feats: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.reduce(feats)?;
        let logits = self.classifier_2.forward(&h)?;
        Ok((h, logits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_numpys_array_split_of_the_shuffled_order() {
        let order: Vec<usize> = vec![4, 0, 9, 2, 7, 1, 3, 8, 6, 5];
        assert_eq!(Dtfd::split(&order, 4), vec![vec![4, 0, 9], vec![2, 7, 1], vec![3, 8], vec![6, 5]]);
        assert_eq!(Dtfd::split(&order[..2], 4), vec![vec![4], vec![0]], "one instance each, no empty group");
        assert_eq!(Dtfd::split(&order[..8], 4).iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 2, 2]);
    }
}
