//! Tensor operations candle lacks or runs slowly, each differentiable where training needs it.
//!
//! - [`depthwise_conv2d`]: one kernel per channel. candle's grouped conv2d runs one convolution per
//!   group, which makes PPEG (512 groups), Nyström's residual conv and EfficientNet's depthwise
//!   stages crawl; on the CPU this op is a direct loop, parallel over (batch, channel), with its own
//!   backward; on other devices the tap sum [`depthwise_conv2d_taps`] (KH·KW element-wise passes,
//!   its backward written out).
//! - [`pinv_iterative`]: the Moore–Penrose iteration Nyströmformer uses, as plain matmuls.
//! - [`dropout`]: dropout with a mask from a seeded generator, so training is reproducible (on a
//!   GPU the device's generator, seeded per run by [`seed_device`]).
//! - [`softmax_last_dim`]: softmax over the last dimension in one pass, with a fused backward.
//!   candle's fused softmax has no backward, and the composed one keeps four full-size tensors per
//!   call alive for the backward pass (TransMIL's attention maps are [heads, n, landmarks]); this
//!   one keeps its input and output only and computes the gradient in one pass.
//! - [`layer_norm`]: LayerNorm over the last dimension with its affine part, in one pass, with a
//!   fused backward; candle's fused LayerNorm has no backward and `layer_norm_slow` keeps about six
//!   full-size intermediates per call.

use crate::rng::Rng;
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use rayon::prelude::*;

/// The activation after a folded convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    /// min(max(x, 0), 6): MobileNet's and EfficientNet-Lite's.
    Relu6,
}

impl Act {
    /// The activation over a tensor (candle's ops, differentiable).
    pub fn apply(self, y: &Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(y.clone()),
            Act::Relu => y.relu(),
            Act::Relu6 => y.clamp(0f32, 6f32),
        }
    }
}

/// Geometry of a depthwise convolution: stride and (top, bottom, left, right) zero padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwGeom {
    pub stride: (usize, usize),
    pub pad: (usize, usize, usize, usize),
}

impl DwGeom {
    /// Symmetric padding, PyTorch-style.
    pub fn same_pad(kh: usize, kw: usize, stride: usize) -> Self {
        DwGeom { stride: (stride, stride), pad: (kh / 2, kh / 2, kw / 2, kw / 2) }
    }

    /// TensorFlow "SAME" padding for input `h × w` (extra pixel at the bottom/right).
    pub fn tf_same(h: usize, w: usize, kh: usize, kw: usize, stride: usize) -> Self {
        let total = |n: usize, k: usize| ((n.div_ceil(stride) - 1) * stride + k).saturating_sub(n);
        let (th, tw) = (total(h, kh), total(w, kw));
        DwGeom { stride: (stride, stride), pad: (th / 2, th - th / 2, tw / 2, tw - tw / 2) }
    }

    fn out_hw(&self, h: usize, w: usize, kh: usize, kw: usize) -> Result<(usize, usize)> {
        let hp = h + self.pad.0 + self.pad.1;
        let wp = w + self.pad.2 + self.pad.3;
        if hp < kh || wp < kw {
            candle_core::bail!("depthwise conv: kernel {kh}x{kw} larger than padded input {hp}x{wp}")
        }
        Ok(((hp - kh) / self.stride.0 + 1, (wp - kw) / self.stride.1 + 1))
    }
}

/// `x`: [B, C, H, W], `w`: [C, 1, KH, KW] → [B, C, OH, OW]. No bias (add it with a broadcast).
/// CPU f32 runs the direct op; every other device and dtype [`depthwise_conv2d_taps`].
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, geom: DwGeom) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, DepthwiseConv { geom, epilogue: None });
    }
    depthwise_conv2d_taps(x, w, geom)
}

/// The depthwise convolution from operations every device has: one strided view of the padded
/// input per kernel tap, scaled by that tap's weight per channel and summed. On a GPU this is
/// KH·KW element-wise passes over the output, against the one convolution per channel (up to 512
/// launches of tiny GEMMs, and as many again backwards) that candle's grouped conv2d makes.
///
/// Strides go through a polyphase view: the padded input [B, C, H', W'], with H' and W' made
/// multiples of the stride, seen as [B, C, H'/s, s, W'/s, s], so that the rows `oy·s + ky` of tap
/// `ky` are the rows `oy + ky/s` of phase `ky % s`. Half-precision inputs are summed in f32 and the
/// result cast back (a 7×7 kernel sums 49 products).
///
/// On the CPU and CUDA this runs inside one custom op whose backward pass is written out
/// ([`taps_backward`]: the gradient scattered back tap by tap, and each tap's weight gradient as one
/// reduction), so training keeps only the op's inputs; left to autograd, every tap's product and
/// every partial sum would stay alive until the backward pass (PPEG's 7×7 at N = 16,000: 3 GB in
/// f32). Other devices get exactly that autograd form.
pub fn depthwise_conv2d_taps(x: &Tensor, w: &Tensor, geom: DwGeom) -> Result<Tensor> {
    check_depthwise(x, w)?;
    if x.device().is_cpu() || x.device().is_cuda() {
        from_offset_zero(x)?.apply_op2(&from_offset_zero(w)?, DepthwiseTaps { geom })
    } else {
        taps_forward(x, w, geom)
    }
}

fn check_depthwise(x: &Tensor, w: &Tensor) -> Result<()> {
    let c = x.dims4()?.1;
    let (c2, one, _, _) = w.dims4()?;
    if c2 != c || one != 1 {
        candle_core::bail!("depthwise conv: kernel {:?} does not fit input {:?}", w.shape(), x.shape())
    }
    Ok(())
}

/// The padded input of a depthwise convolution in its polyphase view, and the kernel per tap, in
/// the dtype the sums run in.
struct Taps {
    /// [B, C, HQ, SH, WQ, SW].
    phases: Tensor,
    /// [C, KH·KW].
    w: Tensor,
    k: (usize, usize),
    out: (usize, usize),
    q: (usize, usize),
    stride: (usize, usize),
}

