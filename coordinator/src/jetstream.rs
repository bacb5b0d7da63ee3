//! Distributed mode: a [`Dispatcher`] over NATS JetStream, and the `status` / `retry-failed`
//! commands that read and reset job states.
//!
//! A stage is published job by job (deduplicated by id and generation), then followed through the
//! KV bucket until every job is done or failed. The coordinator holds no state of its own: killed
//! and restarted, it re-plans from the store, finds the jobs' states in KV, re-publishes what is
//! not finished (JetStream drops the duplicates) and carries on. Jobs that exhausted their
//! deliveries while their worker died are caught through JetStream's max-deliveries advisory.

use crate::dispatch::{Dispatcher, Progress, StageOutcome};
use anyhow::Context;
use futures::future::BoxFuture;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};
use wsimil_common::ids::JobId;
use wsimil_common::job::{FailureRecord, Job, JobKind, RunProgress};
use wsimil_common::nats::{max_deliveries_advisory, now_ms, JobState, JobStatus, Queue, QueueSettings};

pub struct NatsDispatcher {
    client: async_nats::Client,
    queue: Arc<Queue>,
    /// How often to re-read pending jobs' states, in case watch updates were lost (reconnects).
    recheck: Duration,
}

impl NatsDispatcher {
    pub fn new(client: async_nats::Client, queue: Arc<Queue>) -> Self {
        NatsDispatcher { client, queue, recheck: Duration::from_secs(5) }
    }
}

/// Running on its last delivery, with no heartbeat for three ack-wait periods: its worker died and
/// JetStream will not deliver it again.
fn is_exhausted(s: &JobStatus, settings: QueueSettings, now: u64) -> bool {
    s.state == JobState::Running
        && s.attempts >= settings.max_deliver
        && now.saturating_sub(s.updated_ms) > 3 * settings.ack_wait.as_millis() as u64
}

fn failure_of(s: &JobStatus) -> FailureRecord {
    FailureRecord {
        job: s.job.clone(),
        kind: s.kind,
        slide: s.slide.clone(),
        reason: s.reason.clone().unwrap_or_else(|| "failed".into()),
        attempts: s.attempts,
        worker: s.worker.clone().unwrap_or_default(),
    }
}

/// What a job recorded as queued or running needs.
enum Reconciled {
    /// Publish it under this generation (the same one: JetStream drops the copy of a message it
    /// still holds; the next one: its message is gone without a final state).
    Queue(u32),
    /// Its message ran out of deliveries while no coordinator listened: recorded as failed.
    Failed(Box<JobStatus>),
}

/// Follows a stage's pending jobs until each is done or failed.
struct Tracker {
    pending: HashMap<JobId, ()>,
    outcome: StageOutcome,
    progress: Progress,
}

impl Tracker {
    /// Take note of a state; true if it settled a pending job.
    fn observe(&mut self, s: &JobStatus) -> bool {
        if !s.state.is_terminal() || self.pending.remove(&s.job).is_none() {
            return false;
        }
        match s.state {
            JobState::Done if s.already_done => self.outcome.already_done += 1,
            JobState::Done => self.outcome.computed += 1,
            _ => {
                let f = failure_of(s);
                self.progress.finish_one(Some(&f));
                self.outcome.failed.push(f);
                return true;
            }
        }
        self.progress.finish_one(None);
        true
    }
}

