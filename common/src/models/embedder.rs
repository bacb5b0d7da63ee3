//! Patch embedders behind one trait, and the pieces they share: convolutions with BatchNorm folded
//! into their weights for inference.

use super::ops::{depthwise_conv2d, f32_slice, DwGeom};
use crate::features::Preprocessing;
use candle_core::{DType, Result, Tensor, D};
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

    /// The convolution, its folded bias and `act`, the last two in one pass over the output.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let y = self.conv(x)?;
        if y.device().is_cpu() && y.dtype() == DType::F32 {
            return y.apply_op2_no_bwd(&self.bias, &BiasAct(act));
        }
        let y = y.broadcast_add(&self.bias.reshape((1, self.bias.elem_count(), 1, 1))?)?;
        match act {
            Act::None => Ok(y),
            Act::Relu => y.relu(),
            Act::Relu6 => y.clamp(0f32, 6f32),
        }
    }

    /// The convolution and its folded bias, no activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::None)
    }

    /// The convolution alone (no bias).
    fn conv(&self, x: &Tensor) -> Result<Tensor> {
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
        Ok(y)
    }
}

/// The activation after a folded convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    /// min(max(x, 0), 6): MobileNet's and EfficientNet-Lite's.
    Relu6,
}

/// y = act(x + bias[channel]) over [B, C, H, W] in one pass (inference only: no backward). candle's
/// broadcast add and clamp take three passes and three full-size allocations.
struct BiasAct(Act);

impl candle_core::CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (_, c, h, w) = l1.shape().dims4()?;
        let x = f32_slice(s1, l1, "bias-act input")?;
        let bias = f32_slice(s2, l2, "bias-act bias")?;
        if bias.len() != c {
            candle_core::bail!("bias-act: {} biases for {c} channels", bias.len())
        }
        let act = self.0;
        // A copy, then one in-place pass: measured faster than writing into a zeroed buffer.
        let mut y = x.to_vec();
        y.par_chunks_mut(h * w).enumerate().for_each(|(plane, v)| {
            let b = bias[plane % c];
            match act {
                Act::None => v.iter_mut().for_each(|x| *x += b),
                Act::Relu => v.iter_mut().for_each(|x| *x = (*x + b).max(0.0)),
                Act::Relu6 => v.iter_mut().for_each(|x| *x = (*x + b).clamp(0.0, 6.0)),
            }
        });
        Ok((candle_core::CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// Global average pooling [B, C, H, W] → [B, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(2)?.mean(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use candle_core::Device;

    #[test]
    fn fused_bias_and_activation_match_candles_ops() {
        let p = Params::new(4);
        let vb = p.var_builder(&Device::Cpu);
        let conv =
            ConvBn::load((6, 3, 3, 3), vb.pp("c"), vb.pp("bn"), 1e-3, ConvKind::Dense { stride: 1, pad: 1 }).unwrap();
        // A bias far from zero, so both ReLU6 bounds are hit.
        let conv = ConvBn { bias: (conv.bias.clone() * 40.0).unwrap(), ..conv };
        let x = (Tensor::randn(0f32, 1.0, (2, 3, 9, 7), &Device::Cpu).unwrap() * 5.0).unwrap();
        let raw = conv.conv(&x).unwrap().broadcast_add(&conv.bias.reshape((1, 6, 1, 1)).unwrap()).unwrap();
        for (act, want) in
            [(Act::None, raw.clone()), (Act::Relu, raw.relu().unwrap()), (Act::Relu6, raw.clamp(0f32, 6f32).unwrap())]
        {
            let got = conv.forward_act(&x, act).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{act:?}: {diff}");
        }
        let y = conv.forward_act(&x, Act::Relu6).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(y.contains(&0.0) && y.contains(&6.0), "both bounds exercised");
    }
}
