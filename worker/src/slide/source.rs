//! Where a slide's bytes come from: a local file (`pread`), or an object in a bucket read by ranged
//! GETs ([`RemoteSource`]) without downloading it whole.
//!
//! A remote read goes through an extent cache bounded per slide ([`REMOTE_CACHE_BYTES`]): a read
//! that misses fetches its range with a read-ahead ([`READ_AHEAD`], so a TIFF directory and its
//! tag values come in one request), and [`ByteSource::prefetch`] fetches the ranges a batch of
//! patches needs (their tiles, from the tile offset tables) at once: sorted, merged across gaps up to
//! [`COALESCE_GAP`] into requests of at most [`MAX_REQUEST`], [`CONCURRENCY`] requests in flight.
//! Object storage bills and waits per request; a gap of a few KiB is cheaper to read than to skip.
//!
//! A failed request is a [`StoreError`] naming the object's URL (never credentials): the job's one
//! retry decision takes it from there (a network error may pass, a missing object or a refusal
//! will not).

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wsimil_common::store::StoreError;

/// Bytes of one slide's remote reads kept (64 MiB).
pub const REMOTE_CACHE_BYTES: usize = 64 << 20;
/// A read that misses fetches at least this much (64 KiB).
pub const READ_AHEAD: u64 = 64 << 10;
/// Ranges closer than this (32 KiB) are fetched as one.
pub const COALESCE_GAP: u64 = 32 << 10;
/// No request longer than this (8 MiB).
pub const MAX_REQUEST: u64 = 8 << 20;
/// Requests in flight per prefetch.
pub const CONCURRENCY: usize = 16;

/// Why bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Random access to a slide's bytes, shared by every thread reading the slide.
pub trait ByteSource: Send + Sync {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Exactly `buf.len()` bytes from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
    /// These `(offset, length)` ranges will be read soon: fetch them together (a file needs nothing).
    fn prefetch(&self, _ranges: &[(u64, u64)]) -> Result<(), SourceError> {
        Ok(())
    }
    /// Bytes transferred so far (remote sources; 0 for files).
    fn bytes_read(&self) -> u64 {
        0
    }
}

impl ByteSource for File {
    fn len(&self) -> u64 {
        self.metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        Ok(self.read_exact_at(buf, offset)?)
    }
}

/// Fetched extents of an object, oldest first for eviction, at most `cap` bytes (but always the
/// newest extent, however long).
struct Extents {
    by_start: BTreeMap<u64, Bytes>,
    order: VecDeque<u64>,
    bytes: usize,
    cap: usize,
}

impl Extents {
    fn new(cap: usize) -> Self {
        Extents { by_start: BTreeMap::new(), order: VecDeque::new(), bytes: 0, cap }
    }

    /// The extent holding all of `[off, off + len)`, if one does (extents may overlap: a short one
    /// can start inside a long one, so a few before `off` are looked at).
    fn covering(&self, off: u64, len: u64) -> Option<(u64, &Bytes)> {
        self.by_start
            .range(..=off)
            .rev()
            .take(8)
            .find(|(&start, b)| start + b.len() as u64 >= off + len)
            .map(|(&start, b)| (start, b))
    }

    fn insert(&mut self, start: u64, b: Bytes) {
        self.bytes += b.len();
        if let Some(old) = self.by_start.insert(start, b) {
            self.bytes -= old.len();
        } else {
            self.order.push_back(start);
        }
        while self.bytes > self.cap && self.order.len() > 1 {
            if let Some(s) = self.order.pop_front() {
                if let Some(b) = self.by_start.remove(&s) {
                    self.bytes -= b.len();
                }
            }
        }
    }
}

/// An object in a bucket, read by ranged GETs.
pub struct RemoteSource {
    store: Arc<dyn ObjectStore>,
    key: Key,
    /// `s3://bucket/key`, for messages.
    url: String,
    len: u64,
    extents: Mutex<Extents>,
    fetched: AtomicU64,
    runtime: tokio::runtime::Handle,
}

