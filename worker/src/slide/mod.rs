//! Reading whole-slide images: a [`SlideReader`] trait over the pyramid, with two readers:
//! [`native`] for tiled JPEG TIFF/SVS (the common case, several times faster) and [`openslide`]
//! (through its C library, loaded at run time) for every other format OpenSlide knows.
//! [`open`] chooses: native where OpenSlide itself would treat the file as Aperio or generic TIFF,
//! OpenSlide otherwise. `WSIMIL_READER=native|openslide` forces one.

pub mod native;
pub mod openslide;
pub mod remote;
pub mod source;

use image::RgbImage;
use std::path::{Path, PathBuf};

/// Why a slide could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SlideError {
    #[error("{path}: cannot open slide: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("{path}: cannot read region (level {level}, x {x}, y {y}, {w}x{h}): {reason}")]
    Read { path: PathBuf, level: usize, x: i64, y: i64, w: u32, h: u32, reason: String },
    #[error("{path}: corrupt tile at level {level}, column {col}, row {row}: {reason}")]
    CorruptTile { path: PathBuf, level: usize, col: u64, row: u64, reason: String },
    #[error("{path}: the slide records no microns-per-pixel; give `mpp` in the manifest")]
    NoMpp { path: PathBuf },
    /// The file ends before data its own header points to: a partial copy or download.
    #[error("{path}: truncated: the file has {len} bytes but its header points to data up to byte {needed}")]
    Truncated { path: PathBuf, len: u64, needed: u64 },
    #[error("OpenSlide library not available ({0}); install libopenslide (scripts/setup.sh does)")]
    Library(String),
    /// A reader setting that cannot work (`WSIMIL_READER`).
    #[error("{0}")]
    Config(String),
    /// A slide in a bucket whose bytes could not be fetched (missing, refused, unreachable): the
    /// store error names its URL.
    #[error("{0}")]
    Source(wsimil_common::store::StoreError),
}

/// A region to read: `(x, y, level, w, h)` as [`SlideReader::read_region`] takes it.
pub type Region = (i64, i64, usize, u32, u32);

/// Corrupt tiles met by a tolerant read: how many, and the first one's error.
#[derive(Debug, Default)]
pub struct CorruptTiles {
    pub count: usize,
    pub first: Option<String>,
}

impl CorruptTiles {
    pub fn add(&mut self, other: CorruptTiles) {
        self.count += other.count;
        if self.first.is_none() {
            self.first = other.first;
        }
    }
}

/// A pyramidal slide. Coordinates of `read_region` are level-0 pixels, as in OpenSlide.
pub trait SlideReader: Send + Sync {
    fn path(&self) -> &Path;
    /// Which library and format read the slide, for provenance.
    fn reader_name(&self) -> String;
    fn level_count(&self) -> usize;
    fn level_dimensions(&self, level: usize) -> (u64, u64);
    fn level_downsample(&self, level: usize) -> f64;
    /// Microns per pixel at level 0, if the file says.
    fn mpp(&self) -> Option<f64>;
    /// Objective power of level 0, if the file says.
    fn objective_power(&self) -> Option<f64>;
    /// RGB pixels of a `w × h` region of `level` whose top-left is `(x, y)` at level 0.
    /// Transparent (outside the scanned area) pixels come back white.
    fn read_region(&self, x: i64, y: i64, level: usize, w: u32, h: u32) -> Result<RgbImage, SlideError>;

    /// As `read_region`, but corrupt tiles come back white instead of failing the read; also
    /// reports them. Readers that cannot tell corrupt tiles apart (OpenSlide,
    /// whose handle is unusable after an error) fail as `read_region` does.
    fn read_region_tolerant(
        &self,
        x: i64,
        y: i64,
        level: usize,
        w: u32,
        h: u32,
    ) -> Result<(RgbImage, CorruptTiles), SlideError> {
        self.read_region(x, y, level, w, h).map(|img| (img, CorruptTiles::default()))
    }

    /// These regions are about to be read: fetch what they need together (a slide in a bucket; a
    /// no-op for files).
    fn prefetch(&self, _regions: &[Region]) -> Result<(), SlideError> {
        Ok(())
    }

