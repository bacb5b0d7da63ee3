//! Frozen (inference) dense and pointwise convolutions on the CPU in f32, through OpenBLAS
//! ([`super::blas`]): per image, im2col (none for 1×1 stride-1 convolutions, whose input already is
//! the GEMM's right-hand matrix) and one GEMM `W[Cout, Cin·k·k] · col[Cin·k·k, OH·OW]`, then the
//! folded bias, an optional residual and the activation in one pass over that image's output while it
//! is still in cache. Images run in parallel on rayon's pool, each GEMM on one thread.
//!
//! candle's path for the same layer is im2col (with a layout copy), a GEMM from the `gemm` crate,
//! then separate passes for bias, residual and activation; `ConvBn` takes this one whenever its
//! input is CPU f32 and OpenBLAS is installed, and candle's otherwise (other devices, training).

use super::blas::{blas, Blas};
use super::ops::{f32_slice, Act, DwGeom};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// How a frozen convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of zeros on every side (PyTorch).
    Symmetric(usize),
    /// TensorFlow's "SAME", computed from the input's size (the extra zero at the bottom/right).
    TfSame,
}

/// A convolution with BatchNorm folded in, its weights kept as plain f32 for the GEMM.
#[derive(Clone)]
pub struct FrozenConv {
    /// [Cout, Cin·kh·kw], row-major.
    weight: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    cout: usize,
    cin: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: Padding,
}

