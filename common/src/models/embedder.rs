//! What a patch embedder is: a network from normalised patches to features, and which of its
//! layers train when it is fine-tuned (ICMIL's student). The embedders themselves are in
//! [`super::efficientnet`], [`super::resnet`] and [`super::vit`]; [`super::zoo`] names them.

use crate::features::Preprocessing;
use candle_core::{Result, Tensor};

/// A network that turns a batch of normalised patches [B, 3, S, S] into features [B, dim].
pub trait Embedder: Send + Sync {
    fn architecture(&self) -> String;
    fn feature_dim(&self) -> usize;
    /// How patches must be prepared: recorded in every feature file's provenance.
    fn preprocessing(&self) -> Preprocessing;
    /// What each feature is (recorded in the features' provenance and the embedder's card).
    fn output(&self) -> String {
        "global average pool of the last feature map".into()
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// Which layers of an embedder train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tune {
    /// Inference: every convolution folded with its BatchNorm.
    Frozen,
    /// The last `n` blocks (bottlenecks of ResNet, MBConv blocks of EfficientNet, whose 1×1 head
    /// conv always trains with them) train; `usize::MAX` = the whole network, stem included.
    LastBlocks(usize),
}

impl Tune {
    /// Does block `i` of `n` train?
    pub fn trains(self, i: usize, n: usize) -> bool {
        match self {
            Tune::Frozen => false,
            Tune::LastBlocks(k) => i + k.min(n) >= n,
        }
    }

    /// Does the stem (the first convolution) train?
    pub fn trains_stem(self) -> bool {
        self == Tune::LastBlocks(usize::MAX)
    }

    pub fn any(self) -> bool {
        !matches!(self, Tune::Frozen | Tune::LastBlocks(0))
    }
}
