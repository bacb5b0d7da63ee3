//! Feature bags streamed from the store within a memory budget.
//!
//! A TCGA cohort's features are many times a node's memory (1,000 slides of 12,000 patches at
//! 1,024-d are 49 GB of f32), so no job holds a cohort: a job reads the bags it needs as its steps
//! need them, and a worker's bags together never take more than its budget (`--bag-cache-gb`).
//!
//! - [`BagMemory`]: the worker's budget, one for all its jobs: a semaphore of KiB. Every bag in
//!   memory (cached, read ahead, in use, or its file while it is decoded) holds permits for its
//!   bytes, so the budget bounds what the bags take whatever the cohort's size.
//! - [`index`]: the bags of a job, their shapes read from their Parquet footers (a ranged read each,
//!   16 at a time) before any is read: a budget that cannot hold even the largest bag is said then,
//!   naming the bag and the bytes it needs, before any training.
//! - [`BagLoader`]: a job's bags. A [`Pass`] goes through bags in an order known in advance (an
//!   epoch's shuffle, a validation pass); a task on the I/O runtime reads ahead in that order,
//!   [`READ_AHEAD`] at a time, each decoded once on the blocking pool straight into the buffer the
//!   model reads (no Arrow copy, no second copy as a tensor). A bag is kept for the job's later
//!   passes when it fits beside the room streaming needs ([`BagLoader::reserve`]): the first bags
//!   read stay, the rest are read again each pass. With a cohort that fits, every bag is read once.
//! - Results do not depend on the budget: a pass yields the same bags in the same order whether
//!   they come from memory or the store, so for one seed the same model comes out.
//! - Half precision (`--bag-precision f16`) halves what a bag takes; the model then reads features
//!   rounded to f16 (relative error 2^-11), so figures may move in their last digits.

use crate::error::JobError;
use crate::train::BagSet;
use candle_core::{DType, Device, Tensor};
use futures::StreamExt;
use object_store::path::Path;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use wsimil_common::features::{decode, shape_from_tail, BagShape, FeatureValue, FOOTER_GUESS};
use wsimil_common::ids::{EmbedderId, SlideId, TilingId};
use wsimil_common::layout;
use wsimil_common::records::BagReads;
use wsimil_common::store::{Store, StoreError};

/// How bags are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BagPrecision {
    /// As stored.
    #[default]
    F32,
    /// Half the memory; the model reads the features rounded to f16.
    F16,
}

impl BagPrecision {
    pub fn name(self) -> &'static str {
        match self {
            BagPrecision::F32 => "f32",
            BagPrecision::F16 => "f16",
        }
    }

    /// Bytes per feature value.
    pub fn bytes(self) -> usize {
        match self {
            BagPrecision::F32 => 4,
            BagPrecision::F16 => 2,
        }
    }
}

/// A worker's memory for feature bags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BagBudget {
    pub bytes: u64,
    pub precision: BagPrecision,
}

impl BagBudget {
    /// Half of this machine's memory, or of its container's limit where that is lower (cgroup v2
    /// `memory.max`, v1 `memory.limit_in_bytes`): the other half is the models', their activations'
    /// and the page cache's.
    pub fn machine_default() -> Self {
        BagBudget { bytes: machine_memory() / 2, precision: BagPrecision::F32 }
    }

    /// `gb` decimal gigabytes (`--bag-cache-gb`).
    pub fn gb(gb: f64, precision: BagPrecision) -> Self {
        BagBudget { bytes: (gb.max(0.0) * 1e9) as u64, precision }
    }
}

/// This machine's memory in bytes: the lowest of its total and its container's limit.
pub fn machine_memory() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).map(|kb| kb * 1024))
        })
        .unwrap_or(8 << 30);
    let limit = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .min()
        .unwrap_or(u64::MAX);
    total.min(limit)
}

