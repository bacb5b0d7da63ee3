//! Single-precision GEMM from the system's OpenBLAS, loaded at run time, for the CPU convolutions of
//! frozen embedders ([`super::conv`]) and the CPU matrix products of the bag classifiers
//! ([`super::ops::matmul`]).
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
//! before any thread starts, and the loader calls it again (a no-op then) for other programs. The
//! test command (`scripts/test.sh`) exports the same settings from `scripts/blas-env.sh` (the same
//! rule, checked against this one by a test) before the test binaries start, so that no test
//! thread writes the environment.

use std::ffi::c_int;
use std::sync::OnceLock;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// One operand of [`Blas::gemm_view`]: a row-major matrix (`transposed`: the operand is the
/// transpose of the matrix stored) whose rows are `ld` elements apart, from the slice's start.
#[derive(Debug, Clone, Copy)]
pub struct MatView<'a> {
    pub data: &'a [f32],
    pub transposed: bool,
    pub ld: usize,
}

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

/// Set `OPENBLAS_CORETYPE` (from the CPU's features) and `OPENBLAS_NUM_THREADS=1` where unset,
/// and size the thread pools to the CPUs this process may run on. Call before other threads exist
/// (environment writes race with C code reading it).
///
/// candle's pool and rayon's default to the machine's physical cores, not the process's CPU set:
/// under `taskset`, a cgroup cpuset or a CPU quota (a Slurm job, a Kubernetes limit) they start
/// more threads than there are CPUs, and candle's spin-waiting barrier then burns the time of the
/// very thread it waits for (a quarter of a TransMIL step on one core). `available_parallelism`
/// reads the affinity mask and the cgroup quota.
pub fn prepare_env() {
    let cpus = std::thread::available_parallelism().ok().map(|n| n.get());
    for (var, value) in env_to_set(|v| std::env::var_os(v).is_some(), cpus, core_for_this_cpu()) {
        std::env::set_var(var, value);
    }
}

/// What [`prepare_env`] writes: each of its variables that `is_set` says is unset, with its value
/// (the thread pools sized to `cpus` where known, OpenBLAS's kernels `core` where the CPU has one).
pub fn env_to_set(
    is_set: impl Fn(&str) -> bool,
    cpus: Option<usize>,
    core: Option<&'static str>,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(n) = cpus {
        out.extend(["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"].map(|v| (v, n.to_string())));
    }
    if let Some(core) = core {
        out.push(("OPENBLAS_CORETYPE", core.to_string()));
    }
    out.push(("OPENBLAS_NUM_THREADS", "1".to_string()));
    out.retain(|(v, _)| !is_set(v));
    out
}

fn core_for_this_cpu() -> Option<&'static str> {
    core_of(super::cpu::Simd::of_this_cpu())
}

/// OpenBLAS's kernels for a level of vector instructions.
fn core_of(simd: super::cpu::Simd) -> Option<&'static str> {
    match simd {
        super::cpu::Simd::Avx512 => Some("SkylakeX"),
        super::cpu::Simd::Avx2 => Some("Haswell"),
        super::cpu::Simd::Baseline => None,
    }
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

impl Blas {
    /// `c[m×n] = op(a)[m×k] · op(b)[k×n]`, `c` row-major with rows `ldc` apart; each operand
    /// row-major or transposed as its view says (a `w.t()` needs no copy). Every element of the
    /// m×n block of `c` is written; nothing else is read or written there.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_view(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatView,
        b: MatView,
        c: &mut [std::mem::MaybeUninit<f32>],
        ldc: usize,
    ) {
        // beta = 0: OpenBLAS writes the block without reading it, so C may be uninitialised.
        self.sgemm_checked(m, n, k, 1.0, a, b, 0.0, (c.as_mut_ptr().cast::<f32>(), c.len()), ldc)
    }

    /// `c = alpha·op(a)·op(b) + beta·c` over the m×n block of `c` (rows `ldc` apart): BLAS's
    /// SGEMM in full. With beta = 1 a bias already in `c` is added for free; alpha scales (the
    /// attention's 1/√d).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_ex(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: MatView,
        b: MatView,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        self.sgemm_checked(m, n, k, alpha, a, b, beta, (c.as_mut_ptr(), c.len()), ldc)
    }

    /// SGEMM into `c` (a pointer and the length of the memory behind it), every extent checked.
    #[allow(clippy::too_many_arguments)]
    fn sgemm_checked(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: MatView,
        b: MatView,
        beta: f32,
        (c, c_len): (*mut f32, usize),
        ldc: usize,
    ) {
        // The extent each operand's view reaches: (rows stored − 1) · ld + columns stored.
        let extent = |v: &MatView, rows: usize, cols: usize| {
            let (r, c) = if v.transposed { (cols, rows) } else { (rows, cols) };
            assert!(v.ld >= c.max(1), "gemm: leading dimension {} under {c} columns", v.ld);
            if r == 0 || c == 0 {
                0
            } else {
                (r - 1) * v.ld + c
            }
        };
        assert!(a.data.len() >= extent(&a, m, k) && b.data.len() >= extent(&b, k, n), "gemm: operands too short");
        assert!(ldc >= n.max(1) && (m == 0 || c_len >= (m - 1) * ldc + n), "gemm: output too short");
        if m == 0 || n == 0 {
            return;
        }
        let i = |v: usize| c_int::try_from(v).expect("gemm dimension fits a C int");
        let t = |v: &MatView| if v.transposed { TRANS } else { NO_TRANS };
        // SAFETY: each operand holds the matrix its view and dimensions describe, and `c` the m×n
        // block `ldc` apart (checked above); C is read only when beta ≠ 0, when it is initialised.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                t(&a),
                t(&b),
                i(m),
                i(n),
                i(k),
                alpha,
                a.data.as_ptr(),
                i(a.ld),
                b.data.as_ptr(),
                i(b.ld),
                beta,
                c,
                i(ldc),
            )
        }
    }
}

