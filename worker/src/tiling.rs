//! The tile stage: find tissue at low resolution and lay the patch grid at the target resolution.
//!
//! Sizes are physical: a patch is `patch_px` pixels at `target_mpp` µm/px, i.e.
//! `patch_px · target_mpp / mpp` level-0 pixels, so a 40x and a 20x scan of the same tissue give the
//! same patches.

use crate::resample::{fit_within, resize_rgb};
use crate::slide::{CorruptTiles, SlideError, SlideReader};
use crate::tissue::{self, TissueMask};
use image::{GrayImage, RgbImage};
use wsimil_common::grid::{Patch, PatchGrid, TilingProvenance};
use wsimil_common::plan::TilingSpec;

/// Largest side of the stored thumbnail.
const THUMB_MAX_SIDE: u32 = 1024;

/// Everything the tile stage produces for one slide.
pub struct Tiled {
    pub grid: PatchGrid,
    /// The first corrupt tile met while reading the overview, if any (for error messages).
    pub first_corrupt: Option<String>,
    pub thumbnail: RgbImage,
    pub mask: GrayImage,
    /// Tissue regions traced from the mask (mask pixels; × `detect_downsample` for level 0).
    pub contours: Vec<crate::contours::Polygon>,
}

/// Level-0 microns per pixel: the manifest's value wins, else the slide's, else an error.
pub fn resolve_mpp(slide: &dyn SlideReader, manifest_mpp: Option<f64>) -> Result<(f64, &'static str), SlideError> {
    if let Some(m) = manifest_mpp {
        return Ok((m, "manifest"));
    }
    slide.mpp().map(|m| (m, "slide")).ok_or_else(|| SlideError::NoMpp { path: slide.path().to_path_buf() })
}

/// Most pixels of a level read in one piece for the overview; larger levels are reduced strip by
/// strip, so memory stays bounded whatever the slide's size.
const OVERVIEW_READ_LIMIT: u64 = 64 << 20;

/// The whole slide at about `max_side` pixels on its longer side, and its downsample from level 0.
///
/// Reads the smallest level whose longer side is still at least `max_side / 2` (CLAM detects on a
/// level near 64x; decoding a bigger one only costs time), resized to fit `max_side`. A level over
/// [`OVERVIEW_READ_LIMIT`] pixels is box-reduced in horizontal strips instead of read whole.
/// Corrupt tiles in the level read count as background and are counted (the third value).
pub fn read_overview(slide: &dyn SlideReader, max_side: u32) -> Result<(RgbImage, f64, CorruptTiles), SlideError> {
    let (w0, _) = slide.level_dimensions(0);
    let long = |l: usize| {
        let (w, h) = slide.level_dimensions(l);
        w.max(h)
    };
    let level = (0..slide.level_count())
        .filter(|&l| long(l) >= (max_side / 2) as u64)
        .min_by_key(|&l| long(l))
        .unwrap_or_else(|| (0..slide.level_count()).max_by_key(|&l| long(l)).unwrap_or(0));
    let (lw, lh) = slide.level_dimensions(level);
    let mut corrupt = CorruptTiles::default();
    let img = if lw * lh <= OVERVIEW_READ_LIMIT {
        let (img, c) = slide.read_region_tolerant(0, 0, level, lw as u32, lh as u32)?;
        corrupt.add(c);
        let (tw, th) = fit_within(lw as u32, lh as u32, max_side);
        if (tw, th) != (lw as u32, lh as u32) {
            resize_rgb(&img, tw, th)
        } else {
            img
        }
    } else {
        reduce_in_strips(slide, level, max_side, &mut corrupt)?
    };
    let ds = w0 as f64 / img.width() as f64;
    Ok((img, ds, corrupt))
}

/// Box-reduce a level by the integer factor that brings its longer side within `max_side`,
/// reading `factor` rows of level pixels at a time.
fn reduce_in_strips(
    slide: &dyn SlideReader,
    level: usize,
    max_side: u32,
    corrupt: &mut CorruptTiles,
) -> Result<RgbImage, SlideError> {
    let (lw, lh) = slide.level_dimensions(level);
    let f = lw.max(lh).div_ceil(max_side as u64).max(1);
    let (ow, oh) = ((lw / f).max(1) as u32, (lh / f).max(1) as u32);
    let ds = slide.level_downsample(level);
    let mut out = RgbImage::new(ow, oh);
    // Wide strips are read in column blocks too, so no read exceeds ~32 M pixels.
    let block_cols = ((32u64 << 20) / f).max(f) / f * f;
    for oy in 0..oh {
        let mut sums = vec![0u64; ow as usize * 3];
        let mut x = 0u64;
        while x < ow as u64 * f {
            let bw = block_cols.min(ow as u64 * f - x);
            let (strip, c) = slide.read_region_tolerant(
                (x as f64 * ds) as i64,
                ((oy as u64 * f) as f64 * ds) as i64,
                level,
                bw as u32,
                f as u32,
            )?;
            corrupt.add(c);
            for (i, p) in strip.pixels().enumerate() {
                let ox = (x + (i as u64 % bw)) / f;
                for c in 0..3 {
                    sums[ox as usize * 3 + c] += p.0[c] as u64;
                }
            }
            x += bw;
        }
        for ox in 0..ow {
            let n = f * f;
            let px = [0, 1, 2].map(|c| (sums[ox as usize * 3 + c] / n) as u8);
            out.put_pixel(ox, oy, image::Rgb(px));
        }
    }
    Ok(out)
}

/// Tile one slide.
pub fn tile_slide(
    slide: &dyn SlideReader,
    slide_id: &str,
    spec: &TilingSpec,
    manifest_mpp: Option<f64>,
) -> Result<Tiled, SlideError> {
    let (mpp, mpp_source) = resolve_mpp(slide, manifest_mpp)?;
    let (overview, ds, corrupt) = read_overview(slide, spec.tissue.detect_max_side)?;
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
        corrupt_tiles: corrupt.count,
        patches: patches.len(),
    };
    let contours = crate::contours::trace(&mask.mask);
    Ok(Tiled {
        grid: PatchGrid { patches, provenance },
        first_corrupt: corrupt.first,
        thumbnail,
        mask: mask.mask,
        contours,
    })
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