impl NatsDispatcher {
    async fn run(&self, kind: JobKind, jobs: Vec<Job>) -> anyhow::Result<StageOutcome> {
        let started = Instant::now();
        let q = &self.queue;
        // Watch first, so no update after publishing can be missed.
        let mut watch = q.kv.watch_all().await.context("watch job states")?;
        let mut advisories =
            self.client.subscribe(max_deliveries_advisory()).await.context("subscribe to advisories")?;
        let mut t = Tracker {
            pending: HashMap::new(),
            outcome: StageOutcome::default(),
            progress: Progress::new(kind, jobs.len()),
        };
        // Per job: read its state, record it queued, publish. Up to 64 jobs in flight at once, so
        // the round trips overlap instead of adding up.
        let queue_one = |job: &Job| {
            let job = job.clone();
            async move {
                let prior = q.status(&job.id()).await?;
                let generation = match &prior {
                    // Failed jobs stay failed until `retry-failed`: they count as failures here.
                    Some(s) if s.state == JobState::Failed => return anyhow::Ok(prior),
                    // Recorded done, yet planned again: its output is gone, so queue a new generation.
                    Some(s) if s.state == JobState::Done => s.generation + 1,
                    Some(s) => match self.reconcile(&job, s).await? {
                        Reconciled::Failed(f) => return Ok(Some(*f)),
                        Reconciled::Queue(g) => g,
                    },
                    None => 0,
                };
                if !matches!(&prior, Some(s) if s.state == JobState::Running && s.generation == generation) {
                    q.set_status(&JobStatus::queued(&job, generation)).await?;
                }
                q.publish_start(&job, generation).await?.await.context("publish")?;
                Ok(None)
            }
        };
        for job in &jobs {
            t.pending.insert(job.id(), ());
        }
        let mut queued = futures::stream::iter(jobs.iter()).map(queue_one).buffer_unordered(64);
        while let Some(r) = queued.next().await {
            if let Some(failed) = r? {
                t.observe(&failed);
            }
        }
        drop(queued);
        info!(%kind, jobs = jobs.len(), secs = started.elapsed().as_secs_f64(), "stage published");
        let mut tick = tokio::time::interval(self.recheck);
        let mut last_note = Instant::now();
        while !t.pending.is_empty() {
            tokio::select! {
                entry = watch.next() => match entry {
                    Some(Ok(e)) => {
                        if let Ok(s) = serde_json::from_slice::<JobStatus>(&e.value) {
                            t.observe(&s);
                        }
                    }
                    Some(Err(e)) => warn!("job-state watch: {e}"),
                    None => {
                        warn!("job-state watch ended (reconnecting)");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(w) = q.kv.watch_all().await {
                            watch = w;
                        }
                        self.recheck_all(&mut t).await;
                    }
                },
                adv = advisories.next() => {
                    if let Some(m) = adv {
                        self.on_max_deliveries(&m.payload).await;
                    }
                }
                _ = tick.tick() => {
                    self.recheck_all(&mut t).await;
                    if last_note.elapsed() > Duration::from_secs(30) && !t.pending.is_empty() {
                        eprintln!("  {:<8} waiting for {} job(s) (are workers running for {kind}?)", kind.as_str(), t.pending.len());
                        last_note = Instant::now();
                    }
                }
            }
        }
        t.outcome.seconds = started.elapsed().as_secs_f64();
        Ok(t.outcome)
    }

    /// A job whose last state is queued or running: is its message still in the stream, and is
    /// anyone working on it?
    async fn reconcile(&self, job: &Job, s: &JobStatus) -> anyhow::Result<Reconciled> {
        let settings = self.queue.settings;
        match self.queue.queued_message(job).await? {
            None => Ok(Reconciled::Queue(s.generation + 1)),
            Some(seq) if is_exhausted(s, settings, now_ms()) => {
                let mut f = s.clone();
                let last = f.reason.take().map(|r| format!("; last error: {r}")).unwrap_or_default();
                f.reason = Some(format!("gave up after {} deliveries, no worker finished it{last}", s.attempts));
                f.state = JobState::Failed;
                f.updated_ms = now_ms();
                self.queue.set_status(&f).await?;
                let _ = self.queue.stream.delete_message(seq).await;
                Ok(Reconciled::Failed(Box::new(f)))
            }
            Some(_) => Ok(Reconciled::Queue(s.generation)),
        }
    }

    /// Re-read every pending job's state (after a reconnect, or periodically as a safety net), and
    /// settle jobs whose worker died on their last delivery.
    async fn recheck_all(&self, t: &mut Tracker) {
        let ids: Vec<JobId> = t.pending.keys().cloned().collect();
        for id in ids {
            match self.queue.status(&id).await {
                Ok(Some(s)) if is_exhausted(&s, self.queue.settings, now_ms()) => {
                    if let Ok(Reconciled::Failed(f)) = self.reconcile(&s.payload, &s).await {
                        t.observe(&f);
                    }
                }
                Ok(Some(s)) => {
                    t.observe(&s);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!("re-reading job states: {e}");
                    return;
                }
            }
        }
    }

