//! NATS JetStream: the names, the connection, and the job-state records coordinator and workers
//! share.
//!
//! ```text
//! stream WSIMIL_JOBS (WorkQueue, file storage, 24 h dedup window)
//!   subjects wsimil.job.<kind>.<job id>   (one subject per job: "is its message still queued?")
//!   durable pull consumers wsimil-tile | -embed | -train | -predict, filter wsimil.job.<kind>.>
//! KV bucket wsimil-jobs: job id → JobStatus (queued | running | done | failed)
//! advisory $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.WSIMIL_JOBS.* : a job ran out of deliveries
//! ```
//!
//! A job is published with `Nats-Msg-Id = <job id>.g<generation>`: re-planning publishes the same
//! id and JetStream drops the copy; `retry-failed` bumps the generation to queue it again.

use crate::ids::{JobId, SlideId};
use crate::job::{Job, JobKind};
use async_nats::jetstream::{self, consumer, kv, stream};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const STREAM: &str = "WSIMIL_JOBS";
pub const KV_BUCKET: &str = "wsimil-jobs";

/// The subjects of a kind's jobs (a consumer's filter).
pub fn kind_subjects(kind: JobKind) -> String {
    format!("wsimil.job.{}.>", kind.as_str())
}

/// The subject of one job.
pub fn job_subject(job: &Job) -> String {
    format!("wsimil.job.{}.{}", job.kind().as_str(), job.id())
}

pub fn consumer_name(kind: JobKind) -> String {
    format!("wsimil-{}", kind.as_str())
}

pub fn max_deliveries_advisory() -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM}.*")
}

/// Header carrying the job's generation, so a worker need not look it up.
pub const GENERATION_HEADER: &str = "Wsimil-Generation";

pub fn msg_id(job: &JobId, generation: u32) -> String {
    format!("{job}.g{generation}")
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How to reach NATS. Secrets are never printed: `Debug` hides them.
#[derive(Clone, Default)]
pub struct NatsOptions {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<PathBuf>,
    /// Require TLS; with `tls_ca`, trust that CA; with `tls_cert`/`tls_key`, authenticate by certificate.
    pub tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Name of this client in the server's monitoring.
    pub name: String,
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsOptions")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("creds_file", &self.creds_file)
            .field("tls", &self.tls)
            .field("name", &self.name)
            .finish()
    }
}

/// Queue settings that shape redelivery.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// A job not acked (nor marked in progress) within this time is redelivered.
    pub ack_wait: Duration,
    /// Deliveries of a job, the first included, before it counts as failed.
    pub max_deliver: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings { ack_wait: Duration::from_secs(60), max_deliver: 5 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("NATS {what}: {reason}")]
    Op { what: String, reason: String },
}

impl NatsError {
    pub fn op(what: &str, e: impl std::fmt::Display) -> Self {
        NatsError::Op { what: what.to_string(), reason: e.to_string() }
    }
}

/// Connect. An unreachable server is retried for 30 s (servers and workers start in any order);
/// bad credentials or TLS fail at once, naming the server. Once connected, the client reconnects
/// forever: a server restart must not end a long run.
pub async fn connect(opts: &NatsOptions) -> Result<async_nats::Client, NatsError> {
    use async_nats::ConnectErrorKind as Kind;
    let fail = |reason: String| NatsError::Connect { url: opts.url.clone(), reason };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match connect_options(opts).await?.connect(&opts.url).await {
            Ok(client) => return Ok(client),
            Err(e)
                if matches!(e.kind(), Kind::Io | Kind::TimedOut | Kind::Dns)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    }
}

