//! TransMIL's Nyström attention as one CPU op with its backward written out: what training on a
//! CPU runs (`NystromAttention` in [`super::transmil`] keeps the composed tensor version for
//! inference, attention maps and other devices).
//!
//! The op takes the front-padded tokens `x` [B, np, dim], the `to_qkv` weight [3·h·dh, dim] and the
//! residual convolution's kernel [h, 1, K, 1], and returns the heads' outputs in token order
//! [B, np, h·dh] (what `to_out` reads). Per (batch, head), as nystrom-attention 0.0.9 computes:
//!
//! ```text
//! q, k, v = x·Wᵀ split (q scaled by dh^-½);  q̃, k̃ = means of l = np/m consecutive rows
//! A1 = softmax(q k̃ᵀ)  A2 = softmax(q̃ k̃ᵀ)  A3 = softmax(q̃ kᵀ)  Z = pinv(A2) (6 iterations, the
//! initial scale from the largest row and column sums over every head)
//! out = A1 · (Z · (A3 · v)) + conv_K(v)
//! ```
//!
//! Why one op: candle's graph keeps every intermediate of the composed version alive until the end
//! of backward (the logits beside each attention map, the q/k/v head copies, the scaled q, the
//! convolution and its sum, the transposed output), and its backward allocates a zero tensor per
//! gradient before adding to it. Here what backward needs is kept and nothing else: `qkv`, the
//! landmarks, A2 and the pseudo-inverse's m×m iterates, and the two token-sized maps A1 and A3 only
//! while they are small ([`KEEP_MAPS_BYTES`]); above that backward computes them again from `qkv`
//! (about 4% of a step at N = 50,000, against 1.6 GB kept). The backward's large temporaries are
//! one [np, m] map and its gradient per head in flight. At N = 16,000 that is 5 token-sized tensors
//! a layer kept instead of 33. Every product is OpenBLAS's SGEMM reading its operands in place
//! (strided head views of `qkv`, transposes as flags), heads in parallel.
//!
//! The product is associated as `A1 · (Z · (A3 · v))` (the reference: `(A1 · Z) · (A3 · v)`),
//! which keeps the [np, m] × [m, m] product out of both passes; equal to rounding.

use super::blas::{blas, Blas, MatView};
use super::vit_cpu::softmax_rows;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The attention's sizes (from [`super::transmil::TransMilConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct NystromSpec {
    pub heads: usize,
    pub dim_head: usize,
    pub landmarks: usize,
    pub iters: usize,
    pub kernel: usize,
    /// Keep the token-sized maps for backward up to this many bytes a layer, recompute them above
    /// ([`KEEP_MAPS_BYTES`] is what TransMIL uses).
    pub keep_maps_bytes: usize,
}

/// The fused attention of front-padded `x` [B, np, dim] (np a multiple of the landmarks), or `None`
/// where it does not run (not the CPU, not f32, no OpenBLAS): the caller composes it then.
pub fn nystrom_attention(x: &Tensor, w_qkv: &Tensor, res_conv: &Tensor, spec: NystromSpec) -> Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(x) && cpu_f32(w_qkv) && cpu_f32(res_conv)) || blas().is_none() {
        return Ok(None);
    }
    let op = NystromOp { spec, saved: Mutex::new(None) };
    Ok(Some(x.contiguous()?.apply_op3(&w_qkv.contiguous()?, &res_conv.contiguous()?, op)?))
}

struct NystromOp {
    spec: NystromSpec,
    /// What the forward pass leaves for the backward one (taken by it).
    saved: Mutex<Option<Saved>>,
}

/// One pseudo-inverse iteration's matrices, as backward needs them (`a = 7I − xz` is recomputed).
struct Iterate {
    z: Vec<f32>,
    xz: Vec<f32>,
    bb: Vec<f32>,
    c: Vec<f32>,
}

/// One (batch, head)'s saved state.
struct Unit {
    /// [np, m] and [m, np], kept for backward while they are small ([`NystromSpec::keep_maps_bytes`]),
    /// recomputed from `qkv` and the landmarks there otherwise.
    attn1: Option<Vec<f32>>,
    attn3: Option<Vec<f32>>,
    /// [m, m].
    attn2: Vec<f32>,
    /// Landmarks [m, dh].
    ql: Vec<f32>,
    kl: Vec<f32>,
    iterates: Vec<Iterate>,
    /// The pseudo-inverse [m, m], `y = A3·v` and `w = Z·y` [m, dh].
    z: Vec<f32>,
    y: Vec<f32>,
    w: Vec<f32>,
}