    /// A job ran out of deliveries without a worker settling it (its workers died): record it as
    /// failed with the last error seen, and remove the dead message.
    async fn on_max_deliveries(&self, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Advisory {
            stream_seq: u64,
            deliveries: u64,
        }
        let Ok(a) = serde_json::from_slice::<Advisory>(payload) else { return };
        let Ok(raw) = self.queue.stream.get_raw_message(a.stream_seq).await else { return };
        let Ok(job) = serde_json::from_slice::<Job>(&raw.payload) else { return };
        if let Ok(Some(mut s)) = self.queue.status(&job.id()).await {
            if !s.state.is_terminal() {
                let last = s.reason.take().map(|r| format!("; last error: {r}")).unwrap_or_default();
                s.reason = Some(format!("gave up after {} deliveries, no worker finished it{last}", a.deliveries));
                s.state = JobState::Failed;
                s.attempts = a.deliveries as u32;
                s.updated_ms = now_ms();
                let _ = self.queue.set_status(&s).await;
            }
        }
        let _ = self.queue.stream.delete_message(a.stream_seq).await;
    }
}

impl Dispatcher for NatsDispatcher {
    fn run_stage(&self, kind: JobKind, jobs: Vec<Job>) -> BoxFuture<'_, anyhow::Result<StageOutcome>> {
        Box::pin(self.run(kind, jobs))
    }

    fn progress(&self, p: RunProgress) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let bytes = serde_json::to_vec(&p).expect("progress serialises");
            if let Err(e) = self.queue.kv.put(progress_key(&p.run), bytes.into()).await {
                tracing::warn!(run = %p.run, error = %e, "could not record the run's progress");
            }
        })
    }
}

/// Where runs' [`RunProgress`] lives in the bucket, beside the job states.
const PROGRESS_PREFIX: &str = "progress.";

fn progress_key(run: &wsimil_common::ids::RunId) -> String {
    format!("{PROGRESS_PREFIX}{run}")
}

/// Every run's progress in the bucket.
pub async fn all_progress(queue: &Queue) -> anyhow::Result<Vec<RunProgress>> {
    let mut out: Vec<RunProgress> = kv_values(queue, |k| k.starts_with(PROGRESS_PREFIX)).await?;
    out.sort_by(|a, b| a.run.as_str().cmp(b.run.as_str()));
    Ok(out)
}

/// One line per run: where it is.
pub fn render_progress(runs: &[RunProgress]) -> String {
    let mut out = String::new();
    for p in runs {
        let round = if p.rounds == 0 { String::new() } else { format!(" round {} of {} (ICMIL),", p.round, p.rounds) };
        out.push_str(&format!("run {}:{round} stage {}\n", p.run, p.stage));
    }
    out
}

