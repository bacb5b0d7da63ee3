//! Why a job failed, and whether trying again can help.
//!
//! [`JobError`] keeps what went wrong as what it is (a slide that cannot be read, a key missing from
//! the store, credentials the store refuses, the device out of memory, a setting that makes no
//! sense, ...) until [`JobError::is_transient`], the one function that decides, maps it to transient
//! (retried after a delay, possibly elsewhere) or permanent (the job fails at once with its
//! reason). [`RetryPolicy::decide`] then turns that and the attempt count into the next step, for
//! the embedded pool and the NATS workers alike.

use crate::slide::SlideError;
use std::time::Duration;
use wsimil_common::store::StoreError;
use wsimil_common::table::TableError;

/// A job failure, as what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A slide that cannot be read: not a slide, truncated, corrupt where it matters, unsupported.
    #[error("{0}")]
    SlideUnreadable(SlideError),
    /// The slide records no resolution and the manifest gives none.
    #[error("{0}")]
    NoMpp(SlideError),
    /// No slide reader on this host (libopenslide missing): another worker may have one.
    #[error("{0}")]
    ReaderUnavailable(SlideError),
    /// An object the job reads is not in the store.
    #[error("{0}")]
    StoreNotFound(StoreError),
    /// The store refuses this worker's credentials or permissions.
    #[error("{0}")]
    StoreAuth(StoreError),
    /// The store could not be reached or answered with an error that may pass (network, 5xx,
    /// throttling), after the client's own retries.
    #[error("{0}")]
    StoreTransient(StoreError),
    /// A stored object that does not read as what it should be (bad JSON or Parquet), or a
    /// request the store will never accept.
    #[error("{0}")]
    StoreInvalid(StoreError),
    /// The device ran out of memory: another job may free some, another worker may have more.
    #[error("{what}: the device ran out of memory: {reason}")]
    OutOfMemory { what: String, reason: String },
    /// A network failed for a reason that will not pass (shapes, missing kernels, NaNs, ...).
    #[error("{what}: {reason}")]
    Model { what: String, reason: String },
    /// A setting that cannot work, found inside the job (settings are checked before a run starts;
    /// this is what a worker's own environment or an old plan can still get wrong).
    #[error("bad configuration: {0}")]
    Config(String),
    /// The job's inputs cannot give a result: no tissue, no features, a slide in no fold, ...
    #[error("{0}")]
    Input(String),
    /// The job's code panicked (a bug): it would panic again.
    #[error("job panicked: {0}")]
    Panicked(String),
}

impl JobError {
    /// The one place that decides whether a failure may pass.
    pub fn is_transient(&self) -> bool {
        match self {
            JobError::ReaderUnavailable(_) | JobError::StoreTransient(_) | JobError::OutOfMemory { .. } => true,
            JobError::SlideUnreadable(_)
            | JobError::NoMpp(_)
            | JobError::StoreNotFound(_)
            | JobError::StoreAuth(_)
            | JobError::StoreInvalid(_)
            | JobError::Model { .. }
            | JobError::Config(_)
            | JobError::Input(_)
            | JobError::Panicked(_) => false,
        }
    }

    /// A network's failure in `what`: out of memory or not.
    pub fn model(what: &str, e: candle_core::Error) -> Self {
        let reason = e.to_string();
        if crate::device::is_out_of_memory(&e) {
            JobError::OutOfMemory { what: what.to_string(), reason }
        } else {
            JobError::Model { what: what.to_string(), reason }
        }
    }
}

impl From<SlideError> for JobError {
    fn from(e: SlideError) -> Self {
        match e {
            SlideError::Library(_) => JobError::ReaderUnavailable(e),
            SlideError::NoMpp { .. } => JobError::NoMpp(e),
            SlideError::Config(reason) => JobError::Config(reason),
            SlideError::Source(e) => e.into(),
            SlideError::Open { .. }
            | SlideError::Read { .. }
            | SlideError::CorruptTile { .. }
            | SlideError::Truncated { .. } => JobError::SlideUnreadable(e),
        }
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => JobError::StoreNotFound(e),
            StoreError::Auth { .. } => JobError::StoreAuth(e),
            StoreError::Unavailable { .. } => JobError::StoreTransient(e),
            StoreError::Refused { .. } | StoreError::Json { .. } | StoreError::Config { .. } => {
                JobError::StoreInvalid(e)
            }
        }
    }
}

impl From<TableError> for JobError {
    fn from(e: TableError) -> Self {
        JobError::Input(e.to_string())
    }
}

impl From<candle_core::Error> for JobError {
    fn from(e: candle_core::Error) -> Self {
        JobError::model("model", e)
    }
}

/// When to try a failed job again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles after each further failure.
    pub backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    RetryAfter(Duration),
    Fail,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 3, backoff: Duration::from_secs(1) }
    }
}