/// Bags read ahead of the one in use, at most (memory allowing).
pub const READ_AHEAD: usize = 4;

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// Bytes as a person reads them, in the decimal units of `--bag-cache-gb`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// `bytes` in GB rounded up to two significant digits (a value for `--bag-cache-gb`).
fn gb_at_least(bytes: u64) -> String {
    let gb = bytes as f64 / 1e9;
    let scale = 10f64.powi(1 - gb.log10().floor() as i32);
    let up = (gb * scale).ceil() / scale;
    let digits = (scale.log10().round() as i32).max(0) as usize;
    format!("{up:.digits$}")
}

/// A worker's bag memory: one budget shared by all its jobs.
pub struct BagMemory {
    budget: BagBudget,
    /// KiB of the budget not held by a bag.
    permits: Arc<Semaphore>,
    /// KiB held by bags kept across passes, all jobs together.
    pinned: Mutex<u64>,
    /// The most KiB held at once (for tests and the benchmark).
    peak: AtomicU64,
}

impl BagMemory {
    pub fn new(budget: BagBudget) -> Arc<Self> {
        // Bags are held in KiB permits, at most u32::MAX at once (4 TiB).
        let k = kib(budget.bytes).min(u32::MAX as u64) as usize;
        Arc::new(BagMemory {
            budget,
            permits: Arc::new(Semaphore::new(k)),
            pinned: Mutex::new(0),
            peak: AtomicU64::new(0),
        })
    }

    pub fn budget(&self) -> BagBudget {
        self.budget
    }

    /// The most bytes bags have held at once (rounded up to KiB per bag).
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed) * 1024
    }

    fn total_kib(&self) -> u64 {
        kib(self.budget.bytes).min(u32::MAX as u64)
    }

    fn note_held(&self) {
        let held = self.total_kib().saturating_sub(self.permits.available_permits() as u64);
        self.peak.fetch_max(held, Ordering::Relaxed);
    }

    /// `bytes` of the budget for `what`, waiting until they are free; an error when the budget
    /// could never hold them.
    pub async fn hold(&self, bytes: u64, what: &str) -> Result<OwnedSemaphorePermit, JobError> {
        if kib(bytes) > self.total_kib() {
            return Err(self.too_small(what, bytes));
        }
        let permit = self.permits.clone().acquire_many_owned(kib(bytes) as u32).await.expect("never closed");
        self.note_held();
        Ok(permit)
    }

    fn too_small(&self, what: &str, bytes: u64) -> JobError {
        JobError::Config(format!(
            "{what} needs {} in memory, more than the whole bag budget of {}; raise --bag-cache-gb to at least {}{}",
            human_bytes(bytes),
            human_bytes(self.budget.bytes),
            gb_at_least(bytes),
            if self.budget.precision == BagPrecision::F32 {
                ", or hold bags in half precision (--bag-precision f16)"
            } else {
                ""
            }
        ))
    }

    /// Keep `kib` KiB (already held by `permit`) across passes, if the bags kept stay within the
    /// budget less `reserve` KiB (what streaming needs).
    fn try_pin(self: &Arc<Self>, permit: OwnedSemaphorePermit, reserve: u64) -> Result<Pinned, OwnedSemaphorePermit> {
        let size = permit.num_permits() as u64;
        let mut pinned = self.pinned.lock().unwrap();
        if *pinned + size + reserve > self.total_kib() {
            return Err(permit);
        }
        *pinned += size;
        Ok(Pinned { memory: self.clone(), _permit: permit, size })
    }
}

/// A bag's share of the budget kept across passes; given back when its job's loader goes.
struct Pinned {
    memory: Arc<BagMemory>,
    _permit: OwnedSemaphorePermit,
    size: u64,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        *self.memory.pinned.lock().unwrap() -= self.size;
    }
}

/// A bag a job reads: which slide, where, its label, and its shape from the file's footer.
#[derive(Debug, Clone)]
pub struct BagEntry {
    pub slide: SlideId,
    pub key: Path,
    pub label: usize,
    pub shape: BagShape,
}

