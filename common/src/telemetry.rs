//! Live counts a cluster user can scrape: per stage, the jobs a process started, finished (computed,
//! found already done, failed), is running, the patches it tiled or embedded and the seconds its
//! jobs took, in Prometheus' text exposition format (version 0.0.4) on `GET /metrics`.
//!
//! Off by default: `--metrics-addr HOST:PORT` on `run`, `coordinator`, `worker` and `predict`
//! starts the endpoint ([`serve`]). The counters are process-wide and cost a lock per job, so they
//! are always kept; only the endpoint is optional. Rates are Prometheus' to take from the counters
//! (`rate(wsimil_patches_total[1m])`); [`Telemetry::render`] adds each stage's patches per second
//! of job time (`wsimil_patches_per_job_second`) for a reader without Prometheus.
//!
//! The coordinator adds the jobs each stage planned (`wsimil_stage_jobs_planned`), so one scrape of
//! an embedded run says how far every stage is.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Computed,
    AlreadyDone,
    Failed,
}

#[derive(Debug, Default, Clone)]
struct Stage {
    planned: u64,
    started: u64,
    computed: u64,
    already_done: u64,
    failed: u64,
    patches: u64,
    job_seconds: f64,
}

/// The process's counters, by stage name (`tile`, `embed`, ...).
#[derive(Debug, Default)]
pub struct Telemetry {
    stages: Mutex<BTreeMap<String, Stage>>,
}

/// This process's counters.
pub fn telemetry() -> &'static Telemetry {
    static T: OnceLock<Telemetry> = OnceLock::new();
    T.get_or_init(Telemetry::default)
}

impl Telemetry {
    fn with(&self, stage: &str, f: impl FnOnce(&mut Stage)) {
        let mut m = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(stage.to_string()).or_default());
    }

    /// The coordinator planned `n` more jobs of `stage`.
    pub fn planned(&self, stage: &str, n: usize) {
        self.with(stage, |s| s.planned += n as u64);
    }

    /// A job of `stage` started.
    pub fn started(&self, stage: &str) {
        self.with(stage, |s| s.started += 1);
    }

    /// A job of `stage` ended after `seconds`.
    pub fn finished(&self, stage: &str, outcome: Outcome, seconds: f64) {
        self.with(stage, |s| {
            match outcome {
                Outcome::Computed => s.computed += 1,
                Outcome::AlreadyDone => s.already_done += 1,
                Outcome::Failed => s.failed += 1,
            }
            s.job_seconds += seconds;
        });
    }

    /// A job of `stage` tiled or embedded `n` patches.
    pub fn patches(&self, stage: &str, n: usize) {
        self.with(stage, |s| s.patches += n as u64);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let stages = self.stages.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let per = |f: &dyn Fn(&Stage) -> String| -> Vec<(String, String)> {
            stages.iter().map(|(k, s)| (format!("stage=\"{k}\""), f(s))).collect()
        };
        family(
            "wsimil_stage_jobs_planned",
            "counter",
            "Jobs the coordinator planned, by stage.",
            per(&|s| s.planned.to_string()),
        );
        family(
            "wsimil_jobs_started_total",
            "counter",
            "Jobs this process started, by stage.",
            per(&|s| s.started.to_string()),
        );
        let mut ended = Vec::new();
        for (k, s) in &stages {
            for (outcome, n) in [("computed", s.computed), ("already_done", s.already_done), ("failed", s.failed)] {
                ended.push((format!("stage=\"{k}\",outcome=\"{outcome}\""), n.to_string()));
            }
        }
        family("wsimil_jobs_total", "counter", "Jobs this process finished, by stage and outcome.", ended);
        family(
            "wsimil_jobs_running",
            "gauge",
            "Jobs this process is running, by stage.",
            per(&|s| (s.started - s.computed - s.already_done - s.failed).to_string()),
        );
        family(
            "wsimil_patches_total",
            "counter",
            "Patches tiled or embedded, by stage.",
            per(&|s| s.patches.to_string()),
        );
        family(
            "wsimil_job_seconds_total",
            "counter",
            "Seconds of finished jobs, by stage.",
            per(&|s| format!("{}", s.job_seconds)),
        );
        family(
            "wsimil_patches_per_job_second",
            "gauge",
            "Patches per second of job time, by stage (0 before the first finished job).",
            per(&|s| format!("{}", if s.job_seconds > 0.0 { s.patches as f64 / s.job_seconds } else { 0.0 })),
        );
        out
    }
}

/// Serve [`telemetry`]'s text on `GET /metrics` at `addr` until the process ends; returns the
/// address bound (port 0 picks a free one). Any other path is a 404.
pub async fn serve(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                // The request head; a scrape's is a few hundred bytes.
                let mut head = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let target = line.split_whitespace().take(2).collect::<Vec<_>>();
                let (status, kind, body) = match target[..] {
                    ["GET", path] if path == "/metrics" || path.starts_with("/metrics?") => {
                        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", telemetry().render())
                    }
                    _ => ("404 Not Found", "text/plain; charset=utf-8", "wsimil serves GET /metrics\n".to_string()),
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).await.unwrap();
        s
    }

    fn value(text: &str, series: &str) -> f64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line[series.len()..].trim().parse().unwrap()
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_counts_in_prometheus_text_format() {
        // A stage name of this test's own: the counters are process-wide.
        let t = telemetry();
        t.planned("test-embed", 3);
        for (outcome, secs) in [(Outcome::Computed, 2.0), (Outcome::Failed, 0.5), (Outcome::AlreadyDone, 0.0)] {
            t.started("test-embed");
            t.finished("test-embed", outcome, secs);
        }
        t.started("test-embed");
        t.patches("test-embed", 500);
        let addr = serve("127.0.0.1:0").await.unwrap();
        let reply = get(addr, "/metrics").await;
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK") && head.contains("text/plain; version=0.0.4"), "{head}");
        let s = "{stage=\"test-embed\"}";
        assert_eq!(value(body, &format!("wsimil_stage_jobs_planned{s}")), 3.0);
        assert_eq!(value(body, &format!("wsimil_jobs_started_total{s}")), 4.0);
        assert_eq!(value(body, "wsimil_jobs_total{stage=\"test-embed\",outcome=\"computed\"}"), 1.0);
        assert_eq!(value(body, "wsimil_jobs_total{stage=\"test-embed\",outcome=\"failed\"}"), 1.0);
        assert_eq!(value(body, "wsimil_jobs_total{stage=\"test-embed\",outcome=\"already_done\"}"), 1.0);
        assert_eq!(value(body, &format!("wsimil_jobs_running{s}")), 1.0);
        assert_eq!(value(body, &format!("wsimil_patches_total{s}")), 500.0);
        assert_eq!(value(body, &format!("wsimil_job_seconds_total{s}")), 2.5);
        assert_eq!(value(body, &format!("wsimil_patches_per_job_second{s}")), 200.0);
        // Every sample line belongs to a family declared with its TYPE.
        for l in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let name = &l[..l.find('{').unwrap()];
            assert!(body.contains(&format!("# TYPE {name} ")), "{l}");
        }
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
    }
}
