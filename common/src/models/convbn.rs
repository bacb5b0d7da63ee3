//! A convolution followed by BatchNorm, as the CNN embedders use it: folded into one weight and
//! bias for inference (through OpenBLAS on the CPU, [`super::conv`]), or kept apart and run on batch
//! statistics for fine-tuning.
//!
//! Fine-tuning builds the same network from the same tensors with some layers *trainable*: their
//! convolution weight and BatchNorm affine parameters stay the VarBuilder's variables (so
//! gradients reach them), BatchNorm normalises with the batch's statistics and updates the running
//! ones in place (momentum 0.1, unbiased variance, as PyTorch). Frozen layers are folded and
//! detached, so backpropagation stops at the first trainable layer.

use super::conv::{FrozenConv, Padding};
use super::ops::{depthwise_conv2d, depthwise_conv2d_bias_act, f32_slice, Act, DwGeom};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// BatchNorm's running-statistics momentum in training mode (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// BatchNorm kept apart from its convolution, for training.
struct TrainBn {
    gamma: Tensor,
    beta: Tensor,
    /// Share storage with the VarBuilder's tensors: updated in place.
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
}

impl TrainBn {
    /// Normalise `y` [B, C, H, W] with its own per-channel statistics and update the running ones.
    fn forward(&self, y: &Tensor) -> Result<Tensor> {
        let c = y.dim(1)?;
        let n = y.elem_count() / c;
        let mean = y.mean_keepdim((0, 2, 3))?;
        let centred = y.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
        let yhat = centred.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        let out =
            yhat.broadcast_mul(&self.gamma.reshape((1, c, 1, 1))?)?.broadcast_add(&self.beta.reshape((1, c, 1, 1))?)?;
        let m = BN_MOMENTUM;
        let mean = mean.detach().flatten_all()?;
        let unbiased = (var.detach().flatten_all()? * (n as f64 / (n.max(2) - 1) as f64))?;
        self.running_mean.slice_set(&((&self.running_mean * (1.0 - m))? + (mean * m)?)?, 0, 0)?;
        self.running_var.slice_set(&((&self.running_var * (1.0 - m))? + (unbiased * m)?)?, 0, 0)?;
        Ok(out)
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

/// A convolution followed by BatchNorm: folded into one weight and bias for inference, or apart
/// (trainable) for fine-tuning.
pub struct ConvBn {
    /// Folded weight; the raw convolution weight when `train` is set.
    weight: Tensor,
    /// Folded bias (unused when `train` is set).
    bias: Tensor,
    kind: ConvKind,
    train: Option<TrainBn>,
    /// The same frozen layer for the CPU's OpenBLAS path (dense and pointwise, f32 on the CPU).
    frozen: Option<FrozenConv>,
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
        Self::load_as(shape, conv, bn, eps, kind, false)
    }

    /// As [`ConvBn::load`], trainable (BatchNorm on batch statistics) when `trainable`.
    pub fn load_as(
        shape: (usize, usize, usize, usize),
        conv: VarBuilder,
        bn: VarBuilder,
        eps: f64,
        kind: ConvKind,
        trainable: bool,
    ) -> Result<Self> {
        let fan_out = (shape.0 * shape.2 * shape.3) as f64;
        let std = (2.0 / fan_out).sqrt();
        // Trainable layers keep the VarBuilder's dtype; frozen ones fold in f32 and are cast to it
        // afterwards (half-precision inference keeps the fold exact).
        let compute = conv.dtype();
        let load = if trainable { compute } else { DType::F32 };
        let w = conv.get_with_hints_dtype(shape, "weight", Init::Randn { mean: 0.0, stdev: std }, load)?;
        let c = shape.0;
        let gamma = bn.get_with_hints_dtype(c, "weight", Init::Const(1.0), load)?;
        let beta = bn.get_with_hints_dtype(c, "bias", Init::Const(0.0), load)?;
        let mean = bn.get_with_hints_dtype(c, "running_mean", Init::Const(0.0), load)?;
        let var = bn.get_with_hints_dtype(c, "running_var", Init::Const(1.0), load)?;
        let as_kind = |w: Tensor| match kind {
            ConvKind::Pointwise => w.reshape((shape.0, shape.1)),
            _ => Ok(w),
        };
        if trainable {
            let bias = beta.zeros_like()?;
            let train = TrainBn { gamma, beta, running_mean: mean, running_var: var, eps };
            return Ok(ConvBn { weight: as_kind(w)?, bias, kind, train: Some(train), frozen: None });
        }
        let scale = (gamma / (var + eps)?.sqrt()?)?;
        let weight = w.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        // Detached: a frozen layer is a constant to any training around it.
        let k = (shape.2, shape.3);
        let frozen = match kind {
            _ if compute != DType::F32 || !weight.device().is_cpu() => None,
            ConvKind::Pointwise => Some(FrozenConv::new(&weight, &bias, k, 1, Padding::Symmetric(0))?),
            ConvKind::DenseTfSame { stride } => Some(FrozenConv::new(&weight, &bias, k, stride, Padding::TfSame)?),
            ConvKind::Dense { stride, pad } => {
                Some(FrozenConv::new(&weight, &bias, k, stride, Padding::Symmetric(pad))?)
            }
            ConvKind::DepthwiseTfSame { .. } => None,
        };
        let (weight, bias) = (as_kind(weight)?.to_dtype(compute)?, bias.to_dtype(compute)?);
        Ok(ConvBn { weight: weight.detach(), bias: bias.detach(), kind, train: None, frozen })
    }

    /// The convolution, its folded bias and `act`, the last two in one pass over the output.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        if let Some(f) = self.frozen.as_ref().filter(|_| FrozenConv::applies(x)) {
            return f.forward(x, act, None);
        }
        if let ConvKind::DepthwiseTfSame { stride } = self.kind {
            if self.train.is_none() && x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
                let (h, w) = (x.dim(2)?, x.dim(3)?);
                let g = DwGeom::tf_same(h, w, self.weight.dim(2)?, self.weight.dim(3)?, stride);
                return depthwise_conv2d_bias_act(x, &self.weight, &self.bias, g, act);
            }
        }
        let y = self.conv(x)?;
        let y = if let Some(bn) = &self.train {
            bn.forward(&y)?
        } else if y.device().is_cpu() && y.dtype() == DType::F32 {
            return y.apply_op2_no_bwd(&self.bias, &BiasAct(act));
        } else {
            y.broadcast_add(&self.bias.reshape((1, self.bias.elem_count(), 1, 1))?)?
        };
        act.apply(&y)
    }

    /// The convolution and its folded bias, no activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::None)
    }

    /// `act(conv(x) + bias + residual)`: a residual block's last convolution and its skip
    /// connection, in one pass on the CPU's OpenBLAS path.
    pub fn forward_residual_act(&self, x: &Tensor, residual: &Tensor, act: Act) -> Result<Tensor> {
        if let Some(f) = self.frozen.as_ref().filter(|_| FrozenConv::applies(x) && !residual.track_op()) {
            return f.forward(x, act, Some(residual));
        }
        let y = (self.forward(x)? + residual)?;
        act.apply(&y)
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
    use candle_core::{Device, Var};
    use std::collections::BTreeMap;

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

    fn scalar(t: &Tensor) -> f32 {
        t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn a_trainable_layer_normalises_with_batch_statistics_and_updates_the_running_ones() {
        let p = Params::new(1);
        let vb = p.var_builder(&Device::Cpu);
        let kind = ConvKind::Dense { stride: 1, pad: 1 };
        let conv = ConvBn::load_as((4, 3, 3, 3), vb.pp("c"), vb.pp("bn"), 1e-5, kind, true).unwrap();
        let x = (Tensor::randn(0f32, 1.0, (3, 3, 6, 5), &Device::Cpu).unwrap() + 2.0).unwrap();
        let raw = conv.conv(&x).unwrap();
        let y = conv.forward(&x).unwrap();
        // γ = 1, β = 0 at initialisation: every channel of the output has mean 0 and variance 1.
        for c in 0..4 {
            let ch = y.narrow(1, c, 1).unwrap().flatten_all().unwrap();
            let mean = scalar(&ch.mean_all().unwrap());
            let var = scalar(&ch.sqr().unwrap().mean_all().unwrap()) - mean * mean;
            assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3, "channel {c}: {mean} {var}");
        }
        // Running statistics moved 10% of the way from (0, 1) to the batch's (unbiased) ones.
        let named: BTreeMap<String, Tensor> = p.snapshot().unwrap();
        let ch0 = raw.narrow(1, 0, 1).unwrap().flatten_all().unwrap();
        let n = ch0.elem_count() as f32;
        let m = scalar(&ch0.mean_all().unwrap());
        let v = (scalar(&ch0.sqr().unwrap().mean_all().unwrap()) - m * m) * n / (n - 1.0);
        let rm = named["bn.running_mean"].to_vec1::<f32>().unwrap()[0];
        let rv = named["bn.running_var"].to_vec1::<f32>().unwrap()[0];
        assert!((rm - 0.1 * m).abs() < 1e-4, "{rm} vs {}", 0.1 * m);
        assert!((rv - (0.9 + 0.1 * v)).abs() < 1e-3, "{rv} vs {}", 0.9 + 0.1 * v);
    }

    #[test]
    fn trainable_layers_have_the_gradients_finite_differences_give() {
        let kinds = [
            ((4, 3, 3, 3), ConvKind::Dense { stride: 2, pad: 1 }),
            ((4, 3, 3, 3), ConvKind::DenseTfSame { stride: 2 }),
            ((4, 3, 1, 1), ConvKind::Pointwise),
            ((3, 1, 3, 3), ConvKind::DepthwiseTfSame { stride: 2 }),
        ];
        for (shape, kind) in kinds {
            let p = Params::new(2);
            let vb = p.var_builder(&Device::Cpu);
            let conv = ConvBn::load_as(shape, vb.pp("c"), vb.pp("bn"), 1e-5, kind, true).unwrap();
            // Square, as patches are (candle's conv2d backward takes one output padding for both axes).
            let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
            let probe = Tensor::randn(0f32, 1.0, conv.forward(&x).unwrap().dims(), &Device::Cpu).unwrap();
            let loss = |c: &ConvBn| (c.forward(&x).unwrap() * &probe).unwrap().sum_all().unwrap();
            let grads = loss(&conv).backward().unwrap();
            let vars: BTreeMap<String, Var> = p.named_vars().into_iter().collect();
            for name in ["c.weight", "bn.weight", "bn.bias"] {
                let var = &vars[name];
                let g = grads.get(var).unwrap_or_else(|| panic!("{kind:?}: no gradient for {name}"));
                let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for i in [0, base.len() / 2, base.len() - 1] {
                    let h = 1e-2f32;
                    let at = |d: f32| {
                        let mut v = base.clone();
                        v[i] += d;
                        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                        scalar(&loss(&conv))
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                    assert!((fd - g[i]).abs() < 2e-2 * (1.0 + fd.abs()), "{kind:?} {name}[{i}]: {} vs {fd}", g[i]);
                }
            }
        }
    }
}
