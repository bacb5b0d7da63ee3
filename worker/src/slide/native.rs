//! A native reader for tiled JPEG TIFF and Aperio SVS: it reads a tile's bytes straight from the
//! file (`pread`, no shared cursor, so every thread reads at once), splices in the shared
//! `JPEGTables`, and decodes with zune-jpeg; decoded tiles are kept in a small LRU cache because
//! neighbouring patches share tiles. This is the fast path for the common case; anything it does
//! not know (other compressions, JPEG 2000 SVS, vendor formats) is left to OpenSlide.
//!
//! Supported: classic TIFF and BigTIFF, either byte order; 8-bit, 3-sample, chunky; photometric
//! RGB (Aperio's colour-transform-free JPEG, recognised by its component ids) or YCbCr; every tiled
//! directory is a pyramid level (Aperio's thumbnail, label and macro are stripped, so skipped).
//! Microns per pixel come from Aperio's `MPP`, or from the resolution tags in centimetres or inches.

use super::source::{ByteSource, SourceError};
use super::{CorruptTiles, Region, SlideError, SlideReader};
use image::RgbImage;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wsimil_common::store::StoreError;

/// Decoded tiles kept per slide (about 40 MiB of 256×256 RGB tiles).
const CACHE_TILES: usize = 200;

#[derive(Debug, Clone)]
struct Level {
    width: u64,
    height: u64,
    tile_w: u32,
    tile_h: u32,
    offsets: Vec<u64>,
    counts: Vec<u64>,
    tables: Option<Vec<u8>>,
    /// Photometric RGB: the JPEG streams hold RGB without a colour transform.
    rgb: bool,
    downsample: f64,
}

impl Level {
    fn tiles_across(&self) -> u64 {
        self.width.div_ceil(self.tile_w as u64)
    }
}

pub struct NativeTiff {
    /// The file's path, or the object's URL.
    path: PathBuf,
    source: Arc<dyn ByteSource>,
    levels: Vec<Level>,
    mpp: Option<f64>,
    objective: Option<f64>,
    vendor: &'static str,
    cache: Mutex<TileCache>,
}

#[derive(Default)]
struct TileCache {
    tiles: HashMap<(usize, u64), Arc<Vec<u8>>>,
    order: VecDeque<(usize, u64)>,
}

impl TileCache {
    fn get(&self, k: &(usize, u64)) -> Option<Arc<Vec<u8>>> {
        self.tiles.get(k).cloned()
    }

    fn put(&mut self, k: (usize, u64), v: Arc<Vec<u8>>) {
        if self.tiles.insert(k, v).is_none() {
            self.order.push_back(k);
            while self.order.len() > CACHE_TILES {
                if let Some(old) = self.order.pop_front() {
                    self.tiles.remove(&old);
                }
            }
        }
    }
}

/// Why a file is not for this reader (OpenSlide may still read it) or is broken.
#[derive(Debug)]
pub enum Unsupported {
    /// Not a TIFF, or a TIFF this reader does not handle: try OpenSlide.
    NotForUs(String),
    /// A TIFF whose structure is broken.
    Broken(String),
    /// A TIFF that ends before data its directories point to (`needed` bytes at least).
    Truncated { len: u64, needed: u64 },
    /// The bytes could not be fetched (an object in a bucket).
    Source(StoreError),
}

impl From<SourceError> for Unsupported {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Io(e) => Unsupported::Broken(e.to_string()),
            SourceError::Store(e) => Unsupported::Source(e),
        }
    }
}

/// Does the file start like a TIFF (classic or BigTIFF, either byte order)?
pub fn is_tiff(path: &Path) -> bool {
    let mut head = [0u8; 4];
    use std::os::unix::fs::FileExt;
    File::open(path).and_then(|f| f.read_exact_at(&mut head, 0)).is_ok()
        && matches!(&head, [b'I', b'I', 42 | 43, 0] | [b'M', b'M', 0, 42 | 43])
}

struct Parser<'a> {
    source: &'a dyn ByteSource,
    le: bool,
    big: bool,
    len: u64,
}