    /// Bytes fetched from a bucket so far (0 for a file).
    fn bytes_read(&self) -> u64 {
        0
    }

    /// The level with the largest downsample not above `downsample` (OpenSlide's rule).
    fn best_level_for_downsample(&self, downsample: f64) -> usize {
        (0..self.level_count())
            .filter(|&l| self.level_downsample(l) <= downsample * (1.0 + 1e-6))
            .max_by(|&a, &b| self.level_downsample(a).total_cmp(&self.level_downsample(b)))
            .unwrap_or(0)
    }
}

/// Which reader opens slides (`WSIMIL_READER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReaderChoice {
    /// Native for Aperio and generic tiled JPEG TIFF, OpenSlide for the rest.
    Auto,
    Native,
    #[value(name = "openslide")]
    OpenSlide,
}

impl ReaderChoice {
    /// From `WSIMIL_READER` (`auto` when unset). `wsimil run` and `wsimil worker` call this at start,
    /// so a mistyped value stops them before any work instead of failing every slide.
    pub fn from_env() -> Result<Self, SlideError> {
        match std::env::var("WSIMIL_READER").as_deref() {
            Err(_) | Ok("") => Ok(ReaderChoice::Auto),
            Ok(v) => <Self as clap::ValueEnum>::from_str(v, true)
                .map_err(|_| SlideError::Config(format!("WSIMIL_READER={v:?}: expected auto, native or openslide"))),
        }
    }
}

/// Open a slide with the best reader for it.
pub fn open(path: &Path) -> Result<Box<dyn SlideReader>, SlideError> {
    open_with(path, ReaderChoice::from_env()?)
}

pub fn open_with(path: &Path, choice: ReaderChoice) -> Result<Box<dyn SlideReader>, SlideError> {
    check_file(path)?;
    let native = || {
        native::NativeTiff::open(path).map_err(|e| match e {
            native::Unsupported::Truncated { len, needed } => {
                SlideError::Truncated { path: path.to_path_buf(), len, needed }
            }
            native::Unsupported::NotForUs(r) => {
                SlideError::Open { path: path.to_path_buf(), reason: format!("not a tiled JPEG TIFF: {r}") }
            }
            native::Unsupported::Broken(r) => {
                SlideError::Open { path: path.to_path_buf(), reason: format!("broken TIFF: {r}") }
            }
            native::Unsupported::Source(e) => SlideError::Source(e),
        })
    };
    match choice {
        ReaderChoice::OpenSlide => Ok(Box::new(openslide::OpenSlide::open(path)?)),
        ReaderChoice::Native => Ok(Box::new(native()?)),
        ReaderChoice::Auto => {
            // Only layouts whose meaning the native reader knows; vendor TIFFs (Philips,
            // Ventana, …) have their own rules, which OpenSlide implements.
            let ours = match openslide::detect_vendor(path) {
                Ok(Some(v)) => v == "aperio" || v == "generic-tiff",
                // OpenSlide does not recognise a TIFF whose directories it cannot read, which is
                // what a truncated copy looks like: the native reader says what is wrong with it.
                Ok(None) => native::is_tiff(path),
                Err(_) => true, // no OpenSlide here: the native reader is all we have
            };
            if ours {
                match native() {
                    Ok(n) => return Ok(Box::new(n)),
                    Err(e @ SlideError::Truncated { .. }) => return Err(e),
                    Err(_) => {}
                }
            }
            Ok(Box::new(openslide::OpenSlide::open(path)?))
        }
    }
}

/// A path that is not a readable file is said so, before any reader sees it.
fn check_file(path: &Path) -> Result<(), SlideError> {
    let fail = |reason: String| SlideError::Open { path: path.to_path_buf(), reason };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(fail("is a directory, not a slide file".into())),
        Ok(m) if m.len() == 0 => Err(fail("the file is empty".into())),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(fail("no such file".into())),
        Err(e) => Err(fail(format!("cannot read: {e}"))),
    }
}
