//! Reading whole-slide images: a [`SlideReader`] trait over the pyramid, with OpenSlide (through
//! its C library, loaded at run time) as the reader for every format it knows.

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

    /// The level with the largest downsample not above `downsample` (OpenSlide's rule).
    fn best_level_for_downsample(&self, downsample: f64) -> usize {
        (0..self.level_count())
            .filter(|&l| self.level_downsample(l) <= downsample * (1.0 + 1e-6))
            .max_by(|&a, &b| self.level_downsample(a).total_cmp(&self.level_downsample(b)))
            .unwrap_or(0)
    }
}

/// Open a slide with the best reader for it.
pub fn open(path: &Path) -> Result<Box<dyn SlideReader>, SlideError> {
    Ok(Box::new(openslide::OpenSlide::open(path)?))
}
