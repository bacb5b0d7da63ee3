//! Slides that live in buckets (`s3://bucket/key.svs`; GCS, MinIO, Ceph through their S3 APIs).
//!
//! A tiled-JPEG TIFF (Aperio SVS, generic pyramidal TIFF) is read in place by the native reader
//! over ranged GETs ([`super::source::RemoteSource`]): its header and tile offset tables first, then
//! only the tiles a patch grid needs, never the whole object. A format only OpenSlide reads is
//! downloaded into a scratch folder bounded in size ([`Scratch`]): least recently used slides are
//! evicted, never one in use, and a download is written beside its final name and renamed only once
//! whole and of the size the bucket reported, so a partial one is never taken for a slide.
//!
//! Credentials and endpoint are the store's (`AWS_*` variables, `--s3-endpoint`, path style); the
//! slides' bucket may differ from the output store's.

use super::source::RemoteSource;
use super::{native, open_with, ReaderChoice, Region, SlideError, SlideReader};
use image::RgbImage;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wsimil_common::store::{S3Options, Store, StoreError};

/// Is `location` a slide in a bucket?
pub fn is_remote(location: &str) -> bool {
    location.starts_with("s3://")
}

/// `s3://bucket/key` → (bucket, key).
pub fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

/// The object stores of the buckets slides are read from, opened once each with the store's S3
/// settings (endpoint, region, path style, retries; credentials from `AWS_*`).
pub struct Buckets {
    s3: S3Options,
    open: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl Buckets {
    pub fn new(s3: S3Options) -> Self {
        Buckets { s3, open: Mutex::default() }
    }

    /// The object store of `bucket`.
    pub fn bucket(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
        if let Some(s) = self.open.lock().unwrap().get(bucket) {
            return Ok(s.clone());
        }
        let store = Store::open(&format!("s3://{bucket}"), &self.s3)?.object_store().clone();
        self.open.lock().unwrap().insert(bucket.to_string(), store.clone());
        Ok(store)
    }

    /// The store and key of `url`.
    pub fn object(&self, url: &str) -> Result<(Arc<dyn ObjectStore>, Key), StoreError> {
        let (bucket, key) = split_url(url)
            .ok_or_else(|| StoreError::Config { location: url.into(), reason: "not an s3://bucket/key URL".into() })?;
        Ok((self.bucket(bucket)?, Key::from(key)))
    }

    /// The size of the object at `url`, or why it cannot be read (missing, refused, unreachable).
    pub async fn head(&self, url: &str) -> Result<u64, StoreError> {
        let (store, key) = self.object(url)?;
        Ok(store.head(&key).await.map_err(|e| StoreError::from_object_store(url, e))?.size)
    }

    /// The whole object at `url` (a manifest, not a slide).
    pub async fn get(&self, url: &str) -> Result<bytes::Bytes, StoreError> {
        let (store, key) = self.object(url)?;
        let got = store.get(&key).await.map_err(|e| StoreError::from_object_store(url, e))?;
        got.bytes().await.map_err(|e| StoreError::from_object_store(url, e))
    }

    /// [`Self::head`] of every URL, 32 at a time, in order.
    pub async fn head_all(&self, urls: &[String]) -> Vec<Result<u64, StoreError>> {
        use futures::StreamExt;
        futures::stream::iter(urls.iter().map(|u| self.head(u))).buffered(32).collect().await
    }
}

/// `rel` (a manifest's relative path, `/`-separated) against the `s3://` prefix `base`, with `.`
/// and `..` resolved as a filesystem would (object keys have no such entries of their own).
pub fn join_url(base: &str, rel: &str) -> String {
    let Some((bucket, prefix)) = base.strip_prefix("s3://").map(|r| r.split_once('/').unwrap_or((r, ""))) else {
        return format!("{}/{rel}", base.trim_end_matches('/'));
    };
    let mut parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
    for p in rel.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("s3://{bucket}/{}", parts.join("/"))
}

/// Where slides are opened from: local paths, or buckets through the store's S3 settings, with
/// the scratch folder for the formats that must be downloaded.
pub struct SlideSources {
    buckets: Buckets,
    scratch: Arc<Scratch>,
    /// Which reader opens the slides, chosen once (`wsimil`'s `WSIMIL_READER`, read at start).
    reader: ReaderChoice,
}

impl SlideSources {
    /// Slides opened by the best reader for each ([`ReaderChoice::Auto`]).
    pub fn new(s3: S3Options, scratch: Scratch) -> Self {
        SlideSources { buckets: Buckets::new(s3), scratch: Arc::new(scratch), reader: ReaderChoice::Auto }
    }