async fn connect_options(opts: &NatsOptions) -> Result<async_nats::ConnectOptions, NatsError> {
    let fail = |reason: String| NatsError::Connect { url: opts.url.clone(), reason };
    let mut c = async_nats::ConnectOptions::new()
        .name(&opts.name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(10));
    if let (Some(u), Some(p)) = (&opts.user, &opts.password) {
        c = c.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &opts.token {
        c = c.token(t.clone());
    }
    if let Some(f) = &opts.creds_file {
        c = c.credentials_file(f).await.map_err(|e| fail(format!("credentials file {}: {e}", f.display())))?;
    }
    if opts.tls {
        c = c.require_tls(true);
    }
    if let Some(ca) = &opts.tls_ca {
        c = c.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) {
        c = c.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(c)
}

/// The stream, its consumers and the KV bucket, created if missing (coordinator and workers both
/// call this; creation is idempotent).
pub struct Queue {
    pub js: jetstream::Context,
    pub stream: stream::Stream,
    pub kv: kv::Store,
    pub settings: QueueSettings,
}

impl Queue {
    pub async fn open(client: async_nats::Client, settings: QueueSettings) -> Result<Self, NatsError> {
        let js = jetstream::new(client);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: STREAM.to_string(),
                subjects: vec!["wsimil.job.>".to_string()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(24 * 3600),
                ..Default::default()
            })
            .await
            .map_err(|e| NatsError::op("create stream", e))?;
        for kind in JobKind::ALL {
            stream
                .get_or_create_consumer(
                    &consumer_name(kind),
                    consumer::pull::Config {
                        durable_name: Some(consumer_name(kind)),
                        filter_subject: kind_subjects(kind),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: settings.ack_wait,
                        max_deliver: settings.max_deliver as i64,
                        max_ack_pending: 10_000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| NatsError::op("create consumer", e))?;
        }
        let kv = match js.get_key_value(KV_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config { bucket: KV_BUCKET.to_string(), history: 5, ..Default::default() })
                .await
                .map_err(|e| NatsError::op("create KV bucket", e))?,
        };
        Ok(Queue { js, stream, kv, settings })
    }

    pub async fn consumer(&self, kind: JobKind) -> Result<consumer::PullConsumer, NatsError> {
        self.stream.get_consumer(&consumer_name(kind)).await.map_err(|e| NatsError::op("get consumer", e))
    }

    pub async fn status(&self, job: &JobId) -> Result<Option<JobStatus>, NatsError> {
        let v = self.kv.get(job.as_str()).await.map_err(|e| NatsError::op("read job state", e))?;
        Ok(v.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub async fn set_status(&self, s: &JobStatus) -> Result<(), NatsError> {
        let bytes = serde_json::to_vec(s).expect("status serialises");
        self.kv.put(s.job.as_str(), bytes.into()).await.map_err(|e| NatsError::op("write job state", e))?;
        Ok(())
    }

    /// Publish a job (deduplicated by its id and generation) and wait for JetStream to store it.
    pub async fn publish(&self, job: &Job, generation: u32) -> Result<(), NatsError> {
        self.publish_start(job, generation).await?.await.map_err(|e| NatsError::op("publish", e))?;
        Ok(())
    }

    /// Publish without waiting for the acknowledgement: await the returned future (pipelining).
    pub async fn publish_start(
        &self,
        job: &Job,
        generation: u32,
    ) -> Result<jetstream::context::PublishAckFuture, NatsError> {
        let payload = serde_json::to_vec(job).expect("job serialises");
        let msg = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(msg_id(&job.id(), generation))
            .header(GENERATION_HEADER, generation.to_string().as_str());
        self.js.send_publish(job_subject(job), msg).await.map_err(|e| NatsError::op("publish", e))
    }

    /// The stream sequence of `job`'s message if it is still in the stream (queued, in flight, or
    /// out of deliveries), `None` once a worker has acknowledged or terminated it.
    pub async fn queued_message(&self, job: &Job) -> Result<Option<u64>, NatsError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        match self.stream.get_last_raw_message_by_subject(&job_subject(job)).await {
            Ok(m) => Ok(Some(m.sequence)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(NatsError::op("look up a job's message", e)),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed)
    }
}

/// A job's record in the KV bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job: JobId,
    pub kind: JobKind,
    pub slide: Option<SlideId>,
    pub state: JobState,
    /// Bumped by `retry-failed`; part of the publish dedup id.
    pub generation: u32,
    /// Deliveries so far (JetStream's count).
    pub attempts: u32,
    pub worker: Option<String>,
    /// Why it failed, or the last transient error before a retry.
    pub reason: Option<String>,
    /// Done because its output was already in the store (not computed again).
    #[serde(default)]
    pub already_done: bool,
    pub started_ms: Option<u64>,
    pub updated_ms: u64,
    /// The job itself, so it can be re-queued without re-planning.
    pub payload: Job,
}

impl JobStatus {
    pub fn queued(job: &Job, generation: u32) -> Self {
        JobStatus {
            job: job.id(),
            kind: job.kind(),
            slide: job.slide().cloned(),
            state: JobState::Queued,
            generation,
            attempts: 0,
            worker: None,
            reason: None,
            already_done: false,
            started_ms: None,
            updated_ms: now_ms(),
            payload: job.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RunId;
    use crate::job::TrainJob;

    #[test]
    fn names_and_dedup_ids() {
        assert_eq!(kind_subjects(JobKind::Embed), "wsimil.job.embed.>");
        assert_eq!(consumer_name(JobKind::Tile), "wsimil-tile");
        let j = Job::Train(TrainJob { run: RunId::new("r").unwrap(), round: 0, fold: 1 });
        assert_eq!(msg_id(&j.id(), 0), "train.r.r0.f1.g0");
        assert_eq!(job_subject(&j), "wsimil.job.train.train.r.r0.f1");
        assert_ne!(msg_id(&j.id(), 0), msg_id(&j.id(), 1));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let o = NatsOptions {
            url: "nats://x".into(),
            password: Some("hunter2".into()),
            token: Some("tok".into()),
            ..Default::default()
        };
        let s = format!("{o:?}");
        assert!(!s.contains("hunter2") && !s.contains("tok\""), "{s}");
        assert!(s.contains("nats://x"));
    }

    #[test]
    fn status_records_round_trip() {
        let j = Job::Train(TrainJob { run: RunId::new("r").unwrap(), round: 0, fold: 1 });
        let s = JobStatus::queued(&j, 2);
        let back: JobStatus = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(!back.state.is_terminal());
    }
}
