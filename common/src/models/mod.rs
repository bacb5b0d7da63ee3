//! Models, the candle way: one file per model, a serde config, `new(cfg, vb)` with parameter names
//! matching the reference checkpoints.
//!
//! - [`transmil`]: TransMIL bag classifier (Shao et al. 2021).
//! - [`abmil`]: gated attention MIL (Ilse et al. 2018), the baseline.
//! - [`clam`]: CLAM-SB and CLAM-MB (Lu et al. 2021) with their instance clustering loss.
//! - [`dsmil`]: DSMIL (Li et al. 2021), its max-pooling and critical-instance attention streams.
//! - [`dtfd`]: DTFD-MIL (Zhang et al. 2022), two tiers of attention over random pseudo-bags.
//! - [`embedder`]: what a patch embedder is (the trait, which layers train); [`zoo`] names them:
//!   [`efficientnet`], [`resnet`], with [`convbn`] (convolution + BatchNorm, folded or trainable) and
//!   [`conv`] (frozen convolutions through OpenBLAS, [`blas`]); the Vision Transformers of the
//!   pathology foundation models, [`vit`] (with [`vit_cpu`], its fused CPU kernels); [`weights`]:
//!   weights files as publishers ship them (safetensors, PyTorch state dicts), checked by name.
//! - [`cpu`]: which vector instructions the kernels may use (one rule for every choice).
//! - [`ops`]: depthwise convolution with backward, iterative pseudo-inverse, seeded dropout.
//! - [`params`]: seeded parameter creation and safetensors IO.
//! - [`optim`]: RAdam, Lookahead and AdamW.
//! - [`icmil`]: ICMIL's pseudo-label weighting, distillation loss and shard averaging.
//! - [`survival`]: the survival losses (discrete-time NLL, Cox partial likelihood).

pub mod abmil;
pub mod blas;
pub mod clam;
pub mod conv;
pub mod convbn;
pub mod cpu;
pub mod dsmil;
pub mod dtfd;
pub mod efficientnet;
pub mod embedder;
pub mod icmil;
pub mod nystrom;
pub mod ops;
pub mod optim;
pub mod params;
pub mod resnet;
pub mod survival;
pub mod transmil;
pub mod vit;
pub mod vit_cpu;
pub mod weights;
pub mod zoo;

use crate::rng::Rng;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// Training (dropout on, differentiable kernels) or evaluation.
pub enum Mode<'a> {
    Eval,
    Train(&'a mut Rng),
}

impl Mode<'_> {
    pub fn is_train(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    pub fn rng(&mut self) -> Option<&mut Rng> {
        match self {
            Mode::Train(r) => Some(r),
            Mode::Eval => None,
        }
    }
}

/// Softmax over the last dimension: candle's fused kernel for inference, ours (fused, with a
/// backward) for training.
pub fn softmax(x: &Tensor, train: bool) -> Result<Tensor> {
    if train {
        ops::softmax_last_dim(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// A bag classifier's output: logits [1, C] and, when asked, attention over the N instances.
pub struct BagOutput {
    pub logits: Tensor,
    pub attention: Option<Tensor>,
    /// What a model's own training loss needs beyond the logits (CLAM, DSMIL).
    pub aux: Option<Aux>,
}

/// A forward pass's state for a model's own training loss.
pub enum Aux {
    /// CLAM's reduced instances and raw attention, for its clustering loss.
    Clam(clam::ClamState),
    /// DSMIL's two streams' raw logits.
    Dsmil(dsmil::DsmilState),
    /// DTFD-MIL's pseudo-bags' logits, for its tier-1 loss.
    Dtfd(dtfd::DtfdState),
    /// TransMIL's instance head's bag logits [1, C], for its own cross-entropy.
    TransmilHead(Tensor),
}

/// The bag classifiers (`--model`; the names plans hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BagModelKind {
    /// TransMIL (Shao et al., NeurIPS 2021), the paper's configuration.
    Transmil,
    /// Gated attention MIL (Ilse et al., ICML 2018).
    Abmil,
    /// CLAM, single attention branch, with its instance clustering loss (Lu et al. 2021).
    #[serde(rename = "clam-sb")]
    ClamSb,
    /// CLAM, one attention branch and bag classifier per class.
    #[serde(rename = "clam-mb")]
    ClamMb,
    /// DSMIL, a max-pooling stream and an attention stream around each class's critical instance
    /// (Li et al., CVPR 2021).
    Dsmil,
    /// DTFD-MIL, attention over random pseudo-bags and over what they distil (Zhang et al., CVPR
    /// 2022).
    Dtfd,
}

impl BagModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BagModelKind::Transmil => "transmil",
            BagModelKind::Abmil => "abmil",
            BagModelKind::ClamSb => "clam-sb",
            BagModelKind::ClamMb => "clam-mb",
            BagModelKind::Dsmil => "dsmil",
            BagModelKind::Dtfd => "dtfd",
        }
    }
}

