//! The shared domain of wsimil, used by the coordinator and the workers alike.
//!
//! - [`ids`]: typed, validated identifiers (slides, runs, tilings, embedders, jobs).
//! - [`layout`]: every storage key, spelled once.
//! - [`store`]: the object store handle (local folder, S3/MinIO, memory).
//! - [`table`], [`grid`], [`features`], [`attention`]: Parquet files with provenance: patch grids,
//!   features, per-patch attention.
//! - [`plan`]: what a run is (cohort, folds, tiling, embedder, training config).
//! - [`job`]: job messages and outcomes.
//! - [`records`]: what jobs leave in the store for others to read (fold and shard reports, embedder cards).
//! - [`nats`]: JetStream names, connection, job-state records (distributed mode).
//! - [`models`]: TransMIL, ABMIL, the patch embedders, optimizers, custom ops.
//! - [`classifier`]: a trained model ready to apply (its card, its members), and its applications.
//! - [`metrics`]: AUC, accuracy, balanced accuracy, F1.
//! - [`truth`]: patch-level truth (lesion masks, GeoJSON annotations) and the instance-level figures.
//! - [`rng`]: the seeded generator behind every random choice.

pub mod attention;
pub mod classifier;
pub mod features;
pub mod grid;
pub mod ids;
pub mod job;
pub mod layout;
pub mod metrics;
pub mod models;
pub mod nats;
pub mod plan;
pub mod records;
pub mod rng;
pub mod store;
pub mod survival;
pub mod table;
pub mod telemetry;
pub mod truth;

/// The folder `scripts/fetch-data.sh` fills with the real data (slides, weights, benchmarks):
/// `$WSIMIL_DATA`, else `$XDG_CACHE_HOME/wsimil/data`, else `~/.cache/wsimil/data`.
pub fn data_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(d) = std::env::var_os("WSIMIL_DATA") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("wsimil/data")
}