    /// Every slide opened by `reader`.
    pub fn with_reader(self, reader: ReaderChoice) -> Self {
        SlideSources { reader, ..self }
    }

    pub fn reader(&self) -> ReaderChoice {
        self.reader
    }

    /// Local files only (and buckets with the environment's S3 settings), scratch in the system's
    /// temporary folder: for tools and tests.
    pub fn local() -> Self {
        Self::new(S3Options::default(), Scratch::new(std::env::temp_dir(), 50_000_000_000))
    }

    pub fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    pub fn buckets(&self) -> &Buckets {
        &self.buckets
    }

    /// The jobs of this round are done reading `location`: a scratch copy of it is removed (now,
    /// or when the last reader lets it go). Local paths and slides read in place: nothing to do.
    pub fn finished_with(&self, location: &str) {
        if is_remote(location) {
            self.scratch.finished_with(location);
        }
    }

    /// Open the slide at `location`, a local path or an `s3://` URL, with this source's reader.
    pub fn open(&self, location: &str) -> Result<Box<dyn SlideReader>, SlideError> {
        self.open_with(location, self.reader)
    }

    /// [`Self::open`] with the reader chosen: native (ranged reads), OpenSlide (a scratch copy), or
    /// auto (native where it can, else OpenSlide).
    pub fn open_with(&self, location: &str, choice: ReaderChoice) -> Result<Box<dyn SlideReader>, SlideError> {
        if !is_remote(location) {
            return open_with(Path::new(location), choice);
        }
        if split_url(location).is_none() {
            return Err(SlideError::Open { path: location.into(), reason: "not an s3://bucket/key URL".into() });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            SlideError::Config(format!("{location}: reading a slide from a bucket needs an async runtime"))
        })?;
        let (store, key) = self.buckets.object(location).map_err(SlideError::Source)?;
        let source = RemoteSource::open(store.clone(), key.clone(), location.to_string(), runtime.clone())
            .map_err(SlideError::Source)?;
        let size = super::source::ByteSource::len(&source);
        if choice != ReaderChoice::OpenSlide {
            match native::NativeTiff::open_source(Arc::new(source), Path::new(location)) {
                Ok(n) => return Ok(Box::new(n)),
                Err(native::Unsupported::Truncated { len, needed }) => {
                    return Err(SlideError::Truncated { path: location.into(), len, needed })
                }
                Err(native::Unsupported::Source(e)) => return Err(SlideError::Source(e)),
                Err(e) if choice == ReaderChoice::Native => {
                    return Err(SlideError::Open { path: location.into(), reason: format!("{e:?}") })
                }
                Err(_) => {} // not a tiled-JPEG TIFF this reader knows: OpenSlide, from scratch
            }
        }
        let guard = self
            .scratch
            .acquire(location, size, |part| runtime.block_on(download(store.as_ref(), &key, location, part)))?;
        let inner = open_with(&guard.path, ReaderChoice::OpenSlide)?;
        Ok(Box::new(ScratchSlide { inner, url: PathBuf::from(location), _guard: guard }))
    }
}

/// Stream the object into `part`.
async fn download(store: &dyn ObjectStore, key: &Key, url: &str, part: &Path) -> Result<(), SlideError> {
    use futures::StreamExt;
    use std::io::Write;
    let io = |e: std::io::Error| {
        SlideError::Config(format!("{}: cannot write the scratch copy of {url}: {e}", part.display()))
    };
    let mut f = std::fs::File::create(part).map_err(io)?;
    let mut stream =
        store.get(key).await.map_err(|e| SlideError::Source(StoreError::from_object_store(url, e)))?.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| SlideError::Source(StoreError::from_object_store(url, e)))?;
        f.write_all(&chunk).map_err(io)?;
    }
    f.sync_all().map_err(io)
}

/// An OpenSlide reader over a scratch copy, named by its URL; the copy stays while this lives.
struct ScratchSlide {
    inner: Box<dyn SlideReader>,
    url: PathBuf,
    _guard: ScratchGuard,
}