impl BagEntry {
    /// What reading the bag holds at most: its decoded features and, while it is decoded, its file.
    pub fn need(&self, precision: BagPrecision) -> u64 {
        self.shape.decoded_bytes(precision.bytes()) + self.shape.file_bytes
    }
}

/// The shape of one feature file from its footer (`None`: no such file).
pub async fn shape_of(store: &Store, key: &Path) -> Result<Option<BagShape>, JobError> {
    let size = match store.size(key).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut want = FOOTER_GUESS.min(size);
    loop {
        let tail = store.get_range(key, size - want..size).await?;
        match shape_from_tail(key.as_ref(), &tail, size)? {
            Ok(shape) => return Ok(Some(shape)),
            Err(need) if need > want && need <= size => want = need,
            Err(need) => {
                return Err(JobError::Input(format!("{key}: its footer claims {need} bytes of a {size}-byte file")))
            }
        }
    }
}

/// The bags of `slides` (with their labels) under `features/<emb>/<tiling>/`, shapes read from
/// their footers 16 at a time, in the order given; slides without features (no file, or no
/// patches) are returned apart. Every bag must be as wide as the first.
pub async fn index(
    store: &Store,
    (emb, tiling): &(EmbedderId, TilingId),
    slides: &[(SlideId, usize)],
) -> Result<(Vec<BagEntry>, Vec<SlideId>), JobError> {
    let wanted: Vec<(SlideId, usize, Path)> =
        slides.iter().map(|(s, label)| (s.clone(), *label, layout::features(emb, tiling, s))).collect();
    type Found = (SlideId, usize, Path, Option<BagShape>);
    let found: Vec<Result<Found, JobError>> = futures::stream::iter(wanted.into_iter().map(|(s, label, key)| {
        let store = store.clone();
        async move {
            let shape = shape_of(&store, &key).await?;
            Ok((s, label, key, shape))
        }
    }))
    .buffered(16)
    .collect()
    .await;
    let (mut entries, mut missing) = (Vec::new(), Vec::new());
    for f in found {
        match f? {
            (slide, label, key, Some(shape)) if shape.patches > 0 => {
                entries.push(BagEntry { slide, key, label, shape })
            }
            (slide, ..) => missing.push(slide),
        }
    }
    if let Some(first) = entries.first() {
        if let Some(other) = entries.iter().find(|e| e.shape.dim != first.shape.dim) {
            return Err(JobError::Input(format!(
                "features of different widths in one job: {} has {}-d features, {} {}-d ({})",
                first.slide, first.shape.dim, other.slide, other.shape.dim, other.key
            )));
        }
    }
    Ok((entries, missing))
}

/// A bag's patches' level-0 corners, `x` and `y`.
pub type Coords = Arc<(Vec<i64>, Vec<i64>)>;

/// A bag as read: its features and, when the loader reads them, its patches' corners.
#[derive(Clone)]
struct Bag {
    features: Tensor,
    coords: Option<Coords>,
}

/// One bag of a pass, in memory until dropped.
pub struct Loaded {
    /// Index into the loader's entries.
    pub index: usize,
    /// `[1, N, D]` on the CPU, in the budget's precision.
    pub features: Tensor,
    /// The patches' corners, from a loader that reads them ([`BagLoader::with_coords`]).
    pub coords: Option<Coords>,
    /// Its share of the budget while it is not kept across passes.
    _held: Option<OwnedSemaphorePermit>,
}

impl Loaded {
    fn new(index: usize, bag: Bag, held: Option<OwnedSemaphorePermit>) -> Self {
        Loaded { index, features: bag.features, coords: bag.coords, _held: held }
    }
}