impl Parser<'_> {
    fn bytes(&self, at: u64, n: usize) -> Result<Vec<u8>, Unsupported> {
        match at.checked_add(n as u64) {
            None => return Err(Unsupported::Broken(format!("a read of {n} bytes at offset {at}"))),
            Some(end) if end > self.len => return Err(Unsupported::Truncated { len: self.len, needed: end }),
            Some(_) => {}
        }
        let mut b = vec![0u8; n];
        self.source.read_at(at, &mut b)?;
        Ok(b)
    }

    fn u16(&self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    }

    fn u32(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    }

    fn u64(&self, b: &[u8]) -> u64 {
        let a: [u8; 8] = b[..8].try_into().expect("8 bytes");
        if self.le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    }

    /// The entries of the directory at `at`, and the offset of the next one.
    fn ifd(&self, at: u64) -> Result<(HashMap<u16, Entry>, u64), Unsupported> {
        let (count_size, entry_size, off_size) = if self.big { (8, 20, 8) } else { (2, 12, 4) };
        let head = self.bytes(at, count_size)?;
        let n = if self.big { self.u64(&head) } else { self.u16(&head) as u64 };
        if n > 4096 {
            return Err(Unsupported::Broken(format!("directory at {at} claims {n} entries")));
        }
        let body = self.bytes(at + count_size as u64, n as usize * entry_size + off_size)?;
        let mut entries = HashMap::new();
        for i in 0..n as usize {
            let e = &body[i * entry_size..(i + 1) * entry_size];
            let tag = self.u16(&e[0..2]);
            let typ = self.u16(&e[2..4]);
            let count = if self.big { self.u64(&e[4..12]) } else { self.u32(&e[4..8]) as u64 };
            let value = if self.big { e[12..20].to_vec() } else { e[8..12].to_vec() };
            entries.insert(tag, Entry { typ, count, value });
        }
        let tail = &body[n as usize * entry_size..];
        let next = if self.big { self.u64(tail) } else { self.u32(tail) as u64 };
        Ok((entries, next))
    }

    /// The raw bytes of an entry's values (inline or at its offset).
    fn values(&self, e: &Entry) -> Result<Vec<u8>, Unsupported> {
        let size = match e.typ {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 => 4,
            5 | 10 | 12 | 16 | 17 | 18 => 8,
            t => return Err(Unsupported::Broken(format!("unknown TIFF field type {t}"))),
        };
        let n = (e.count as usize).checked_mul(size).ok_or_else(|| Unsupported::Broken("field too large".into()))?;
        let inline = if self.big { 8 } else { 4 };
        if n <= inline {
            Ok(e.value[..n].to_vec())
        } else {
            let at = if self.big { self.u64(&e.value) } else { self.u32(&e.value) as u64 };
            self.bytes(at, n)
        }
    }

    /// Unsigned integer values (SHORT, LONG, LONG8).
    fn ints(&self, e: &Entry) -> Result<Vec<u64>, Unsupported> {
        let raw = self.values(e)?;
        Ok(match e.typ {
            1 | 7 => raw.iter().map(|b| *b as u64).collect(),
            3 => raw.chunks(2).map(|c| self.u16(c) as u64).collect(),
            4 => raw.chunks(4).map(|c| self.u32(c) as u64).collect(),
            16 => raw.chunks(8).map(|c| self.u64(c)).collect(),
            t => return Err(Unsupported::Broken(format!("expected integers, found field type {t}"))),
        })
    }

    fn int(&self, tags: &HashMap<u16, Entry>, tag: u16) -> Result<Option<u64>, Unsupported> {
        match tags.get(&tag) {
            Some(e) => Ok(self.ints(e)?.first().copied()),
            None => Ok(None),
        }
    }

    fn rational(&self, tags: &HashMap<u16, Entry>, tag: u16) -> Result<Option<f64>, Unsupported> {
        let Some(e) = tags.get(&tag) else { return Ok(None) };
        if e.typ != 5 {
            return Ok(None);
        }
        let raw = self.values(e)?;
        let (n, d) = (self.u32(&raw[0..4]) as f64, self.u32(&raw[4..8]) as f64);
        Ok((d > 0.0).then_some(n / d))
    }

    fn text(&self, tags: &HashMap<u16, Entry>, tag: u16) -> Result<Option<String>, Unsupported> {
        match tags.get(&tag) {
            Some(e) => Ok(Some(String::from_utf8_lossy(&self.values(e)?).trim_end_matches('\0').to_string())),
            None => Ok(None),
        }
    }
}

