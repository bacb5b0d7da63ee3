//! Patch embedders behind one trait, and the pieces they share: convolutions with BatchNorm folded
//! into their weights for inference.

use super::ops::{depthwise_conv2d, DwGeom};
use crate::features::Preprocessing;
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// A network that turns a batch of normalised patches [B, 3, S, S] into features [B, dim].
pub trait Embedder: Send + Sync {
    fn architecture(&self) -> &'static str;
    fn feature_dim(&self) -> usize;
    /// How patches must be prepared: recorded in every feature file's provenance.
    fn preprocessing(&self) -> Preprocessing;
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// The architectures wsimil knows, by name.
pub const ARCHITECTURES: [&str; 2] = ["efficientnet-lite0", "resnet50-trunc"];

/// Build the named embedder from `vb` (a checkpoint's tensors, or seeded random ones).
pub fn build(architecture: &str, vb: VarBuilder) -> Result<Box<dyn Embedder>> {
    match architecture {
        "efficientnet-lite0" => Ok(Box::new(super::efficientnet::EfficientNetLite::lite0(vb)?)),
        "resnet50-trunc" => Ok(Box::new(super::resnet::ResNetTrunc::resnet50(vb)?)),
        other => candle_core::bail!("unknown embedder {other:?} (known: {})", ARCHITECTURES.join(", ")),
    }
}

/// How a folded convolution is computed.
#[derive(Debug, Clone, Copy)]
pub enum ConvKind {
    /// 1×1, stride 1: a batched matmul, no im2col.
    Pointwise,
    /// One kernel per channel, TensorFlow "SAME" padding.
    DepthwiseTfSame { stride: usize },
    /// Dense k×k with TensorFlow "SAME" padding.
    DenseTfSame { stride: usize },
    /// Dense with symmetric (PyTorch) padding.
    Dense { stride: usize, pad: usize },
}

/// A convolution followed by inference-mode BatchNorm, folded into one weight and bias.
pub struct ConvBn {
    weight: Tensor,
    bias: Tensor,
    kind: ConvKind,
}

impl ConvBn {
    /// Loads `<conv>.weight` (no bias) and `<bn>.{weight,bias,running_mean,running_var}` and folds:
    /// w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε).
    pub fn load(
        shape: (usize, usize, usize, usize),
        conv: VarBuilder,
        bn: VarBuilder,
        eps: f64,
        kind: ConvKind,
    ) -> Result<Self> {
        let fan_out = (shape.0 * shape.2 * shape.3) as f64;
        let std = (2.0 / fan_out).sqrt();
        let w = conv.get_with_hints(shape, "weight", Init::Randn { mean: 0.0, stdev: std })?;
        let c = shape.0;
        let gamma = bn.get_with_hints(c, "weight", Init::Const(1.0))?;
        let beta = bn.get_with_hints(c, "bias", Init::Const(0.0))?;
        let mean = bn.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        let var = bn.get_with_hints(c, "running_var", Init::Const(1.0))?;
        let scale = (gamma / (var + eps)?.sqrt()?)?;
        let weight = w.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        let weight = match kind {
            ConvKind::Pointwise => weight.reshape((shape.0, shape.1))?,
            _ => weight,
        };
        Ok(ConvBn { weight, bias, kind })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let out_c = self.weight.dim(0)?;
        let y = match self.kind {
            ConvKind::Pointwise => {
                let y = self.weight.broadcast_matmul(&x.reshape((b, c, h * w))?)?;
                y.reshape((b, out_c, h, w))?
            }
            ConvKind::DepthwiseTfSame { stride } => {
                let (kh, kw) = (self.weight.dim(2)?, self.weight.dim(3)?);
                depthwise_conv2d(x, &self.weight, DwGeom::tf_same(h, w, kh, kw, stride))?
            }
            ConvKind::DenseTfSame { stride } => {
                let (kh, kw) = (self.weight.dim(2)?, self.weight.dim(3)?);
                let g = DwGeom::tf_same(h, w, kh, kw, stride);
                let xp = x.pad_with_zeros(2, g.pad.0, g.pad.1)?.pad_with_zeros(3, g.pad.2, g.pad.3)?;
                xp.conv2d(&self.weight, 0, stride, 1, 1)?
            }
            ConvKind::Dense { stride, pad } => x.conv2d(&self.weight, pad, stride, 1, 1)?,
        };
        y.broadcast_add(&self.bias.reshape((1, out_c, 1, 1))?)
    }
}

/// Global average pooling [B, C, H, W] → [B, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(2)?.mean(D::Minus1)
}
