//! Distributed mode against real servers: a NATS JetStream server and an S3 server (SeaweedFS),
//! with the coordinator and workers as separate `wsimil` processes.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;
use support::*;
use wsimil_common::nats::{JobState, QueueSettings};
use wsimil_common::store::Store;

const LONG: Duration = Duration::from_secs(300);

fn settings() -> QueueSettings {
    QueueSettings { ack_wait: Duration::from_secs(3), max_deliver: 4 }
}

/// Every object under `prefix` with its last-modified time.
async fn modified(store: &Store, prefix: &str) -> BTreeMap<String, i64> {
    use object_store::ObjectStoreExt;
    let mut out = BTreeMap::new();
    for key in store.list(&object_store::path::Path::from(prefix)).await.unwrap() {
        let meta = store.object_store().head(&key).await.unwrap();
        out.insert(key.to_string(), meta.last_modified.timestamp_millis());
    }
    out
}

fn file_text(path: impl AsRef<std::path::Path>) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_match_the_embedded_run_isolate_a_corrupt_slide_and_drain_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 4, 1024, 1280, true);
    // Round 0, then one ICMIL round: two fine-tuning shards per fold, taken by either worker.
    let icmil = [
        "--icmil-rounds",
        "1",
        "--icmil-shards",
        "2",
        "--icmil-batch-size",
        "4",
        "--icmil-patches-per-slide",
        "4",
        "--icmil-trainable-blocks",
        "2",
        "--icmil-lr",
        "1e-4",
    ];

    // The embedded run, as the reference.
    let local = d.join("embedded-store");
    let mut args = run_flags(&manifest, &icmil);
    args.extend(["--store".to_string(), local.display().to_string()]);
    let out = wsimil().args(&args).output().unwrap();
    assert!(out.status.success(), "embedded run failed: {}", String::from_utf8_lossy(&out.stderr));

    // The same cohort through NATS and S3.
    let nats = Nats::start();
    let s3 = s3();
    let store_flags = s3.flags("two-workers");
    // Both workers serve their counts for Prometheus.
    let ports = [free_port(), free_port()];
    let with_metrics = |name: &str, port: u16| {
        let mut f = worker_flags(&nats, &store_flags, name);
        f.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{port}")]);
        f
    };
    let mut w1 = spawn("w1", d, &with_metrics("w1", ports[0]));
    let mut w2 = spawn("w2", d, &with_metrics("w2", ports[1]));
    let mut args = run_flags(&manifest, &icmil);
    args.extend(nats_flags(&nats));
    args.extend(store_flags.clone());
    let mut coord = spawn("coordinator", d, &args);
    assert!(coord.wait(LONG).success(), "coordinator failed:\n{}", log(d, "coordinator"));
    let report = log(d, "coordinator");
    assert!(report.contains("(distributed)") && report.contains("AUC"), "{report}");

    // Outputs identical to the embedded run: every feature file (round 0's and both folds' ICMIL
    // embedders'), the fine-tuned embedders, every classifier and both rounds' predictions.
    let remote = s3.store("two-workers");
    let mut compared = 0;
    // (Embedder cards hold the shards' timings: their weights are compared.)
    let same = |p: &std::path::Path| p.starts_with(local.join("features")) || p.ends_with("model.safetensors");
    for path in walk(&local).into_iter().filter(|p| same(p)) {
        let key = path.strip_prefix(&local).unwrap().to_str().unwrap().to_string();
        let theirs = remote.get(&object_store::path::Path::from(key.as_str())).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), theirs.to_vec(), "{key} differs");
        compared += 1;
    }
    // 4 slides x (1 + 2 fold embedders) feature files; the weights of the base embedder and of the
    // 2 fine-tuned ones; the bag classifiers of 2 folds x 2 rounds.
    assert_eq!(compared, 12 + 3 + 4);
    for round in ["round-0", "round-1"] {
        let suffix = format!("{round}/predictions.csv");
        let preds = walk(&local.join("runs")).into_iter().find(|p| p.ends_with(&suffix)).unwrap();
        let key = preds.strip_prefix(&local).unwrap().to_str().unwrap().to_string();
        let remote_preds = remote.get(&object_store::path::Path::from(key.as_str())).await.unwrap();
        assert_eq!(file_text(&preds), String::from_utf8(remote_preds.to_vec()).unwrap(), "{round}");
    }
    assert!(report.contains("round 1: AUC"), "{report}");

    // Both workers took jobs; the corrupt slide failed alone, with its reason shown by `status`.
    for w in ["w1", "w2"] {
        assert!(log(d, w).contains("done"), "{w} did no job:\n{}", log(d, w));
    }
    let mut status_args = vec!["status".to_string()];
    status_args.extend(nats_flags(&nats));
    let status = String::from_utf8(wsimil().args(&status_args).output().unwrap().stdout).unwrap();
    assert!(status.contains("tile            0        0        4        1"), "{status}");
    assert!(status.contains("finetune        0        0        4        0"), "{status}");
    assert!(status.contains("round 1 of 1 (ICMIL), stage done"), "{status}");
    let finetuned: Vec<usize> =
        ["w1", "w2"].iter().map(|w| log(d, w).lines().filter(|l| l.contains("fine-tuned")).count()).collect();
    assert_eq!(finetuned.iter().sum::<usize>(), 4, "{finetuned:?}");
    assert!(status.contains(".corrupt  after 1 attempt(s):") && status.contains("could not be decoded"), "{status}");

    // retry-failed queues it again (a new generation), and it fails again for the same reason.
    let mut retry = vec!["retry-failed".to_string()];
    retry.extend(nats_flags(&nats));
    let out = wsimil().args(&retry).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 failed job(s) queued again"));
    let queue = nats.queue(settings()).await;
    wait_until(&queue, None, d, LONG, "the retried job to fail again", |s| {
        s.iter().any(|j| j.job.as_str().ends_with(".corrupt") && j.generation == 1 && j.state == JobState::Failed)
    })
    .await;

    // What the workers' endpoints say adds up to what the run did: 4 slides tiled (the corrupt one
    // failed twice: once, and once more after retry-failed), 4 fine-tuning shards, and the patches
    // of every feature file embedded (round 0's and both folds' ICMIL embedders').
    let scraped: Vec<String> = ports.iter().map(|&p| scrape(p)).collect();
    let total = |series: &str| -> f64 { scraped.iter().map(|t| sample(t, series)).sum() };
    assert_eq!(total("wsimil_jobs_total{stage=\"tile\",outcome=\"computed\"}"), 4.0, "{scraped:#?}");
    assert_eq!(total("wsimil_jobs_total{stage=\"tile\",outcome=\"failed\"}"), 2.0, "{scraped:#?}");
    assert_eq!(total("wsimil_jobs_total{stage=\"finetune\",outcome=\"computed\"}"), 4.0, "{scraped:#?}");
    let mut embedded_patches = 0;
    for path in walk(&local).into_iter().filter(|p| p.starts_with(local.join("features"))) {
        let bag =
            wsimil_common::features::FeatureBag::from_parquet("bag", std::fs::read(&path).unwrap().into()).unwrap();
        embedded_patches += bag.len();
    }
    assert_eq!(total("wsimil_patches_total{stage=\"embed\"}"), embedded_patches as f64, "{scraped:#?}");
    assert_eq!(total("wsimil_jobs_running{stage=\"embed\"}"), 0.0);

    // SIGTERM: the workers drain and exit cleanly.
    for w in [&mut w1, &mut w2] {
        let status = w.terminate(Duration::from_secs(30)).expect("worker exits after SIGTERM");
        assert!(status.success(), "{status:?}");
    }
    assert!(log(d, "w1").contains("drained, exiting"));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_embedding_is_replaced_and_its_parquet_is_whole() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 2, 1024, 1536, false);
    let nats = Nats::start();
    let s3 = s3();
    let store_flags = s3.flags("killed-worker");
    let mut workers = BTreeMap::new();
    for w in ["k1", "k2"] {
        workers.insert(w.to_string(), spawn(w, d, &worker_flags(&nats, &store_flags, w)));
    }
    // A slow embedder (ResNet50 on a CPU), so there is time to kill a worker mid-job.
    let mut args =
        run_flags(&manifest, &["--embedder", "resnet50-trunc", "--random-weights", "7", "--batch-size", "2"]);
    args.extend(nats_flags(&nats));
    args.extend(store_flags);
    let mut coord = spawn("coordinator", d, &args);
    let queue = nats.queue(settings()).await;
    let states = wait_until(&queue, Some(&mut coord), d, LONG, "an embed job to run", |s| {
        s.iter().any(|j| j.kind.as_str() == "embed" && j.state == JobState::Running)
    })
    .await;
    let victim_job =
        states.iter().find(|j| j.kind.as_str() == "embed" && j.state == JobState::Running).unwrap().clone();
    let victim = victim_job.worker.clone().unwrap();
    workers.get_mut(&victim).unwrap().kill9();

    assert!(coord.wait(LONG).success(), "coordinator failed:\n{}", log(d, "coordinator"));
    let after = queue.status(&victim_job.job).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Done);
    assert!(after.attempts >= 2, "redelivered: {after:?}");
    assert_ne!(after.worker.as_deref(), Some(victim.as_str()), "finished by the other worker");
    // Its Parquet is whole (readable, one row per patch of the grid) and not duplicated.
    let store = s3.store("killed-worker");
    let features = store.list(&object_store::path::Path::from("features")).await.unwrap();
    assert_eq!(features.len(), 2, "{features:?}");
    for key in &features {
        let bag =
            wsimil_common::features::FeatureBag::from_parquet(key.as_ref(), store.get(key).await.unwrap()).unwrap();
        assert_eq!(bag.len(), bag.provenance.tiling.as_ref().unwrap().patches);
        assert_eq!(bag.dim, 1024);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finishes_the_run_and_redoes_no_finished_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 4, 1024, 1280, false);
    let nats = Nats::start();
    let s3 = s3();
    let store_flags = s3.flags("restarted-coordinator");
    let _w1 = spawn("r1", d, &worker_flags(&nats, &store_flags, "r1"));
    let _w2 = spawn("r2", d, &worker_flags(&nats, &store_flags, "r2"));
    let mut args = run_flags(&manifest, &[]);
    args.extend(nats_flags(&nats));
    args.extend(store_flags);
    let mut coord = spawn("coordinator-1", d, &args);
    let queue = nats.queue(settings()).await;
    wait_until(&queue, Some(&mut coord), d, LONG, "two embed jobs done", |s| count(s, "embed", JobState::Done) >= 2)
        .await;
    coord.kill9();
    let store = s3.store("restarted-coordinator");
    let before = modified(&store, "").await;
    assert!(before.keys().any(|k| k.starts_with("features/")));

    let mut coord2 = spawn("coordinator-2", d, &args);
    assert!(coord2.wait(LONG).success(), "restarted coordinator failed:\n{}", log(d, "coordinator-2"));
    let after = modified(&store, "").await;
    for (key, t) in &before {
        // Outputs of finished jobs were not written again (the plan and the run's summary are
        // the coordinator's own files and may be).
        if key.starts_with("tiles/") || key.starts_with("features/") || key.contains("/fold-") {
            assert_eq!(after.get(key), Some(t), "{key} was rewritten");
        }
    }
    let states = wsimil_coordinator::jetstream::all_states(&queue).await.unwrap();
    assert!(states.iter().all(|s| s.state == JobState::Done), "{states:#?}");
    assert!(states.iter().all(|s| !s.already_done), "no job was delivered again after it finished");
    assert!(log(d, "coordinator-2").contains("predictions:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_coordinator_ride_out_a_nats_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 4, 1024, 1280, false);
    let mut nats = Nats::start();
    let s3 = s3();
    let store_flags = s3.flags("nats-restart");
    let _w1 = spawn("n1", d, &worker_flags(&nats, &store_flags, "n1"));
    let _w2 = spawn("n2", d, &worker_flags(&nats, &store_flags, "n2"));
    let mut args = run_flags(&manifest, &[]);
    args.extend(nats_flags(&nats));
    args.extend(store_flags);
    let mut coord = spawn("coordinator", d, &args);
    {
        let queue = nats.queue(settings()).await;
        wait_until(&queue, Some(&mut coord), d, LONG, "an embed job done", |s| count(s, "embed", JobState::Done) >= 1)
            .await;
    }
    nats.restart();
    assert!(coord.wait(LONG).success(), "coordinator failed after the NATS restart:\n{}", log(d, "coordinator"));
    let store = s3.store("nats-restart");
    let csv = store.list(&object_store::path::Path::from("runs")).await.unwrap();
    let preds = csv.iter().find(|k| k.as_ref().ends_with("predictions.csv")).expect("predictions written");
    let text = String::from_utf8(store.get(preds).await.unwrap().to_vec()).unwrap();
    assert_eq!(text.lines().count(), 5, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_transiently_on_every_delivery_fails_after_max_deliver_with_the_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 2, 1024, 1280, false);
    let nats = Nats::start();
    // The worker's S3 endpoint refuses connections: a transient error, every time.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let bad_store: Vec<String> =
        ["--store", "s3://wsimil/unreachable", "--s3-endpoint", &dead, "--s3-path-style", "--s3-max-retries", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let _w = spawn("w", d, &worker_flags(&nats, &bad_store, "w"));
    let mut args = run_flags(&manifest, &["--until", "tile", "--random-weights", "1"]);
    args.extend(nats_flags(&nats));
    args.extend(["--store".to_string(), d.join("store").display().to_string()]);
    let mut coord = spawn("coordinator", d, &args);
    assert!(coord.wait(LONG).success(), "{}", log(d, "coordinator"));
    let queue = nats.queue(settings()).await;
    let states = wsimil_coordinator::jetstream::all_states(&queue).await.unwrap();
    assert_eq!(states.len(), 2);
    for s in &states {
        assert_eq!(s.state, JobState::Failed, "{s:?}");
        assert_eq!(s.attempts, 4, "max_deliver deliveries: {s:?}");
        assert!(s.reason.as_deref().unwrap_or("").contains("unreachable"), "the last error, naming the key: {s:?}");
    }
    assert!(log(d, "coordinator").contains("2 failed"), "{}", log(d, "coordinator"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_die_on_every_delivery_is_failed_even_with_the_coordinator_down() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let manifest = cohort(&d.join("cohort"), 2, 1024, 1536, false);
    let nats = Nats::start();
    let s3 = s3();
    let store_flags = s3.flags("dying-workers");
    let nflags = |deliver: &str| {
        vec!["--nats".to_string(), nats.url(), "--ack-wait".into(), "2".into(), "--max-deliver".into(), deliver.into()]
    };
    let worker = |name: &str| {
        let mut v = vec!["worker".to_string(), "--name".into(), name.into(), "--kinds".into(), "embed".into()];
        v.extend(nflags("2"));
        v.extend(store_flags.clone());
        v
    };
    // Tile with an ordinary worker, then embed slowly (ResNet50 on a CPU) with workers we kill.
    let mut tiler = spawn("tiler", d, &{
        let mut v = vec!["worker".to_string(), "--name".into(), "tiler".into(), "--kinds".into(), "tile".into()];
        v.extend(nflags("2"));
        v.extend(store_flags.clone());
        v
    });
    let mut args = run_flags(
        &manifest,
        &["--embedder", "resnet50-trunc", "--random-weights", "3", "--batch-size", "1", "--until", "embed"],
    );
    args.extend(nflags("2"));
    args.extend(store_flags.clone());
    let mut coord = spawn("coordinator-1", d, &args);
    let queue = nats.queue(QueueSettings { ack_wait: Duration::from_secs(2), max_deliver: 2 }).await;
    let running = |attempt: u32| {
        move |s: &[wsimil_common::nats::JobStatus]| {
            s.iter().any(|j| j.kind.as_str() == "embed" && j.state == JobState::Running && j.attempts == attempt)
        }
    };
    let mut e1 = spawn("e1", d, &worker("e1"));
    let states = wait_until(&queue, Some(&mut coord), d, LONG, "a first delivery", running(1)).await;
    let victim =
        states.iter().find(|j| j.kind.as_str() == "embed" && j.state == JobState::Running).unwrap().job.clone();
    e1.kill9();
    tiler.kill9();
    // The coordinator goes down too: nobody hears JetStream's max-deliveries advisory.
    coord.kill9();
    let mut e2 = spawn("e2", d, &worker("e2"));
    wait_until(&queue, Some(&mut e2), d, LONG, "the last delivery", |s| {
        s.iter().any(|j| j.job == victim && j.attempts == 2 && j.state == JobState::Running)
    })
    .await;
    e2.kill9();
    // No heartbeat for three ack-wait periods: a restarted coordinator must settle it, not hang.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut e3 = spawn("e3", d, &worker("e3"));
    let mut coord2 = spawn("coordinator-2", d, &args);
    assert!(coord2.wait(LONG).success(), "{}", log(d, "coordinator-2"));
    let s = queue.status(&victim).await.unwrap().unwrap();
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    assert!(s.reason.as_deref().unwrap().contains("gave up after 2 deliveries"), "{s:?}");
    assert!(queue.queued_message(&s.payload).await.unwrap().is_none(), "its dead message was removed");
    e3.kill9();
}

#[test]
fn nats_user_password_and_token_auth_work_and_a_wrong_secret_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (server_args, good, bad) in [
        (
            vec!["--user", "wsimil", "--pass", "s3cret"],
            vec![("WSIMIL_NATS_USER", "wsimil"), ("WSIMIL_NATS_PASSWORD", "s3cret")],
            vec![("WSIMIL_NATS_USER", "wsimil"), ("WSIMIL_NATS_PASSWORD", "wrong")],
        ),
        (vec!["--auth", "t0ken"], vec![("WSIMIL_NATS_TOKEN", "t0ken")], vec![("WSIMIL_NATS_TOKEN", "nope")]),
    ] {
        let port = free_port();
        let mut server = Proc {
            child: std::process::Command::new(tool("nats-server"))
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(dir.path().join(format!("js-{port}")))
                .args(&server_args)
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
            name: "nats-server".into(),
        };
        let url = format!("nats://127.0.0.1:{port}");
        std::thread::sleep(Duration::from_millis(500));
        let status = |env: &[(&str, &str)]| {
            wsimil().args(["status", "--nats", &url]).envs(env.iter().copied()).output().unwrap()
        };
        let ok = status(&good);
        assert!(ok.status.success(), "{server_args:?}: {}", String::from_utf8_lossy(&ok.stderr));
        assert!(String::from_utf8_lossy(&ok.stdout).contains("stage"));
        let no = status(&bad);
        assert!(!no.status.success());
        let err = String::from_utf8_lossy(&no.stderr);
        assert!(err.contains(&url) && err.to_lowercase().contains("authorization"), "{err}");
        assert!(
            !err.contains("s3cret") && !err.contains("nope") && !err.contains("wrong"),
            "secrets stay out of errors: {err}"
        );
        server.kill9();
    }
}