struct Entry {
    typ: u16,
    count: u64,
    value: Vec<u8>,
}

/// A vendor whose TIFF layout has rules of its own (OpenSlide's Philips, Ventana and Hamamatsu
/// readers), told by the first ImageDescription; the native reader leaves those to OpenSlide. (For
/// a local file OpenSlide's own detection decides first; this is what a slide in a bucket has.)
pub fn vendor_of_description(desc: &str) -> Option<&'static str> {
    if desc.contains("PhilipsTIFF") || desc.contains("DPUfsImport") {
        Some("Philips")
    } else if desc.contains("iScan") || desc.contains("Ventana") {
        Some("Ventana")
    } else if desc.contains("Hamamatsu") {
        Some("Hamamatsu")
    } else {
        None
    }
}

/// `key = value` pairs of an Aperio ImageDescription (`…|AppMag = 20|MPP = 0.499|…`).
pub fn aperio_properties(desc: &str) -> Option<HashMap<String, String>> {
    if !desc.starts_with("Aperio") {
        return None;
    }
    Some(
        desc.split('|')
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

impl NativeTiff {
    /// Open `path` if this reader handles it.
    pub fn open(path: &Path) -> Result<Self, Unsupported> {
        let file = File::open(path).map_err(|e| Unsupported::NotForUs(e.to_string()))?;
        Self::open_source(Arc::new(file), path)
    }

    /// Open the slide `source` holds (a file, an object in a bucket) if this reader handles it;
    /// `path` names it in messages.
    pub fn open_source(source: Arc<dyn ByteSource>, path: &Path) -> Result<Self, Unsupported> {
        let len = source.len();
        let mut head = [0u8; 16];
        if len < 8 {
            return Err(Unsupported::NotForUs("too short for a TIFF".into()));
        }
        source.read_at(0, &mut head[..8])?;
        let le = match &head[0..2] {
            b"II" => true,
            b"MM" => false,
            _ => return Err(Unsupported::NotForUs("not a TIFF".into())),
        };
        let mut p = Parser { source: source.as_ref(), le, big: false, len };
        let first = match p.u16(&head[2..4]) {
            42 => p.u32(&head[4..8]) as u64,
            43 => {
                p.big = true;
                let h = p.bytes(0, 16)?;
                p.u64(&h[8..16])
            }
            v => return Err(Unsupported::NotForUs(format!("TIFF version {v}"))),
        };
        let mut levels = Vec::new();
        let (mut description, mut resolution) = (None, None);
        let mut at = first;
        let mut seen = 0;
        while at != 0 {
            seen += 1;
            if seen > 64 {
                return Err(Unsupported::Broken("more than 64 directories (a loop?)".into()));
            }
            let (tags, next) = p.ifd(at)?;
            if description.is_none() {
                description = p.text(&tags, 270)?;
                let unit = p.int(&tags, 296)?.unwrap_or(2);
                if let Some(xres) = p.rational(&tags, 282)? {
                    // Pixels per centimetre (unit 3) or per inch (unit 2) → µm per pixel.
                    let per_cm = if unit == 3 {
                        xres
                    } else if unit == 2 {
                        xres / 2.54
                    } else {
                        0.0
                    };
                    if per_cm > 0.0 {
                        resolution = Some(10_000.0 / per_cm);
                    }
                }
            }
            at = next;
            if !tags.contains_key(&322) {
                continue; // stripped: thumbnail, label, macro
            }
            let get = |tag: u16, what: &str| -> Result<u64, Unsupported> {
                p.int(&tags, tag)?.ok_or_else(|| Unsupported::Broken(format!("tiled directory without {what}")))
            };
            let compression = get(259, "Compression")?;
            if compression != 7 {
                return Err(Unsupported::NotForUs(format!("tiles with compression {compression} (not JPEG)")));
            }
            let samples = p.int(&tags, 277)?.unwrap_or(1);
            let bits = p.int(&tags, 258)?.unwrap_or(1);
            let planar = p.int(&tags, 284)?.unwrap_or(1);
            let photometric = get(262, "PhotometricInterpretation")?;
            if samples != 3 || bits != 8 || planar != 1 || !(photometric == 2 || photometric == 6) {
                return Err(Unsupported::NotForUs(format!(
                    "{samples} samples of {bits} bits, planar {planar}, photometric {photometric}"
                )));
            }
            let offsets = p.ints(tags.get(&324).ok_or_else(|| Unsupported::Broken("no TileOffsets".into()))?)?;
            let counts = p.ints(tags.get(&325).ok_or_else(|| Unsupported::Broken("no TileByteCounts".into()))?)?;
            let (width, height) = (get(256, "ImageWidth")?, get(257, "ImageLength")?);
            let (tile_w, tile_h) = (get(322, "TileWidth")? as u32, get(323, "TileLength")? as u32);
            if tile_w == 0 || tile_h == 0 || width == 0 || height == 0 {
                return Err(Unsupported::Broken("empty level or tile".into()));
            }
            let expect = width.div_ceil(tile_w as u64) * height.div_ceil(tile_h as u64);
            if offsets.len() as u64 != expect || counts.len() as u64 != expect {
                return Err(Unsupported::Broken(format!("{} tile offsets for {expect} tiles", offsets.len())));
            }
            let tables = match tags.get(&347) {
                Some(e) => Some(p.values(e)?),
                None => None,
            };
            levels.push(Level {
                width,
                height,
                tile_w,
                tile_h,
                offsets,
                counts,
                tables,
                rgb: photometric == 2,
                downsample: 1.0,
            });
        }
        if levels.is_empty() {
            return Err(Unsupported::NotForUs("no tiled JPEG levels".into()));
        }
        // Tiles past the end of the file: a partial copy, whose directories (often at the start)
        // survived. Said at open, not as a corrupt tile per patch.
        let needed = levels
            .iter()
            .flat_map(|l| l.offsets.iter().zip(&l.counts).map(|(o, c)| o.saturating_add(*c)))
            .max()
            .unwrap_or(0);
        if needed > len {
            return Err(Unsupported::Truncated { len, needed });
        }
        levels.sort_by_key(|l| std::cmp::Reverse(l.width));
        let (w0, h0) = (levels[0].width as f64, levels[0].height as f64);
        for l in &mut levels {
            // OpenSlide's rule: the mean of the two axes' ratios.
            l.downsample = (w0 / l.width as f64 + h0 / l.height as f64) / 2.0;
        }
        let aperio = description.as_deref().and_then(aperio_properties);
        let num =
            |k: &str| aperio.as_ref().and_then(|a| a.get(k)).and_then(|v| v.parse::<f64>().ok()).filter(|v| *v > 0.0);
        let (mpp, objective, vendor) = match &aperio {
            Some(_) => (num("MPP"), num("AppMag"), "aperio"),
            None => (resolution, None, "generic-tiff"),
        };
        if let Some(v) = description.as_deref().and_then(vendor_of_description) {
            // A vendor's own TIFF layout, which OpenSlide knows and this reader does not.
            return Err(Unsupported::NotForUs(format!("a {v} TIFF")));
        }
        Ok(NativeTiff { path: path.to_path_buf(), source, levels, mpp, objective, vendor, cache: Mutex::default() })
    }

    /// Decoded RGB pixels of one tile (`tile_w × tile_h × 3`).
    fn tile(&self, level: usize, index: u64) -> Result<Arc<Vec<u8>>, SlideError> {
        if let Some(t) = self.cache.lock().unwrap().get(&(level, index)) {
            return Ok(t);
        }
        let l = &self.levels[level];
        let (col, row) = (index % l.tiles_across(), index / l.tiles_across());
        let corrupt = |reason: String| SlideError::CorruptTile { path: self.path.clone(), level, col, row, reason };
        let (off, n) = (l.offsets[index as usize], l.counts[index as usize]);
        if n == 0 {
            return Err(corrupt("tile has no data".into()));
        }
        let mut raw = vec![0u8; n as usize];
        match self.source.read_at(off, &mut raw) {
            Ok(()) => {}
            Err(SourceError::Io(e)) => return Err(corrupt(format!("cannot read {n} bytes at {off}: {e}"))),
            // A bucket that fails a request is not a corrupt tile: the job's retry rule decides.
            Err(SourceError::Store(e)) => return Err(SlideError::Source(e)),
        }
        let mut stream = match &l.tables {
            // Abbreviated tile: the tables' stream without its EOI, then the tile without its SOI.
            Some(t) if t.len() >= 4 && raw.len() >= 2 && raw[0..2] == [0xFF, 0xD8] => {
                let mut s = Vec::with_capacity(t.len() + raw.len());
                s.extend_from_slice(&t[..t.len() - 2]);
                s.extend_from_slice(&raw[2..]);
                s
            }
            _ => raw,
        };
        if l.rgb {
            mark_rgb_components(&mut stream);
        }
        let opts = zune_core::options::DecoderOptions::default()
            .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(zune_core::bytestream::ZCursor::new(&stream), opts);
        let pixels = dec.decode().map_err(|e| corrupt(format!("JPEG: {e:?}")))?;
        let (dw, dh) = dec.dimensions().unwrap_or((0, 0));
        if dw < l.tile_w as usize || dh < l.tile_h as usize || pixels.len() < dw * dh * 3 {
            return Err(corrupt(format!("decoded {dw}x{dh}, expected {}x{}", l.tile_w, l.tile_h)));
        }
        // Keep exactly tile_w × tile_h (a stream may be padded to its MCU size).
        let tile = if dw == l.tile_w as usize && dh == l.tile_h as usize {
            pixels
        } else {
            let mut t = Vec::with_capacity((l.tile_w * l.tile_h * 3) as usize);
            for y in 0..l.tile_h as usize {
                t.extend_from_slice(&pixels[y * dw * 3..(y * dw + l.tile_w as usize) * 3]);
            }
            t
        };
        let tile = Arc::new(tile);
        self.cache.lock().unwrap().put((level, index), tile.clone());
        Ok(tile)
    }
}

/// Relabel a 3-component JPEG's component ids as `R`, `G`, `B` in its frame and scan headers.
///
/// TIFF says "photometric RGB" outside the JPEG stream (as Aperio does); inside, nothing tells a
/// decoder the samples are not YCbCr. libjpeg-based readers pass the TIFF's word on; decoders that
/// look only at the stream (zune-jpeg among them) take component ids `R`, `G`, `B` as that word.
pub fn mark_rgb_components(jpeg: &mut [u8]) {
    let mut ids = [0u8; 3];
    let mut i = 2; // after SOI
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return;
        }
        let marker = jpeg[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0x01 || (0xD0..=0xD8).contains(&marker) {
            i += 2;
            continue;
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        let seg = i + 4;
        if seg + len.saturating_sub(2) > jpeg.len() {
            return;
        }
        let is_sof = (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof && jpeg[seg + 5] == 3 {
            for (k, id) in ids.iter_mut().enumerate() {
                *id = jpeg[seg + 6 + 3 * k];
                jpeg[seg + 6 + 3 * k] = b"RGB"[k];
            }
        } else if marker == 0xDA {
            let n = jpeg[seg] as usize;
            for k in 0..n {
                let sel = &mut jpeg[seg + 1 + 2 * k];
                if let Some(pos) = ids.iter().position(|id| id == sel) {
                    *sel = b"RGB"[pos];
                }
            }
            return; // entropy-coded data follows
        }
        i += 2 + len;
    }
}

impl SlideReader for NativeTiff {
    fn path(&self) -> &Path {
        &self.path
    }

    fn reader_name(&self) -> String {
        format!("wsimil native tiled-JPEG TIFF ({})", self.vendor)
    }

    fn level_count(&self) -> usize {
        self.levels.len()
    }

    fn level_dimensions(&self, level: usize) -> (u64, u64) {
        (self.levels[level].width, self.levels[level].height)
    }

    fn level_downsample(&self, level: usize) -> f64 {
        self.levels[level].downsample
    }

    fn mpp(&self) -> Option<f64> {
        self.mpp
    }

    fn objective_power(&self) -> Option<f64> {
        self.objective
    }

    fn read_region(&self, x: i64, y: i64, level: usize, w: u32, h: u32) -> Result<RgbImage, SlideError> {
        self.read(x, y, level, w, h, false).map(|(img, _)| img)
    }

    fn read_region_tolerant(
        &self,
        x: i64,
        y: i64,
        level: usize,
        w: u32,
        h: u32,
    ) -> Result<(RgbImage, CorruptTiles), SlideError> {
        self.read(x, y, level, w, h, true)
    }

    fn prefetch(&self, regions: &[Region]) -> Result<(), SlideError> {
        let cache = self.cache.lock().unwrap();
        let mut ranges = Vec::new();
        for &(x, y, level, w, h) in regions {
            for (l, index) in self.tiles_of(x, y, level, w, h) {
                if cache.get(&(l, index)).is_none() {
                    let lv = &self.levels[l];
                    ranges.push((lv.offsets[index as usize], lv.counts[index as usize]));
                }
            }
        }
        drop(cache);
        self.source.prefetch(&ranges).map_err(|e| match e {
            SourceError::Store(e) => SlideError::Source(e),
            SourceError::Io(e) => {
                SlideError::Read { path: self.path.clone(), level: 0, x: 0, y: 0, w: 0, h: 0, reason: e.to_string() }
            }
        })
    }

    fn bytes_read(&self) -> u64 {
        self.source.bytes_read()
    }
}

impl NativeTiff {
    /// The tiles (level, index) a region of `level` lies on.
    fn tiles_of(&self, x: i64, y: i64, level: usize, w: u32, h: u32) -> Vec<(usize, u64)> {
        let Some(l) = self.levels.get(level) else { return Vec::new() };
        let lx = (x as f64 / l.downsample).round() as i64;
        let ly = (y as f64 / l.downsample).round() as i64;
        let (tw, th) = (l.tile_w as i64, l.tile_h as i64);
        let (x0, y0) = (lx.max(0), ly.max(0));
        let x1 = (lx + w as i64).min(l.width as i64);
        let y1 = (ly + h as i64).min(l.height as i64);
        if x0 >= x1 || y0 >= y1 {
            return Vec::new();
        }
        let across = l.tiles_across() as i64;
        (y0 / th..=(y1 - 1) / th)
            .flat_map(|row| (x0 / tw..=(x1 - 1) / tw).map(move |col| (level, (row * across + col) as u64)))
            .collect()
    }

    /// Read a region; with `tolerant`, a corrupt tile is left white and counted.
    fn read(
        &self,
        x: i64,
        y: i64,
        level: usize,
        w: u32,
        h: u32,
        tolerant: bool,
    ) -> Result<(RgbImage, CorruptTiles), SlideError> {
        let fail = |reason: String| SlideError::Read { path: self.path.clone(), level, x, y, w, h, reason };
        let l = self.levels.get(level).ok_or_else(|| fail(format!("no level {level}")))?;
        // Level coordinates of the region's top-left. OpenSlide places the region at the
        // fractional position x / downsample and interpolates; the nearest whole pixel is within
        // half a pixel of that (downsamples are means of axis ratios, e.g. 3.99933, not 4).
        let lx = (x as f64 / l.downsample).round() as i64;
        let ly = (y as f64 / l.downsample).round() as i64;
        let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
        let (tw, th) = (l.tile_w as i64, l.tile_h as i64);
        let x0 = lx.max(0);
        let y0 = ly.max(0);
        let x1 = (lx + w as i64).min(l.width as i64);
        let y1 = (ly + h as i64).min(l.height as i64);
        let mut corrupt = CorruptTiles::default();
        if x0 >= x1 || y0 >= y1 {
            return Ok((out, corrupt));
        }
        // The region's tiles in few requests (a bucket; nothing for a file).
        self.prefetch(&[(x, y, level, w, h)])?;
        let buf: &mut [u8] = &mut out;
        for row in y0 / th..=(y1 - 1) / th {
            for col in x0 / tw..=(x1 - 1) / tw {
                let tile = match self.tile(level, (row * l.tiles_across() as i64 + col) as u64) {
                    Ok(t) => t,
                    Err(e @ SlideError::CorruptTile { .. }) if tolerant => {
                        corrupt.add(CorruptTiles { count: 1, first: Some(e.to_string()) });
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                // The overlap of this tile with the region, in level coordinates.
                let (ox0, oy0) = ((col * tw).max(x0), (row * th).max(y0));
                let (ox1, oy1) = (((col + 1) * tw).min(x1), ((row + 1) * th).min(y1));
                let n = ((ox1 - ox0) * 3) as usize;
                for yy in oy0..oy1 {
                    let src = (((yy - row * th) * tw + (ox0 - col * tw)) * 3) as usize;
                    let dst = (((yy - ly) * w as i64 + (ox0 - lx)) * 3) as usize;
                    buf[dst..dst + n].copy_from_slice(&tile[src..src + n]);
                }
            }
        }
        Ok((out, corrupt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes in memory whose reads start failing as a bucket's requests do, on demand.
    struct Flaky {
        data: Vec<u8>,
        failing: std::sync::atomic::AtomicBool,
    }

    impl ByteSource for Flaky {
        fn len(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                let reason = "connection reset by peer".into();
                return Err(SourceError::Store(StoreError::Unavailable { key: "s3://b/a.svs".into(), reason }));
            }
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn a_bucket_failing_mid_read_is_a_transient_store_error_never_a_corrupt_tile() {
        let img = RgbImage::from_fn(1024, 1024, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, 128]));
        let data = crate::tiff::write_slide(&img, "a", &Default::default()).unwrap();
        let src = Arc::new(Flaky { data, failing: false.into() });
        let slide = NativeTiff::open_source(src.clone(), Path::new("s3://b/a.svs")).unwrap();
        assert_eq!(slide.read_region(0, 0, 0, 64, 64).unwrap().dimensions(), (64, 64));
        src.failing.store(true, std::sync::atomic::Ordering::Relaxed);
        // Even a read that tolerates corrupt tiles stops: the bytes were never seen.
        let err = slide.read_region_tolerant(512, 512, 0, 64, 64).expect_err("the read fails");
        assert!(matches!(err, SlideError::Source(StoreError::Unavailable { .. })), "{err:?}");
        assert!(err.to_string().starts_with("s3://b/a.svs: the store is unavailable"), "{err}");
        assert!(crate::error::JobError::from(err).is_transient());
    }

    #[test]
    fn aperio_description_properties() {
        let p = aperio_properties(
            "Aperio Image Library v10\r\n2220x2967 (240x240) JPEG/RGB Q=30|AppMag = 20|MPP = 0.4990|Date = 12/29/09",
        )
        .unwrap();
        assert_eq!(p["AppMag"], "20");
        assert_eq!(p["MPP"], "0.4990");
        assert!(aperio_properties("Generic TIFF").is_none());
    }

    #[test]
    fn rgb_component_ids_are_relabelled_in_frame_and_scan() {
        // SOI, SOF0 (3 components, ids 0 1 2), SOS (3 components), then data.
        let mut j = vec![0xFF, 0xD8, 0xFF, 0xC0, 0, 17, 8, 0, 16, 0, 16, 3, 0, 0x11, 0, 1, 0x11, 0, 2, 0x11, 0];
        j.extend([0xFF, 0xDA, 0, 12, 3, 0, 0, 1, 0x11, 2, 0x11, 0, 63, 0, 0xAB, 0xCD]);
        mark_rgb_components(&mut j);
        assert_eq!([j[12], j[15], j[18]], *b"RGB");
        assert_eq!([j[26], j[28], j[30]], *b"RGB");
        assert_eq!(&j[j.len() - 2..], &[0xAB, 0xCD], "entropy data untouched");
    }

    #[test]
    fn garbage_is_not_for_us() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.svs");
        std::fs::write(&p, b"hello, not a tiff").unwrap();
        assert!(matches!(NativeTiff::open(&p), Err(Unsupported::NotForUs(_))));
    }
}