impl RemoteSource {
    /// HEAD the object: its length, or why it cannot be read (missing, refused, unreachable).
    pub fn open(
        store: Arc<dyn ObjectStore>,
        key: Key,
        url: String,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, StoreError> {
        let meta = runtime.block_on(store.head(&key)).map_err(|e| StoreError::from_object_store(&url, e))?;
        Ok(RemoteSource {
            store,
            key,
            url,
            len: meta.size,
            extents: Mutex::new(Extents::new(REMOTE_CACHE_BYTES)),
            fetched: AtomicU64::new(0),
            runtime,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Keep at most `bytes` of fetched extents instead of [`REMOTE_CACHE_BYTES`].
    pub fn with_cache_bytes(self, bytes: usize) -> Self {
        RemoteSource { extents: Mutex::new(Extents::new(bytes)), ..self }
    }

    /// Fetch `ranges` (already merged), concurrently, into the cache.
    fn fetch(&self, ranges: Vec<(u64, u64)>) -> Result<(), SourceError> {
        use futures::{StreamExt, TryStreamExt};
        let fetched: Vec<(u64, Bytes)> = self.runtime.block_on(
            futures::stream::iter(ranges.into_iter().map(|(off, len)| {
                let (store, key, url) = (self.store.clone(), self.key.clone(), self.url.clone());
                async move {
                    let b = store
                        .get_range(&key, off..off + len)
                        .await
                        .map_err(|e| StoreError::from_object_store(&url, e))?;
                    if (b.len() as u64) < len {
                        // The object is shorter than its HEAD said: replaced while being read.
                        return Err(StoreError::Unavailable {
                            key: url,
                            reason: format!("{len} bytes asked at {off}, {} returned (the object changed?)", b.len()),
                        });
                    }
                    Ok((off, b))
                }
            }))
            .buffer_unordered(CONCURRENCY)
            .try_collect(),
        )?;
        let mut ext = self.extents.lock().unwrap();
        for (off, b) in fetched {
            self.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
            ext.insert(off, b);
        }
        Ok(())
    }
}

/// Sorted, merged ranges: gaps of at most `gap` joined, none longer than `max` (unless one range is).
pub fn coalesce(mut ranges: Vec<(u64, u64)>, gap: u64, max: u64) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in ranges {
        if let Some(last) = out.last_mut() {
            let end = last.0 + last.1;
            if off <= end + gap && (off + len).max(end) - last.0 <= max {
                last.1 = (off + len).max(end) - last.0;
                continue;
            }
        }
        out.push((off, len));
    }
    out
}

impl ByteSource for RemoteSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        if offset + len > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{}: a read of {len} bytes at {offset} past the end ({} bytes)", self.url, self.len),
            )
            .into());
        }
        let copy = |ext: &Extents, buf: &mut [u8]| {
            ext.covering(offset, len).map(|(start, b)| {
                let at = (offset - start) as usize;
                buf.copy_from_slice(&b[at..at + buf.len()]);
            })
        };
        if copy(&self.extents.lock().unwrap(), buf).is_some() {
            return Ok(());
        }
        let want = len.max(READ_AHEAD).min(self.len - offset);
        self.fetch(vec![(offset, want)])?;
        copy(&self.extents.lock().unwrap(), buf)
            .ok_or_else(|| SourceError::Io(std::io::Error::other(format!("{}: fetched range not cached", self.url))))
    }

    fn prefetch(&self, ranges: &[(u64, u64)]) -> Result<(), SourceError> {
        let missing: Vec<(u64, u64)> = {
            let ext = self.extents.lock().unwrap();
            ranges.iter().copied().filter(|&(o, l)| l > 0 && ext.covering(o, l).is_none()).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        self.fetch(coalesce(missing, COALESCE_GAP, MAX_REQUEST))
    }

    fn bytes_read(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_across_small_gaps_and_stay_bounded() {
        let r = coalesce(vec![(85, 10), (0, 50), (60, 10), (10_000, 5), (10_004, 10), (10_100, 1)], 20, 1000);
        assert_eq!(r, vec![(0, 95), (10_000, 14), (10_100, 1)]);
        // Never longer than `max`, unless one range is.
        assert_eq!(coalesce(vec![(0, 600), (600, 600)], 20, 1000), vec![(0, 600), (600, 600)]);
        assert_eq!(coalesce(vec![(0, 5000)], 20, 1000), vec![(0, 5000)]);
        assert!(coalesce(vec![(5, 0)], 20, 1000).is_empty());
    }

    /// A megabyte object at `key` in memory, byte i being i mod `modulus`.
    async fn stored(key: &str, modulus: u32) -> (object_store::memory::InMemory, Key, Vec<u8>) {
        let store = object_store::memory::InMemory::new();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % modulus) as u8).collect();
        let key = Key::from(key);
        store.put(&key, data.clone().into()).await.unwrap();
        (store, key, data)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remote_reads_are_ranged_cached_and_coalesced() {
        let (store, key, data) = stored("slides/a.svs", 251).await;
        let rt = tokio::runtime::Handle::current();
        let src = tokio::task::spawn_blocking(move || {
            let src = RemoteSource::open(Arc::new(store), key, "s3://b/slides/a.svs".into(), rt).unwrap();
            let mut buf = vec![0u8; 100];
            src.read_at(500_000, &mut buf).unwrap();
            // One read-ahead's worth fetched, and later reads inside it cost nothing.
            assert_eq!(src.bytes_read(), READ_AHEAD);
            src.read_at(500_100, &mut buf).unwrap();
            assert_eq!(src.bytes_read(), READ_AHEAD);
            src.prefetch(&[(0, 1000), (2000, 1000), (900_000, 10)]).unwrap();
            assert_eq!(src.bytes_read(), READ_AHEAD + 3000 + 10, "the gap between the first two is fetched too");
            src.read_at(2500, &mut buf).unwrap();
            assert_eq!(&buf[..], &data[2500..2600]);
            assert!(src.read_at(999_990, &mut buf).is_err(), "past the end");
            src
        })
        .await
        .unwrap();
        assert_eq!(src.len(), 1_000_000);
    }

    /// Past its bound the cache lets its oldest extents go: a read there is fetched again, the
    /// newer ones are still served from memory, and what is held never passes the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cache_evicts_its_oldest_extents_past_its_bound() {
        let (store, key, data) = stored("a.svs", 253).await;
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let ra = READ_AHEAD as usize;
            let src =
                RemoteSource::open(Arc::new(store), key, "s3://b/a.svs".into(), rt).unwrap().with_cache_bytes(2 * ra);
            let mut buf = vec![0u8; 10];
            let mut read = |at: u64, src: &RemoteSource| {
                let before = src.bytes_read();
                src.read_at(at, &mut buf).unwrap();
                assert_eq!(&buf[..], &data[at as usize..at as usize + 10]);
                src.bytes_read() - before
            };
            assert_eq!(read(0, &src), READ_AHEAD, "a miss");
            assert_eq!(read(200_000, &src), READ_AHEAD, "a miss");
            assert_eq!(read(5, &src), 0, "two extents fit");
            assert_eq!(read(400_000, &src), READ_AHEAD, "a third: the oldest goes");
            assert_eq!(src.extents.lock().unwrap().bytes, 2 * ra);
            assert_eq!(read(200_005, &src), 0, "the second stays");
            assert_eq!(read(400_005, &src), 0, "the third stays");
            assert_eq!(read(10, &src), READ_AHEAD, "the first was let go: fetched again");
            assert_eq!(read(200_010, &src), READ_AHEAD, "which pushed out the second");
            // One extent longer than the bound is still kept (the read needs it), alone.
            src.prefetch(&[(600_000, 3 * READ_AHEAD)]).unwrap();
            let ext = src.extents.lock().unwrap();
            assert_eq!((ext.by_start.len(), ext.bytes), (1, 3 * ra));
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_object_is_named_by_its_url() {
        let rt = tokio::runtime::Handle::current();
        let err = tokio::task::spawn_blocking(move || {
            let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
            RemoteSource::open(store, Key::from("x.svs"), "s3://bucket/x.svs".into(), rt).err().unwrap()
        })
        .await
        .unwrap();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().starts_with("s3://bucket/x.svs: not found"), "{err}");
    }
}