/// OpenBLAS for a test of a path that runs through it. Such a test cannot run its subject without
/// the library, so it fails, with the reason, rather than passing having checked nothing.
#[cfg(test)]
pub(crate) fn for_test() -> &'static Blas {
    blas().unwrap_or_else(|| {
        panic!(
            "this test checks a path through OpenBLAS, and OpenBLAS is not loaded: install it \
             (scripts/setup.sh installs Debian's libopenblas0-pthread) and leave WSIMIL_BLAS unset"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_written_only_where_unset() {
        let all = env_to_set(|_| false, Some(6), Some("SkylakeX"));
        let want = [
            ("CANDLE_NUM_THREADS", "6"),
            ("RAYON_NUM_THREADS", "6"),
            ("OPENBLAS_CORETYPE", "SkylakeX"),
            ("OPENBLAS_NUM_THREADS", "1"),
        ];
        assert_eq!(all, want.map(|(v, x)| (v, x.to_string())));
        assert!(env_to_set(|_| true, Some(6), Some("Haswell")).is_empty(), "a set variable is the user's");
        let some = env_to_set(|v| v == "OPENBLAS_CORETYPE", None, Some("Haswell"));
        assert_eq!(some, vec![("OPENBLAS_NUM_THREADS", "1".to_string())]);
    }

    /// `scripts/blas-env.sh`, which the test command sources so that the test binaries start with
    /// these variables set, chooses OpenBLAS's kernels by the same features and names as the loader.
    #[test]
    fn the_test_commands_settings_follow_the_loaders_rule() {
        let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/blas-env.sh")).unwrap();
        let rule: Vec<&str> = script.lines().filter(|l| l.contains("_blas_cpu_has ")).collect();
        assert_eq!(rule.len(), 2, "{rule:?}");
        use super::super::cpu::{Simd, AVX2_FEATURES, AVX512_FEATURES};
        assert_eq!(core_of(Simd::Baseline), None, "the script exports no core where neither rule holds");
        for (line, features, simd) in [(rule[0], AVX512_FEATURES, Simd::Avx512), (rule[1], AVX2_FEATURES, Simd::Avx2)] {
            let core = core_of(simd).unwrap();
            let named: Vec<&str> =
                line.split("_blas_cpu_has ").nth(1).unwrap().trim_end_matches("; then").split(' ').collect();
            assert_eq!(named, features, "{line}");
            let export = script.split(line).nth(1).unwrap().lines().nth(1).unwrap().trim();
            assert_eq!(export, format!("export OPENBLAS_CORETYPE={core}"));
        }
        for (var, _) in env_to_set(|_| false, Some(1), Some("SkylakeX")) {
            assert!(script.contains(&format!("export {var}=")), "{var} not exported");
        }
    }

    #[test]
    fn openblas_multiplies_like_the_definition() {
        let b = for_test();
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

    #[test]
    fn transposed_and_strided_views_multiply_like_the_definition() {
        let b = for_test();
        let (m, n, k) = (4, 3, 5);
        // op(a) = transpose of a stored 5×4 matrix with rows 6 apart; b row-major 5×3, rows 3 apart.
        let a: Vec<f32> = (0..k * 6).map(|i| (i % 7) as f32 - 2.5).collect();
        let bm: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        let mut c = vec![std::mem::MaybeUninit::new(f32::NAN); m * 4];
        let av = MatView { data: &a, transposed: true, ld: 6 };
        let bv = MatView { data: &bm, transposed: false, ld: n };
        b.gemm_view(m, n, k, av, bv, &mut c, 4);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| a[t * 6 + i] * bm[t * n + j]).sum();
                // SAFETY: the m×n block was written.
                let got = unsafe { c[i * 4 + j].assume_init() };
                assert!((got - want).abs() < 1e-5, "({i},{j}): {got} vs {want}");
            }
            // SAFETY: initialised above; the column past n is outside the block and left alone.
            assert!(unsafe { c[i * 4 + 3].assume_init() }.is_nan());
        }
    }

    #[test]
    fn alpha_and_beta_scale_the_product_and_accumulate_into_c() {
        let b = for_test();
        let (m, n, k) = (3, 2, 4);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.25).collect();
        let bm: Vec<f32> = (0..k * n).map(|i| 1.0 - i as f32 * 0.5).collect();
        // A bias in every row of c, kept (beta = 1) under half the product (alpha = 0.5).
        let mut c: Vec<f32> = (0..m * n).map(|i| (i % n) as f32 + 10.0).collect();
        let v = |data, ld| MatView { data, transposed: false, ld };
        b.gemm_ex(m, n, k, 0.5, v(&a, k), v(&bm, n), 1.0, &mut c, n);
        for i in 0..m {
            for j in 0..n {
                let want = 0.5 * (0..k).map(|t| a[i * k + t] * bm[t * n + j]).sum::<f32>() + j as f32 + 10.0;
                assert!((c[i * n + j] - want).abs() < 1e-5, "({i},{j}): {} vs {want}", c[i * n + j]);
            }
        }
    }
}