impl RetryPolicy {
    /// Permanent errors fail at once, transient ones are retried with exponential backoff until
    /// attempts run out. `attempt` counts from 1.
    pub fn decide(&self, err: &JobError, attempt: u32) -> Decision {
        if !err.is_transient() || attempt >= self.max_attempts {
            return Decision::Fail;
        }
        Decision::RetryAfter(self.backoff * 2u32.saturating_pow(attempt - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn path() -> PathBuf {
        PathBuf::from("/slides/a.svs")
    }

    fn key() -> String {
        "features/e/t/a.parquet".into()
    }

    #[test]
    fn permanent_errors_fail_at_once_and_transient_ones_back_off_until_the_last_attempt() {
        let p = RetryPolicy { max_attempts: 3, backoff: Duration::from_millis(100) };
        assert_eq!(p.decide(&JobError::Input("no tissue".into()), 1), Decision::Fail);
        let t = JobError::from(StoreError::Unavailable { key: key(), reason: "connection refused".into() });
        assert_eq!(p.decide(&t, 1), Decision::RetryAfter(Duration::from_millis(100)));
        assert_eq!(p.decide(&t, 2), Decision::RetryAfter(Duration::from_millis(200)));
        assert_eq!(p.decide(&t, 3), Decision::Fail);
    }

    /// One case per variant, reached the way jobs reach it (from the error a library returns).
    #[test]
    fn each_kind_of_failure_is_classified_once() {
        let slide = |e: SlideError| JobError::from(e);
        let store = |e: StoreError| JobError::from(e);
        let cases: Vec<(JobError, bool, &str)> = vec![
            (slide(SlideError::Open { path: path(), reason: "not a slide".into() }), false, "SlideUnreadable"),
            (
                slide(SlideError::Read { path: path(), level: 0, x: 0, y: 0, w: 1, h: 1, reason: "bad JPEG".into() }),
                false,
                "SlideUnreadable",
            ),
            (
                slide(SlideError::CorruptTile { path: path(), level: 0, col: 1, row: 2, reason: "x".into() }),
                false,
                "SlideUnreadable",
            ),
            (slide(SlideError::Truncated { path: path(), len: 10, needed: 20 }), false, "SlideUnreadable"),
            (slide(SlideError::NoMpp { path: path() }), false, "NoMpp"),
            (slide(SlideError::Library("libopenslide.so.1: not found".into())), true, "ReaderUnavailable"),
            (slide(SlideError::Config("WSIMIL_READER=\"nativ\"".into())), false, "Config"),
            // A slide in a bucket: the same rule as the store's own objects.
            (slide(SlideError::Source(StoreError::NotFound { key: "s3://b/a.svs".into() })), false, "StoreNotFound"),
            (
                slide(SlideError::Source(StoreError::Auth { key: "s3://b/a.svs".into(), reason: "403".into() })),
                false,
                "StoreAuth",
            ),
            (
                slide(SlideError::Source(StoreError::Unavailable {
                    key: "s3://b/a.svs".into(),
                    reason: "reset".into(),
                })),
                true,
                "StoreTransient",
            ),
            (store(StoreError::NotFound { key: key() }), false, "StoreNotFound"),
            (store(StoreError::Auth { key: key(), reason: "403 Forbidden".into() }), false, "StoreAuth"),
            (store(StoreError::Unavailable { key: key(), reason: "timed out".into() }), true, "StoreTransient"),
            (store(StoreError::Refused { key: key(), reason: "invalid path".into() }), false, "StoreInvalid"),
            (store(StoreError::Config { location: "s3://".into(), reason: "no bucket".into() }), false, "StoreInvalid"),
            (
                store(StoreError::Json { key: key(), source: serde_json::from_str::<u8>("x").unwrap_err() }),
                false,
                "StoreInvalid",
            ),
            (JobError::model("embed", crate::device::OutOfMemory.into()), true, "OutOfMemory"),
            (JobError::model("embed", candle_core::Error::Msg("shape mismatch".into())), false, "Model"),
            (JobError::from(TableError::invalid("f", "bad")), false, "Input"),
            (JobError::Input("no tissue patches".into()), false, "Input"),
            (JobError::Panicked("index out of bounds".into()), false, "Panicked"),
        ];
        for (err, transient, variant) in cases {
            assert!(format!("{err:?}").starts_with(variant), "{err:?} should be {variant}");
            assert_eq!(err.is_transient(), transient, "{variant}: {err}");
        }
    }

    #[test]
    fn an_out_of_memory_error_says_so_and_names_what_ran() {
        let e = JobError::model("embedding s1", crate::device::OutOfMemory.into());
        assert!(e.to_string().starts_with("embedding s1: the device ran out of memory"), "{e}");
    }
}