/// The dtype a depthwise convolution sums in: f32 for half-precision inputs.
fn sum_dtype(dtype: DType) -> DType {
    if matches!(dtype, DType::F16 | DType::BF16) {
        DType::F32
    } else {
        dtype
    }
}

impl Taps {
    fn new(x: &Tensor, w: &Tensor, geom: DwGeom) -> Result<Self> {
        let (b, c, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let (oh, ow) = geom.out_hw(h, wd, kh, kw)?;
        let (sh, sw) = geom.stride;
        let acc = sum_dtype(x.dtype());
        let (x, w) = (x.to_dtype(acc)?, w.to_dtype(acc)?.reshape((c, kh * kw))?);
        // The phases need `oh + (kh - 1) / sh` rows of `sh`; the rows past the last tap's reach are
        // never read, so they may be cut or added as zeros.
        let (hq, wq) = (oh + (kh - 1) / sh, ow + (kw - 1) / sw);
        let xp = fit(&x, 2, geom.pad.0, hq * sh)?;
        let xp = fit(&xp, 3, geom.pad.2, wq * sw)?;
        let phases = xp.contiguous()?.reshape((b, c, hq, sh, wq, sw))?;
        Ok(Taps { phases, w, k: (kh, kw), out: (oh, ow), q: (hq, wq), stride: (sh, sw) })
    }

    /// The input rows and columns tap (ky, kx) multiplies: [B, C, OH, OW], a view.
    fn tap(&self, ky: usize, kx: usize) -> Result<Tensor> {
        let ((sh, sw), (oh, ow)) = (self.stride, self.out);
        self.phases
            .narrow(2, ky / sh, oh)?
            .narrow(3, ky % sh, 1)?
            .narrow(4, kx / sw, ow)?
            .narrow(5, kx % sw, 1)?
            .squeeze(5)?
            .squeeze(3)
    }

    /// Tap (ky, kx)'s weight per channel, [1, C, 1, 1].
    fn weight(&self, ky: usize, kx: usize) -> Result<Tensor> {
        let c = self.w.dim(0)?;
        self.w.narrow(1, ky * self.k.1 + kx, 1)?.reshape((1, c, 1, 1))
    }
}

/// `t` zero-padded by `before` along `dim` and then cut or zero-padded to `want`.
fn fit(t: &Tensor, dim: usize, before: usize, want: usize) -> Result<Tensor> {
    let have = t.dim(dim)? + before;
    let t = t.pad_with_zeros(dim, before, want.saturating_sub(have))?;
    if have > want {
        t.narrow(dim, 0, want)
    } else {
        Ok(t)
    }
}

/// The tap sum, in candle's operations (differentiable by autograd when its inputs are tracked).
fn taps_forward(x: &Tensor, w: &Tensor, geom: DwGeom) -> Result<Tensor> {
    let t = Taps::new(x, w, geom)?;
    let mut out: Option<Tensor> = None;
    for ky in 0..t.k.0 {
        for kx in 0..t.k.1 {
            let term = t.tap(ky, kx)?.broadcast_mul(&t.weight(ky, kx)?)?;
            out = Some(match out {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
    }
    match out {
        Some(y) => y.to_dtype(x.dtype()),
        None => candle_core::bail!("depthwise conv: empty kernel"),
    }
}

/// Gradients of the tap sum with respect to `x` and `w` given the output's gradient `grad`:
/// each tap's `grad · weight` added into its phase of the padded input at the tap's offset (the
/// phases then interleaved and the padding cut off), and each tap's weight gradient the sum of
/// `grad · tap` over batch, rows and columns.
pub fn taps_backward(x: &Tensor, w: &Tensor, grad: &Tensor, geom: DwGeom) -> Result<(Tensor, Tensor)> {
    let (b, c, h, wd) = x.dims4()?;
    let t = Taps::new(&x.detach(), &w.detach(), geom)?;
    let grad = grad.detach().to_dtype(sum_dtype(grad.dtype()))?;
    let ((kh, kw), (oh, ow), (hq, wq), (sh, sw)) = (t.k, t.out, t.q, t.stride);
    let mut phase_grads: Vec<Option<Tensor>> = vec![None; sh * sw];
    let mut w_grads = Vec::with_capacity(kh * kw);
    for ky in 0..kh {
        for kx in 0..kw {
            w_grads.push((t.tap(ky, kx)? * &grad)?.sum(3)?.sum(2)?.sum(0)?);
            let (qy, qx) = (ky / sh, kx / sw);
            let term = grad.broadcast_mul(&t.weight(ky, kx)?)?;
            let term = term.pad_with_zeros(2, qy, hq - oh - qy)?.pad_with_zeros(3, qx, wq - ow - qx)?;
            let slot = &mut phase_grads[(ky % sh) * sw + kx % sw];
            *slot = Some(match slot.take() {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
    }
    let zeros = Tensor::zeros((b, c, hq, wq), grad.dtype(), grad.device())?;
    let rows: Vec<Tensor> = phase_grads
        .chunks(sw)
        .map(|row| {
            let cols: Vec<Tensor> = row.iter().map(|g| g.clone().unwrap_or_else(|| zeros.clone())).collect();
            Tensor::stack(&cols, 4) // [B, C, HQ, WQ, SW]
        })
        .collect::<Result<_>>()?;
    let gxp = Tensor::stack(&rows, 3)?.reshape((b, c, hq * sh, wq * sw))?;
    // Back from the padded extent to the input's: rows the padding cut never had a gradient.
    let (pt, pl) = (geom.pad.0, geom.pad.2);
    let gxp = gxp.pad_with_zeros(2, 0, (pt + h).saturating_sub(hq * sh))?;
    let gxp = gxp.pad_with_zeros(3, 0, (pl + wd).saturating_sub(wq * sw))?;
    let gx = gxp.narrow(2, pt, h)?.narrow(3, pl, wd)?.to_dtype(x.dtype())?;
    let gw = Tensor::stack(&w_grads, 1)?.reshape((c, 1, kh, kw))?.to_dtype(w.dtype())?;
    Ok((gx, gw))
}

/// [`taps_forward`] as one op: inputs contiguous from offset 0, the sums run graph-free on the
/// storages' device, and the backward pass is [`taps_backward`].
struct DepthwiseTaps {
    geom: DwGeom,
}

/// The storage of an op's input, seen as a tensor with no graph (the op asks for its inputs
/// contiguous and from offset 0, so the shape says which elements are its own).
fn as_tensor(storage: Storage, l: &Layout) -> Result<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("depthwise taps: expected a contiguous input from offset 0")
    }
    Ok(Tensor::from_storage(storage, l.shape().clone(), BackpropOp::none(), false))
}

/// `t` itself when it is contiguous from its storage's first element, else a copy that is.
fn from_offset_zero(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().start_offset() == 0 {
        Ok(t.clone())
    } else {
        t.copy()
    }
}

/// A copy of a result's storage (contiguous from offset 0), to hand back from an op.
fn storage_of(t: &Tensor) -> Result<Storage> {
    let t = from_offset_zero(t)?;
    let (s, l) = t.storage_and_layout();
    Ok(match &*s {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(l)?),
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(l)?),
        Storage::Metal(s) => Storage::Metal(s.try_clone(l)?),
    })
}

impl DepthwiseTaps {
    fn run(&self, x: Storage, l1: &Layout, w: Storage, l2: &Layout) -> Result<(Storage, Shape)> {
        let y = taps_forward(&as_tensor(x, l1)?, &as_tensor(w, l2)?, self.geom)?;
        Ok((storage_of(&y)?, y.shape().clone()))
    }
}

impl CustomOp2 for DepthwiseTaps {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-taps"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.run(Storage::Cpu(s1.clone()), l1, Storage::Cpu(s2.clone()), l2)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("depthwise taps: the result left the CPU"),
        }
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.run(Storage::Cuda(s1.try_clone(l1)?), l1, Storage::Cuda(s2.try_clone(l2)?), l2)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("depthwise taps: the result left the GPU"),
        }
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = taps_backward(x, w, grad, self.geom)?;
        Ok((Some(gx), Some(gw)))
    }
}