impl std::fmt::Display for BagModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which bag classifier, with its configuration; stored beside checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "lowercase")]
pub enum BagModelConfig {
    Transmil(transmil::TransMilConfig),
    Abmil(abmil::AbmilConfig),
    Clam(clam::ClamConfig),
    Dsmil(dsmil::DsmilConfig),
    Dtfd(dtfd::DtfdConfig),
}

impl BagModelConfig {
    /// The model with its paper defaults.
    pub fn new(kind: BagModelKind, in_dim: usize, n_classes: usize) -> Self {
        match kind {
            BagModelKind::Transmil => BagModelConfig::Transmil(transmil::TransMilConfig::paper(in_dim, n_classes)),
            BagModelKind::Abmil => BagModelConfig::Abmil(abmil::AbmilConfig::new(in_dim, n_classes)),
            BagModelKind::ClamSb => BagModelConfig::Clam(clam::ClamConfig::new(in_dim, n_classes, false)),
            BagModelKind::ClamMb => BagModelConfig::Clam(clam::ClamConfig::new(in_dim, n_classes, true)),
            BagModelKind::Dsmil => BagModelConfig::Dsmil(dsmil::DsmilConfig::new(in_dim, n_classes)),
            BagModelKind::Dtfd => BagModelConfig::Dtfd(dtfd::DtfdConfig::new(in_dim, n_classes)),
        }
    }

    /// The width of the instance features it takes.
    pub fn in_dim(&self) -> usize {
        match self {
            BagModelConfig::Transmil(c) => c.in_dim,
            BagModelConfig::Abmil(c) => c.in_dim,
            BagModelConfig::Clam(c) => c.in_dim,
            BagModelConfig::Dsmil(c) => c.in_dim,
            BagModelConfig::Dtfd(c) => c.in_dim,
        }
    }

    pub fn n_classes(&self) -> usize {
        match self {
            BagModelConfig::Transmil(c) => c.n_classes,
            BagModelConfig::Abmil(c) => c.n_classes,
            BagModelConfig::Clam(c) => c.n_classes,
            BagModelConfig::Dsmil(c) => c.n_classes,
            BagModelConfig::Dtfd(c) => c.n_classes,
        }
    }

    /// Set TransMIL's landmarks (no effect on ABMIL).
    pub fn with_landmarks(mut self, m: usize) -> Self {
        if let BagModelConfig::Transmil(c) = &mut self {
            c.landmarks = m.max(1);
        }
        self
    }

    /// Set CLAM's subtyping mode (no effect on the other models).
    pub fn with_clam_subtyping(mut self, on: bool) -> Self {
        if let BagModelConfig::Clam(c) = &mut self {
            c.subtyping = on;
        }
        self
    }

    /// Set DTFD-MIL's distillation, where one is given (no effect on the other models).
    pub fn with_dtfd_distill(mut self, distill: Option<dtfd::Distill>) -> Self {
        if let (BagModelConfig::Dtfd(c), Some(d)) = (&mut self, distill) {
            c.distill = d;
        }
        self
    }

    /// Give TransMIL wsimil's instance head, or not (no effect on the other models).
    pub fn with_transmil_instance_head(mut self, on: bool) -> Self {
        if let BagModelConfig::Transmil(c) = &mut self {
            c.instance_head = on;
        }
        self
    }

