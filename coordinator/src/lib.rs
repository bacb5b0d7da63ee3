//! The wsimil coordinator: from a cohort manifest to trained bag classifiers and predictions.
//!
//! - [`manifest`]: reading and validating the cohort CSV (every problem at once).
//! - [`planner`]: folds, the run plan, and each stage's jobs given what the store holds (resume).
//! - [`dispatch`]: getting a stage's jobs done; the embedded in-process pool and the retry rule.
//! - [`jetstream`]: distributed mode: the NATS JetStream dispatcher, `status`, `retry-failed`.
//! - [`run`]: the stages in order, and the round's summary (predictions, metrics).
//! - [`cli`]: the `wsimil` command line.

pub mod cli;
pub mod dispatch;
pub mod import;
pub mod jetstream;
pub mod manifest;
pub mod planner;
pub mod run;
