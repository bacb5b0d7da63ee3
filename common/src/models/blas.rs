//! Single-precision GEMM from the system's OpenBLAS, loaded at run time, for the CPU convolutions of
//! frozen embedders ([`super::conv`]).
//!
//! Why: candle's CPU matmul (the `gemm` crate) reaches ~25 GFLOPS on convolution-shaped products on
//! one core of this project's machines; OpenBLAS's AVX-512 kernels 75–95 (bench notes in
//! docs/models.md). It is loaded like libopenslide, by soname at run time (`libopenblas.so.0`;
//! `scripts/setup.sh` installs Debian's `libopenblas0-pthread`): a machine without it embeds through
//! candle's matmul, with the same results to rounding.
//!
//! OpenBLAS picks its kernels by CPU model, and older builds (Debian 12's 0.3.21) do not know recent
//! Xeons and fall back to SSE3 kernels ("Prescott", 13 GFLOPS here). [`prepare_env`] therefore sets
//! `OPENBLAS_CORETYPE` from the CPU's features (SkylakeX for AVX-512, Haswell for AVX2) unless the
//! user set it, and `OPENBLAS_NUM_THREADS=1`: wsimil parallelises over the images of a batch
//! itself. The variables are read when the library loads; `wsimil`'s `main` calls [`prepare_env`]
//! before any thread starts, and the loader calls it again (a no-op then) for other programs.

use std::ffi::c_int;
use std::sync::OnceLock;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// The loaded library.
pub struct Blas {
    sgemm: Sgemm,
    /// OpenBLAS's name for the kernels it chose.
    pub core: String,
    _lib: libloading::Library,
}

/// Set `OPENBLAS_CORETYPE` (from the CPU's features) and `OPENBLAS_NUM_THREADS=1` where unset.
/// Call before other threads exist (environment writes race with C code reading it).
pub fn prepare_env() {
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
        if let Some(core) = core_for_this_cpu() {
            std::env::set_var("OPENBLAS_CORETYPE", core);
        }
    }
    if std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        std::env::set_var("OPENBLAS_NUM_THREADS", "1");
    }
}

fn core_for_this_cpu() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            return Some("SkylakeX");
        }
        if has!("avx2") && has!("fma") {
            return Some("Haswell");
        }
    }
    None
}

/// OpenBLAS, loaded once; `None` when it is not installed (or `WSIMIL_BLAS=off`).
pub fn blas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        if std::env::var("WSIMIL_BLAS").is_ok_and(|v| v == "off") {
            return None;
        }
        prepare_env();
        match load() {
            Ok(b) => {
                tracing::debug!(core = %b.core, "OpenBLAS loaded for CPU convolutions");
                Some(b)
            }
            Err(e) => {
                tracing::info!("OpenBLAS not available ({e}); CPU convolutions use candle's matmul");
                None
            }
        }
    })
    .as_ref()
}

fn load() -> Result<Blas, libloading::Error> {
    let mut last = None;
    for name in ["libopenblas.so.0", "libopenblas.so"] {
        // SAFETY: OpenBLAS's initialisers only read the environment and the CPU's features.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => {
                // SAFETY: the symbols have the C signatures declared here (cblas.h, openblas_config.h).
                unsafe {
                    let sgemm: Sgemm = *lib.get(b"cblas_sgemm\0")?;
                    let set_threads: unsafe extern "C" fn(c_int) = *lib.get(b"openblas_set_num_threads\0")?;
                    set_threads(1);
                    let corename: unsafe extern "C" fn() -> *const std::ffi::c_char =
                        *lib.get(b"openblas_get_corename\0")?;
                    let core = std::ffi::CStr::from_ptr(corename()).to_string_lossy().into_owned();
                    return Ok(Blas { sgemm, core, _lib: lib });
                }
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least one name"))
}

impl Blas {
    /// `c[m×n] = a[m×k] · b[k×n]`, all row-major and dense.
    pub fn gemm(&self, m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        // SAFETY: f32 and MaybeUninit<f32> have the same layout; initialised memory stays so.
        let c = unsafe { &mut *(c as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
        self.gemm_uninit(m, n, k, a, b, c)
    }

    /// As [`Blas::gemm`], into memory that need not be initialised: every element of
    /// `c[..m×n]` is written (beta = 0: OpenBLAS never reads C).
    pub fn gemm_uninit(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [std::mem::MaybeUninit<f32>],
    ) {
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: slices too short");
        let i = |v: usize| c_int::try_from(v).expect("gemm dimension fits a C int");
        // SAFETY: the slices hold the matrices the dimensions describe (checked above).
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                NO_TRANS,
                i(m),
                i(n),
                i(k),
                1.0,
                a.as_ptr(),
                i(k),
                b.as_ptr(),
                i(n),
                0.0,
                c.as_mut_ptr().cast::<f32>(),
                i(n),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openblas_multiplies_like_the_definition_when_installed() {
        let Some(b) = blas() else {
            assert!(std::env::var_os("CI").is_none(), "CI installs OpenBLAS (scripts/setup.sh)");
            eprintln!("OpenBLAS not installed: nothing to check here");
            return;
        };
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bm: Vec<f32> = (0..k * n).map(|i| (i % 4) as f32 - 1.5).collect();
        let mut c = vec![f32::NAN; m * n];
        b.gemm(m, n, k, &a, &bm, &mut c);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| a[i * k + t] * bm[t * n + j]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-5, "({i},{j}): {} vs {want}", c[i * n + j]);
            }
        }
        assert!(!b.core.is_empty());
    }
}