impl FrozenConv {
    /// From a folded `weight` [Cout, Cin, kh, kw] (or [Cout, Cin] for 1×1) and `bias` [Cout].
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        (kh, kw): (usize, usize),
        stride: usize,
        padding: Padding,
    ) -> Result<Self> {
        let cout = weight.dim(0)?;
        let cin = weight.elem_count() / (cout * kh * kw);
        if cin * cout * kh * kw != weight.elem_count() || bias.elem_count() != cout {
            candle_core::bail!(
                "frozen conv: weight {:?} and bias {:?} do not fit {kh}x{kw}",
                weight.shape(),
                bias.shape()
            )
        }
        let flat = |t: &Tensor| -> Result<Arc<Vec<f32>>> { Ok(Arc::new(t.flatten_all()?.to_vec1::<f32>()?)) };
        Ok(FrozenConv { weight: flat(weight)?, bias: flat(bias)?, cout, cin, kh, kw, stride, padding })
    }

    /// Is the fast path available for `x` (CPU, f32, not part of a graph being differentiated,
    /// OpenBLAS installed)?
    pub fn applies(x: &Tensor) -> bool {
        x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !x.track_op() && blas().is_some()
    }

    /// `act(conv(x) + bias [+ residual])`. Call only where [`FrozenConv::applies`].
    pub fn forward(&self, x: &Tensor, act: Act, residual: Option<&Tensor>) -> Result<Tensor> {
        if residual.is_some_and(|r| r.track_op()) {
            candle_core::bail!("frozen conv: the residual is being differentiated; use candle's path")
        }
        let x = x.contiguous()?;
        match residual {
            None => x.apply_op1_no_bwd(&Run { conv: self, act }),
            Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &Run { conv: self, act }),
        }
    }

    fn pads(&self, h: usize, w: usize) -> (usize, usize, usize, usize) {
        match self.padding {
            Padding::Symmetric(p) => (p, p, p, p),
            Padding::TfSame => DwGeom::tf_same(h, w, self.kh, self.kw, self.stride).pad,
        }
    }

    /// The whole batch: `x` [B, Cin, H, W] → ([B, Cout, OH, OW], its shape).
    fn run(&self, blas: &Blas, x: &[f32], l: &Layout, residual: Option<&[f32]>, act: Act) -> Result<(Vec<f32>, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        if c != self.cin {
            candle_core::bail!("frozen conv: {c} input channels, weights for {}", self.cin)
        }
        let (pt, pb, pl, pr) = self.pads(h, w);
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if hp < self.kh || wp < self.kw {
            candle_core::bail!("frozen conv: kernel {}x{} larger than padded input {hp}x{wp}", self.kh, self.kw)
        }
        let (oh, ow) = ((hp - self.kh) / self.stride + 1, (wp - self.kw) / self.stride + 1);
        let (n, k, cout) = (oh * ow, self.cin * self.kh * self.kw, self.cout);
        let shape = Shape::from((b, cout, oh, ow));
        if residual.is_some_and(|r| r.len() != b * cout * n) {
            candle_core::bail!("frozen conv: residual does not match the output {shape:?}")
        }
        let direct = self.kh == 1 && self.kw == 1 && self.stride == 1 && (pt, pb, pl, pr) == (0, 0, 0, 0);
        // Not zeroed: the GEMM writes every element (OpenBLAS clears C itself when beta is 0).
        let mut out: Vec<f32> = Vec::with_capacity(b * cout * n);
        out.spare_capacity_mut()[..b * cout * n].par_chunks_mut(cout * n).enumerate().for_each(|(i, o)| {
            let xi = &x[i * c * h * w..(i + 1) * c * h * w];
            COL.with_borrow_mut(|col| {
                let rhs: &[f32] = if direct {
                    xi
                } else {
                    // Grown once per thread; im2col writes every element it uses.
                    if col.len() < k * n {
                        col.resize(k * n, 0.0);
                    }
                    self.im2col(xi, (h, w), (pt, pl), (oh, ow), &mut col[..k * n]);
                    &col[..k * n]
                };
                blas.gemm_uninit(cout, n, k, &self.weight, rhs, o);
            });
            // SAFETY: the GEMM above wrote all of `o`.
            let o = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            let res = residual.map(|r| &r[i * cout * n..(i + 1) * cout * n]);
            for (co, row) in o.chunks_mut(n).enumerate() {
                let bias = self.bias[co];
                match res {
                    Some(r) => epilogue_residual(row, bias, &r[co * n..(co + 1) * n], act),
                    None => epilogue(row, bias, act),
                }
            }
        });
        // SAFETY: every chunk was written above.
        unsafe { out.set_len(b * cout * n) };
        Ok((out, shape))
    }

    /// Rows `(ci, ky, kx)`, columns `(oy, ox)`: the input under each kernel tap, zero outside.
    fn im2col(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        (pt, pl): (usize, usize),
        (oh, ow): (usize, usize),
        col: &mut [f32],
    ) {
        let s = self.stride;
        let n = oh * ow;
        for ci in 0..self.cin {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut col[((ci * self.kh + ky) * self.kw + kx) * n..][..n];
                    // Output columns whose input column is inside the image: ox·s + kx − pl ∈ [0, w).
                    let lo = pl.saturating_sub(kx).div_ceil(s).min(ow);
                    let hi = if w + pl > kx { ((w + pl - kx - 1) / s + 1).min(ow) } else { 0 }.max(lo);
                    for oy in 0..oh {
                        let dst = &mut row[oy * ow..(oy + 1) * ow];
                        let iy = (oy * s + ky) as isize - pt as isize;
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        if hi == lo {
                            continue;
                        }
                        let first = lo * s + kx - pl;
                        if s == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                        } else {
                            for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[first + j * s];
                            }
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Each thread's im2col buffer, kept between layers and batches.
    static COL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[inline(always)]
fn activate(v: f32, act: Act) -> f32 {
    match act {
        Act::None => v,
        Act::Relu => v.max(0.0),
        Act::Relu6 => v.clamp(0.0, 6.0),
    }
}

/// `row = act(row + bias)`, one pass.
fn epilogue(row: &mut [f32], bias: f32, act: Act) {
    match act {
        Act::None => row.iter_mut().for_each(|v| *v += bias),
        Act::Relu => row.iter_mut().for_each(|v| *v = activate(*v + bias, Act::Relu)),
        Act::Relu6 => row.iter_mut().for_each(|v| *v = activate(*v + bias, Act::Relu6)),
    }
}

/// `row = act(row + bias + residual)`, one pass.
fn epilogue_residual(row: &mut [f32], bias: f32, residual: &[f32], act: Act) {
    match act {
        Act::None => row.iter_mut().zip(residual).for_each(|(v, r)| *v += bias + r),
        Act::Relu => row.iter_mut().zip(residual).for_each(|(v, r)| *v = activate(*v + bias + r, Act::Relu)),
        Act::Relu6 => row.iter_mut().zip(residual).for_each(|(v, r)| *v = activate(*v + bias + r, Act::Relu6)),
    }
}

struct Run<'a> {
    conv: &'a FrozenConv,
    act: Act,
}

impl Run<'_> {
    fn blas(&self) -> Result<&'static Blas> {
        blas().ok_or_else(|| candle_core::Error::Msg("frozen conv: OpenBLAS is not loaded".into()))
    }
}