struct Saved {
    /// `x·Wᵀ` [B·np, 3·h·dh], the q columns already scaled.
    qkv: Vec<f32>,
    units: Vec<Unit>,
    /// The pseudo-inverse's initial scale `s = C·R`: the largest row sum `C` of |A2| over every
    /// unit, with the (unit, row)s that reach it, and the largest column sum `R`, with its
    /// (unit, column)s.
    c: (f32, Vec<(usize, usize)>),
    r: (f32, Vec<(usize, usize)>),
}

/// Above this many bytes of the two token-sized maps (A1 and A3, every head of one layer), they are
/// not kept from forward to backward but computed again there: at N = 50,000 they are 1.6 GB over
/// TransMIL's two layers, and recomputing them costs two products of each head's 2·np·m·dh
/// multiply-adds (about 4% of a step). Below it (bags up to ~8,000 instances) keeping is cheaper.
pub const KEEP_MAPS_BYTES: usize = 128 << 20;

/// A1 = softmax(q k̃ᵀ) [np, m] of one unit, `q` a strided view of `qkv`.
fn map1(blas: &Blas, d: &Dims, q: &[f32], kl: &[f32]) -> Vec<f32> {
    let mut a1 = product(blas, d.np, d.m, d.dh, 1.0, rm(q, d.w3()), tr(kl, d.dh));
    softmax_rows(&mut a1, d.m);
    a1
}

/// A3 = softmax(q̃ kᵀ) [m, np] of one unit, `k` a strided view of `qkv`.
fn map3(blas: &Blas, d: &Dims, ql: &[f32], k: &[f32]) -> Vec<f32> {
    let mut a3 = product(blas, d.m, d.np, d.dh, 1.0, rm(ql, d.dh), tr(k, d.w3()));
    softmax_rows(&mut a3, d.np);
    a3
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    np: usize,
    dim: usize,
    h: usize,
    dh: usize,
    m: usize,
    l: usize,
    k: usize,
}

impl Dims {
    fn inner(&self) -> usize {
        self.h * self.dh
    }
    fn w3(&self) -> usize {
        3 * self.inner()
    }
    /// Offset in `qkv` of unit `u`'s q (`part` 0), k (1) or v (2) columns.
    fn col(&self, u: usize, part: usize) -> usize {
        let (b, head) = (u / self.h, u % self.h);
        b * self.np * self.w3() + part * self.inner() + head * self.dh
    }
}

/// A row-major view with rows `ld` apart, and its transpose.
fn rm(data: &[f32], ld: usize) -> MatView<'_> {
    MatView { data, transposed: false, ld }
}
fn tr(data: &[f32], ld: usize) -> MatView<'_> {
    MatView { data, transposed: true, ld }
}

/// `c = alpha·a·b + beta·c` for dense row-major `c` [m, n].
#[allow(clippy::too_many_arguments)]
fn gemm(blas: &Blas, m: usize, n: usize, k: usize, alpha: f32, a: MatView, b: MatView, beta: f32, c: &mut [f32]) {
    blas.gemm_ex(m, n, k, alpha, a, b, beta, c, n)
}

/// A new [m, n] = a·b.
fn product(blas: &Blas, m: usize, n: usize, k: usize, alpha: f32, a: MatView, b: MatView) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    gemm(blas, m, n, k, alpha, a, b, 0.0, &mut c);
    c
}

/// `c[rows, n] = a[rows, k]·b[k, n]` (beta as given), row blocks in parallel; `a` row-major with
/// rows `lda` apart or transposed (then column blocks of the stored matrix).
#[allow(clippy::too_many_arguments)]
fn par_gemm(blas: &Blas, rows: usize, n: usize, k: usize, a: MatView, b: MatView, beta: f32, c: &mut [f32]) {
    let block = rows.div_ceil(2 * rayon::current_num_threads()).max(64);
    c[..rows * n].par_chunks_mut(block * n).enumerate().for_each(|(i, c)| {
        let r0 = i * block;
        let off = if a.transposed { r0 } else { r0 * a.ld };
        let av = MatView { data: &a.data[off..], transposed: a.transposed, ld: a.ld };
        let bv = MatView { data: b.data, transposed: b.transposed, ld: b.ld };
        blas.gemm_ex(c.len() / n, n, k, 1.0, av, bv, beta, c, n);
    });
}

