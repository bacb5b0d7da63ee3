//! The semi-synthetic demo cohort: real tissue, a known answer.
//!
//! Each slide is a crop of a real Aperio H&E scan (OpenSlide's CMU-1-Small-Region), flipped or
//! rotated and stain-jittered; positive slides carry one to three irregular regions of a real H&E
//! tumour image (TIAToolbox's sample), blended in with feathered edges. Slides are written as
//! pyramidal Aperio-style TIFFs that OpenSlide opens, with a tumour mask (downsample
//! [`TRUTH_DOWNSAMPLE`]) per slide so heatmaps can be checked against patch-level truth.

use crate::resample::resize_rgb;
use crate::tiff::{write_slide, TiffError, TiffOptions};
use crate::tissue;
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use wsimil_common::grid::TissueParams;
use wsimil_common::rng::Rng;

/// Downsample of the stored tumour masks relative to level 0.
pub const TRUTH_DOWNSAMPLE: u32 = 8;

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub slides: usize,
    pub seed: u64,
    /// Level-0 size of every slide (must fit in the source scan).
    pub width: u32,
    pub height: u32,
    /// Range of tumour region radii, level-0 pixels.
    pub radius: (f64, f64),
    /// Most regions planted in a positive slide.
    pub max_regions: usize,
    pub tiff: TiffOptions,
    /// Slide ids are this and a number (`demo-000`): another prefix keeps a second cohort's ids
    /// apart from the first's in one store.
    pub id_prefix: String,
    /// How opaque the planted tumour is (1 = the tumour image replaces the tissue, lower blends it
    /// into the normal tissue beneath: fainter lesions, a harder task).
    pub opacity: f64,
    /// Staining sites: slide i comes from site i mod `sites`, and each site shifts every slide's
    /// stain by its own per-channel gain (±`site_shift`), as scanners and labs differ. 1: one site.
    pub sites: usize,
    pub site_shift: f64,
    /// Write each slide's site (`site-<i>`) to the manifest's `site` column, which stratifies the
    /// folds by site (`wsimil run`). Off by default: a cohort made before keeps its manifest and
    /// hence its folds.
    pub site_column: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            slides: 32,
            seed: 0,
            width: 2048,
            height: 2816,
            radius: (140.0, 300.0),
            max_regions: 3,
            tiff: TiffOptions::default(),
            id_prefix: "demo-".into(),
            opacity: 1.0,
            sites: 1,
            site_shift: 0.25,
            site_column: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Region {
    pub cx: f64,
    pub cy: f64,
    pub radius: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthSlide {
    pub slide_id: String,
    pub path: PathBuf,
    pub label: String,
    pub regions: Vec<Region>,
    /// Fraction of the slide's tissue covered by planted tumour.
    pub tumour_fraction: f64,
    /// Tumour mask at [`TRUTH_DOWNSAMPLE`], relative to the cohort folder.
    pub truth_mask: Option<PathBuf>,
    /// The staining site it comes from (slide i: site i mod [`SynthOptions::sites`]).
    #[serde(default)]
    pub site: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("source scan is {0}x{1}, smaller than the requested slide {2}x{3}")]
    SourceTooSmall(u32, u32, u32, u32),
    #[error(transparent)]
    Tiff(#[from] TiffError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Image(#[from] image::ImageError),
}

/// One of the 8 flips/rotations of a square's symmetry group.
fn dihedral(img: &RgbImage, k: usize) -> RgbImage {
    let r = match k % 4 {
        0 => img.clone(),
        1 => image::imageops::rotate90(img),
        2 => image::imageops::rotate180(img),
        _ => image::imageops::rotate270(img),
    };
    if k >= 4 {
        image::imageops::flip_horizontal(&r)
    } else {
        r
    }
}

/// Stain-like jitter: scale each channel's darkness (255 − v) so glass stays white.
fn jitter(img: &mut RgbImage, gains: [f64; 3]) {
    for p in img.pixels_mut() {
        for (v, g) in p.0.iter_mut().zip(gains) {
            let dark = (255.0 - *v as f64) * g;
            *v = (255.0 - dark).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// Radius of an irregular region at angle θ.
fn boundary(r0: f64, phases: &[f64; 4], theta: f64) -> f64 {
    r0 * (1.0
        + 0.22 * (3.0 * theta + phases[0]).sin()
        + 0.12 * (5.0 * theta + phases[1]).sin()
        + 0.06 * (9.0 * theta + phases[2]).sin())
}

/// Plant one tumour region, `opacity` times its blending weight; its coverage (before opacity) is
/// added to `cover` (same size as `canvas`).
fn plant(canvas: &mut RgbImage, cover: &mut [f32], tumour: &RgbImage, region: &Region, opacity: f32, rng: &mut Rng) {
    let phases = [rng.range(0.0, 6.3), rng.range(0.0, 6.3), rng.range(0.0, 6.3), 0.0];
    let reach = region.radius * 1.45;
    let side = (2.0 * reach).ceil() as u32;
    let tex = dihedral(tumour, rng.below(8));
    let scale = rng.range(0.9, 1.15);
    let tex = resize_rgb(&tex, (tex.width() as f64 * scale) as u32, (tex.height() as f64 * scale) as u32);
    let (ox, oy) = (
        rng.below((tex.width() - side.min(tex.width()) + 1) as usize) as u32,
        rng.below((tex.height() - side.min(tex.height()) + 1) as usize) as u32,
    );
    let (w, h) = canvas.dimensions();
    let feather = 14.0;
    let x0 = (region.cx - reach).max(0.0) as u32;
    let y0 = (region.cy - reach).max(0.0) as u32;
    let x1 = ((region.cx + reach) as u32).min(w);
    let y1 = ((region.cy + reach) as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let (dx, dy) = (x as f64 - region.cx, y as f64 - region.cy);
            let d = (dx * dx + dy * dy).sqrt();
            let edge = boundary(region.radius, &phases, dy.atan2(dx));
            let a = ((edge - d) / feather + 0.5).clamp(0.0, 1.0) as f32;
            if a <= 0.0 {
                continue;
            }
            let tx = (ox + (x - x0)).min(tex.width() - 1);
            let ty = (oy + (y - y0)).min(tex.height() - 1);
            let t = tex.get_pixel(tx, ty).0;
            let p = canvas.get_pixel_mut(x, y);
            let blend = a * opacity;
            for (v, tv) in p.0.iter_mut().zip(t) {
                *v = (blend * tv as f32 + (1.0 - blend) * *v as f32).round() as u8;
            }
            let i = (y * w + x) as usize;
            cover[i] = cover[i].max(a);
        }
    }
}

/// Build the cohort into `out`: `slides/<id>.svs`, `truth/<id>.tumour.png`, `manifest.csv`,
/// `truth.json`. Half the slides (rounded down) are positive.
pub fn build_cohort(
    source: &RgbImage,
    tumour: &RgbImage,
    out: &Path,
    opt: &SynthOptions,
) -> Result<Vec<SynthSlide>, SynthError> {
    let (sw, sh) = source.dimensions();
    let fits = |w: u32, h: u32| w <= sw && h <= sh;
    if !fits(opt.width, opt.height) && !fits(opt.height, opt.width) {
        return Err(SynthError::SourceTooSmall(sw, sh, opt.width, opt.height));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    for d in ["slides", "truth"] {
        std::fs::create_dir_all(out.join(d)).map_err(io(&out.join(d)))?;
    }
    let mut rng = Rng::new(opt.seed);
    let detect = TissueParams { threshold: None, min_tissue_area: 0.0, min_hole_area: 0.0, ..TissueParams::biopsy() };
    let small_src = resize_rgb(source, sw / TRUTH_DOWNSAMPLE, sh / TRUTH_DOWNSAMPLE);
    let source_tissue = tissue::detect(&small_src, TRUTH_DOWNSAMPLE as f64, &detect);
    let mut labels: Vec<bool> = (0..opt.slides).map(|i| i % 2 == 1).collect();
    rng.shuffle(&mut labels);
    // Each site's stain, drawn once: its slides share it (and keep their own small jitter).
    // (Drawn from a generator of their own, so that one site leaves the cohort as it always was.)
    let site_gains: Vec<[f64; 3]> = if opt.sites <= 1 {
        vec![[1.0; 3]]
    } else {
        let mut srng = Rng::new(opt.seed ^ 0x5173_5eed);
        let s = opt.site_shift;
        (0..opt.sites).map(|_| [0; 3].map(|_| srng.range(1.0 - s, 1.0 + s))).collect()
    };
    let mut slides = Vec::new();
    for (i, positive) in labels.into_iter().enumerate() {
        let mut srng = rng.fork(i as u64);
        let id = format!("{}{i:03}", opt.id_prefix);
        // A transform whose output has the requested orientation.
        let k = loop {
            let k = srng.below(8);
            let (w, h) = if k % 2 == 1 { (opt.height, opt.width) } else { (opt.width, opt.height) };
            if fits(w, h) {
                break k;
            }
        };
        let (cw, ch) = if k % 2 == 1 { (opt.height, opt.width) } else { (opt.width, opt.height) };
        // A crop that holds tissue: at least a fifth of its area, best of a few tries.
        let mut best: Option<(f64, u32, u32)> = None;
        for _ in 0..12 {
            let (ox, oy) = (srng.below((sw - cw + 1) as usize) as u32, srng.below((sh - ch + 1) as usize) as u32);
            let f = source_tissue.fraction_rect(ox as i64, oy as i64, cw as u64, ch as u64) as f64;
            if best.is_none_or(|(b, _, _)| f > b) {
                best = Some((f, ox, oy));
            }
            if f >= 0.2 {
                break;
            }
        }
        let (_, ox, oy) = best.expect("at least one try");
        let crop = image::imageops::crop_imm(source, ox, oy, cw, ch).to_image();
        let mut canvas = dihedral(&crop, k);
        let (w, h) = canvas.dimensions();
        let mut cover = vec![0f32; (w * h) as usize];
        let mut regions = Vec::new();
        if positive {
            // Tissue of the canvas, to put tumour where tissue is.
            let small = resize_rgb(&canvas, w / TRUTH_DOWNSAMPLE, h / TRUTH_DOWNSAMPLE);
            let mask = tissue::detect(&small, TRUTH_DOWNSAMPLE as f64, &detect);
            let n = 1 + srng.below(opt.max_regions);
            for _ in 0..n {
                let r0 = srng.range(opt.radius.0, opt.radius.1);
                for _attempt in 0..200 {
                    let cx = srng.range(r0, w as f64 - r0);
                    let cy = srng.range(r0, h as f64 - r0);
                    let side = (2.0 * r0) as u64;
                    let f = mask.fraction((cx - r0) as i64, (cy - r0) as i64, side);
                    let overlaps = regions
                        .iter()
                        .any(|g: &Region| ((g.cx - cx).powi(2) + (g.cy - cy).powi(2)).sqrt() < g.radius + r0);
                    if f > 0.75 && !overlaps {
                        let region = Region { cx, cy, radius: r0 };
                        plant(&mut canvas, &mut cover, tumour, &region, opt.opacity as f32, &mut srng);
                        regions.push(region);
                        break;
                    }
                }
            }
        }
        let site = site_gains[i % site_gains.len()];
        let gains = [0, 1, 2].map(|c| site[c] * srng.range(0.9, 1.1));
        jitter(&mut canvas, gains);
        let bytes = write_slide(&canvas, &id, &opt.tiff)?;
        let path = out.join("slides").join(format!("{id}.svs"));
        std::fs::write(&path, bytes).map_err(io(&path))?;
        // Truth: tumour mask and its share of the tissue.
        let small = resize_rgb(&canvas, w / TRUTH_DOWNSAMPLE, h / TRUTH_DOWNSAMPLE);
        let tissue_mask = tissue::detect(&small, TRUTH_DOWNSAMPLE as f64, &detect);
        let truth = GrayImage::from_fn(w / TRUTH_DOWNSAMPLE, h / TRUTH_DOWNSAMPLE, |x, y| {
            let (cx, cy) = (x * TRUTH_DOWNSAMPLE + TRUTH_DOWNSAMPLE / 2, y * TRUTH_DOWNSAMPLE + TRUTH_DOWNSAMPLE / 2);
            image::Luma([if cover[(cy.min(h - 1) * w + cx.min(w - 1)) as usize] > 0.5 { 255 } else { 0 }])
        });
        let tumour_px = truth.pixels().filter(|p| p.0[0] > 0).count() as f64;
        let tissue_px = tissue_mask.tissue_pixels().max(1) as f64;
        let truth_rel = PathBuf::from("truth").join(format!("{id}.tumour.png"));
        truth.save(out.join(&truth_rel))?;
        slides.push(SynthSlide {
            slide_id: id,
            path: path.canonicalize().unwrap_or(path),
            label: if positive { "tumor" } else { "normal" }.into(),
            regions,
            tumour_fraction: tumour_px / tissue_px,
            truth_mask: Some(truth_rel),
            site: i % site_gains.len(),
        });
    }
    // The truth masks go in the manifest too: runs report how well they find the planted lesions.
    let mut csv =
        String::from(if opt.site_column { "slide_id,path,label,truth,site\n" } else { "slide_id,path,label,truth\n" });
    for s in &slides {
        let truth = s.truth_mask.as_ref().map(|m| out.join(m)).map(|m| m.canonicalize().unwrap_or(m));
        let truth = truth.map(|t| t.display().to_string()).unwrap_or_default();
        csv.push_str(&format!("{},{},{},{truth}", s.slide_id, s.path.display(), s.label));
        csv.push_str(&if opt.site_column { format!(",site-{}\n", s.site) } else { "\n".into() });
    }
    let manifest = out.join("manifest.csv");
    std::fs::write(&manifest, csv).map_err(io(&manifest))?;
    let truth = out.join("truth.json");
    std::fs::write(&truth, serde_json::to_vec_pretty(&slides).expect("json")).map_err(io(&truth))?;
    Ok(slides)
}

/// Read a whole slide's level 0 (small slides only: the demo's source scan).
pub fn read_level0(slide: &dyn crate::slide::SlideReader) -> Result<RgbImage, crate::slide::SlideError> {
    let (w, h) = slide.level_dimensions(0);
    slide.read_region(0, 0, 0, w as u32, h as u32)
}

/// The fraction of each patch (level-0 top-left, side `patch`) covered by a demo truth mask (at
/// [`TRUTH_DOWNSAMPLE`]): [`wsimil_common::truth::Truth::coverage`].
pub fn patch_truth(mask: &GrayImage, xs: &[i64], ys: &[i64], patch: u64) -> Vec<f32> {
    let truth = wsimil_common::truth::Truth { mask: mask.clone(), downsample: TRUTH_DOWNSAMPLE as f64 };
    truth.coverage(xs, ys, patch)
}

/// A `width × height` image tiled with flipped and rotated copies of `source` (real tissue at any
/// size).
pub fn mosaic(source: &RgbImage, width: u32, height: u32) -> RgbImage {
    let variants: Vec<RgbImage> = (0..4)
        .map(|k| match k {
            0 => source.clone(),
            1 => image::imageops::flip_horizontal(source),
            2 => image::imageops::flip_vertical(source),
            _ => image::imageops::rotate180(source),
        })
        .collect();
    let (sw, sh) = source.dimensions();
    RgbImage::from_fn(width, height, |x, y| {
        let (i, j) = (x / sw, y / sh);
        *variants[((i + 2 * j) % 4) as usize].get_pixel(x % sw, y % sh)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dihedral_transforms_are_distinct_and_invertible_in_size() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let outs: Vec<RgbImage> = (0..8).map(|k| dihedral(&img, k)).collect();
        for (k, o) in outs.iter().enumerate() {
            let expect = if k % 2 == 1 { (2, 3) } else { (3, 2) };
            assert_eq!(o.dimensions(), expect, "k={k}");
        }
        for i in 0..8 {
            for j in i + 1..8 {
                assert!(outs[i] != outs[j], "{i} vs {j}");
            }
        }
    }

    #[test]
    fn jitter_keeps_glass_white_and_darkens_stain() {
        let mut img = RgbImage::from_raw(2, 1, vec![255, 255, 255, 155, 155, 155]).unwrap();
        jitter(&mut img, [1.1, 1.0, 0.9]);
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(1, 0).0, [145, 155, 165]);
    }

    #[test]
    fn patch_truth_measures_mask_coverage() {
        let mask = GrayImage::from_fn(10, 10, |x, _| image::Luma([if x < 5 { 255 } else { 0 }]));
        // Patches of 32 level-0 px are 4 mask pixels; the third covers mask columns 2..6, 3 of them set.
        let t = patch_truth(&mask, &[0, 40, 16], &[0, 0, 0], 32);
        assert_eq!(t, vec![1.0, 0.0, 0.75]);
    }
}