    pub fn with_dropout(mut self, p: f32) -> Self {
        match &mut self {
            BagModelConfig::Transmil(c) => c.dropout = p,
            BagModelConfig::Abmil(c) => c.dropout = p,
            BagModelConfig::Clam(c) => c.dropout = p,
            // DSMIL's only dropout is before its optional value network, 0 as the authors'.
            BagModelConfig::Dsmil(_) => {}
            // DTFD-MIL's dropouts (before each tier's classifier) are 0 in the authors' code.
            BagModelConfig::Dtfd(_) => {}
        }
        self
    }
}

pub enum BagModel {
    Transmil(Box<transmil::TransMil>),
    Abmil(abmil::Abmil),
    Clam(clam::Clam),
    Dsmil(dsmil::Dsmil),
    Dtfd(dtfd::Dtfd),
}

impl BagModel {
    pub fn new(cfg: &BagModelConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(match cfg {
            BagModelConfig::Transmil(c) => BagModel::Transmil(Box::new(transmil::TransMil::new(c, vb)?)),
            BagModelConfig::Abmil(c) => BagModel::Abmil(abmil::Abmil::new(c, vb)?),
            BagModelConfig::Clam(c) => BagModel::Clam(clam::Clam::new(c, vb)?),
            BagModelConfig::Dsmil(c) => BagModel::Dsmil(dsmil::Dsmil::new(c, vb)?),
            BagModelConfig::Dtfd(c) => BagModel::Dtfd(dtfd::Dtfd::new(c, vb)?),
        })
    }

    pub fn forward(&self, bag: &Tensor, mode: &mut Mode, want_attention: bool) -> Result<BagOutput> {
        match self {
            BagModel::Transmil(m) => m.forward(bag, mode, want_attention),
            BagModel::Abmil(m) => m.forward(bag, mode, want_attention),
            BagModel::Clam(m) => m.forward(bag, mode, want_attention),
            BagModel::Dsmil(m) => m.forward(bag, mode, want_attention),
            BagModel::Dtfd(m) => m.forward(bag, mode, want_attention),
        }
    }

    /// The training loss of a bag of class `label` from its logits' cross-entropy `bag_loss`:
    /// itself, or for CLAM `bag_weight · bag_loss + (1 − bag_weight) · clustering loss`, or for
    /// DSMIL its own two streams' binary cross-entropy (in place of `bag_loss`), or for DTFD-MIL
    /// `bag_loss` (its tier 2's) plus its pseudo-bags' (tier 1's), or for a TransMIL with the
    /// instance head `bag_loss` plus the head's cross-entropy.
    pub fn classification_loss(&self, out: &BagOutput, bag_loss: Tensor, label: usize) -> Result<Tensor> {
        match (self, &out.aux) {
            (BagModel::Clam(m), Some(Aux::Clam(state))) => {
                let w = m.config().bag_weight;
                let inst = m.instance_loss(state, label)?.to_dtype(bag_loss.dtype())?;
                (bag_loss * w)? + (inst * (1.0 - w))?
            }
            (BagModel::Dsmil(m), Some(Aux::Dsmil(state))) => m.loss(state, label)?.to_dtype(bag_loss.dtype()),
            (BagModel::Dtfd(m), Some(Aux::Dtfd(state))) => {
                let pseudo = m.pseudo_loss(state, label)?.to_dtype(bag_loss.dtype())?;
                bag_loss + pseudo
            }
            (BagModel::Transmil(_), Some(Aux::TransmilHead(logits))) => {
                let target = Tensor::new(&[label as u32], logits.device())?;
                let head = candle_nn::loss::cross_entropy(&logits.to_dtype(candle_core::DType::F32)?, &target)?;
                let head = head.to_dtype(bag_loss.dtype())?;
                bag_loss + head
            }
            _ => Ok(bag_loss),
        }
    }

