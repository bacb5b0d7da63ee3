//! The wsimil coordinator: from a cohort manifest to trained bag classifiers and predictions.
//!
//! - [`manifest`]: reading and validating the cohort CSV (every problem at once).
//! - [`planner`]: folds, the run plan, and each stage's jobs given what the store holds (resume).
//! - [`dispatch`]: getting a stage's jobs done; the embedded in-process pool and the retry rule.
//! - [`jetstream`]: distributed mode: the NATS JetStream dispatcher, `status`, `retry-failed`.
//! - [`run`]: the stages in order, and the round's summary (predictions, metrics).
//! - [`apply`]: a trained model applied to new slides (`wsimil predict`), models as folders.
//! - [`predictions`]: the predictions table both write (CSV and Parquet).
//! - [`report`]: `report.html`, the page a person reads at the end of a run.
//! - [`export`]: features out as the HDF5 files CLAM and TRIDENT read (`wsimil export-features`).
//! - [`cli`]: the `wsimil` command line.

pub mod apply;
pub mod cli;
pub mod dispatch;
pub mod export;

/// Keep freed memory in the process instead of handing it back to the kernel. Tensors of tens of
/// megabytes are allocated and freed for every layer of every batch; glibc serves blocks over its
/// mmap threshold (32 MiB at most) with fresh mappings and unmaps them on free, so each one costs
/// page faults that zero it again. Called first thing in `main` (through [`prepare_process`]).
///
/// One arena for every thread: memory kept this way only serves the arena that freed it, and glibc
/// gives each new thread that meets contention an arena of its own (up to 8 per core). Bags are
/// decoded on the blocking pool's threads and trained on another, so with an arena per thread each
/// grew to its own high-water mark and the process held several times what was live at once
/// (0.9-1.8 GB resident for a 0.2 GB bag budget on the 20-slide cohort of bench/train-scale.sh,
/// 0.69 GB with one arena, at the same speed).
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes glibc's allocation policy; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
/// Logging to stderr, filtered by `WSIMIL_LOG` (default `warn`), in colour on a terminal.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WSIMIL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// What `main` does before anything else, while the process has one thread: the allocator policy
/// and OpenBLAS's environment (read when it loads; see `wsimil_common::models::blas`).
pub fn prepare_process() {
    tune_allocator();
    wsimil_common::models::blas::prepare_env();
}

pub mod icmil;
pub mod import;
pub mod jetstream;
pub mod manifest;
pub mod planner;
pub mod predictions;
pub mod raster;
pub mod report;
pub mod run;