impl SlideReader for ScratchSlide {
    fn path(&self) -> &Path {
        &self.url
    }
    fn reader_name(&self) -> String {
        format!("{} (downloaded to scratch)", self.inner.reader_name())
    }
    fn level_count(&self) -> usize {
        self.inner.level_count()
    }
    fn level_dimensions(&self, level: usize) -> (u64, u64) {
        self.inner.level_dimensions(level)
    }
    fn level_downsample(&self, level: usize) -> f64 {
        self.inner.level_downsample(level)
    }
    fn mpp(&self) -> Option<f64> {
        self.inner.mpp()
    }
    fn objective_power(&self) -> Option<f64> {
        self.inner.objective_power()
    }
    fn read_region(&self, x: i64, y: i64, level: usize, w: u32, h: u32) -> Result<RgbImage, SlideError> {
        // The reader names the scratch file; the job names the slide by its URL.
        self.inner.read_region(x, y, level, w, h).map_err(|e| rename(e, &self.url))
    }
    fn prefetch(&self, regions: &[Region]) -> Result<(), SlideError> {
        self.inner.prefetch(regions)
    }
}

fn rename(e: SlideError, url: &Path) -> SlideError {
    match e {
        SlideError::Read { level, x, y, w, h, reason, .. } => {
            SlideError::Read { path: url.into(), level, x, y, w, h, reason }
        }
        SlideError::Open { reason, .. } => SlideError::Open { path: url.into(), reason },
        other => other,
    }
}

