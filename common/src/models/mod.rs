//! Models, the candle way: one file per model, a serde config, `new(cfg, vb)` with parameter names
//! matching the reference checkpoints.
//!
//! - [`transmil`]: TransMIL bag classifier (Shao et al. 2021).
//! - [`abmil`]: gated attention MIL (Ilse et al. 2018), the baseline.
//! - [`efficientnet`], [`resnet`]: patch embedders behind the [`embedder::Embedder`] trait.
//! - [`ops`]: depthwise convolution with backward, iterative pseudo-inverse, seeded dropout.
//! - [`params`]: seeded parameter creation and safetensors IO.
//! - [`optim`]: RAdam, Lookahead and AdamW.

pub mod abmil;
pub mod efficientnet;
pub mod embedder;
pub mod ops;
pub mod optim;
pub mod params;
pub mod resnet;
pub mod transmil;

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
}

/// Which bag classifier, with its configuration; stored beside checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "lowercase")]
pub enum BagModelConfig {
    Transmil(transmil::TransMilConfig),
    Abmil(abmil::AbmilConfig),
}

impl BagModelConfig {
    /// The named model with its paper defaults.
    pub fn named(name: &str, in_dim: usize, n_classes: usize) -> Option<Self> {
        match name {
            "transmil" => Some(BagModelConfig::Transmil(transmil::TransMilConfig::paper(in_dim, n_classes))),
            "abmil" => Some(BagModelConfig::Abmil(abmil::AbmilConfig::new(in_dim, n_classes))),
            _ => None,
        }
    }

    /// Set TransMIL's landmarks (no effect on ABMIL).
    pub fn with_landmarks(mut self, m: usize) -> Self {
        if let BagModelConfig::Transmil(c) = &mut self {
            c.landmarks = m.max(1);
        }
        self
    }

    pub fn with_dropout(mut self, p: f32) -> Self {
        match &mut self {
            BagModelConfig::Transmil(c) => c.dropout = p,
            BagModelConfig::Abmil(c) => c.dropout = p,
        }
        self
    }
}

pub enum BagModel {
    Transmil(Box<transmil::TransMil>),
    Abmil(abmil::Abmil),
}

impl BagModel {
    pub fn new(cfg: &BagModelConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(match cfg {
            BagModelConfig::Transmil(c) => BagModel::Transmil(Box::new(transmil::TransMil::new(c, vb)?)),
            BagModelConfig::Abmil(c) => BagModel::Abmil(abmil::Abmil::new(c, vb)?),
        })
    }

    pub fn forward(&self, bag: &Tensor, mode: &mut Mode, want_attention: bool) -> Result<BagOutput> {
        match self {
            BagModel::Transmil(m) => m.forward(bag, mode, want_attention),
            BagModel::Abmil(m) => m.forward(bag, mode, want_attention),
        }
    }
}