/// `act(depthwise(x, w) + bias[channel])` for inference (no backward), CPU f32: bias and
/// activation applied to each output plane right after it is computed, while it is in cache.
pub fn depthwise_conv2d_bias_act(x: &Tensor, w: &Tensor, bias: &Tensor, geom: DwGeom, act: Act) -> Result<Tensor> {
    let bias = bias.flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &DepthwiseConv { geom, epilogue: Some((bias, act)) })
}

struct DepthwiseConv {
    geom: DwGeom,
    /// Inference only: per-channel bias and the activation after it.
    epilogue: Option<(Vec<f32>, Act)>,
}

thread_local! {
    /// Each thread's zero-bordered plane for the depthwise convolution, with the geometry
    /// ((h, w), (hp, wp), (pt, pl)) whose border it holds zeros for.
    static PADDED: std::cell::RefCell<(Vec<f32>, [usize; 6])> = const { std::cell::RefCell::new((Vec::new(), [0; 6])) };
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// Softmax over the last dimension, differentiable. CPU f32 runs the fused op; anything else the
/// composed one.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax input")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, row)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, v) in o.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// dx = y ⊙ (g − Σ g ⊙ y), row by row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32_slice(s1, l1, "softmax output")?, f32_slice(s2, l2, "softmax gradient")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("softmax gradient: shape {:?} vs output {:?}", l2.shape(), l1.shape())
        }
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d).zip(y.par_chunks(d).zip(g.par_chunks(d))).for_each(|(o, (y, g))| {
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((o, y), g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// LayerNorm over the last dimension, `x̂·weight + bias`, differentiable in all three. CPU f32 runs
/// the fused op; anything else candle's composed one.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
    } else {
        candle_nn::ops::layer_norm_slow(x, weight, bias, eps)
    }
}

/// Mean and 1/σ of one row.
#[inline]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = row.iter().sum::<f32>() / d;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer norm input")?;
        let (w, b) = (f32_slice(s2, l2, "layer norm weight")?, f32_slice(s3, l3, "layer norm bias")?);
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        if w.len() != d || b.len() != d {
            candle_core::bail!("layer norm: weight {} and bias {} for rows of {d}", w.len(), b.len())
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, row)| {
            let (mean, rstd) = row_stats(row, self.eps);
            for (i, (o, v)) in o.iter_mut().zip(row).enumerate() {
                *o = (v - mean) * rstd * w[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One op computes all three: rows 0..n are dx, row n is dweight, row n + 1 is dbias.
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let d = w.elem_count();
        let n = x.elem_count() / d;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, 1)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + 1, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Gradients of [`LayerNormOp`] from (x, weight, dy): [n + 2, d] = dx rows, dweight, dbias.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (f32_slice(s1, l1, "x")?, f32_slice(s2, l2, "weight")?, f32_slice(s3, l3, "grad")?);
        let d = w.len().max(1);
        let n = x.len() / d;
        let mut out = vec![0f32; (n + 2) * d];
        let (dx, dwb) = out.split_at_mut(n * d);
        // dx row by row; dweight and dbias summed over blocks of rows, then over blocks.
        const BLOCK: usize = 64;
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * BLOCK)
            .zip(x.par_chunks(d * BLOCK).zip(g.par_chunks(d * BLOCK)))
            .map(|(dxb, (xb, gb))| {
                let mut acc = vec![0f32; 2 * d];
                for ((dxr, xr), gr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for i in 0..d {
                        let xh = (xr[i] - mean) * rstd;
                        let gw = gr[i] * w[i];
                        m1 += gw;
                        m2 += gw * xh;
                        acc[i] += gr[i] * xh;
                        acc[d + i] += gr[i];
                    }
                    let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                    for i in 0..d {
                        let xh = (xr[i] - mean) * rstd;
                        dxr[i] = rstd * (gr[i] * w[i] - m1 - xh * m2);
                    }
                }
                acc
            })
            .collect();
        for acc in partial {
            for (o, a) in dwb.iter_mut().zip(acc) {
                *o += a;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n + 2, d))))
    }
}