/// The softmax's backward in place: `g ← y ⊙ (g − Σ g ⊙ y)`, row by row.
fn softmax_grad_rows(y: &[f32], g: &mut [f32], n: usize) {
    for (y, g) in y.chunks(n).zip(g.chunks_mut(n)) {
        let dot = super::ops::dot(y, g);
        for (g, y) in g.iter_mut().zip(y) {
            *g = y * (*g - dot);
        }
    }
}

/// Means of `l` consecutive rows of a strided [m·l, dh] view: [m, dh].
fn landmark_means(src: &[f32], ld: usize, m: usize, l: usize, dh: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * dh];
    for (j, o) in out.chunks_mut(dh).enumerate() {
        for i in j * l..(j + 1) * l {
            for (o, v) in o.iter_mut().zip(&src[i * ld..i * ld + dh]) {
                *o += v;
            }
        }
        let inv = 1.0 / l as f32;
        o.iter_mut().for_each(|v| *v *= inv);
    }
    out
}

/// `c·I − x` for an m×m `x`.
fn diag_minus(c: f32, x: &[f32], m: usize) -> Vec<f32> {
    let mut out: Vec<f32> = x.iter().map(|v| -v).collect();
    for i in 0..m {
        out[i * m + i] += c;
    }
    out
}

/// The sign of `v`, 0 at 0 (as PyTorch's `sign`, which `abs`'s gradient uses).
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Sums of |a| along the rows and along the columns of an m×m matrix.
fn abs_sums(a: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cols = vec![0f32; m];
    let rows = a
        .chunks(m)
        .map(|row| {
            for (c, v) in cols.iter_mut().zip(row) {
                *c += v.abs();
            }
            row.iter().map(|v| v.abs()).sum()
        })
        .collect();
    (rows, cols)
}

/// The largest of every unit's sums, and every (unit, index) that reaches it: the gradient of a
/// maximum is shared evenly among ties, as PyTorch's `max()` does (padding makes ties: whole
/// groups of zero tokens give equal landmark columns).
fn max_with_ties(sums: &[Vec<f32>]) -> (f32, Vec<(usize, usize)>) {
    let max = sums.iter().flatten().copied().fold(f32::NEG_INFINITY, f32::max);
    let at = sums
        .iter()
        .enumerate()
        .flat_map(|(u, s)| s.iter().enumerate().filter(|&(_, &v)| v == max).map(move |(i, _)| (u, i)))
        .collect();
    (max, at)
}

impl NystromOp {
    fn dims(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
        let s = self.spec;
        let (b, np, dim) = l1.shape().dims3()?;
        let (h, dh, m, k) = (s.heads, s.dim_head, s.landmarks, s.kernel);
        if l2.dims() != [3 * h * dh, dim] || l3.dims() != [h, 1, k, 1] {
            candle_core::bail!("nystrom: weights {:?} and {:?} do not fit {s:?}", l2.dims(), l3.dims())
        }
        if m == 0 || np % m != 0 {
            candle_core::bail!("nystrom: {np} tokens are not a multiple of {m} landmarks")
        }
        Ok(Dims { b, np, dim, h, dh, m, l: np / m, k })
    }
}

impl CustomOp3 for NystromOp {
    fn name(&self) -> &'static str {
        "nystrom-attention"
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
        let blas = blas().ok_or_else(|| candle_core::Error::Msg("nystrom: OpenBLAS not loaded".into()))?;
        let d = self.dims(l1, l2, l3)?;
        let (x, wq, rc) = (
            super::ops::f32_slice(s1, l1, "nystrom input")?,
            super::ops::f32_slice(s2, l2, "to_qkv weight")?,
            super::ops::f32_slice(s3, l3, "residual kernel")?,
        );
        let (np, m, dh, w3, inner) = (d.np, d.m, d.dh, d.w3(), d.inner());
        let mut qkv = vec![0f32; d.b * np * w3];
        par_gemm(blas, d.b * np, w3, d.dim, rm(x, d.dim), tr(wq, d.dim), 0.0, &mut qkv);
        let scale = (dh as f32).powf(-0.5);
        qkv.par_chunks_mut(w3).for_each(|row| row[..inner].iter_mut().for_each(|v| *v *= scale));

