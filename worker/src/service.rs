//! The worker process: pull jobs of the kinds it serves from JetStream and execute them.
//!
//! For each message: record `running` in the KV bucket, send in-progress acks as a heartbeat while
//! the job runs (so a long embedding is not redelivered, and a killed worker's job is), execute,
//! then record the outcome and acknowledge: `done` → ack (after the outputs are in the store and
//! the state is written, so a crash in between only causes a redelivery that finds the output);
//! transient error → nak with backoff; permanent error or last delivery → `failed` and term.
//! On shutdown the worker stops pulling and lets running jobs finish.

use crate::error::{Decision, RetryPolicy};
use crate::jobs::{execute, Done, WorkerContext};
use async_nats::jetstream::{consumer::PullConsumer, AckKind, Message};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use wsimil_common::job::{Job, JobKind};
use wsimil_common::nats::{now_ms, JobState, JobStatus, NatsError, Queue, GENERATION_HEADER};

#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub kinds: Vec<JobKind>,
    /// Jobs executed at once, all kinds together.
    pub concurrency: usize,
    /// First retry delay of a transient failure; doubles per attempt.
    pub backoff: Duration,
    /// Acknowledge jobs without doing them (queue benchmarks only).
    pub noop: bool,
}

/// This host's name and this process's id: a worker's name unless it is given one.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{}-{}", if host.is_empty() { "worker" } else { host.as_str() }, std::process::id())
}

/// The `wsimil worker` process: serve until SIGTERM or SIGINT, then drain (running jobs finish,
/// no new ones are taken) and return.
pub async fn run_until_signalled(
    ctx: Arc<WorkerContext>,
    queue: Arc<Queue>,
    settings: ServiceSettings,
) -> Result<(), NatsError> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let served: Vec<&str> = settings.kinds.iter().map(|k| k.as_str()).collect();
    eprintln!("wsimil worker {}: serving {} (concurrency {})", ctx.name, served.join(","), settings.concurrency);
    let name = ctx.name.clone();
    serve(ctx, queue, settings, rx).await?;
    eprintln!("wsimil worker {name}: drained, exiting");
    Ok(())
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Run until `shutdown` turns true, then drain.
pub async fn serve(
    ctx: Arc<WorkerContext>,
    queue: Arc<Queue>,
    settings: ServiceSettings,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NatsError> {
    let mut consumers = Vec::new();
    for &kind in &settings.kinds {
        consumers.push((kind, queue.consumer(kind).await?));
    }
    info!(worker = %ctx.name, kinds = ?settings.kinds, concurrency = settings.concurrency, "worker ready");
    let mut tasks = pull(&consumers, &ctx, &queue, &settings, shutdown).await;
    info!(worker = %ctx.name, running = tasks.len(), "draining: no new jobs, waiting for running ones");
    while let Some(t) = tasks.join_next().await {
        if let Err(e) = t {
            error!("job task panicked: {e}");
        }
    }
    Ok(())
}

/// The one pulling loop: while permits are free, ask each kind's consumer (no-wait) for up to that
/// many jobs, rotating which kind goes first; when every queue is empty, back off (50 ms up to 1 s)
/// before asking again. Each job runs in its own task holding one permit.
async fn pull(
    consumers: &[(JobKind, PullConsumer)],
    ctx: &Arc<WorkerContext>,
    queue: &Arc<Queue>,
    settings: &ServiceSettings,
    mut shutdown: watch::Receiver<bool>,
) -> JoinSet<()> {
    let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let mut idle = Duration::from_millis(50);
    let mut first = 0;
    loop {
        let first_permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore open"),
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let mut free = vec![first_permit];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            free.push(p);
        }
        let mut got = 0;
        for i in 0..consumers.len() {
            if free.is_empty() {
                break;
            }
            let (kind, consumer) = &consumers[(first + i) % consumers.len()];
            let mut messages = match consumer.fetch().max_messages(free.len()).messages().await {
                Ok(m) => m,
                Err(e) => {
                    warn!(%kind, "fetch failed (will retry): {e}");
                    continue;
                }
            };
            while let Some(m) = messages.next().await {
                let msg = match m {
                    Ok(msg) => msg,
                    Err(e) => {
                        warn!(%kind, "receive failed: {e}");
                        break;
                    }
                };
                let Some(permit) = free.pop() else { break };
                got += 1;
                let (ctx, queue, settings) = (ctx.clone(), queue.clone(), settings.clone());
                tasks.spawn(async move {
                    handle(&ctx, &queue, &settings, msg).await;
                    drop(permit);
                });
            }
        }
        drop(free);
        first = (first + 1) % consumers.len().max(1);
        while tasks.try_join_next().is_some() {}
        if got == 0 {
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            idle = (idle * 2).min(Duration::from_secs(1));
        } else {
            idle = Duration::from_millis(50);
        }
    }
    tasks
}

