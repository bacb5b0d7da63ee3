//! Reading whole-slide images: a [`SlideReader`] trait over the pyramid, with two readers:
//! [`native`] for tiled JPEG TIFF/SVS (the common case, several times faster) and [`openslide`]
//! (through its C library, loaded at run time) for every other format OpenSlide knows.
//! [`open`] chooses: native where OpenSlide itself would treat the file as Aperio or generic TIFF,
//! OpenSlide otherwise. `WSIMIL_READER=native|openslide` forces one.

pub mod native;
pub mod openslide;

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
    #[error("OpenSlide library not available ({0}); install libopenslide (scripts/setup.sh does)")]
    Library(String),
}

impl SlideError {
    /// Only a missing library can be fixed by retrying elsewhere; a bad file stays bad.
    pub fn is_transient(&self) -> bool {
        matches!(self, SlideError::Library(_))
    }
}

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

    /// The level with the largest downsample not above `downsample` (OpenSlide's rule).
    fn best_level_for_downsample(&self, downsample: f64) -> usize {
        (0..self.level_count())
            .filter(|&l| self.level_downsample(l) <= downsample * (1.0 + 1e-6))
            .max_by(|&a, &b| self.level_downsample(a).total_cmp(&self.level_downsample(b)))
            .unwrap_or(0)
    }
}

/// Which reader opens slides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderChoice {
    /// Native for Aperio and generic tiled JPEG TIFF, OpenSlide for the rest.
    Auto,
    Native,
    OpenSlide,
}

impl ReaderChoice {
    /// From `WSIMIL_READER` (`auto` when unset).
    pub fn from_env() -> Result<Self, SlideError> {
        match std::env::var("WSIMIL_READER").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(ReaderChoice::Auto),
            Ok("native") => Ok(ReaderChoice::Native),
            Ok("openslide") => Ok(ReaderChoice::OpenSlide),
            Ok(other) => {
                Err(SlideError::Library(format!("WSIMIL_READER={other:?}: expected auto, native or openslide")))
            }
        }
    }
}

/// Open a slide with the best reader for it.
pub fn open(path: &Path) -> Result<Box<dyn SlideReader>, SlideError> {
    open_with(path, ReaderChoice::from_env()?)
}

pub fn open_with(path: &Path, choice: ReaderChoice) -> Result<Box<dyn SlideReader>, SlideError> {
    let native = || {
        native::NativeTiff::open(path).map_err(|e| SlideError::Open {
            path: path.to_path_buf(),
            reason: match e {
                native::Unsupported::NotForUs(r) => format!("not a tiled JPEG TIFF: {r}"),
                native::Unsupported::Broken(r) => format!("broken TIFF: {r}"),
            },
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
                Ok(None) => false,
                Err(_) => true, // no OpenSlide here: the native reader is all we have
            };
            if ours {
                if let Ok(n) = native() {
                    return Ok(Box::new(n));
                }
            }
            Ok(Box::new(openslide::OpenSlide::open(path)?))
        }
    }
}