/// The bags of one job, read as its passes need them.
pub struct BagLoader {
    store: Store,
    runtime: Handle,
    memory: Arc<BagMemory>,
    entries: Arc<Vec<BagEntry>>,
    cache: Arc<Mutex<HashMap<usize, (Bag, Pinned)>>>,
    reserve: u64,
    /// Whether passes read the patches' corners too.
    coords: bool,
    reads: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
    bytes_read: Arc<AtomicU64>,
    waited: Mutex<f64>,
    /// The first failure of a pass, kept as what it is (a store that is down is transient).
    failure: Mutex<Option<JobError>>,
}

impl BagLoader {
    /// A loader over `entries`, its reads on `runtime`, for a job that uses one bag at a time (one
    /// more read ahead). Fails when the budget cannot hold the largest bag (with its file while it
    /// is decoded), naming it.
    pub fn new(
        memory: Arc<BagMemory>,
        store: Store,
        entries: Vec<BagEntry>,
        runtime: Handle,
    ) -> Result<Self, JobError> {
        Self::holding(memory, store, entries, runtime, 2, "")
    }

    /// A loader for a job that holds up to `at_once` bags at a time (`why` says what holds them):
    /// fails when the budget cannot hold that many of the largest, and bags are kept across passes
    /// only beyond the room they need.
    pub fn holding(
        memory: Arc<BagMemory>,
        store: Store,
        entries: Vec<BagEntry>,
        runtime: Handle,
        at_once: usize,
        why: &str,
    ) -> Result<Self, JobError> {
        let precision = memory.budget().precision;
        let mut needs: Vec<(u64, &BagEntry)> = entries.iter().map(|e| (e.need(precision), e)).collect();
        needs.sort_by_key(|n| std::cmp::Reverse(n.0));
        if let Some(&(need, big)) = needs.first() {
            if kib(need) > memory.total_kib() {
                let what = format!(
                    "slide {}'s bag ({} patches × {} features: {} in {}, plus its {} file while it is decoded)",
                    big.slide,
                    big.shape.patches,
                    big.shape.dim,
                    human_bytes(big.shape.decoded_bytes(precision.bytes())),
                    precision.name(),
                    human_bytes(big.shape.file_bytes)
                );
                return Err(memory.too_small(&what, need));
            }
        }
        let room: u64 = needs.iter().take(at_once).map(|(n, _)| kib(*n)).sum();
        if at_once > 2 && room > memory.total_kib() {
            let what = format!("{why}: {} of these bags at once (the largest)", at_once.min(needs.len()));
            return Err(memory.too_small(&what, room * 1024));
        }
        // Streaming keeps room for what the job holds at once, or the whole budget where it holds
        // less.
        let reserve = room.min(memory.total_kib());
        Ok(BagLoader {
            store,
            runtime,
            memory,
            entries: Arc::new(entries),
            cache: Arc::new(Mutex::new(HashMap::new())),
            reserve,
            coords: false,
            reads: Arc::default(),
            hits: Arc::default(),
            bytes_read: Arc::default(),
            waited: Mutex::new(0.0),
            failure: Mutex::new(None),
        })
    }

    /// Read the patches' corners with the features (16 bytes a patch more, counted in the budget).
    pub fn with_coords(mut self) -> Self {
        self.coords = true;
        self
    }

    /// What reading entry `e` holds at most.
    fn need(&self, e: &BagEntry) -> u64 {
        e.need(self.memory.budget().precision) + if self.coords { 16 * e.shape.patches as u64 } else { 0 }
    }

    /// What ended a pass, said (the failure itself stays for [`Self::take_failure`]).
    pub fn failure_text(&self) -> Option<String> {
        self.failure.lock().unwrap().as_ref().map(|e| e.to_string())
    }

    pub fn entries(&self) -> &[BagEntry] {
        &self.entries
    }

    /// KiB of the budget left for streaming (bags are kept across passes only beyond it).
    pub fn reserve(&self) -> u64 {
        self.reserve * 1024
    }

    pub fn stats(&self) -> BagReads {
        BagReads {
            reads: self.reads.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            waited_s: *self.waited.lock().unwrap(),
        }
    }

