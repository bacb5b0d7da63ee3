//! Real servers and real processes for the distributed tests: `nats-server` (JetStream) and
//! SeaweedFS's `weed mini` (S3) on free loopback ports, and the `wsimil` binary. Servers come from
//! scripts/fetch-tools.sh.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wsimil_common::nats::{JobState, JobStatus, NatsOptions, Queue, QueueSettings};
use wsimil_common::store::{S3Credentials, S3Options, Store};

pub const S3_KEY: &str = "wsimil-test";
pub const S3_SECRET: &str = "wsimil-test-secret";
/// A second identity, allowed only the `wsimil` bucket (reading, writing, listing): what a user
/// whose credentials do not reach another bucket has.
pub const S3_LIMITED_KEY: &str = "wsimil-limited";
pub const S3_LIMITED_SECRET: &str = "wsimil-limited-secret";

/// SeaweedFS's identities: the tests' admin, and the limited one.
fn s3_identities() -> String {
    let scoped = ["Read:wsimil", "Write:wsimil", "List:wsimil", "Tagging:wsimil"];
    serde_json::json!({ "identities": [
        { "name": "admin", "credentials": [{ "accessKey": S3_KEY, "secretKey": S3_SECRET }],
          "actions": ["Admin", "Read", "Write", "List", "Tagging"] },
        { "name": "limited", "credentials": [{ "accessKey": S3_LIMITED_KEY, "secretKey": S3_LIMITED_SECRET }],
          "actions": scoped },
    ]})
    .to_string()
}

/// scripts/fetch-tools.sh's folder (`WSIMIL_TOOLS`, or `tools` beside the data cache).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("WSIMIL_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| wsimil_common::data_dir().parent().expect("cache dir").join("tools"))
}

/// A server binary of the tools folder.
pub fn tool(name: &str) -> PathBuf {
    let p = tools_dir().join("bin").join(name);
    assert!(p.is_file(), "{} missing: run scripts/fetch-tools.sh", p.display());
    p
}