/// A folder of downloaded slides, bounded in bytes: least recently used copies are evicted to make
/// room, never one in use (held by a [`ScratchGuard`]).
///
/// The process owns a folder of its own under the one it is given, `wsimil-scratch-<pid>`, so
/// workers on one host may share `--scratch` and nothing else in it is ever touched. That folder
/// goes when the `Scratch` is dropped; those left by processes that died (their pid gone) are
/// removed when the next one starts.
pub struct Scratch {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<ScratchState>,
    /// Woken when a download finishes or fails (others wait for a copy being downloaded).
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct ScratchState {
    entries: HashMap<String, ScratchEntry>,
    clock: u64,
}

struct ScratchEntry {
    path: PathBuf,
    size: u64,
    users: usize,
    last_used: u64,
    /// The copy is whole (false while it downloads: its bytes are reserved all the same, so that
    /// concurrent downloads never take the folder past its bound).
    ready: bool,
    /// Remove the copy when its last user lets it go ([`Scratch::finished_with`]).
    discard: bool,
}

impl Scratch {
    /// Scratch space under `parent`, at most `max_bytes` of slides. Nothing is created until the
    /// first download.
    pub fn new(parent: PathBuf, max_bytes: u64) -> Self {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let pid = std::process::id();
        remove_abandoned(&parent, pid);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = parent.join(format!("{OWNED_PREFIX}{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch { dir, max_bytes, state: Mutex::default(), changed: std::sync::Condvar::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes held or reserved by downloads now.
    pub fn bytes(&self) -> u64 {
        self.state.lock().unwrap().entries.values().map(|e| e.size).sum()
    }

    /// A local copy of `url` (`size` bytes): the one held, the one another job is downloading
    /// (waited for), or one `fetch` writes into the path it is given (renamed into place once
    /// whole). Room is made first, least recently used copies out, never one in use; a download
    /// holds its bytes from the start.
    pub fn acquire(
        self: &Arc<Self>,
        url: &str,
        size: u64,
        fetch: impl FnOnce(&Path) -> Result<(), SlideError>,
    ) -> Result<ScratchGuard, SlideError> {
        let config = |m: String| SlideError::Config(m);
        let name = wsimil_common::ids::content_hash([url.as_bytes()]);
        let ext = Path::new(url).extension().and_then(|e| e.to_str()).unwrap_or("slide");
        let path = self.dir.join(format!("{name}.{ext}"));
        {
            let mut st = self.state.lock().unwrap();
            loop {
                st.clock += 1;
                let now = st.clock;
                match st.entries.get_mut(url) {
                    Some(e) if !e.ready => {
                        st = self.changed.wait(st).unwrap();
                        continue;
                    }
                    Some(e) if e.size == size && e.path.metadata().map(|m| m.len()).ok() == Some(size) => {
                        e.users += 1;
                        e.last_used = now;
                        e.discard = false;
                        return Ok(ScratchGuard { scratch: self.clone(), url: url.into(), path: e.path.clone() });
                    }
                    Some(e) if e.users > 0 => {
                        let reason = if e.size != size {
                            format!(
                                "the object is {size} bytes now, {} when it was copied for a job still reading it: it changed in the bucket",
                                e.size
                            )
                        } else {
                            format!("its scratch copy {} is gone or cut short while a job reads it", e.path.display())
                        };
                        return Err(SlideError::Open { path: url.into(), reason });
                    }
                    Some(_) => {
                        let stale = st.entries.remove(url).expect("present");
                        let _ = std::fs::remove_file(&stale.path);
                    }
                    None => {}
                }
                break;
            }
            // Room for it: the least recently used whole copies not in use go first.
            let mut held: u64 = st.entries.values().map(|e| e.size).sum();
            while held + size > self.max_bytes {
                let victim = st
                    .entries
                    .iter()
                    .filter(|(_, e)| e.users == 0 && e.ready)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone());
                let Some(v) = victim else {
                    return Err(config(format!(
                        "{url}: {:.2} GB does not fit the scratch folder's {:.2} GB beside the {:.2} GB of slides in use or downloading (--scratch-max-gb)",
                        size as f64 / 1e9,
                        self.max_bytes as f64 / 1e9,
                        held as f64 / 1e9
                    )));
                };
                let e = st.entries.remove(&v).expect("listed");
                held -= e.size;
                let _ = std::fs::remove_file(&e.path);
            }
            let now = st.clock;
            st.entries.insert(
                url.to_string(),
                ScratchEntry { path: path.clone(), size, users: 1, last_used: now, ready: false, discard: false },
            );
        }
        // The reservation is ours until it is ready; given up (entry and part file removed, waiters
        // woken) on any other way out, a panic in `fetch` included.
        let part = self.dir.join(format!("{name}.{}.part", std::process::id() as u64 ^ rand_tag()));
        let reservation = Reservation { scratch: self, url, part: &part, done: false };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| config(format!("{}: cannot create the scratch folder: {e}", self.dir.display())))?;
        fetch(&part)?;
        let got = part.metadata().map(|m| m.len()).unwrap_or(0);
        if got != size {
            return Err(SlideError::Source(StoreError::Unavailable {
                key: url.into(),
                reason: format!("the download stopped at {got} of {size} bytes"),
            }));
        }
        std::fs::rename(&part, &path).map_err(|e| config(format!("{}: {e}", path.display())))?;
        reservation.commit();
        Ok(ScratchGuard { scratch: self.clone(), url: url.into(), path })
    }

    /// Mark `url`'s copy whole and wake whoever waits for it.
    fn ready(&self, url: &str) {
        let mut st = self.state.lock().unwrap();
        st.clock += 1;
        let now = st.clock;
        if let Some(e) = st.entries.get_mut(url) {
            e.ready = true;
            e.last_used = now;
        }
        drop(st);
        self.changed.notify_all();
    }

    /// The jobs that read `url` are done with it: its copy is removed now, or when the last job
    /// still reading it lets it go (it is downloaded again if a later job asks for it).
    pub fn finished_with(&self, url: &str) {
        let mut st = self.state.lock().unwrap();
        let Some(e) = st.entries.get_mut(url) else { return };
        if e.users > 0 || !e.ready {
            e.discard = true;
            return;
        }
        let e = st.entries.remove(url).expect("present");
        let _ = std::fs::remove_file(&e.path);
    }

    fn release(&self, url: &str) {
        let mut st = self.state.lock().unwrap();
        let Some(e) = st.entries.get_mut(url) else { return };
        e.users = e.users.saturating_sub(1);
        if e.users == 0 && e.discard {
            let e = st.entries.remove(url).expect("present");
            let _ = std::fs::remove_file(&e.path);
        }
    }
}

/// A download's hold on its bytes in a [`Scratch`], until [`Reservation::commit`].
struct Reservation<'a> {
    scratch: &'a Scratch,
    url: &'a str,
    part: &'a Path,
    done: bool,
}

impl Reservation<'_> {
    fn commit(mut self) {
        self.done = true;
        self.scratch.ready(self.url);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(self.part);
            self.scratch.state.lock().unwrap().entries.remove(self.url);
            self.scratch.changed.notify_all();
        }
    }
}

