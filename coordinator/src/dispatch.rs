//! Getting a stage's jobs done. The coordinator hands a stage's jobs to a [`Dispatcher`] and gets
//! back what happened to each; how they run is the dispatcher's business. [`LocalDispatcher`] is
//! embedded mode: an in-process queue drained by a pool of tasks running the worker's own
//! `execute`, with the same retry rules the distributed workers follow ([`RetryPolicy::decide`]).

use futures::future::BoxFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, Mutex};
use wsimil_common::job::{FailureRecord, Job, JobKind, RunProgress};
use wsimil_worker::error::{Decision, RetryPolicy};
use wsimil_worker::jobs::{execute, Done, WorkerContext};

/// What became of a stage's jobs.
#[derive(Debug, Default, Clone)]
pub struct StageOutcome {
    pub computed: usize,
    pub already_done: usize,
    pub failed: Vec<FailureRecord>,
    pub seconds: f64,
}

pub trait Dispatcher: Send + Sync {
    /// Run `jobs` (all of one kind) to completion or failure.
    fn run_stage(&self, kind: JobKind, jobs: Vec<Job>) -> BoxFuture<'_, anyhow::Result<StageOutcome>>;

    /// Say where the run is (round and stage) for `wsimil status`; best effort.
    fn progress(&self, _p: RunProgress) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Prints a stage's progress as lines (they read well in logs and terminals alike).
pub struct Progress {
    kind: JobKind,
    total: usize,
    finished: AtomicUsize,
    failed: AtomicUsize,
    started: Instant,
}

impl Progress {
    pub fn new(kind: JobKind, total: usize) -> Self {
        Progress { kind, total, finished: AtomicUsize::new(0), failed: AtomicUsize::new(0), started: Instant::now() }
    }

    pub fn finish_one(&self, failure: Option<&FailureRecord>) {
        let n = self.finished.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(f) = failure {
            self.failed.fetch_add(1, Ordering::SeqCst);
            eprintln!(
                "  {:<8} FAILED {}: {}",
                self.kind.as_str(),
                f.slide.as_ref().map(|s| s.as_str()).unwrap_or(f.job.as_str()),
                f.reason
            );
        }
        // A line each time another tenth of the stage is finished.
        if n * 10 / self.total.max(1) > (n - 1) * 10 / self.total.max(1) || n == self.total {
            let failed = self.failed.load(Ordering::SeqCst);
            let note = if failed > 0 { format!(" ({failed} failed)") } else { String::new() };
            eprintln!(
                "  {:<8} {n:>5}/{}{note}  {:.1} s",
                self.kind.as_str(),
                self.total,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Embedded mode's dispatcher.
pub struct LocalDispatcher {
    ctx: Arc<WorkerContext>,
    retry: RetryPolicy,
    /// Jobs of a kind run at once. Embedding and training use every core on their own.
    concurrency: fn(JobKind) -> usize,
}

pub fn default_concurrency(kind: JobKind) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    match kind {
        JobKind::Tile => cores,
        JobKind::Predict | JobKind::Score => cores.div_ceil(2),
        JobKind::Embed | JobKind::Train | JobKind::Finetune => 1,
    }
}

impl LocalDispatcher {
    pub fn new(ctx: Arc<WorkerContext>, retry: RetryPolicy) -> Self {
        LocalDispatcher { ctx, retry, concurrency: default_concurrency }
    }

    async fn run_one(ctx: &WorkerContext, retry: RetryPolicy, job: &Job) -> Result<Done, FailureRecord> {
        let mut attempt = 1;
        loop {
            match execute(ctx, job).await {
                Ok(done) => return Ok(done),
                Err(e) => match retry.decide(&e, attempt) {
                    Decision::RetryAfter(d) => {
                        tracing::warn!(job = %job.id(), attempt, error = %e, "transient failure, retrying");
                        tokio::time::sleep(d).await;
                        attempt += 1;
                    }
                    Decision::Fail => {
                        return Err(FailureRecord {
                            job: job.id(),
                            kind: job.kind(),
                            slide: job.slide().cloned(),
                            reason: e.to_string(),
                            attempts: attempt,
                            worker: ctx.name.clone(),
                        })
                    }
                },
            }
        }
    }
}

impl Dispatcher for LocalDispatcher {
    fn run_stage(&self, kind: JobKind, jobs: Vec<Job>) -> BoxFuture<'_, anyhow::Result<StageOutcome>> {
        Box::pin(async move {
            let started = Instant::now();
            let progress = Arc::new(Progress::new(kind, jobs.len()));
            let (tx, rx) = mpsc::channel::<Job>(jobs.len().max(1));
            for j in jobs {
                tx.send(j).await.expect("queue open");
            }
            drop(tx);
            let rx = Arc::new(Mutex::new(rx));
            let outcome = Arc::new(std::sync::Mutex::new(StageOutcome::default()));
            let mut pool = Vec::new();
            for _ in 0..(self.concurrency)(kind).max(1) {
                let (rx, ctx, progress, outcome, retry) =
                    (rx.clone(), self.ctx.clone(), progress.clone(), outcome.clone(), self.retry);
                pool.push(tokio::spawn(async move {
                    loop {
                        let next = rx.lock().await.recv().await;
                        let Some(job) = next else { break };
                        let result = Self::run_one(&ctx, retry, &job).await;
                        progress.finish_one(result.as_ref().err());
                        let mut o = outcome.lock().unwrap();
                        match result {
                            Ok(Done::Computed) => o.computed += 1,
                            Ok(Done::AlreadyDone) => o.already_done += 1,
                            Err(f) => o.failed.push(f),
                        }
                    }
                }));
            }
            for task in pool {
                task.await?;
            }
            let mut o = outcome.lock().unwrap().clone();
            o.seconds = started.elapsed().as_secs_f64();
            Ok(o)
        })
    }
}