pub fn data(name: &str) -> PathBuf {
    let p = wsimil_common::data_dir().join(name);
    assert!(p.is_file(), "{} missing: run scripts/fetch-data.sh", p.display());
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str, within: Duration) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < within, "{what} did not listen on {port} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit (a worker drains).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let t = Instant::now();
        while t.elapsed() < within {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < within, "{} did not finish within {within:?}", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A JetStream server with file storage, restartable on the same port and folder.
pub struct Nats {
    pub port: u16,
    pub dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Nats {
    pub fn start() -> Self {
        let mut n = Nats { port: free_port(), dir: tempfile::tempdir().unwrap(), proc: None };
        n.launch();
        n
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("nats.log")).unwrap();
        let child = Command::new(tool("nats-server"))
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.path().join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc { child, name: "nats-server".into() });
        wait_for_port(self.port, "nats-server", Duration::from_secs(20));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// The job queue, as tests inspect it.
    pub async fn queue(&self, settings: QueueSettings) -> Queue {
        let opts = NatsOptions { url: self.url(), name: "test".into(), ..Default::default() };
        Queue::open(wsimil_common::nats::connect(&opts).await.unwrap(), settings).await.unwrap()
    }
}

/// One S3 server per test process; each test uses its own prefix in the bucket.
pub struct S3 {
    pub port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

/// A loopback port in 20000-29999 that is free, and so is the port 10000 above it (weed's gRPC).
fn free_weed_port() -> u16 {
    loop {
        let p = 20000 + free_port() % 10000;
        let pair = (TcpListener::bind(("127.0.0.1", p)), TcpListener::bind(("127.0.0.1", p + 10000)));
        if pair.0.is_ok() && pair.1.is_ok() {
            return p;
        }
    }
}

/// The servers a test binary shares live in statics, which are never dropped: each is killed and
/// its folder removed when the binary exits, so that no server outlives its tests.
static AT_EXIT: std::sync::Mutex<Vec<(u32, PathBuf)>> = std::sync::Mutex::new(Vec::new());

extern "C" fn stop_shared_servers() {
    if let Ok(servers) = AT_EXIT.lock() {
        for (pid, dir) in servers.iter() {
            // SAFETY: plain system calls on a child's pid; nothing else of the process is touched.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                libc::waitpid(*pid as libc::pid_t, std::ptr::null_mut(), 0);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn stop_at_exit(pid: u32, dir: &Path) {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a function with no arguments that only uses what it owns.
    REGISTERED.call_once(|| unsafe {
        libc::atexit(stop_shared_servers);
    });
    AT_EXIT.lock().unwrap().push((pid, dir.to_path_buf()));
}

pub fn s3() -> &'static S3 {
    static S3_SERVER: OnceLock<S3> = OnceLock::new();
    S3_SERVER.get_or_init(|| {
        // A port taken between choosing and binding makes weed exit: try again with others.
        for attempt in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let mut ports: Vec<u16> = Vec::new();
            while ports.len() < 7 {
                let p = free_weed_port();
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
            let log_path = dir.path().join("weed.log");
            let identities = dir.path().join("s3.json");
            std::fs::write(&identities, s3_identities()).unwrap();
            let child = Command::new(tool("weed"))
                .arg("mini")
                .arg(format!("-dir={}", dir.path().display()))
                .args([
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    "-master.telemetry=false",
                    "-webdav=false",
                    "-admin.ui=false",
                ])
                .arg(format!("-master.port={}", ports[0]))
                .arg(format!("-volume.port={}", ports[1]))
                .arg(format!("-filer.port={}", ports[2]))
                .arg(format!("-s3.port={}", ports[3]))
                .arg(format!("-admin.port={}", ports[4]))
                .arg(format!("-s3.port.iceberg={}", ports[5]))
                .arg(format!("-debug.port={}", ports[6]))
                .arg(format!("-s3.config={}", identities.display()))
                .env("AWS_ACCESS_KEY_ID", S3_KEY)
                .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .unwrap();
            let mut proc = Proc { child, name: "weed".into() };
            // Other tests load both cores while weed starts: give it time, but not if it died.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(180) {
                if std::net::TcpStream::connect(("127.0.0.1", ports[3])).is_ok() {
                    stop_at_exit(proc.child.id(), dir.path());
                    return S3 { port: ports[3], _proc: proc, _dir: dir };
                }
                if let Ok(Some(status)) = proc.child.try_wait() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                    eprintln!("weed exited ({status}) on attempt {attempt}: {tail}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            proc.kill9();
        }
        panic!("weed s3 did not start in 3 attempts (see the lines above)");
    })
}

impl S3 {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn location(&self, prefix: &str) -> String {
        format!("s3://wsimil/{prefix}")
    }

    /// A store handle on a prefix, as the processes see it.
    pub fn store(&self, prefix: &str) -> Store {
        self.open(&self.location(prefix))
    }

    /// A store handle on `s3://bucket/prefix` (the bucket made on the first write), as the tests'
    /// admin identity.
    pub fn open(&self, location: &str) -> Store {
        Store::open(location, &self.options()).unwrap()
    }

    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            path_style: true,
            max_retries: None,
            // Given in, not set in this process's environment (tests run on parallel threads).
            credentials: Some(S3Credentials { key_id: S3_KEY.into(), secret: S3_SECRET.into() }),
        }
    }

    /// `--store …` flags for the binaries.
    pub fn flags(&self, prefix: &str) -> Vec<String> {
        vec!["--store".into(), self.location(prefix), "--s3-endpoint".into(), self.endpoint(), "--s3-path-style".into()]
    }
}

pub fn wsimil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wsimil-e2e"));
    c.env("AWS_ACCESS_KEY_ID", S3_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("WSIMIL_LOG", "info");
    c
}

/// Start a `wsimil` process logging to `<dir>/<name>.log`.
pub fn spawn(name: &str, dir: &Path, args: &[String]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = wsimil().args(args).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    Proc { child, name: name.to_string() }
}

pub fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Poll job states until `pred` holds; fail after `within`, or at once (with its log) if the
/// watched process `coord`, logging into `dir`, has exited.
pub async fn wait_until(
    queue: &Queue,
    mut coord: Option<&mut Proc>,
    dir: &Path,
    within: Duration,
    what: &str,
    pred: impl Fn(&[JobStatus]) -> bool,
) -> Vec<JobStatus> {
    let t = Instant::now();
    loop {
        let states = wsimil_coordinator::jetstream::all_states(queue).await.unwrap_or_default();
        if pred(&states) {
            return states;
        }
        if let Some(c) = coord.as_deref_mut() {
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!("{} exited ({status}) while waiting for {what}:\n{}", c.name, log(dir, &c.name));
            }
        }
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn count(states: &[JobStatus], kind: &str, state: JobState) -> usize {
    states.iter().filter(|s| s.kind.as_str() == kind && s.state == state).count()
}

/// A small semi-synthetic cohort (real tissue) in `dir`, plus, if asked, OpenSlide's corrupt
/// `unreadable.svs` as slide `corrupt`. Returns the manifest.
pub fn cohort(dir: &Path, slides: usize, width: u32, height: u32, corrupt: bool) -> PathBuf {
    cohort_seeded(dir, slides, width, height, corrupt, 0)
}

/// [`cohort`] with another seed: other slides, other tumour regions (an external cohort).
pub fn cohort_seeded(dir: &Path, slides: usize, width: u32, height: u32, corrupt: bool, seed: u64) -> PathBuf {
    use wsimil_worker::synth::{build_cohort, read_level0, SynthOptions};
    let src = wsimil_worker::slide::open(&data("cmu_small_region.svs")).unwrap();
    let source = read_level0(src.as_ref()).unwrap();
    let tumour = image::open(data("target_image.png")).unwrap().to_rgb8();
    let opt = SynthOptions { slides, width, height, seed, radius: (120.0, 180.0), ..SynthOptions::default() };
    build_cohort(&source, &tumour, dir, &opt).unwrap();
    let manifest = dir.join("manifest.csv");
    if corrupt {
        let path = dir.join("slides/corrupt.svs");
        std::fs::copy(data("unreadable.svs"), &path).unwrap();
        let mut text = std::fs::read_to_string(&manifest).unwrap();
        text.push_str(&format!("corrupt,{},tumor\n", path.display()));
        std::fs::write(&manifest, text).unwrap();
    }
    manifest
}

/// The `run` flags every test uses: small, fast training.
pub fn run_flags(manifest: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["run", "--manifest"].iter().map(|s| s.to_string()).collect();
    v.push(manifest.display().to_string());
    for s in
        ["--tissue-preset", "biopsy", "--folds", "2", "--landmarks", "16", "--epochs", "3", "--classes", "normal,tumor"]
    {
        v.push(s.to_string());
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub fn nats_flags(nats: &Nats) -> Vec<String> {
    vec!["--nats".into(), nats.url(), "--ack-wait".into(), "3".into(), "--max-deliver".into(), "4".into()]
}

pub fn worker_flags(nats: &Nats, store: &[String], name: &str) -> Vec<String> {
    let mut v = vec!["worker".to_string(), "--name".into(), name.into(), "--backoff".into(), "1".into()];
    v.extend(nats_flags(nats));
    v.extend(store.iter().cloned());
    v
}

/// A TCP proxy on loopback in front of a server, that can go away part way through a response:
/// once `cut_after` bytes of responses have passed it closes every connection, mid-transfer, and
/// refuses new ones (the server stopped). [`Proxy::start_on`] brings one back on the same port.
pub struct Proxy {
    pub port: u16,
    passed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

/// Stop a proxy: no new connections, every open one closed both ways.
fn stop_proxy(down: &std::sync::atomic::AtomicBool, open: &std::sync::Mutex<Vec<std::net::TcpStream>>) {
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    for s in open.lock().unwrap().iter() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

impl Proxy {
    pub fn start(upstream: u16, cut_after: Option<u64>) -> Proxy {
        Self::start_on(0, upstream, cut_after)
    }

    pub fn start_on(port: u16, upstream: u16, cut_after: Option<u64>) -> Proxy {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        // The port of a proxy just stopped is free once its accept loop has seen the stop.
        let t = Instant::now();
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) if t.elapsed() > Duration::from_secs(5) => panic!("proxy port {port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let passed = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (p, d, o) = (passed.clone(), down.clone(), open.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = std::net::TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                o.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                // Requests pass as they are.
                let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
                // Responses are counted, and cut at `cut_after`.
                let (mut from, mut to, p, d, o) = (server, client, p.clone(), d.clone(), o.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 << 10];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        let before = p.fetch_add(n as u64, Ordering::SeqCst);
                        let pass = match cut_after {
                            Some(cut) if before + n as u64 >= cut => cut.saturating_sub(before) as usize,
                            _ => n,
                        };
                        let sent = to.write_all(&buf[..pass]).is_ok();
                        if pass < n {
                            stop_proxy(&d, &o);
                        }
                        if !sent || pass < n || d.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Proxy { port, passed, down, open }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether it went away (cut a response), and the response bytes that passed until then.
    pub fn cut(&self) -> (bool, u64) {
        use std::sync::atomic::Ordering;
        (self.down.load(Ordering::SeqCst), self.passed.load(Ordering::SeqCst))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        stop_proxy(&self.down, &self.open);
    }
}

/// Render `page` in headless Chromium (Debian's package, which scripts/test.sh installs;
/// `WSIMIL_CHROMIUM` names another binary) and return the DOM after its scripts ran. Fails if a
/// file the page links is not beside it, if the page writes anything to the console (an uncaught
/// error included), or if its script did not run to its end (`data-ready` on the body).
pub fn render_in_chromium(page: &Path) -> String {
    assert!(page.is_file(), "{} not written", page.display());
    let html = std::fs::read_to_string(page).unwrap();
    for src in html.split("src=\"").skip(1).map(|s| &s[..s.find('"').unwrap()]) {
        assert!(page.parent().unwrap().join(src).is_file(), "{} links {src}, which is not beside it", page.display());
    }
    let chromium = std::env::var_os("WSIMIL_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "chromium".into());
    let out = Command::new(&chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test.sh installs Debian's chromium)", chromium.display()));
    let (dom, log) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "chromium failed: {log}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "{} wrote to the console: {console:#?}", page.display());
    assert!(dom.contains("data-ready=\"1\""), "{}: its script did not run to its end", page.display());
    dom
}

/// `GET /metrics` of a process started with `--metrics-addr 127.0.0.1:PORT`: the body.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut c =
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("metrics port {port}: {e}"));
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of one sample (`name{labels}`) in Prometheus' text format; 0 where absent (a stage
/// the process never ran).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// The AUC of scores against flags by its definition: the share of (flagged, other) pairs the score
/// orders right, ties counting half.
pub fn pair_auc<T: PartialOrd>(pairs: &[(T, bool)]) -> f64 {
    let (mut right, mut n) = (0.0, 0.0);
    for (p, _) in pairs.iter().filter(|x| x.1) {
        for (q, _) in pairs.iter().filter(|x| !x.1) {
            right += if p > q {
                1.0
            } else if p == q {
                0.5
            } else {
                0.0
            };
            n += 1.0;
        }
    }
    assert!(n > 0.0, "both kinds among the pairs");
    right / n
}