/// `Σ a·b` over two slices of one length, in 16 partial sums (a vector register's worth) added at
/// the end: the compiler keeps a sequential sum sequential, which is scalar code.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The shared inner loop: for one (b, c) plane, visit every (output, input, weight) index triple.
/// `f(out_row, in_row, weight_index, lo, hi)` is called for each tap, where output columns
/// `lo..hi` read in-bounds input columns.
#[inline]
fn for_each_tap(
    geom: DwGeom,
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    (oh, ow): (usize, usize),
    mut f: impl FnMut(usize, usize, usize, usize, usize),
) {
    let (sh, sw) = geom.stride;
    let (pt, _, pl, _) = geom.pad;
    for ky in 0..kh {
        for oy in 0..oh {
            let iy = (oy * sh + ky) as isize - pt as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            let iy = iy as usize;
            for kx in 0..kw {
                // Output columns whose input column ox*sw + kx - pl lies inside [0, w).
                let lo = if kx >= pl { 0 } else { (pl - kx).div_ceil(sw) };
                let hi_excl = {
                    let lim = w + pl; // need ox*sw + kx < w + pl
                    if lim <= kx {
                        0
                    } else {
                        ((lim - kx - 1) / sw + 1).min(ow)
                    }
                };
                if lo >= hi_excl {
                    continue;
                }
                f(oy * ow, iy * w, ky * kw + kx, lo, hi_excl);
            }
        }
    }
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let (c2, one, kh, kw) = l2.shape().dims4()?;
        if c2 != c || one != 1 {
            candle_core::bail!("depthwise conv: kernel {:?} does not fit input {:?}", l2.shape(), l1.shape())
        }
        let x = f32_slice(s1, l1, "depthwise conv input")?;
        let k = f32_slice(s2, l2, "depthwise conv kernel")?;
        let geom = self.geom;
        let (oh, ow) = geom.out_hw(h, w, kh, kw)?;
        let ((sh, sw), (pt, pl)) = (geom.stride, (geom.pad.0, geom.pad.2));
        let (hp, wp) = (h + geom.pad.0 + geom.pad.1, w + geom.pad.2 + geom.pad.3);
        if self.epilogue.as_ref().is_some_and(|(bias, _)| bias.len() != c) {
            candle_core::bail!("depthwise conv: bias does not have {c} channels")
        }
        let mut out = vec![0f32; b * c * oh * ow];
        // Each plane is copied into a zero-bordered buffer (one per thread, kept between calls;
        // while the geometry stays the same only its interior is written), so every tap is a
        // branch-free pass over a whole output row.
        let shape_key = [h, w, hp, wp, pt, pl];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(bc, o)| {
            PADDED.with_borrow_mut(|(padded, key)| {
                if *key != shape_key || padded.len() != hp * wp {
                    padded.clear();
                    padded.resize(hp * wp, 0.0);
                    *key = shape_key;
                }
                let ch = bc % c;
                let xin = &x[bc * h * w..(bc + 1) * h * w];
                let ker = &k[ch * kh * kw..(ch + 1) * kh * kw];
                for (y, row) in xin.chunks(w).enumerate() {
                    let at = (y + pt) * wp + pl;
                    padded[at..at + w].copy_from_slice(row);
                }
                for (oy, orow) in o.chunks_mut(ow).enumerate() {
                    for ky in 0..kh {
                        let iy = oy * sh + ky;
                        let irow = &padded[iy * wp..(iy + 1) * wp];
                        for kx in 0..kw {
                            let wt = ker[ky * kw + kx];
                            if sw == 1 {
                                for (d, s) in orow.iter_mut().zip(&irow[kx..kx + ow]) {
                                    *d += wt * s;
                                }
                            } else {
                                for (d, s) in orow.iter_mut().zip(irow[kx..].iter().step_by(sw)) {
                                    *d += wt * s;
                                }
                            }
                        }
                    }
                }
                if let Some((bias, act)) = &self.epilogue {
                    let bias = bias[ch];
                    match act {
                        Act::None => o.iter_mut().for_each(|v| *v += bias),
                        Act::Relu => o.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
                        Act::Relu6 => o.iter_mut().for_each(|v| *v = (*v + bias).clamp(0.0, 6.0)),
                    }
                }
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, _, h, wd) = x.dims4()?;
        let gx = grad.apply_op2_no_bwd(w, &DepthwiseConvGradInput { geom: self.geom, h, w: wd })?;
        let gw =
            x.apply_op2_no_bwd(&grad, &DepthwiseConvGradKernel { geom: self.geom, kh: w.dim(2)?, kw: w.dim(3)? })?;
        Ok((Some(gx), Some(gw)))
    }
}

/// d(out)/d(x): scatter each output gradient back through the kernel taps.
struct DepthwiseConvGradInput {
    geom: DwGeom,
    h: usize,
    w: usize,
}

impl CustomOp2 for DepthwiseConvGradInput {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, oh, ow) = l1.shape().dims4()?;
        let (_, _, kh, kw) = l2.shape().dims4()?;
        let g = f32_slice(s1, l1, "depthwise conv grad")?;
        let k = f32_slice(s2, l2, "depthwise conv kernel")?;
        let (h, w, geom) = (self.h, self.w, self.geom);
        let (sw, pl) = (geom.stride.1, geom.pad.2);
        let mut gx = vec![0f32; b * c * h * w];
        gx.par_chunks_mut(h * w).enumerate().for_each(|(bc, gxp)| {
            let ch = bc % c;
            let gp = &g[bc * oh * ow..(bc + 1) * oh * ow];
            let ker = &k[ch * kh * kw..(ch + 1) * kh * kw];
            for_each_tap(geom, (h, w), (kh, kw), (oh, ow), |orow, irow, ki, lo, hi| {
                let wt = ker[ki];
                let kx = ki % kw;
                if sw == 1 {
                    // Contiguous on both sides: one vectorised pass.
                    let at = irow + lo + kx - pl;
                    for (d, g) in gxp[at..at + hi - lo].iter_mut().zip(&gp[orow + lo..orow + hi]) {
                        *d += wt * g;
                    }
                } else {
                    for ox in lo..hi {
                        gxp[irow + ox * sw + kx - pl] += wt * gp[orow + ox];
                    }
                }
            });
        });
        Ok((CpuStorage::F32(gx), Shape::from((b, c, h, w))))
    }
}