    /// The failure that ended a pass, if one did.
    pub fn take_failure(&self) -> Option<JobError> {
        self.failure.lock().unwrap().take()
    }

    /// Go through the bags at `order` (indices into the entries), in that order, read ahead.
    pub fn pass(&self, order: &[usize]) -> Pass<'_> {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let order = order.to_vec();
        let (precision, coords) = (self.memory.budget().precision, self.coords);
        let needs: Arc<Vec<u64>> = Arc::new(self.entries.iter().map(|e| self.need(e)).collect());
        let (store, memory, entries, cache) =
            (self.store.clone(), self.memory.clone(), self.entries.clone(), self.cache.clone());
        let (reads, hits, bytes_read, reserve) =
            (self.reads.clone(), self.hits.clone(), self.bytes_read.clone(), self.reserve);
        let task = self.runtime.spawn(async move {
            // Memory is taken in the pass's order (the semaphore is fair), so a later bag never
            // holds the room an earlier one waits for; the reads themselves overlap.
            let items = futures::stream::iter(order)
                .then(|i| {
                    let (memory, entries, cache, needs) =
                        (memory.clone(), entries.clone(), cache.clone(), needs.clone());
                    async move {
                        let cached = cache.lock().unwrap().get(&i).map(|(b, _)| b.clone());
                        if let Some(b) = cached {
                            return Ok((i, Err(b)));
                        }
                        let held = memory.hold(needs[i], entries[i].key.as_ref()).await?;
                        Ok::<_, JobError>((i, Ok(held)))
                    }
                })
                .map(|step| {
                    let (store, memory, entries, cache) =
                        (store.clone(), memory.clone(), entries.clone(), cache.clone());
                    let (reads, hits, bytes_read) = (reads.clone(), hits.clone(), bytes_read.clone());
                    async move {
                        let (i, held) = step?;
                        let mut held = match held {
                            Err(cached) => {
                                hits.fetch_add(1, Ordering::Relaxed);
                                return Ok(Loaded::new(i, cached, None));
                            }
                            Ok(h) => h,
                        };
                        let e = entries[i].clone();
                        let bytes = store.get(&e.key).await?;
                        bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        let bag = tokio::task::spawn_blocking(move || read_bag(&e, bytes, precision, coords))
                            .await
                            .map_err(|p| JobError::Panicked(p.to_string()))??;
                        reads.fetch_add(1, Ordering::Relaxed);
                        // The file is gone: its share goes back.
                        let file = kib(entries[i].shape.file_bytes) as usize;
                        drop(held.split(file.min(held.num_permits())));
                        let mut cache = cache.lock().unwrap();
                        if cache.contains_key(&i) {
                            return Ok(Loaded::new(i, bag, Some(held)));
                        }
                        match memory.try_pin(held, reserve) {
                            Ok(pin) => {
                                cache.insert(i, (bag.clone(), pin));
                                Ok(Loaded::new(i, bag, None))
                            }
                            Err(held) => Ok(Loaded::new(i, bag, Some(held))),
                        }
                    }
                })
                .buffered(READ_AHEAD);
            futures::pin_mut!(items);
            while let Some(item) = items.next().await {
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Pass { loader: self, rx, task }
    }
}

/// Decode a bag's file into a `[1, N, D]` CPU tensor in `precision` (and its corners when asked),
/// checked against its footer.
fn read_bag(e: &BagEntry, bytes: bytes::Bytes, precision: BagPrecision, coords: bool) -> Result<Bag, JobError> {
    fn to_bag<T: FeatureValue + candle_core::WithDType>(
        e: &BagEntry,
        bytes: bytes::Bytes,
        coords: bool,
    ) -> Result<Bag, JobError> {
        let d = decode::<T>(e.key.as_ref(), bytes, coords)?;
        let n = d.features.len() / d.dim.max(1);
        if (n, d.dim) != (e.shape.patches, e.shape.dim) {
            return Err(JobError::Input(format!(
                "{}: {n} × {} features, but {} × {} when the job started (rewritten meanwhile?)",
                e.key, d.dim, e.shape.patches, e.shape.dim
            )));
        }
        let features = Tensor::from_vec(d.features, (1, n, d.dim), &Device::Cpu)
            .map_err(|err| JobError::model(e.key.as_ref(), err))?;
        Ok(Bag { features, coords: d.coords.map(Arc::new) })
    }
    match precision {
        BagPrecision::F32 => to_bag::<f32>(e, bytes, coords),
        BagPrecision::F16 => to_bag::<half::f16>(e, bytes, coords),
    }
}

/// The bags of one pass, in its order.
pub struct Pass<'a> {
    loader: &'a BagLoader,
    rx: mpsc::Receiver<Result<Loaded, JobError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Pass<'_> {
    /// The next bag (from a blocking thread, never the I/O runtime): `None` at the end of the pass
    /// or after a failure ([`BagLoader::take_failure`] has it).
    pub fn next_bag(&mut self) -> Option<Loaded> {
        let started = Instant::now();
        let item = self.rx.blocking_recv();
        *self.loader.waited.lock().unwrap() += started.elapsed().as_secs_f64();
        match item? {
            Ok(l) => Some(l),
            Err(e) => {
                self.loader.failure.lock().unwrap().get_or_insert(e);
                None
            }
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A bag's features as the model reads them: f32 on `device`.
pub fn on_device(features: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
    features.to_device(device)?.to_dtype(DType::F32)
}

/// Some of a loader's bags as a training job's set (its training, validation or test slides).
pub struct Streamed<'a> {
    loader: &'a BagLoader,
    /// Entry index of each member.
    at: Vec<usize>,
}

impl<'a> Streamed<'a> {
    pub fn new(loader: &'a BagLoader, at: Vec<usize>) -> Self {
        Streamed { loader, at }
    }
}

impl BagSet for Streamed<'_> {
    fn len(&self) -> usize {
        self.at.len()
    }

    fn label(&self, i: usize) -> usize {
        self.loader.entries[self.at[i]].label
    }

    fn slide(&self, i: usize) -> &str {
        self.loader.entries[self.at[i]].slide.as_str()
    }

    fn visit(
        &self,
        order: &[usize],
        device: &Device,
        f: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let entries: Vec<usize> = order.iter().map(|&i| self.at[i]).collect();
        let mut pass = self.loader.pass(&entries);
        for &i in order {
            let Some(bag) = pass.next_bag() else {
                let why = self.loader.failure_text().unwrap_or_else(|| "the bag reader stopped".into());
                return Err(candle_core::Error::Msg(why));
            };
            // The bag's share of the budget is held until the step that reads it is done.
            f(i, &on_device(&bag.features, device)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsimil_common::features::{EmbeddingProvenance, FeatureBag};

    fn ids() -> (EmbedderId, TilingId) {
        (EmbedderId::new("e").unwrap(), TilingId::new("t").unwrap())
    }

    /// `n` bags of 100–199 patches × 32 features, bag `i`'s values all `i` plus the row.
    async fn cohort(store: &Store, n: usize) -> Vec<(SlideId, usize)> {
        let (emb, tiling) = ids();
        let mut slides = Vec::new();
        for i in 0..n {
            let slide = SlideId::new(format!("s{i}")).unwrap();
            let rows = 100 + (i * 37) % 100;
            let bag = FeatureBag {
                xs: (0..rows as i64).collect(),
                ys: vec![0; rows],
                dim: 32,
                features: (0..rows * 32).map(|k| i as f32 + (k / 32) as f32 * 1e-3).collect(),
                provenance: EmbeddingProvenance::new(slide.as_str(), "e", "test", 32),
            };
            store.put(&layout::features(&emb, &tiling, &slide), bag.to_parquet().unwrap()).await.unwrap();
            slides.push((slide, i % 2));
        }
        slides
    }

    /// Every bag's first value, pass by pass, read on a blocking thread as a job does.
    async fn passes(loader: Arc<BagLoader>, orders: Vec<Vec<usize>>) -> Vec<Vec<f32>> {
        tokio::task::spawn_blocking(move || {
            orders
                .iter()
                .map(|order| {
                    let mut pass = loader.pass(order);
                    let mut firsts = Vec::new();
                    while let Some(b) = pass.next_bag() {
                        let v = b.features.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
                        firsts.push(v.get(0).unwrap().to_scalar::<f32>().unwrap());
                    }
                    firsts
                })
                .collect()
        })
        .await
        .unwrap()
    }

    /// While a step works on one bag the next ones are read: with room for them, a pass has read
    /// `READ_AHEAD` bags and more beyond the one in use before it is asked for the second.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_reads_ahead_while_the_step_holds_its_bag() {
        let store = Store::memory();
        let slides = cohort(&store, 12).await;
        let (entries, _) = index(&store, &ids(), &slides).await.unwrap();
        let cohort_bytes: u64 = entries.iter().map(|e| e.need(BagPrecision::F32)).sum();
        let memory = BagMemory::new(BagBudget { bytes: 4 * cohort_bytes, precision: BagPrecision::F32 });
        let loader = Arc::new(BagLoader::new(memory, store.clone(), entries, Handle::current()).unwrap());
        let l = loader.clone();
        let (ahead, rest) = tokio::task::spawn_blocking(move || {
            let order: Vec<usize> = (0..12).collect();
            let mut pass = l.pass(&order);
            let first = pass.next_bag().unwrap();
            // The step holds bag 0 and asks for nothing: what is read now was read ahead.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while l.stats().reads < 1 + READ_AHEAD as u64 && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let ahead = l.stats().reads - 1;
            drop(first);
            let rest = std::iter::from_fn(|| pass.next_bag()).count();
            (ahead, rest)
        })
        .await
        .unwrap();
        assert!(ahead >= READ_AHEAD as u64, "{ahead} bags read ahead of the step");
        assert_eq!(rest, 11, "and the pass still gives every bag");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_budget_below_the_cohort_streams_every_pass_in_order_and_never_holds_more_than_it() {
        let store = Store::memory();
        let slides = cohort(&store, 12).await;
        let (entries, missing) = index(&store, &ids(), &slides).await.unwrap();
        assert!(missing.is_empty());
        let cohort_bytes: u64 = entries.iter().map(|e| e.need(BagPrecision::F32)).sum();
        let largest = entries.iter().map(|e| e.need(BagPrecision::F32)).max().unwrap();
        let orders = vec![(0..12).collect::<Vec<_>>(), vec![5, 3, 11, 0, 7, 1, 2, 4, 6, 8, 9, 10]];
        let expect: Vec<Vec<f32>> = orders.iter().map(|o| o.iter().map(|&i| i as f32).collect()).collect();

        // Room for little more than the largest bag: nothing is kept, every pass reads again.
        let budget = BagBudget { bytes: largest + largest / 2, precision: BagPrecision::F32 };
        assert!(budget.bytes * 4 < cohort_bytes);
        let memory = BagMemory::new(budget);
        let loader =
            Arc::new(BagLoader::new(memory.clone(), store.clone(), entries.clone(), Handle::current()).unwrap());
        assert_eq!(passes(loader.clone(), orders.clone()).await, expect);
        let stats = loader.stats();
        assert_eq!((stats.reads, stats.hits), (24, 0), "{stats:?}");
        assert!(memory.peak_bytes() <= budget.bytes + 1024 * 12, "peak {} of {}", memory.peak_bytes(), budget.bytes);
        assert!(memory.peak_bytes() >= largest, "the bags were held while read");

        // A budget above the cohort: each bag is read once and the second pass comes from memory.
        let memory = BagMemory::new(BagBudget { bytes: 4 * cohort_bytes, precision: BagPrecision::F32 });
        let loader =
            Arc::new(BagLoader::new(memory.clone(), store.clone(), entries.clone(), Handle::current()).unwrap());
        assert_eq!(passes(loader.clone(), orders.clone()).await, expect);
        assert_eq!((loader.stats().reads, loader.stats().hits), (12, 12));
        // Its kept bags are given back when the job's loader goes.
        assert!(*memory.pinned.lock().unwrap() > 0);
        drop(loader);
        assert_eq!(*memory.pinned.lock().unwrap(), 0);
        assert_eq!(memory.permits.available_permits() as u64, memory.total_kib());

        // Half precision: half the bytes per value, the values rounded.
        let memory = BagMemory::new(BagBudget { bytes: 4 * cohort_bytes, precision: BagPrecision::F16 });
        let loader = Arc::new(BagLoader::new(memory, store.clone(), entries, Handle::current()).unwrap());
        let l2 = loader.clone();
        let dtype =
            tokio::task::spawn_blocking(move || l2.pass(&[0]).next_bag().unwrap().features.dtype()).await.unwrap();
        assert_eq!(dtype, DType::F16);
    }

    #[test]
    fn sizes_read_as_a_person_reads_them_and_the_advice_is_enough() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(26_560), "26.6 kB");
        assert_eq!(human_bytes(1_024_000_000), "1.02 GB");
        // A 100,000-patch bag of 2,560-d f32 features and its file: at least 2.1 GB.
        assert_eq!(gb_at_least(2_048_000_000), "2.1");
        assert_eq!(gb_at_least(66_000), "0.000066");
        assert_eq!(gb_at_least(12_000_000_000), "12");
        for b in [1u64, 999, 66_001, 2_048_000_001, 12_345_678_901] {
            assert!(gb_at_least(b).parse::<f64>().unwrap() * 1e9 >= b as f64, "{b}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_budget_that_cannot_hold_the_largest_bag_is_refused_naming_it() {
        let store = Store::memory();
        let slides = cohort(&store, 4).await;
        let (entries, _) = index(&store, &ids(), &slides).await.unwrap();
        let big = entries.iter().max_by_key(|e| e.need(BagPrecision::F32)).unwrap().clone();
        let memory =
            BagMemory::new(BagBudget { bytes: big.need(BagPrecision::F32) - 2048, precision: BagPrecision::F32 });
        let err = BagLoader::new(memory, store, entries, Handle::current()).err().unwrap();
        let text = err.to_string();
        assert!(matches!(err, JobError::Config(_)), "{err:?}");
        assert!(
            text.contains(&format!("slide {}'s bag ({} patches × 32 features", big.slide, big.shape.patches)),
            "{text}"
        );
        assert!(text.contains("raise --bag-cache-gb") && text.contains("--bag-precision f16"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_bags_are_set_apart_and_a_bag_gone_mid_job_fails_the_pass_as_not_found() {
        let store = Store::memory();
        let mut slides = cohort(&store, 3).await;
        slides.push((SlideId::new("nowhere").unwrap(), 0));
        let (entries, missing) = index(&store, &ids(), &slides).await.unwrap();
        assert_eq!((entries.len(), missing), (3, vec![SlideId::new("nowhere").unwrap()]));
        store.delete(&entries[1].key).await.unwrap();
        let memory = BagMemory::new(BagBudget { bytes: 1 << 30, precision: BagPrecision::F32 });
        let loader = Arc::new(BagLoader::new(memory, store, entries, Handle::current()).unwrap());
        let got = passes(loader.clone(), vec![vec![0, 1, 2]]).await;
        assert_eq!(got, vec![vec![0.0]], "the pass stops at the missing bag");
        let err = loader.take_failure().unwrap();
        assert!(matches!(err, JobError::StoreNotFound(_)) && err.to_string().contains("s1.parquet"), "{err:?}");
    }
}