/// Execute one delivered job and settle it with JetStream and the KV bucket.
async fn handle(ctx: &WorkerContext, queue: &Queue, settings: &ServiceSettings, msg: Message) {
    let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
    let job: Job = match serde_json::from_slice(&msg.payload) {
        Ok(j) => j,
        Err(e) => {
            error!(subject = %msg.subject, "unreadable job message, dropped: {e}");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    let generation = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(GENERATION_HEADER))
        .and_then(|v| v.as_str().parse::<u32>().ok())
        .unwrap_or(0);
    let mut status = JobStatus {
        state: JobState::Running,
        attempts: delivered,
        worker: Some(ctx.name.clone()),
        started_ms: Some(now_ms()),
        updated_ms: now_ms(),
        ..JobStatus::queued(&job, generation)
    };
    if let Err(e) = queue.set_status(&status).await {
        warn!(job = %job.id(), "cannot record running state: {e}");
    }
    // Heartbeat: tell JetStream we are alive well within ack_wait.
    let beat_every = (queue.settings.ack_wait / 3).max(Duration::from_millis(200));
    let outcome = if settings.noop {
        Ok(Done::Computed)
    } else {
        let work = execute(ctx, &job);
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tokio::time::sleep(beat_every) => {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        warn!(job = %job.id(), "heartbeat failed: {e}");
                    }
                    // The KV record shows the job is alive too (`status` ages, exhaustion checks).
                    status.updated_ms = now_ms();
                    let _ = queue.set_status(&status).await;
                }
            }
        }
    };
    status.updated_ms = now_ms();
    match outcome {
        Ok(done) => {
            status.state = JobState::Done;
            status.already_done = done == Done::AlreadyDone;
            status.reason = None;
            settle(queue, &status, &msg, AckKind::Ack).await;
            info!(job = %job.id(), attempt = delivered, already_done = status.already_done, "done");
        }
        Err(e) => {
            let policy = RetryPolicy { max_attempts: queue.settings.max_deliver, backoff: settings.backoff };
            status.reason = Some(e.to_string());
            match policy.decide(&e, delivered) {
                Decision::RetryAfter(delay) => {
                    status.state = JobState::Queued;
                    warn!(job = %job.id(), attempt = delivered, "transient failure, retry in {delay:?}: {e}");
                    settle(queue, &status, &msg, AckKind::Nak(Some(delay))).await;
                }
                Decision::Fail => {
                    status.state = JobState::Failed;
                    warn!(job = %job.id(), attempt = delivered, "failed: {e}");
                    settle(queue, &status, &msg, AckKind::Term).await;
                }
            }
        }
    }
}

/// Record the state first, then acknowledge: the ack is the point of no return.
async fn settle(queue: &Queue, status: &JobStatus, msg: &Message, ack: AckKind) {
    for attempt in 0..5 {
        match queue.set_status(status).await {
            Ok(()) => break,
            Err(e) if attempt < 4 => {
                warn!(job = %status.job, "cannot record state (retrying): {e}");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            Err(e) => error!(job = %status.job, "cannot record state: {e}"),
        }
    }
    if let Err(e) = msg.double_ack_with(ack).await {
        warn!(job = %status.job, "acknowledgement not confirmed (the job may be redelivered): {e}");
    }
}