/// d(out)/d(kernel): correlate input and output gradient, summed over the batch.
struct DepthwiseConvGradKernel {
    geom: DwGeom,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for DepthwiseConvGradKernel {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-grad-kernel"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let (_, _, oh, ow) = l2.shape().dims4()?;
        let x = f32_slice(s1, l1, "depthwise conv input")?;
        let g = f32_slice(s2, l2, "depthwise conv grad")?;
        let (kh, kw, geom) = (self.kh, self.kw, self.geom);
        let (sw, pl) = (geom.stride.1, geom.pad.2);
        let mut gk = vec![0f32; c * kh * kw];
        gk.par_chunks_mut(kh * kw).enumerate().for_each(|(ch, gkc)| {
            for bi in 0..b {
                let bc = bi * c + ch;
                let xp = &x[bc * h * w..(bc + 1) * h * w];
                let gp = &g[bc * oh * ow..(bc + 1) * oh * ow];
                for_each_tap(geom, (h, w), (kh, kw), (oh, ow), |orow, irow, ki, lo, hi| {
                    let kx = ki % kw;
                    gkc[ki] += if sw == 1 {
                        let at = irow + lo + kx - pl;
                        dot(&gp[orow + lo..orow + hi], &xp[at..at + hi - lo])
                    } else {
                        (lo..hi).map(|ox| gp[orow + ox] * xp[irow + ox * sw + kx - pl]).sum()
                    };
                });
            }
        });
        Ok((CpuStorage::F32(gk), Shape::from((c, 1, kh, kw))))
    }
}

/// `a · b` over the last two dimensions; the leading ones are a batch, the same in both (any
/// strides: 0 for a broadcast operand, as a linear layer's weight is). On the CPU in f32 with
/// OpenBLAS: one SGEMM per batch entry and block of rows, in parallel, each operand read in place
/// whether row-major or transposed (`w.t()` is not copied). candle's CPU matmul (the `gemm` crate,
/// AVX2 kernels) reaches about half of OpenBLAS's AVX-512 speed here, and was 58% of a TransMIL
/// training step. Elsewhere candle's matmul. Differentiable: the gradients are products through
/// this same function.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() >= 2;
    if fits(a) && fits(b) && a.rank() == b.rank() && super::blas::blas().is_some() {
        let r = a.rank();
        if a.dims()[..r - 2] == b.dims()[..r - 2] && a.dims()[r - 1] == b.dims()[r - 2] {
            let inplace = |t: &Tensor| if mat_view(t.layout()).is_some() { Ok(t.clone()) } else { t.contiguous() };
            return inplace(a)?.apply_op2(&inplace(b)?, Matmul);
        }
    }
    a.matmul(b)
}

/// How a tensor's last two dimensions lie in memory: `(transposed, leading dimension)`, or `None`
/// when they are neither row- nor column-major.
fn mat_view(l: &Layout) -> Option<(bool, usize)> {
    let (d, s) = (l.dims(), l.stride());
    let r = d.len();
    let ((rows, cols), (sr, sc)) = ((d[r - 2], d[r - 1]), (s[r - 2], s[r - 1]));
    if (sc == 1 || cols == 1) && (sr >= cols || rows == 1) {
        return Some((false, if rows == 1 { cols.max(1) } else { sr }));
    }
    if (sr == 1 || rows == 1) && (sc >= rows || cols == 1) {
        return Some((true, if cols == 1 { rows.max(1) } else { sc }));
    }
    None
}

struct Matmul;

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "matmul-openblas"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let blas = super::blas::blas().ok_or_else(|| candle_core::Error::Msg("matmul: OpenBLAS not loaded".into()))?;
        let (a, b) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let batch = &da[..r - 2];
        let nb: usize = batch.iter().product();
        let (Some((ta, lda)), Some((tb, ldb))) = (mat_view(l1), mat_view(l2)) else {
            candle_core::bail!("matmul: an operand is neither row- nor column-major")
        };
        // Each batch entry's first element, from the batch strides.
        let starts = |l: &Layout| -> Vec<usize> {
            let strides = &l.stride()[..r - 2];
            (0..nb)
                .map(|mut i| {
                    let mut off = l.start_offset();
                    for (d, st) in batch.iter().zip(strides).rev() {
                        off += (i % d) * st;
                        i /= d;
                    }
                    off
                })
                .collect()
        };
        let (sa, sb) = (starts(l1), starts(l2));
        let mut out_dims = batch.to_vec();
        out_dims.extend([m, n]);
        let len = nb * m * n;
        if k == 0 {
            return Ok((CpuStorage::F32(vec![0.0; len]), Shape::from(out_dims)));
        }
        let mut out: Vec<f32> = Vec::with_capacity(len);
        if len > 0 {
            // Blocks of rows so that both cores (or all) have work when the batch is small.
            let per_entry = (2 * rayon::current_num_threads()).div_ceil(nb).max(1);
            let block = m.div_ceil(per_entry).max(16);
            out.spare_capacity_mut()[..len].par_chunks_mut(m * n).enumerate().for_each(|(bi, c)| {
                c.par_chunks_mut(block * n).enumerate().for_each(|(ri, c)| {
                    let r0 = ri * block;
                    let a0 = sa[bi] + if ta { r0 } else { r0 * lda };
                    let av = super::blas::MatView { data: &a[a0..], transposed: ta, ld: lda };
                    let bv = super::blas::MatView { data: &b[sb[bi]..], transposed: tb, ld: ldb };
                    blas.gemm_view(c.len() / n, n, k, av, bv, c, n);
                })
            });
        }
        // SAFETY: every element was written by one GEMM (its block of rows of its batch entry).
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the operands the graph tracks: a linear layer's input bag is data, and its
        // gradient (as many multiply-adds as the forward product) would be thrown away.
        let ga = if a.track_op() { Some(matmul(grad, &b.t()?)?) } else { None };
        let gb = if b.track_op() { Some(matmul(&a.t()?, grad)?) } else { None };
        Ok((ga, gb))
    }
}

