//! A frozen Vision Transformer's forward pass on the CPU, over plain `f32` slices: every matrix
//! product through OpenBLAS's SGEMM ([`super::blas`]), the element-wise work fused into one pass per
//! layer while the rows are in cache, and rows (or images) spread over rayon's threads with one
//! single-threaded SGEMM each.
//!
//! Why not candle's ops: its CPU matmul (the `gemm` crate) reaches a third of OpenBLAS's speed on
//! these shapes, its strided element-wise ops run on one thread, and each op allocates a full-size
//! output (a block of ViT-L over a batch of 16 would write 2 GB of intermediates). The generic path
//! in [`super::vit`] (GPU, half precision, fine-tuning) stays the reference: tests hold the two to
//! each other.
//!
//! Layout: token rows `[B·T, D]`, row-major, tokens of one image contiguous; weights as PyTorch
//! stores them (`[out, in]`, read transposed in place).

use super::blas::{Blas, MatView};
use rayon::prelude::*;

/// Rows per parallel task of the products and row-wise kernels: one block per thread, so that each
/// SGEMM packs the weight once for as many rows as it can (OpenBLAS packs B per call: blocks of 512
/// rows cost ViT-B/16 a tenth of its time in packing), but no fewer than 64.
fn row_block(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(threads).max(64)
}

/// A buffer of `n` floats that every caller writes whole before reading: no zeroing pass (for the
/// block of ViT-L over a batch of 16, half a gigabyte of writes per image batch).
fn uninit(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// A buffer from [`uninit`] once every element is written.
///
/// # Safety
/// Every element must have been initialised.
unsafe fn assume_init(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same layout; the caller guarantees initialisation.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// `y[rows, n] = x[rows, k] · wᵀ + b` with `w` stored `[n, k]`; rows in parallel blocks.
pub fn linear(blas: &Blas, x: &[f32], k: usize, w: &[f32], b: Option<&[f32]>, n: usize) -> Vec<f32> {
    let rows = x.len() / k;
    let mut y = uninit(rows * n);
    let rb = row_block(rows);
    y.par_chunks_mut(rb * n).zip(x.par_chunks(rb * k)).for_each(|(y, x)| {
        let m = x.len() / k;
        let a = MatView { data: x, transposed: false, ld: k };
        let wt = MatView { data: w, transposed: true, ld: k };
        match b {
            Some(b) => {
                // The bias in C first, added by the product (beta = 1): no pass of its own.
                for row in y.chunks_mut(n) {
                    for (o, v) in row.iter_mut().zip(b) {
                        o.write(*v);
                    }
                }
                // SAFETY: every element was just written.
                let y = unsafe { &mut *(y as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                blas.gemm_ex(m, n, k, 1.0, a, wt, 1.0, y, n);
            }
            None => blas.gemm_view(m, n, k, a, wt, y, n),
        }
    });
    // SAFETY: every block of rows was written, by the bias and the product or by the product.
    unsafe { assume_init(y) }
}

/// `pub fn $name(args)` calling `$body` compiled three times: for AVX-512, AVX2 + FMA and the
/// baseline, the widest the CPU has (the loops are written for the compiler to vectorise).
macro_rules! simd_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
            unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
            use $crate::models::cpu::Simd;
            match Simd::of_this_cpu() {
                // SAFETY: the CPU has every feature the copy is compiled for (`Simd`'s one rule).
                #[cfg(target_arch = "x86_64")]
                Simd::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

const LANES: usize = 16;

/// Σ x, in 16 lanes (so that it vectorises: one float sum in order would not).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Σ (x − m)², in 16 lanes.
#[inline(always)]
fn sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|v| (v - m) * (v - m)).sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += (c[i] - m) * (c[i] - m);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// max x, in 16 lanes.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().copied().fold(rest, f32::max)
}

simd_kernel! {
    /// LayerNorm of each row of `x` (`d` wide), with its affine part, into `y`.
    fn layer_norm_rows(x: &[f32], y: &mut [f32], d: usize, w: &[f32], b: &[f32], eps: f32) {
        for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
            let mean = sum(x) / d as f32;
            let inv = 1.0 / (sum_sq_dev(x, mean) / d as f32 + eps).sqrt();
            for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * inv * w + b;
            }
        }
    }
}

simd_kernel! {
    /// The unnormalised softmax of each row of `x` (`n` wide), in place: `exp(x − max)`, each row's
    /// `1 / Σ` into `inv_sums` (applied to the attention's output, a third the size of the scores).
    fn exp_rows(x: &mut [f32], n: usize, inv_sums: &mut [f32]) {
        for (row, inv) in x.chunks_mut(n).zip(inv_sums.iter_mut()) {
            let m = max(row);
            let mut acc = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    c[i] = exp(c[i] - m);
                    acc[i] += c[i];
                }
            }
            let mut rest = 0f32;
            for v in chunks.into_remainder() {
                *v = exp(*v - m);
                rest += *v;
            }
            *inv = 1.0 / (acc.iter().sum::<f32>() + rest);
        }
    }
}