    /// The instance-level path (ICMIL's teacher): feature reduction and head on each instance of
    /// `feats` [N, in_dim], no attention → (reduced [N, R], logits [N, C]). Differentiable (for
    /// gradients to reach `feats` through a frozen copy too).
    pub fn instance_path(&self, feats: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            BagModel::Transmil(m) => m.instance_path(feats, true),
            BagModel::Abmil(m) => m.instance_path(feats),
            BagModel::Clam(m) => m.instance_path(feats),
            BagModel::Dsmil(m) => m.instance_path(feats),
            BagModel::Dtfd(m) => m.instance_path(feats),
        }
    }

    /// Each instance's attention on a scale shared by every slide, [N] (ICMIL's confidence is the
    /// min-max of these over a batch of patches from many slides). ABMIL: the gated attention's raw
    /// logits, before the softmax over the bag (what the authors' code min-maxes). TransMIL, whose
    /// attention exists only within its bag: `ln(N·a)`, the log of the cls token's attention
    /// relative to uniform, so that slides of different sizes compare (wsimil's own choice: the
    /// authors have no TransMIL variant); with its instance head, the head's raw logits.
    pub fn attention_scores(&self, feats: &Tensor) -> Result<Tensor> {
        match self {
            BagModel::Abmil(m) => m.attention_logits(feats),
            BagModel::Clam(m) => m.attention_logits(feats),
            // DSMIL's attention is to a bag's critical instance; its max-pooling stream's instance
            // score is each instance's own.
            BagModel::Dsmil(m) => m.instance_logits(feats),
            // DTFD-MIL: tier 1's raw attention, as ABMIL's.
            BagModel::Dtfd(m) => m.attention_logits(feats),
            BagModel::Transmil(m) => {
                if let Some(logits) = m.head_attention_logits(feats)? {
                    return Ok(logits);
                }
                let n = feats.dim(0)?;
                let a = m.forward(&feats.unsqueeze(0)?, &mut Mode::Eval, true)?.attention.expect("asked for attention");
                (a.to_dtype(candle_core::DType::F32)? * n as f64)?.clamp(1e-30, f64::MAX)?.log()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use candle_core::Device;

    #[test]
    fn an_attention_models_instance_path_is_the_bag_prediction_of_a_one_instance_bag() {
        // One instance gets all the attention, so the bag's logits are the head on that instance:
        // the pseudo-label of a patch (ICMIL's teacher, the heatmaps' instance figure) is what the
        // classifier says of a slide made of it alone. ABMIL, CLAM's two forms and DSMIL (whose
        // bag stream attends to the critical instance, here the only one) alike.
        for (kind, classes) in [
            (BagModelKind::Abmil, 2),
            (BagModelKind::ClamSb, 2),
            (BagModelKind::ClamMb, 3),
            (BagModelKind::Dsmil, 2),
            (BagModelKind::Dsmil, 3),
        ] {
            let p = Params::new(3);
            let m = BagModel::new(&BagModelConfig::new(kind, 6, classes), p.var_builder(&Device::Cpu)).unwrap();
            let x = Tensor::randn(0f32, 1.0, (4, 6), &Device::Cpu).unwrap();
            let (reduced, logits) = m.instance_path(&x).unwrap();
            assert_eq!((reduced.dims()[0], logits.dims()), (4, &[4, classes][..]), "{kind:?}");
            for i in 0..4 {
                let bag = x.narrow(0, i, 1).unwrap().unsqueeze(0).unwrap();
                let want = m.forward(&bag, &mut Mode::Eval, false).unwrap().logits.squeeze(0).unwrap();
                let got = logits.get(i).unwrap();
                let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "{kind:?} ({classes} classes), instance {i}: {d}");
            }
        }
    }

    #[test]
    fn transmil_instance_path_is_fc1_norm_fc2_per_instance() {
        let cfg = transmil::TransMilConfig {
            dim: 16,
            heads: 2,
            dim_head: 8,
            landmarks: 4,
            ..transmil::TransMilConfig::paper(6, 3)
        };
        let p = Params::new(5);
        let m = BagModel::new(&BagModelConfig::Transmil(cfg), p.var_builder(&Device::Cpu)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 6), &Device::Cpu).unwrap();
        let (reduced, logits) = m.instance_path(&x).unwrap();
        assert_eq!((reduced.dims(), logits.dims()), (&[5, 16][..], &[5, 3][..]));
        // Each row on its own gives the same answer: no mixing between instances.
        let (_, one) = m.instance_path(&x.narrow(0, 2, 1).unwrap()).unwrap();
        let d = (one.squeeze(0).unwrap() - logits.get(2).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(reduced.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0, "reduced features are post-ReLU");
    }
}