        // The landmarks and A2 per unit, and the pseudo-inverse's scale over all of them.
        let n_units = d.b * d.h;
        let qkv_ref = &qkv;
        let mut maps: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..n_units)
            .into_par_iter()
            .map(|u| {
                let (q, kk) = (&qkv_ref[d.col(u, 0)..], &qkv_ref[d.col(u, 1)..]);
                let ql = landmark_means(q, w3, m, d.l, dh);
                let kl = landmark_means(kk, w3, m, d.l, dh);
                let mut a2 = product(blas, m, m, dh, 1.0, rm(&ql, dh), tr(&kl, dh));
                softmax_rows(&mut a2, m);
                (a2, ql, kl)
            })
            .collect();
        let keep_maps = 2 * n_units * np * m * std::mem::size_of::<f32>() <= self.spec.keep_maps_bytes;
        let (rows, cols): (Vec<_>, Vec<_>) = maps.iter().map(|(a2, ..)| abs_sums(a2, m)).unzip();
        let (c, r) = (max_with_ties(&rows), max_with_ties(&cols));
        let s = c.0 * r.0;

        let iters = self.spec.iters;
        let done: Vec<(Unit, Vec<f32>)> = maps
            .par_drain(..)
            .enumerate()
            .map(|(u, (attn2, ql, kl))| {
                let attn1 = map1(blas, &d, &qkv_ref[d.col(u, 0)..], &kl);
                let attn3 = map3(blas, &d, &ql, &qkv_ref[d.col(u, 1)..]);
                // Pseudo-inverse of A2, keeping each iterate.
                let mut z: Vec<f32> = (0..m * m).map(|e| attn2[(e % m) * m + e / m] / s).collect();
                let mut iterates = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let xz = product(blas, m, m, m, 1.0, rm(&attn2, m), rm(&z, m));
                    let a = diag_minus(7.0, &xz, m);
                    let p = product(blas, m, m, m, 1.0, rm(&xz, m), rm(&a, m));
                    let bb = diag_minus(15.0, &p, m);
                    let rr = product(blas, m, m, m, 1.0, rm(&xz, m), rm(&bb, m));
                    let c = diag_minus(13.0, &rr, m);
                    let next = product(blas, m, m, m, 0.25, rm(&z, m), rm(&c, m));
                    iterates.push(Iterate { z: std::mem::replace(&mut z, next), xz, bb, c });
                }
                let v = &qkv_ref[d.col(u, 2)..];
                let y = product(blas, m, dh, np, 1.0, rm(&attn3, np), rm(v, w3));
                let w = product(blas, m, dh, m, 1.0, rm(&z, m), rm(&y, dh));
                let head = u % d.h;
                let mut o = product(blas, np, dh, m, 1.0, rm(&attn1, m), rm(&w, dh));
                // The residual convolution over the sequence, per column of the head.
                let taps = &rc[head * d.k..(head + 1) * d.k];
                let half = d.k / 2;
                for i in 0..np {
                    let row = &mut o[i * dh..(i + 1) * dh];
                    for (t, &wt) in taps.iter().enumerate() {
                        let src = i + t;
                        if src < half || src - half >= np {
                            continue;
                        }
                        let vr = &v[(src - half) * w3..(src - half) * w3 + dh];
                        for (o, v) in row.iter_mut().zip(vr) {
                            *o += wt * v;
                        }
                    }
                }
                let (attn1, attn3) = if keep_maps { (Some(attn1), Some(attn3)) } else { (None, None) };
                (Unit { attn1, attn3, attn2, ql, kl, iterates, z, y, w }, o)
            })
            .collect();
        // The heads' outputs side by side, token by token.
        let mut out = vec![0f32; d.b * np * inner];
        let mut units = Vec::with_capacity(n_units);
        for (u, (unit, o)) in done.into_iter().enumerate() {
            let (b, head) = (u / d.h, u % d.h);
            for (i, src) in o.chunks(dh).enumerate() {
                let at = (b * np + i) * inner + head * dh;
                out[at..at + dh].copy_from_slice(src);
            }
            units.push(unit);
        }
        *self.saved.lock().unwrap() = Some(Saved { qkv, units, c, r });
        Ok((CpuStorage::F32(out), Shape::from((d.b, np, inner))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wq: &Tensor,
        rc: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("nystrom: backward ran twice, or without a forward".into()))?;
        let d = self.dims(x.layout(), wq.layout(), rc.layout())?;
        let grad = grad.contiguous()?;
        let (gx, gw, gr, gg) =
            (x.storage_and_layout(), wq.storage_and_layout(), rc.storage_and_layout(), grad.storage_and_layout());
        let (dx, dw, drc) = backward(
            &d,
            &saved,
            cpu_f32(&gx.0, gx.1)?,
            cpu_f32(&gw.0, gw.1)?,
            cpu_f32(&gr.0, gr.1)?,
            cpu_f32(&gg.0, gg.1)?,
        )?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (d.b, d.np, d.dim), dev)?),
            Some(Tensor::from_vec(dw, (d.w3(), d.dim), dev)?),
            Some(Tensor::from_vec(drc, (d.h, 1, d.k, 1), dev)?),
        ))
    }
}

