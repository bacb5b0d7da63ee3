//! The tile stage: find tissue at low resolution and lay the patch grid at the target resolution.
//!
//! Sizes are physical: a patch is `patch_px` pixels at `target_mpp` µm/px, i.e.
//! `patch_px · target_mpp / mpp` level-0 pixels, so a 40x and a 20x scan of the same tissue give the
//! same patches.

use crate::resample::{fit_within, resize_rgb};
use crate::slide::{SlideError, SlideReader};
use crate::tissue::{self, TissueMask};
use image::{GrayImage, RgbImage};
use wsimil_common::grid::{Patch, PatchGrid, TilingProvenance};
use wsimil_common::plan::TilingSpec;

/// Largest side of the stored thumbnail.
const THUMB_MAX_SIDE: u32 = 1024;

/// Everything the tile stage produces for one slide.
pub struct Tiled {
    pub grid: PatchGrid,
    pub thumbnail: RgbImage,
    pub mask: GrayImage,
}

/// Level-0 microns per pixel: the manifest's value wins, else the slide's, else an error.
pub fn resolve_mpp(slide: &dyn SlideReader, manifest_mpp: Option<f64>) -> Result<(f64, &'static str), SlideError> {
    if let Some(m) = manifest_mpp {
        return Ok((m, "manifest"));
    }
    slide.mpp().map(|m| (m, "slide")).ok_or_else(|| SlideError::NoMpp { path: slide.path().to_path_buf() })
}

/// Read the whole slide at about `downsample` (from the best level, then resized).
pub fn read_overview(slide: &dyn SlideReader, max_side: u32) -> Result<(RgbImage, f64), SlideError> {
    let (w0, h0) = slide.level_dimensions(0);
    let want = (w0.max(h0) as f64 / max_side as f64).max(1.0);
    let level = slide.best_level_for_downsample(want);
    let (lw, lh) = slide.level_dimensions(level);
    let img = slide.read_region(0, 0, level, lw as u32, lh as u32)?;
    let (tw, th) = fit_within(lw as u32, lh as u32, max_side);
    let img = if (tw, th) != (lw as u32, lh as u32) { resize_rgb(&img, tw, th) } else { img };
    // The effective downsample of the overview relative to level 0.
    Ok((img, w0 as f64 / tw as f64))
}

/// Tile one slide.
pub fn tile_slide(
    slide: &dyn SlideReader,
    slide_id: &str,
    spec: &TilingSpec,
    manifest_mpp: Option<f64>,
) -> Result<Tiled, SlideError> {
    let (mpp, mpp_source) = resolve_mpp(slide, manifest_mpp)?;
    let (overview, ds) = read_overview(slide, spec.tissue.detect_max_side)?;
    let mask = tissue::detect(&overview, ds, &spec.tissue);
    let (w0, h0) = slide.level_dimensions(0);
    let patch_level0 = ((spec.patch_px as f64 * spec.target_mpp / mpp).round() as u64).max(1);
    let step_level0 = ((patch_level0 as f64 * spec.step_fraction).round() as u64).max(1);
    let patches = lay_grid(&mask, w0, h0, patch_level0, step_level0, spec.min_tissue_fraction);
    let (tw, th) = fit_within(overview.width(), overview.height(), THUMB_MAX_SIDE);
    let thumbnail = resize_rgb(&overview, tw, th);
    let source_magnification = slide.objective_power().unwrap_or(10.0 / mpp);
    let provenance = TilingProvenance {
        slide: slide_id.to_string(),
        source_path: slide.path().display().to_string(),
        reader: slide.reader_name(),
        level0_width: w0,
        level0_height: h0,
        mpp,
        mpp_source: mpp_source.into(),
        source_magnification,
        target_mpp: spec.target_mpp,
        target_magnification: source_magnification * mpp / spec.target_mpp,
        patch_px: spec.patch_px,
        patch_level0,
        step_level0,
        min_tissue_fraction: spec.min_tissue_fraction,
        tissue: spec.tissue.clone(),
        threshold_used: mask.threshold,
        detect_downsample: ds,
        patches: patches.len(),
    };
    Ok(Tiled { grid: PatchGrid { patches, provenance }, thumbnail, mask: mask.mask })
}

/// Every grid position fully inside the slide whose tissue fraction reaches `min_fraction`.
pub fn lay_grid(mask: &TissueMask, w0: u64, h0: u64, patch: u64, step: u64, min_fraction: f32) -> Vec<Patch> {
    let mut out = Vec::new();
    if patch > w0 || patch > h0 {
        return out;
    }
    let mut y = 0;
    while y + patch <= h0 {
        let mut x = 0;
        while x + patch <= w0 {
            let t = mask.fraction(x as i64, y as i64, patch);
            if t >= min_fraction && t > 0.0 {
                out.push(Patch { x: x as i64, y: y as i64, tissue: t });
            }
            x += step;
        }
        y += step;
    }
    out
}

pub fn png_bytes_rgb(img: &RgbImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).expect("PNG encoding to memory");
    buf.into_inner()
}

pub fn png_bytes_gray(img: &GrayImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).expect("PNG encoding to memory");
    buf.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_keeps_only_tissue_patches_inside_the_slide() {
        // Tissue in the left half of a 100x50 mask at downsample 10 (a 1000x500 slide).
        let mask = GrayImage::from_fn(100, 50, |x, _| image::Luma([if x < 50 { 255 } else { 0 }]));
        let m = TissueMask::new(mask, 10.0, 0);
        let ps = lay_grid(&m, 1000, 500, 100, 100, 0.5);
        assert_eq!(ps.len(), 5 * 5);
        assert!(ps.iter().all(|p| p.x < 500 && p.tissue == 1.0));
        // Overlapping grid with step 50: patches straddling the edge have 50% tissue.
        let ps = lay_grid(&m, 1000, 500, 100, 50, 0.5);
        assert!(ps.iter().any(|p| p.x == 450 && (p.tissue - 0.5).abs() < 1e-6));
        assert!(lay_grid(&m, 1000, 500, 2000, 2000, 0.0).is_empty());
    }
}