simd_kernel! {
    /// The softmax of each row of `x` (`n` wide), in place (TransMIL's Nyström maps in training).
    fn softmax_rows(x: &mut [f32], n: usize) {
        let mut inv = [0f32];
        for row in x.chunks_mut(n) {
            exp_rows(row, n, &mut inv);
            row.iter_mut().for_each(|v| *v *= inv[0]);
        }
    }
}

simd_kernel! {
    /// Row `r` of the `w`-wide block at the start of `x` (rows `ld` apart) times `scale[r]`.
    fn scale_rows(x: &mut [f32], ld: usize, w: usize, scale: &[f32]) {
        for (r, s) in scale.iter().enumerate() {
            x[r * ld..r * ld + w].iter_mut().for_each(|v| *v *= s);
        }
    }
}

simd_kernel! {
    /// GELU with the exact error function, in place.
    fn gelu_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

simd_kernel! {
    /// `y = silu(gate) · value` over packed rows `u` (`2h` wide).
    fn swiglu_rows(u: &[f32], y: &mut [f32], h: usize) {
        for (y, u) in y.chunks_mut(h).zip(u.chunks(2 * h)) {
            let (gate, value) = u.split_at(h);
            for ((y, g), v) in y.iter_mut().zip(gate).zip(value) {
                *y = g / (1.0 + exp(-g)) * v;
            }
        }
    }
}

simd_kernel! {
    /// `x += γ ⊙ y` row by row (`d` wide).
    fn add_scaled_rows(x: &mut [f32], y: &[f32], gamma: &[f32], d: usize) {
        for (x, y) in x.chunks_mut(d).zip(y.chunks(d)) {
            for ((x, y), g) in x.iter_mut().zip(y).zip(gamma) {
                *x += g * y;
            }
        }
    }
}

simd_kernel! {
    /// `x += y`.
    fn add(x: &mut [f32], y: &[f32]) {
        for (x, y) in x.iter_mut().zip(y) {
            *x += y;
        }
    }
}

/// LayerNorm over each row of `x` (`[rows, d]`), with its affine part, into a new buffer.
pub fn layer_norm(x: &[f32], d: usize, w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let rb = row_block(x.len() / d) * d;
    y.par_chunks_mut(rb).zip(x.par_chunks(rb)).for_each(|(y, x)| layer_norm_rows(x, y, d, w, b, eps));
    y
}

/// `x += γ ⊙ y` row by row (`γ` absent: `x += y`): a residual branch with its LayerScale.
pub fn add_scaled(x: &mut [f32], y: &[f32], gamma: Option<&[f32]>, d: usize) {
    let rb = row_block(x.len() / d) * d;
    x.par_chunks_mut(rb).zip(y.par_chunks(rb)).for_each(|(x, y)| match gamma {
        Some(g) => add_scaled_rows(x, y, g, d),
        None => add(x, y),
    });
}

/// GELU with the exact error function (PyTorch's `nn.GELU()`), in place.
pub fn gelu(x: &mut [f32]) {
    let chunk = x.len().div_ceil(rayon::current_num_threads().max(1)).max(1 << 14);
    x.par_chunks_mut(chunk).for_each(gelu_slice);
}

/// SwiGLU over packed rows `u[rows, 2h]`: `silu(u[:, :h]) · u[:, h:]` → `[rows, h]` (timm's
/// `SwiGLUPacked` and DINOv2's: the first half gates).
pub fn swiglu(u: &[f32], h: usize) -> Vec<f32> {
    let rows = u.len() / (2 * h);
    let mut y = vec![0f32; rows * h];
    let rb = row_block(rows);
    y.par_chunks_mut(rb * h).zip(u.par_chunks(rb * 2 * h)).for_each(|(y, u)| swiglu_rows(u, y, h));
    y
}

/// Multi-head self-attention over `qkv` rows `[B·T, 3D]` (q, k, v side by side, heads inside each,
/// as timm's fused projection lays them out) → `[B·T, D]`, heads side by side. Per image and head:
/// scores `q·kᵀ/√hd` by one SGEMM reading q and k in place, a softmax per row, one SGEMM with v.
/// Images in parallel; one scratch score matrix per task.
pub fn attention(blas: &Blas, qkv: &[f32], batch: usize, tokens: usize, dim: usize, heads: usize) -> Vec<f32> {
    let hd = dim / heads;
    let scale = (hd as f32).powf(-0.5);
    let mut out = vec![0f32; batch * tokens * dim];
    out.par_chunks_mut(tokens * dim).zip(qkv.par_chunks(tokens * 3 * dim)).for_each(|(out, qkv)| {
        let mut scores = vec![0f32; tokens * tokens];
        let mut inv_sums = vec![0f32; tokens];
        for h in 0..heads {
            let q = MatView { data: &qkv[h * hd..], transposed: false, ld: 3 * dim };
            let kt = MatView { data: &qkv[dim + h * hd..], transposed: true, ld: 3 * dim };
            blas.gemm_ex(tokens, tokens, hd, scale, q, kt, 0.0, &mut scores, tokens);
            exp_rows(&mut scores, tokens, &mut inv_sums);
            let s = MatView { data: &scores, transposed: false, ld: tokens };
            let v = MatView { data: &qkv[2 * dim + h * hd..], transposed: false, ld: 3 * dim };
            // Straight into this head's columns of the output (rows `dim` apart), then normalised.
            let o = &mut out[h * hd..];
            blas.gemm_ex(tokens, hd, tokens, 1.0, s, v, 0.0, o, dim);
            scale_rows(o, dim, hd, &inv_sums);
        }
    });
    out
}

/// The patch embedding's input: images `[B, 3, S, S]` cut into `p × p` patches, each flattened in
/// the convolution weight's order (channel, row, column) → `[B·(S/p)², 3·p·p]`.
pub fn unfold_patches(x: &[f32], batch: usize, side: usize, p: usize) -> Vec<f32> {
    let g = side / p;
    let plane = side * side;
    let width = 3 * p * p;
    let mut out = vec![0f32; batch * g * g * width];
    out.par_chunks_mut(g * g * width).enumerate().for_each(|(b, out)| {
        let img = &x[b * 3 * plane..(b + 1) * 3 * plane];
        for (t, patch) in out.chunks_mut(width).enumerate() {
            let (gy, gx) = (t / g, t % g);
            for c in 0..3 {
                for ky in 0..p {
                    let src = c * plane + (gy * p + ky) * side + gx * p;
                    let dst = (c * p + ky) * p;
                    patch[dst..dst + p].copy_from_slice(&img[src..src + p]);
                }
            }
        }
    });
    out
}

/// eˣ to within 2 ulp over the range that matters (|x| < 87), without libm: written so the
/// compiler can vectorise the loops that call it (softmax, SiLU).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // eˣ = 2ⁿ · eʳ, n = round(x / ln 2), r = x − n·ln 2 in [−ln2/2, ln2/2] (ln 2 in two parts,
    // Cody and Waite's, so that n·C1 is exact); eʳ by its Taylor polynomial to degree 7 (error
    // below 1e-8 on that interval).
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2²³ trick (no libm call, so the loop vectorises).
    const SHIFT: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // n is an integer in [−126, 127] once x is clamped (NaN converts to 0 and stays NaN in p).
    p * f32::from_bits((((n as i32) + 127) as u32) << 23)
}