/// Moore–Penrose pseudo-inverse by the iteration Nyströmformer uses (Razavi et al. 2014), as in the
/// reference `moore_penrose_iter_pinv`: the initial guess scales `xᵀ` by the largest column and row
/// sums over the *whole* batch.
pub fn pinv_iterative(x: &Tensor, iters: usize) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    let abs = x.abs()?;
    let col = max_shared(&abs.sum(D::Minus1)?.flatten_all()?)?;
    let row = max_shared(&abs.sum(D::Minus2)?.flatten_all()?)?;
    let scale = (col * row)?;
    let mut z = x.transpose(D::Minus1, D::Minus2)?.broadcast_div(&scale)?;
    let eye = Tensor::eye(n, x.dtype(), x.device())?;
    for _ in 0..iters {
        let xz = matmul(x, &z)?;
        let a = (eye.affine(7.0, 0.0)?.broadcast_sub(&xz))?;
        let b = eye.affine(15.0, 0.0)?.broadcast_sub(&matmul(&xz, &a)?)?;
        let c = eye.affine(13.0, 0.0)?.broadcast_sub(&matmul(&xz, &b)?)?;
        z = (matmul(&z, &c)? * 0.25)?;
    }
    Ok(z)
}

/// The largest element of a vector, whose gradient is shared evenly among the elements equal to
/// it, as PyTorch's `max()` does (candle's gives each tie the whole gradient). The value is the
/// maximum itself; the mean over the ties carries the gradient.
fn max_shared(v: &Tensor) -> Result<Tensor> {
    let max = v.max_keepdim(0)?.detach();
    let ties = v.broadcast_eq(&max)?.to_dtype(v.dtype())?;
    let mean = (v * &ties)?.sum_all()?.broadcast_div(&ties.sum_all()?)?;
    mean.clone() + (max.squeeze(0)? - mean)?.detach()
}