/// The name of the folders a process owns under `--scratch`: `wsimil-scratch-<pid>-<n>`.
const OWNED_PREFIX: &str = "wsimil-scratch-";

/// Remove the scratch folders under `parent` whose process is gone (Linux: no `/proc/<pid>`).
fn remove_abandoned(parent: &Path, me: u32) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(OWNED_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != me && Path::new("/proc").is_dir() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Distinguishes concurrent downloads' part files.
fn rand_tag() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A scratch copy in use.
pub struct ScratchGuard {
    scratch: Arc<Scratch>,
    url: String,
    pub path: PathBuf,
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        self.scratch.release(&self.url);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, n: usize) -> Result<(), SlideError> {
        std::fs::write(p, vec![7u8; n]).map_err(|e| SlideError::Config(e.to_string()))
    }

    /// The reader `wsimil` chose at start (`WSIMIL_READER`) is the one every slide is opened with,
    /// whatever the environment says later.
    #[test]
    fn a_slide_is_opened_by_the_reader_its_sources_were_given() {
        let slide = wsimil_common::data_dir().join("cmu_small_region.svs");
        assert!(slide.is_file(), "{} missing: run scripts/fetch-data.sh", slide.display());
        let location = slide.to_str().unwrap();
        for (choice, want) in [
            (ReaderChoice::Native, "wsimil native"),
            (ReaderChoice::OpenSlide, "openslide"),
            (ReaderChoice::Auto, "wsimil native"),
        ] {
            let sources = SlideSources::local().with_reader(choice);
            assert_eq!(sources.reader(), choice);
            let name = sources.open(location).unwrap().reader_name();
            assert!(name.starts_with(want), "{choice:?}: opened by {name}");
        }
    }

    #[test]
    fn urls_split_into_bucket_and_key() {
        assert_eq!(split_url("s3://b/k/x.svs"), Some(("b", "k/x.svs")));
        assert_eq!(split_url("s3://b"), None);
        assert_eq!(split_url("s3:///k"), None);
        assert!(is_remote("s3://b/k") && !is_remote("/data/s3/x.svs"));
    }

    #[test]
    fn relative_paths_join_an_s3_prefix_as_a_folder_would() {
        assert_eq!(join_url("s3://b/cohort", "slides/a.svs"), "s3://b/cohort/slides/a.svs");
        assert_eq!(join_url("s3://b/cohort/", "./a.svs"), "s3://b/cohort/a.svs");
        assert_eq!(join_url("s3://b/cohort/csv", "../slides/a.svs"), "s3://b/cohort/slides/a.svs");
        assert_eq!(join_url("s3://b", "a.svs"), "s3://b/a.svs");
    }

    #[test]
    fn scratch_evicts_the_least_recently_used_copy_never_one_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Scratch::new(dir.path().join("scratch"), 250));
        let a = s.acquire("s3://b/a.svs", 100, |p| write(p, 100)).unwrap();
        let b = s.acquire("s3://b/b.svs", 100, |p| write(p, 100)).unwrap();
        // Held: a third does not fit while both are in use.
        let err = s.acquire("s3://b/c.svs", 100, |p| write(p, 100)).err().unwrap().to_string();
        assert!(err.contains("does not fit the scratch folder"), "{err}");
        drop(a);
        // a is no longer in use: evicted for c; b stays.
        let c = s.acquire("s3://b/c.svs", 100, |p| write(p, 100)).unwrap();
        assert!(b.path.is_file() && c.path.is_file());
        assert_eq!(s.bytes(), 200);
        // b again: the copy held, no download.
        let b2 = s.acquire("s3://b/b.svs", 100, |_| panic!("downloaded again")).unwrap();
        assert_eq!(b2.path, b.path);
    }

    /// Jobs on several threads: a download in flight holds its bytes (the bound holds while two
    /// download), and a second job asking for the slide being downloaded waits for that copy
    /// instead of downloading it again.
    #[test]
    fn concurrent_downloads_keep_the_bound_and_one_slide_is_downloaded_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Barrier;
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Scratch::new(dir.path().join("scratch"), 250));
        let (started, fetches) = (Arc::new(Barrier::new(2)), Arc::new(AtomicUsize::new(0)));
        // a is downloading (slowly) when b asks for room: b cannot have it, a's 200 bytes are taken.
        let slow = {
            let (s, started, fetches) = (s.clone(), started.clone(), fetches.clone());
            std::thread::spawn(move || {
                s.acquire("s3://b/a.svs", 200, |p| {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    started.wait();
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    write(p, 200)
                })
                .map(|g| g.path.clone())
            })
        };
        started.wait();
        let err = s.acquire("s3://b/b.svs", 100, |p| write(p, 100)).err().unwrap().to_string();
        assert!(err.contains("does not fit") && err.contains("in use or downloading"), "{err}");
        assert_eq!(s.bytes(), 200, "a's bytes are reserved while it downloads");
        // The same slide asked for while it downloads: the one copy, waited for.
        let again = s
            .acquire("s3://b/a.svs", 200, |_| {
                fetches.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        let first = slow.join().unwrap().unwrap();
        assert_eq!(again.path, first);
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "downloaded once");
    }

    /// A download that dies (an error or a panic) gives its reservation back: its bytes, its part
    /// file, and the slide to whoever asks next, who would otherwise wait for it for ever.
    #[test]
    fn a_download_that_dies_gives_its_reservation_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Scratch::new(dir.path().join("scratch"), 100));
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = s.acquire("s3://b/p.svs", 80, |p| {
                write(p, 40).unwrap();
                panic!("the connection thread died")
            });
        }));
        assert!(died.is_err());
        assert_eq!(s.bytes(), 0, "no bytes held for it");
        assert_eq!(std::fs::read_dir(s.dir()).unwrap().count(), 0, "no part file left");
        let g = s.acquire("s3://b/p.svs", 80, |p| write(p, 80)).unwrap();
        assert_eq!(g.path.metadata().unwrap().len(), 80);
    }

    #[test]
    fn a_copy_the_jobs_are_finished_with_is_removed_once_its_last_reader_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Scratch::new(dir.path().join("scratch"), 1000));
        let g = s.acquire("s3://b/a.svs", 100, |p| write(p, 100)).unwrap();
        let path = g.path.clone();
        s.finished_with("s3://b/a.svs");
        assert!(path.is_file(), "still read by a job");
        drop(g);
        assert!(!path.exists() && s.bytes() == 0, "removed when its last reader let it go");
        // Not in use: removed at once; asked for again later, it is downloaded again.
        let g = s.acquire("s3://b/a.svs", 100, |p| write(p, 100)).unwrap();
        drop(g);
        s.finished_with("s3://b/a.svs");
        assert!(!path.exists());
        let mut downloaded = false;
        let _g = s
            .acquire("s3://b/a.svs", 100, |p| {
                downloaded = true;
                write(p, 100)
            })
            .unwrap();
        assert!(downloaded);
    }

    #[test]
    fn a_partial_download_is_never_taken_for_a_slide() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Scratch::new(dir.path().join("scratch"), 1000));
        let err = s.acquire("s3://b/a.svs", 100, |p| write(p, 60)).err().unwrap().to_string();
        assert!(err.contains("s3://b/a.svs") && err.contains("stopped at 60 of 100 bytes"), "{err}");
        assert_eq!(std::fs::read_dir(s.dir()).unwrap().count(), 0, "nothing left behind");
        let g = s.acquire("s3://b/a.svs", 100, |p| write(p, 100)).unwrap();
        assert_eq!(g.path.metadata().unwrap().len(), 100);
    }

    #[test]
    fn scratch_owns_only_its_folder_and_clears_those_of_dead_processes() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join("user-file.txt");
        std::fs::write(&mine, b"keep").unwrap();
        // A folder left by a process that is gone (pid beyond any live one) and one of a live one.
        let dead = dir.path().join(format!("{OWNED_PREFIX}4294967-0"));
        let live = dir.path().join(format!("{OWNED_PREFIX}1-0"));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        let s = Arc::new(Scratch::new(dir.path().to_path_buf(), 1000));
        assert!(s.dir().starts_with(dir.path()) && s.dir() != dir.path());
        assert!(!dead.exists(), "an abandoned scratch folder is removed");
        assert!(live.exists() && mine.exists(), "nothing else is touched");
        let g = s.acquire("s3://b/a.svs", 10, |p| write(p, 10)).unwrap();
        assert!(g.path.starts_with(s.dir()));
        drop(g);
        let owned = s.dir().to_path_buf();
        drop(s);
        assert!(!owned.exists() && mine.exists(), "dropping removes only its own folder");
    }
}