/// The error function to within 3e-7 (Abramowitz & Stegun 7.1.28): a polynomial, four squarings
/// and one division, no exponential (GELU's erf was a tenth of a ViT's CPU time through `exp`).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let p = 1.0
        + a * (0.070_523_08
            + a * (0.042_282_01
                + a * (0.009_270_527 + a * (0.000_152_014_3 + a * (0.000_276_567_2 + a * 0.000_043_063_8)))));
    let p2 = p * p;
    let p4 = p2 * p2;
    let p16 = (p4 * p4) * (p4 * p4);
    (1.0 - 1.0 / p16).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_the_standard_library_and_known_values() {
        for i in -800..=800 {
            let x = i as f32 * 0.1;
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(((got as f64 - want) / want).abs() < 5e-7, "exp({x}): {got} vs {want}");
        }
        assert_eq!(exp(-200.0), exp(-87.0), "clamped, not NaN");
        // erf at known points (tables to 7 digits).
        for (x, want) in
            [(0.0f32, 0.0f32), (0.5, 0.520_499_9), (1.0, 0.842_700_8), (2.0, 0.995_322_3), (-1.0, -0.842_700_8)]
        {
            assert!((erf(x) - want).abs() < 3e-7, "erf({x}) = {} vs {want}", erf(x));
        }
    }

    #[test]
    fn patches_unfold_in_the_convolution_weights_order() {
        // One 4×4 image of 3 channels, value = channel·100 + row·10 + column; 2×2 patches.
        let x: Vec<f32> = (0..3).flat_map(|c| (0..16).map(move |i| (c * 100 + (i / 4) * 10 + i % 4) as f32)).collect();
        let u = unfold_patches(&x, 1, 4, 2);
        assert_eq!(u.len(), 4 * 12);
        // Patch 1 is the top-right one: rows 0-1, columns 2-3.
        assert_eq!(&u[12..24], &[2., 3., 12., 13., 102., 103., 112., 113., 202., 203., 212., 213.]);
    }
}