/// Inverted dropout: zeroes each element with probability `p` and scales the rest by 1/(1-p).
/// On the CPU the mask comes from `rng`; on other devices from the device's own generator
/// ([`dropout_device_rng`]), seeded per training run by [`seed_device`].
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() {
        return dropout_device_rng(x, p);
    }
    let n = x.elem_count();
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..n).map(|_| if rng.uniform() < p as f64 { 0.0 } else { keep }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// Dropout with the mask drawn on `x`'s device (cuRAND on a GPU): a host-drawn mask would cost
/// one generator call per element on the CPU and a bag-sized copy over the bus for each layer of
/// each step (TransMIL at N = 16,000: 8 M draws and 32 MB per layer).
pub fn dropout_device_rng(x: &Tensor, p: f32) -> Result<Tensor> {
    let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
    let mask = (u.ge(p)?.to_dtype(x.dtype())? * (1.0 / (1.0 - p as f64)))?;
    x * mask
}

/// Seeds `device`'s generator, which draws the dropout masks off the CPU, so that a training run
/// on a GPU repeats itself (while no other run draws from the same device meanwhile). The CPU's
/// masks come from each run's own [`Rng`]: nothing to do there.
pub fn seed_device(device: &candle_core::Device, seed: u64) -> Result<()> {
    if device.is_cpu() {
        Ok(())
    } else {
        device.set_seed(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn dot_is_the_sum_of_products_at_every_length() {
        for n in [0, 5, 16, 37] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() <= 1e-4 * want.abs().max(1.0), "n={n}");
        }
    }

    #[test]
    fn the_gradient_of_a_maximum_is_shared_among_ties_as_pytorch_shares_it() {
        let v = Var::new(&[1.0f32, 3.0, 2.0, 3.0, 3.0], &Device::Cpu).unwrap();
        let m = max_shared(v.as_tensor()).unwrap();
        assert_eq!(m.to_scalar::<f32>().unwrap(), 3.0);
        let g = m.affine(6.0, 0.0).unwrap().backward().unwrap();
        let g = g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![0.0, 2.0, 0.0, 2.0, 2.0]);
    }

    fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut r = Rng::new(seed);
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| r.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// candle's grouped conv2d as the reference (it is slow, not wrong).
    fn reference(x: &Tensor, w: &Tensor, g: DwGeom) -> Tensor {
        let c = x.dim(1).unwrap();
        let (pt, pb, pl, pr) = g.pad;
        let xp = x.pad_with_zeros(2, pt, pb).unwrap().pad_with_zeros(3, pl, pr).unwrap();
        xp.conv2d(w, 0, g.stride.0, 1, c).unwrap()
    }

    #[test]
    fn forward_matches_grouped_conv_for_every_geometry_we_use() {
        let cases = [
            ((2, 3, 9, 9), (3, 3), DwGeom::same_pad(3, 3, 1)),
            ((1, 4, 10, 7), (5, 5), DwGeom::same_pad(5, 5, 1)),
            ((2, 3, 12, 12), (3, 3), DwGeom::tf_same(12, 12, 3, 3, 2)),
            ((1, 2, 11, 11), (5, 5), DwGeom::tf_same(11, 11, 5, 5, 2)),
            ((1, 8, 40, 16), (33, 1), DwGeom { stride: (1, 1), pad: (16, 16, 0, 0) }),
            ((1, 5, 6, 6), (7, 7), DwGeom::same_pad(7, 7, 1)),
            // Stride 3 whose last input rows no tap reaches (the polyphase view cuts them).
            ((1, 3, 11, 10), (3, 3), DwGeom { stride: (3, 3), pad: (0, 0, 0, 0) }),
            // The first geometry again: each thread's padded plane was reshaped in between.
            ((2, 3, 9, 9), (3, 3), DwGeom::same_pad(3, 3, 1)),
        ];
        for (i, ((b, c, h, w), (kh, kw), g)) in cases.into_iter().enumerate() {
            let x = rand_tensor(&[b, c, h, w], i as u64);
            let k = rand_tensor(&[c, 1, kh, kw], 100 + i as u64);
            let ours = depthwise_conv2d(&x, &k, g).unwrap();
            let theirs = reference(&x, &k, g);
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            assert!(max_abs_diff(&ours, &theirs) < 1e-4, "case {i}");
            // The tap-sum form other devices run, here on the CPU.
            let taps = depthwise_conv2d_taps(&x, &k, g).unwrap();
            assert_eq!(taps.dims(), theirs.dims(), "case {i}, taps");
            assert!(max_abs_diff(&taps, &theirs) < 1e-4, "case {i}, taps");
            // The inference variant with its bias and activation fused in.
            let bias = rand_tensor(&[c], 200 + i as u64);
            let fused = depthwise_conv2d_bias_act(&x, &k, &bias, g, Act::Relu6).unwrap();
            let want = theirs.broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap()).unwrap().clamp(0f32, 6f32).unwrap();
            assert!(max_abs_diff(&fused, &want) < 1e-4, "case {i}, fused bias and ReLU6");
        }
    }

    #[test]
    fn tf_same_padding_puts_the_extra_pixel_last() {
        assert_eq!(DwGeom::tf_same(224, 224, 3, 3, 2).pad, (0, 1, 0, 1));
        assert_eq!(DwGeom::tf_same(56, 56, 5, 5, 2).pad, (1, 2, 1, 2));
        assert_eq!(DwGeom::tf_same(14, 14, 5, 5, 1).pad, (2, 2, 2, 2));
    }

    #[test]
    fn backward_matches_grouped_conv_gradients() {
        let cases = [
            ((2, 3, 9, 9), (3, 3), DwGeom::same_pad(3, 3, 1)),
            ((2, 3, 9, 9), (3, 3), DwGeom::tf_same(9, 9, 3, 3, 2)),
            ((2, 3, 9, 9), (5, 1), DwGeom { stride: (1, 1), pad: (2, 2, 0, 0) }),
            ((1, 4, 10, 10), (5, 5), DwGeom::tf_same(10, 10, 5, 5, 2)),
            ((1, 5, 8, 8), (7, 7), DwGeom::same_pad(7, 7, 1)),
            // Stride 3 with input rows no tap reaches, and a 1×1 kernel at stride 2 (phases no tap
            // reads). candle's convolution backward gets the input gradient's shape wrong when the
            // stride leaves rows unread, so these two take the direct op (checked above) as the truth.
            ((1, 3, 11, 10), (3, 3), DwGeom { stride: (3, 3), pad: (0, 0, 0, 0) }),
            ((1, 2, 7, 6), (1, 1), DwGeom { stride: (2, 2), pad: (0, 0, 0, 0) }),
        ];
        for (i, ((b, c, h, w), (kh, kw), g)) in cases.into_iter().enumerate() {
            let x = Var::from_tensor(&rand_tensor(&[b, c, h, w], 7 + i as u64)).unwrap();
            let k = Var::from_tensor(&rand_tensor(&[c, 1, kh, kw], 80 + i as u64)).unwrap();
            let probe = rand_tensor(reference(&x, &k, g).dims(), 90 + i as u64);
            let loss = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let want = loss(if i < 5 { reference(&x, &k, g) } else { depthwise_conv2d(&x, &k, g).unwrap() });
            let (wx, wk) = (want.get(&x).unwrap(), want.get(&k).unwrap());
            let forms = [
                ("direct op", depthwise_conv2d(&x, &k, g).unwrap()),
                ("taps op", depthwise_conv2d_taps(&x, &k, g).unwrap()),
                ("taps by autograd", taps_forward(&x, &k, g).unwrap()),
            ];
            for (name, y) in forms {
                let got = loss(y);
                assert!(max_abs_diff(got.get(&x).unwrap(), wx) < 1e-4, "{name}: grad x, case {i}");
                assert!(max_abs_diff(got.get(&k).unwrap(), wk) < 1e-3, "{name}: grad k, case {i}");
            }
        }
    }

    #[test]
    fn half_precision_depthwise_sums_in_f32_and_returns_the_input_dtype() {
        // PPEG's 7×7 over a 512-wide bag would sum 49 products; here 7×7 over 6 channels.
        let g = DwGeom::same_pad(7, 7, 1);
        let (x, k) = (rand_tensor(&[1, 6, 12, 12], 31), rand_tensor(&[6, 1, 7, 7], 32));
        let want = reference(&x, &k, g);
        let half = depthwise_conv2d(&x.to_dtype(DType::F16).unwrap(), &k.to_dtype(DType::F16).unwrap(), g).unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let half = half.to_dtype(DType::F32).unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Inputs rounded to f16 (2⁻¹¹ relative) and one rounding of the sum: far under 1% of the range.
        assert!(max_abs_diff(&half, &want) < 5e-3 * scale, "{} vs scale {scale}", max_abs_diff(&half, &want));
    }

    #[test]
    fn fused_softmax_matches_the_composed_one_forward_and_backward() {
        let d = Device::Cpu;
        let x = Var::new(&[[0.3f32, -1.2, 2.0, 0.0], [5.0, 5.0, -3.0, 1.0], [-50.0, 60.0, 0.1, 0.2]], &d).unwrap();
        let w = Tensor::new(&[[1.0f32, -2.0, 0.5, 3.0], [0.2, 0.1, -1.0, 2.0], [1.5, -0.5, 0.0, 1.0]], &d).unwrap();
        let ours = softmax_last_dim(x.as_tensor()).unwrap();
        let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        let g1 = (&ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
        assert!(a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.1, "a gradient flows");
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_one_forward_and_backward() {
        let d = Device::Cpu;
        let mut r = Rng::new(3);
        let mut t = |shape: &[usize], scale: f64| {
            let n = shape.iter().product::<usize>();
            Tensor::from_vec((0..n).map(|_| (r.normal() * scale) as f32).collect::<Vec<_>>(), shape, &d).unwrap()
        };
        // 130 rows: more than one block of the gradient's row blocks.
        let (x, w, b, m) = (t(&[2, 65, 12], 3.0), t(&[12], 1.0), t(&[12], 1.0), t(&[2, 65, 12], 1.0));
        let (x, w, b) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let max = |t: Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max((&ours - &theirs).unwrap()) < 1e-5);
        let g1 = (&ours * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &m).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(max((a - e).unwrap()) < 1e-4 * max(e.clone()).max(1.0), "{:?}", v.shape());
            assert!(max(a.clone()) > 1e-3, "a gradient flows");
        }
    }

    #[test]
    fn matmul_matches_candles_for_every_layout_forward_and_backward() {
        // Without OpenBLAS `matmul` is candle's own and this would compare it with itself.
        crate::models::blas::for_test();
        type View = fn(&Tensor) -> Tensor;
        type Case<'a> = (&'a str, &'a [usize], View, &'a [usize], View);
        let id: View = |t| t.clone();
        let t: View = |t| t.t().unwrap();
        // (a, b) as the models make them: plain, batched, a weight broadcast over the batch and read
        // transposed (a Linear layer), transposed views of both, a narrowed (row-strided) operand,
        // heads split from a sequence, and a layout neither row- nor column-major (copied first).
        let cases: Vec<Case> = vec![
            ("2-d", &[7, 5], id, &[5, 3], id),
            ("batched", &[2, 7, 5], id, &[2, 5, 3], id),
            ("linear", &[2, 37, 5], id, &[6, 5], |w| w.broadcast_left(2).unwrap().t().unwrap()),
            ("both transposed", &[2, 5, 7], t, &[2, 3, 5], t),
            ("row-strided", &[9, 8], |a| a.narrow(1, 1, 5).unwrap(), &[5, 4], id),
            ("heads", &[1, 40, 3, 4], |a| a.transpose(1, 2).unwrap(), &[1, 3, 4, 2], id),
            (
                "no matrix layout",
                &[3, 4, 5],
                |a| a.permute((2, 0, 1)).unwrap().narrow(0, 0, 2).unwrap(),
                &[2, 4, 6],
                id,
            ),
        ];
        for (i, (name, sa, fa, sb, fb)) in cases.into_iter().enumerate() {
            let va = Var::from_tensor(&rand_tensor(sa, 2 * i as u64)).unwrap();
            let vb = Var::from_tensor(&rand_tensor(sb, 2 * i as u64 + 1)).unwrap();
            let (a, b) = (fa(va.as_tensor()), fb(vb.as_tensor()));
            let ours = matmul(&a, &b).unwrap();
            let theirs = a.matmul(&b).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{name}");
            assert!(max_abs_diff(&ours, &theirs) < 1e-5, "{name}");
            let probe = rand_tensor(theirs.dims(), 99);
            let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&va, &vb] {
                let (x, y) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert_eq!(x.dims(), v.dims(), "{name}: gradient shape");
                assert!(max_abs_diff(x, y) < 1e-4, "{name}: gradient");
            }
        }
    }

    #[test]
    fn pinv_iteration_inverts_a_softmax_matrix() {
        let x = candle_nn::ops::softmax(&rand_tensor(&[2, 6, 6], 3), D::Minus1).unwrap();
        let z = pinv_iterative(&x, 20).unwrap();
        let eye = Tensor::eye(6, DType::F32, &Device::Cpu).unwrap();
        let xz = x.matmul(&z).unwrap();
        // x z x ≈ x is the defining property, whatever the conditioning.
        let xzx = xz.matmul(&x).unwrap();
        assert!(max_abs_diff(&xzx, &x) < 1e-3);
        let _ = eye;
    }

    #[test]
    fn dropout_keeps_expectation_and_is_seeded() {
        let x = Tensor::ones((1000,), DType::F32, &Device::Cpu).unwrap();
        let a = dropout(&x, 0.25, &mut Rng::new(1)).unwrap();
        let b = dropout(&x, 0.25, &mut Rng::new(1)).unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        let mean = a.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - 1.0).abs() < 0.1, "{mean}");
        let zeros = a.to_vec1::<f32>().unwrap().iter().filter(|v| **v == 0.0).count();
        assert!((180..320).contains(&zeros), "{zeros}");
    }

    #[test]
    fn device_drawn_dropout_zeroes_p_and_scales_the_rest() {
        // The path GPUs take, here with the CPU's generator.
        let x = Tensor::full(2f32, (4000,), &Device::Cpu).unwrap();
        let v = dropout_device_rng(&x, 0.25).unwrap().to_vec1::<f32>().unwrap();
        let zeros = v.iter().filter(|v| **v == 0.0).count();
        assert!((850..1150).contains(&zeros), "{zeros} of 4000 zeroed at p = 0.25");
        assert!(v.iter().all(|v| *v == 0.0 || (v - 2.0 / 0.75).abs() < 1e-6), "kept values scaled by 1/(1-p)");
        assert!(seed_device(&Device::Cpu, 1).is_ok(), "nothing to seed on the CPU");
    }
}