/// The elements of a contiguous CPU f32 tensor's storage.
fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) => super::ops::f32_slice(s, l, "nystrom backward"),
        _ => candle_core::bail!("nystrom: backward of a tensor off the CPU"),
    }
}

/// Gradients of the input, the `to_qkv` weight and the residual kernel.
fn backward(
    d: &Dims,
    saved: &Saved,
    x: &[f32],
    wq: &[f32],
    rc: &[f32],
    g: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let blas = blas().ok_or_else(|| candle_core::Error::Msg("nystrom: OpenBLAS not loaded".into()))?;
    let (np, m, dh, w3, inner, l) = (d.np, d.m, d.dh, d.w3(), d.inner(), d.l);
    let qkv = &saved.qkv;
    let s = saved.c.0 * saved.r.0;
    let n_units = d.b * d.h;
    let half = d.k / 2;

    // Pass A, per unit: through the output, the maps and the pseudo-inverse, to dA2 (but for the
    // scale's own path) and the landmarks; dq, dk, dv from the maps written into dqkv.
    struct PartA {
        /// The unit's dq, dk, dv, each [np, dh].
        dq: Vec<f32>,
        dk: Vec<f32>,
        dv: Vec<f32>,
        da2: Vec<f32>,
        dql: Vec<f32>,
        dkl: Vec<f32>,
        /// d s from this unit's initial iterate.
        ds: f64,
        drc: Vec<f32>,
    }
    let parts: Vec<PartA> = (0..n_units)
        .into_par_iter()
        .map(|u| {
            let un = &saved.units[u];
            let (b, head) = (u / d.h, u % d.h);
            let go = &g[b * np * inner + head * dh..];
            let (q, k, v) = (&qkv[d.col(u, 0)..], &qkv[d.col(u, 1)..], &qkv[d.col(u, 2)..]);
            let attn1 = un.attn1.as_deref().map_or_else(|| map1(blas, d, q, &un.kl).into(), std::borrow::Cow::from);
            let attn3 = un.attn3.as_deref().map_or_else(|| map3(blas, d, &un.ql, k).into(), std::borrow::Cow::from);
            let (mut dq, mut dk, mut dv) = (vec![0f32; np * dh], vec![0f32; np * dh], vec![0f32; np * dh]);
            // The residual convolution: out[i] += Σ_t w_t v[i + t − half].
            let taps = &rc[head * d.k..(head + 1) * d.k];
            let mut drc = vec![0f32; d.k];
            for i in 0..np {
                let gi = &go[i * inner..i * inner + dh];
                for (t, &wt) in taps.iter().enumerate() {
                    let src = i + t;
                    if src < half || src - half >= np {
                        continue;
                    }
                    let j = src - half;
                    let vr = &v[j * w3..j * w3 + dh];
                    drc[t] += super::ops::dot(gi, vr);
                    for (dv, g) in dv[j * dh..(j + 1) * dh].iter_mut().zip(gi) {
                        *dv += wt * g;
                    }
                }
            }
            // out = A1 · w
            let dwm = product(blas, m, dh, np, 1.0, tr(&attn1, m), rm(go, inner));
            let mut ds1 = product(blas, np, m, dh, 1.0, rm(go, inner), tr(&un.w, dh));
            softmax_grad_rows(&attn1, &mut ds1, m);
            drop(attn1);
            gemm(blas, np, dh, m, 1.0, rm(&ds1, m), rm(&un.kl, dh), 0.0, &mut dq);
            let dkl = product(blas, m, dh, np, 1.0, tr(&ds1, m), rm(q, w3));
            drop(ds1);
            // w = Z · y, y = A3 · v
            let dz = product(blas, m, m, dh, 1.0, rm(&dwm, dh), tr(&un.y, dh));
            let dy = product(blas, m, dh, m, 1.0, tr(&un.z, m), rm(&dwm, dh));
            let mut ds3 = product(blas, m, np, dh, 1.0, rm(&dy, dh), tr(v, w3));
            gemm(blas, np, dh, m, 1.0, tr(&attn3, np), rm(&dy, dh), 1.0, &mut dv);
            softmax_grad_rows(&attn3, &mut ds3, np);
            drop(attn3);
            let dql = product(blas, m, dh, np, 1.0, rm(&ds3, np), rm(k, w3));
            gemm(blas, np, dh, m, 1.0, tr(&ds3, np), rm(&un.ql, dh), 0.0, &mut dk);
            drop(ds3);
            // The pseudo-inverse's iterations, last first.
            let a2 = &un.attn2;
            let mut dzc = dz;
            let mut da2 = vec![0f32; m * m];
            for it in un.iterates.iter().rev() {
                let mut dprev = product(blas, m, m, m, 0.25, rm(&dzc, m), tr(&it.c, m));
                let mut dr = product(blas, m, m, m, 0.25, tr(&it.z, m), rm(&dzc, m));
                dr.iter_mut().for_each(|v| *v = -*v);
                let mut dxz = product(blas, m, m, m, 1.0, rm(&dr, m), tr(&it.bb, m));
                let mut dp = product(blas, m, m, m, 1.0, tr(&it.xz, m), rm(&dr, m));
                dp.iter_mut().for_each(|v| *v = -*v);
                let a = diag_minus(7.0, &it.xz, m);
                gemm(blas, m, m, m, 1.0, rm(&dp, m), tr(&a, m), 1.0, &mut dxz);
                let da = product(blas, m, m, m, 1.0, tr(&it.xz, m), rm(&dp, m));
                dxz.iter_mut().zip(&da).for_each(|(x, a)| *x -= a);
                gemm(blas, m, m, m, 1.0, rm(&dxz, m), tr(&it.z, m), 1.0, &mut da2);
                gemm(blas, m, m, m, 1.0, tr(a2, m), rm(&dxz, m), 1.0, &mut dprev);
                dzc = dprev;
            }
            // z0 = A2ᵀ / s: into dA2 directly, and into d s.
            let z0 = &un.iterates.first().map(|i| i.z.as_slice()).unwrap_or(&un.z);
            let mut ds = 0f64;
            for i in 0..m {
                for j in 0..m {
                    let gz = dzc[i * m + j];
                    da2[j * m + i] += gz / s;
                    ds -= (gz * z0[i * m + j]) as f64 / s as f64;
                }
            }
            // dq̃ and dk̃ hold A1's and A3's shares; A2's comes in pass B, with the scale's path.
            PartA { dq, dk, dv, da2, dql, dkl, ds, drc }
        })
        .collect();

    // The scale s = C·R: its gradient goes to the row and the column that gave C and R.
    let ds: f64 = parts.iter().map(|p| p.ds).sum();
    let mut parts = parts;
    let (dc, dr) = ((ds * saved.r.0 as f64) as f32, (ds * saved.c.0 as f64) as f32);
    let dc = dc / saved.c.1.len() as f32;
    for &(u, i) in &saved.c.1 {
        let a2 = &saved.units[u].attn2;
        for j in 0..m {
            parts[u].da2[i * m + j] += dc * sign(a2[i * m + j]);
        }
    }
    let dr = dr / saved.r.1.len() as f32;
    for &(u, j) in &saved.r.1 {
        let a2 = &saved.units[u].attn2;
        for i in 0..m {
            parts[u].da2[i * m + j] += dr * sign(a2[i * m + j]);
        }
    }

    // Pass B, per unit: A2's softmax and the landmark means; dq is taken back through the scale.
    let scale = (dh as f32).powf(-0.5);
    parts.par_iter_mut().enumerate().for_each(|(u, p)| {
        let un = &saved.units[u];
        softmax_grad_rows(&un.attn2, &mut p.da2, m);
        gemm(blas, m, dh, m, 1.0, rm(&p.da2, m), rm(&un.kl, dh), 1.0, &mut p.dql);
        gemm(blas, m, dh, m, 1.0, tr(&p.da2, m), rm(&un.ql, dh), 1.0, &mut p.dkl);
        let inv = 1.0 / l as f32;
        for i in 0..np {
            let j = i / l;
            let (dq, dk) = (&mut p.dq[i * dh..(i + 1) * dh], &mut p.dk[i * dh..(i + 1) * dh]);
            for (o, v) in dq.iter_mut().zip(&p.dql[j * dh..(j + 1) * dh]) {
                *o = (*o + v * inv) * scale;
            }
            for (o, v) in dk.iter_mut().zip(&p.dkl[j * dh..(j + 1) * dh]) {
                *o += v * inv;
            }
        }
    });
    // Side by side as qkv was, each unit's buffers freed once copied.
    let mut dqkv = vec![0f32; d.b * np * w3];
    let mut drc = vec![0f32; d.h * d.k];
    for (u, p) in parts.into_iter().enumerate() {
        for (part, src) in [&p.dq, &p.dk, &p.dv].into_iter().enumerate() {
            let at = d.col(u, part);
            for (i, row) in src.chunks(dh).enumerate() {
                dqkv[at + i * w3..at + i * w3 + dh].copy_from_slice(row);
            }
        }
        let head = u % d.h;
        for (o, v) in drc[head * d.k..(head + 1) * d.k].iter_mut().zip(&p.drc) {
            *o += v;
        }
    }

    // Through x·Wᵀ.
    let rows = d.b * np;
    let mut dx = vec![0f32; rows * d.dim];
    par_gemm(blas, rows, d.dim, w3, rm(&dqkv, w3), rm(wq, d.dim), 0.0, &mut dx);
    let mut dw = vec![0f32; w3 * d.dim];
    par_gemm(blas, w3, d.dim, rows, tr(&dqkv, w3), rm(x, d.dim), 0.0, &mut dw);
    Ok((dx, dw, drc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Kept or recomputed, the maps give backward the same gradients, bit for bit: recomputing
    /// runs the very products and softmax of the forward pass.
    #[test]
    fn recomputed_maps_give_the_gradients_kept_ones_give() {
        crate::models::blas::for_test();
        let (h, dh, m, k, dim, np) = (2, 8, 4, 3, 12, 24);
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, np, dim), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (3 * h * dh, dim), &dev).unwrap() * 0.3).unwrap()).unwrap();
        let rc = Var::from_tensor(&Tensor::randn(0f32, 1.0, (h, 1, k, 1), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (1, np, h * dh), &dev).unwrap();
        let run = |keep: usize| {
            let spec = NystromSpec { heads: h, dim_head: dh, landmarks: m, iters: 6, kernel: k, keep_maps_bytes: keep };
            let out = nystrom_attention(x.as_tensor(), w.as_tensor(), rc.as_tensor(), spec).unwrap().unwrap();
            let grads = (out.clone() * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut all = flat(&out);
            for v in [&x, &w, &rc] {
                all.extend(flat(grads.get(v.as_tensor()).unwrap()));
            }
            all
        };
        let (kept, recomputed) = (run(usize::MAX), run(0));
        assert_eq!(kept.len(), recomputed.len());
        assert!(kept.iter().zip(&recomputed).all(|(a, b)| a == b), "kept and recomputed maps differ");
    }
}