/// Every value in the bucket under a key `keep` accepts that parses as a `T`.
async fn kv_values<T: serde::de::DeserializeOwned>(queue: &Queue, keep: fn(&str) -> bool) -> anyhow::Result<Vec<T>> {
    let keys: Vec<String> = queue.kv.keys().await?.filter_map(|k| async move { k.ok() }).collect().await;
    let mut out = Vec::new();
    for k in keys.iter().filter(|k| keep(k)) {
        if let Some(v) = queue.kv.get(k).await? {
            if let Ok(t) = serde_json::from_slice::<T>(&v) {
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// Every job state in the bucket.
pub async fn all_states(queue: &Queue) -> anyhow::Result<Vec<JobStatus>> {
    kv_values(queue, |k| !k.starts_with(PROGRESS_PREFIX)).await
}

/// `wsimil status`: per-stage counts, running jobs with their worker and age, failures.
pub fn render_status(states: &[JobStatus], now: u64) -> String {
    let mut out = String::new();
    let mut counts: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    for s in states {
        let c = counts.entry(s.kind.as_str()).or_default();
        c[match s.state {
            JobState::Queued => 0,
            JobState::Running => 1,
            JobState::Done => 2,
            JobState::Failed => 3,
        }] += 1;
    }
    out.push_str(&format!("{:<8} {:>8} {:>8} {:>8} {:>8}\n", "stage", "queued", "running", "done", "failed"));
    for kind in JobKind::ALL {
        if let Some(c) = counts.get(kind.as_str()) {
            out.push_str(&format!("{:<8} {:>8} {:>8} {:>8} {:>8}\n", kind.as_str(), c[0], c[1], c[2], c[3]));
        }
    }
    let running: Vec<&JobStatus> = states.iter().filter(|s| s.state == JobState::Running).collect();
    if !running.is_empty() {
        out.push_str("running:\n");
        for s in running {
            let age = now.saturating_sub(s.started_ms.unwrap_or(s.updated_ms)) as f64 / 1000.0;
            out.push_str(&format!(
                "  {}  on {}  for {age:.0} s  (attempt {})\n",
                s.job,
                s.worker.as_deref().unwrap_or("?"),
                s.attempts
            ));
        }
    }
    let failed: Vec<&JobStatus> = states.iter().filter(|s| s.state == JobState::Failed).collect();
    if !failed.is_empty() {
        out.push_str("failed:\n");
        for s in failed {
            out.push_str(&format!(
                "  {}  after {} attempt(s): {}\n",
                s.job,
                s.attempts,
                s.reason.as_deref().unwrap_or("")
            ));
        }
    }
    out
}

/// `wsimil retry-failed`: queue every failed job (optionally only those `select` keeps) again, as a
/// new generation. Returns how many.
pub async fn retry_failed(queue: &Queue, select: impl Fn(&JobStatus) -> bool) -> anyhow::Result<usize> {
    let mut n = 0;
    for s in all_states(queue).await? {
        if s.state == JobState::Failed && select(&s) {
            let generation = s.generation + 1;
            queue.set_status(&JobStatus::queued(&s.payload, generation)).await?;
            queue.publish(&s.payload, generation).await?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsimil_common::ids::RunId;
    use wsimil_common::job::TrainJob;

    fn status(fold: u32, state: JobState) -> JobStatus {
        let job = Job::Train(TrainJob { run: RunId::new("r").unwrap(), round: 0, fold });
        JobStatus {
            state,
            worker: Some("w1".into()),
            started_ms: Some(1_000),
            reason: Some("disk full".into()),
            ..JobStatus::queued(&job, 0)
        }
    }

    #[test]
    fn status_shows_counts_running_jobs_with_worker_and_age_and_failures_with_reasons() {
        let states = vec![
            status(0, JobState::Done),
            status(1, JobState::Running),
            status(2, JobState::Failed),
            status(3, JobState::Queued),
        ];
        let text = render_status(&states, 31_000);
        assert!(text.contains("train           1        1        1        1"), "{text}");
        assert!(text.contains("train.r.r0.f1  on w1  for 30 s"), "{text}");
        assert!(text.contains("train.r.r0.f2  after 0 attempt(s): disk full"), "{text}");
    }

    #[test]
    fn a_job_is_exhausted_only_on_its_last_delivery_without_heartbeats() {
        let q = QueueSettings { ack_wait: Duration::from_secs(10), max_deliver: 3 };
        let mut s = status(0, JobState::Running);
        s.attempts = 3;
        s.updated_ms = 1_000;
        assert!(is_exhausted(&s, q, 1_000 + 31_000));
        assert!(!is_exhausted(&s, q, 1_000 + 29_000), "heartbeat recent enough");
        s.attempts = 2;
        assert!(!is_exhausted(&s, q, 1_000 + 31_000), "JetStream will deliver it again");
        s.attempts = 3;
        s.state = JobState::Queued;
        assert!(!is_exhausted(&s, q, 1_000 + 31_000));
    }

    #[test]
    fn the_tracker_counts_each_job_once() {
        let mut t = Tracker {
            pending: HashMap::new(),
            outcome: StageOutcome::default(),
            progress: Progress::new(JobKind::Train, 2),
        };
        let done = status(0, JobState::Done);
        let failed = status(1, JobState::Failed);
        t.pending.insert(done.job.clone(), ());
        t.pending.insert(failed.job.clone(), ());
        assert!(!t.observe(&status(0, JobState::Running)));
        assert!(t.observe(&done));
        assert!(!t.observe(&done), "a repeated update is not counted twice");
        assert!(t.observe(&failed));
        assert!(t.pending.is_empty());
        assert_eq!((t.outcome.computed, t.outcome.failed.len()), (1, 1));
        assert_eq!(t.outcome.failed[0].reason, "disk full");
    }
}