impl CustomOp1 for Run<'_> {
    fn name(&self) -> &'static str {
        "frozen-conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "frozen conv input")?;
        let (y, shape) = self.conv.run(self.blas()?, x, l, None, self.act)?;
        Ok((CpuStorage::F32(y), shape))
    }
}

impl CustomOp2 for Run<'_> {
    fn name(&self) -> &'static str {
        "frozen-conv-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "frozen conv input")?;
        let r = f32_slice(s2, l2, "frozen conv residual")?;
        let (y, shape) = self.conv.run(self.blas()?, x, l1, Some(r), self.act)?;
        Ok((CpuStorage::F32(y), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut r = Rng::new(seed);
        let n = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| r.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    /// candle's convolution with explicit zero padding, then bias, residual and activation.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: usize,
        pads: (usize, usize, usize, usize),
        act: Act,
        res: Option<&Tensor>,
    ) -> Tensor {
        let xp = x.pad_with_zeros(2, pads.0, pads.1).unwrap().pad_with_zeros(3, pads.2, pads.3).unwrap();
        let y = xp.conv2d(w, 0, stride, 1, 1).unwrap();
        let y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap()).unwrap();
        let y = match res {
            Some(r) => (y + r).unwrap(),
            None => y,
        };
        match act {
            Act::None => y,
            Act::Relu => y.relu().unwrap(),
            Act::Relu6 => y.clamp(0f32, 6f32).unwrap(),
        }
    }

    #[test]
    fn frozen_convolutions_match_candles_for_every_shape_the_embedders_use() {
        crate::models::blas::for_test();
        // (cin, cout, k, stride, padding, input h×w, act, residual): ResNet's stem, 3×3 and strided
        // 1×1 downsample, pointwise with residual, EfficientNet's TF-SAME stride-2 stem on odd and
        // even inputs.
        let cases = [
            (3, 8, 7, 2, Padding::Symmetric(3), (19, 16), Act::Relu, false),
            (6, 5, 3, 1, Padding::Symmetric(1), (9, 11), Act::Relu, false),
            (6, 10, 1, 2, Padding::Symmetric(0), (9, 8), Act::None, false),
            (7, 4, 1, 1, Padding::Symmetric(0), (5, 6), Act::Relu, true),
            (4, 4, 1, 1, Padding::Symmetric(0), (3, 3), Act::None, true),
            (3, 6, 3, 2, Padding::TfSame, (13, 12), Act::Relu6, false),
            (5, 3, 3, 2, Padding::TfSame, (8, 10), Act::Relu6, false),
            (5, 3, 5, 1, Padding::TfSame, (6, 7), Act::None, false),
        ];
        for (i, &(cin, cout, k, stride, padding, (h, w), act, with_res)) in cases.iter().enumerate() {
            let x = randn(&[3, cin, h, w], i as u64);
            let wt = randn(&[cout, cin, k, k], 100 + i as u64);
            let b = randn(&[cout], 200 + i as u64);
            let conv = FrozenConv::new(&wt, &b, (k, k), stride, padding).unwrap();
            let pads = conv.pads(h, w);
            let want_shape = reference(&x, &wt, &b, stride, pads, Act::None, None).dims().to_vec();
            let res = with_res.then(|| randn(&want_shape, 300 + i as u64));
            let want = reference(&x, &wt, &b, stride, pads, act, res.as_ref());
            let got = conv.forward(&x, act, res.as_ref()).unwrap();
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let diff = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "case {i}: differs by {diff}");
        }
    }

    #[test]
    fn mismatched_inputs_are_refused_with_the_reason() {
        crate::models::blas::for_test();
        let conv =
            FrozenConv::new(&randn(&[4, 3, 3, 3], 1), &randn(&[4], 2), (3, 3), 1, Padding::Symmetric(1)).unwrap();
        let e = conv.forward(&randn(&[1, 5, 6, 6], 3), Act::None, None).unwrap_err().to_string();
        assert!(e.contains("5 input channels"), "{e}");
        let e = conv.forward(&randn(&[1, 3, 6, 6], 3), Act::None, Some(&randn(&[1, 4, 5, 5], 4))).unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
        assert!(FrozenConv::new(&randn(&[4, 3, 3, 3], 1), &randn(&[5], 2), (3, 3), 1, Padding::TfSame).is_err());
    }
}
