//! Tissue detection as CLAM does it (Lu et al. 2021, `WholeSlideImage.segmentTissue`), on a raster
//! instead of OpenCV contours:
//!
//! 1. HSV saturation of a low-resolution image of the slide (tissue is coloured, glass is grey);
//! 2. median blur (removes dust and pen speckle);
//! 3. threshold: Otsu's, or a fixed value (CLAM's presets use 8);
//! 4. morphological close with a square kernel (bridges small gaps);
//! 5. connected tissue regions smaller than the tissue area threshold are dropped, and holes
//!    smaller than the hole area threshold are filled (both areas in level-0 pixels²).

use image::{GrayImage, RgbImage};
use wsimil_common::grid::TissueParams;

/// The detected tissue, at `downsample` relative to level 0.
#[derive(Debug, Clone)]
pub struct TissueMask {
    pub mask: GrayImage,
    pub downsample: f64,
    pub threshold: u8,
    integral: Vec<u64>,
}

impl TissueMask {
    pub fn new(mask: GrayImage, downsample: f64, threshold: u8) -> Self {
        let integral = integral_image(&mask);
        TissueMask { mask, downsample, threshold, integral }
    }

    /// Fraction of the level-0 square `(x, y, size, size)` covered by tissue.
    pub fn fraction(&self, x: i64, y: i64, size: u64) -> f32 {
        self.fraction_rect(x, y, size, size)
    }

    /// Fraction of the level-0 rectangle `(x, y, w, h)` covered by tissue.
    pub fn fraction_rect(&self, x: i64, y: i64, rw: u64, rh: u64) -> f32 {
        let (w, h) = self.mask.dimensions();
        let to_mask = |v: f64, lim: u32| (v / self.downsample).round().clamp(0.0, lim as f64) as usize;
        let (x0, y0) = (to_mask(x as f64, w), to_mask(y as f64, h));
        let (x1, y1) = (to_mask((x as u64 + rw) as f64, w), to_mask((y as u64 + rh) as f64, h));
        if x1 <= x0 || y1 <= y0 {
            return 0.0;
        }
        let stride = w as usize + 1;
        let at = |x: usize, y: usize| self.integral[y * stride + x];
        let sum = at(x1, y1) + at(x0, y0) - at(x1, y0) - at(x0, y1);
        sum as f32 / ((x1 - x0) * (y1 - y0)) as f32
    }

    pub fn tissue_pixels(&self) -> usize {
        self.mask.pixels().filter(|p| p.0[0] > 0).count()
    }
}

/// Summed-area table of mask pixels that are set, (w+1)×(h+1).
fn integral_image(mask: &GrayImage) -> Vec<u64> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let mut s = vec![0u64; (w + 1) * (h + 1)];
    for y in 0..h {
        let mut row = 0u64;
        for x in 0..w {
            row += (mask.as_raw()[y * w + x] > 0) as u64;
            s[(y + 1) * (w + 1) + x + 1] = s[y * (w + 1) + x + 1] + row;
        }
    }
    s
}

/// HSV saturation (0–255) of each pixel, as OpenCV's `COLOR_RGB2HSV` for 8-bit images.
pub fn saturation(img: &RgbImage) -> GrayImage {
    let data = img
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0;
            let max = r.max(g).max(b);
            let min = r.min(g).min(b);
            if max == 0 {
                0
            } else {
                ((255.0 * (max - min) as f32 / max as f32) + 0.5) as u8
            }
        })
        .collect();
    GrayImage::from_raw(img.width(), img.height(), data).expect("sized")
}

/// Median filter with a `k × k` window (k odd), borders replicated: a sliding 256-bin histogram
/// per row, so the cost per pixel is O(k) rather than O(k²).
pub fn median_blur(img: &GrayImage, k: u32) -> GrayImage {
    let k = (k | 1) as i64;
    if k <= 1 {
        return img.clone();
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    let r = k / 2;
    let px = |x: i64, y: i64| img.as_raw()[(y.clamp(0, h - 1) * w + x.clamp(0, w - 1)) as usize];
    let half = (k * k / 2) as u32;
    let mut out = vec![0u8; (w * h) as usize];
    for y in 0..h {
        let mut hist = [0u32; 256];
        for dy in -r..=r {
            for dx in -r..=r {
                hist[px(dx, y + dy) as usize] += 1;
            }
        }
        for x in 0..w {
            if x > 0 {
                for dy in -r..=r {
                    hist[px(x - r - 1, y + dy) as usize] -= 1;
                    hist[px(x + r, y + dy) as usize] += 1;
                }
            }
            let mut acc = 0u32;
            let mut v = 0usize;
            while acc + hist[v] <= half {
                acc += hist[v];
                v += 1;
            }
            out[(y * w + x) as usize] = v as u8;
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out).expect("sized")
}

/// Otsu's threshold: the value maximising the between-class variance of the histogram. Pixels
/// strictly above it are foreground (OpenCV's `THRESH_BINARY`).
pub fn otsu_threshold(img: &GrayImage) -> u8 {
    let mut hist = [0u64; 256];
    for p in img.as_raw() {
        hist[*p as usize] += 1;
    }
    let total: u64 = hist.iter().sum();
    let sum_all: f64 = hist.iter().enumerate().map(|(i, c)| i as f64 * *c as f64).sum();
    let (mut w0, mut sum0, mut best, mut best_t) = (0u64, 0f64, -1f64, 0u8);
    for (t, &count) in hist.iter().enumerate() {
        w0 += count;
        sum0 += t as f64 * count as f64;
        let w1 = total - w0;
        if w0 == 0 || w1 == 0 {
            continue;
        }
        let m0 = sum0 / w0 as f64;
        let m1 = (sum_all - sum0) / w1 as f64;
        let between = w0 as f64 * w1 as f64 * (m0 - m1) * (m0 - m1);
        if between > best {
            best = between;
            best_t = t as u8;
        }
    }
    best_t
}

/// Max (dilate) or min (erode) over a `k × k` square, separably; outside the image counts as the
/// operation's neutral value (so borders neither grow nor shrink tissue).
fn morph(img: &GrayImage, k: u32, dilate: bool) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (before, after) = ((k as usize - 1) / 2, k as usize / 2);
    let pick = |a: u8, b: u8| if dilate { a.max(b) } else { a.min(b) };
    let neutral = if dilate { 0 } else { 255 };
    let mut tmp = vec![neutral; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut v = neutral;
            for xx in x.saturating_sub(after)..(x + before + 1).min(w) {
                v = pick(v, img.as_raw()[y * w + xx]);
            }
            tmp[y * w + x] = v;
        }
    }
    let mut out = vec![neutral; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut v = neutral;
            for yy in y.saturating_sub(after)..(y + before + 1).min(h) {
                v = pick(v, tmp[yy * w + x]);
            }
            out[y * w + x] = v;
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out).expect("sized")
}

/// Connected components of pixels where `fg(value)` holds; returns labels (0 = none) and sizes.
pub(crate) fn components(img: &GrayImage, fg: impl Fn(u8) -> bool, eight: bool) -> (Vec<u32>, Vec<usize>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut labels = vec![0u32; w * h];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..w * h {
        if labels[start] != 0 || !fg(img.as_raw()[start]) {
            continue;
        }
        let id = sizes.len() as u32;
        sizes.push(0);
        labels[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[id as usize] += 1;
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    if (dx == 0 && dy == 0) || (!eight && dx != 0 && dy != 0) {
                        continue;
                    }
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if labels[j] == 0 && fg(img.as_raw()[j]) {
                        labels[j] = id;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, sizes)
}

/// Otsu's threshold is never taken below this: on a slide of bare glass the saturation histogram
/// is all JPEG noise, and Otsu would split the noise and call half the glass tissue. CLAM's presets
/// use this value as their fixed threshold.
pub const OTSU_FLOOR: u8 = 8;

/// Run the whole recipe on `img`, an image of the slide at `downsample` from level 0.
pub fn detect(img: &RgbImage, downsample: f64, params: &TissueParams) -> TissueMask {
    let sat = median_blur(&saturation(img), params.median_kernel);
    let threshold = params.threshold.unwrap_or_else(|| otsu_threshold(&sat).max(OTSU_FLOOR));
    let (w, h) = sat.dimensions();
    let binary = GrayImage::from_raw(w, h, sat.as_raw().iter().map(|v| if *v > threshold { 255 } else { 0 }).collect())
        .expect("sized");
    let closed = if params.close_kernel > 1 {
        morph(&morph(&binary, params.close_kernel, true), params.close_kernel, false)
    } else {
        binary
    };
    let px_area = downsample * downsample;
    // Drop small tissue regions (8-connected, like contours).
    let (labels, sizes) = components(&closed, |v| v > 0, true);
    let keep: Vec<bool> = sizes.iter().map(|s| *s as f64 * px_area >= params.min_tissue_area).collect();
    let mut mask: Vec<u8> = labels.iter().map(|l| if *l > 0 && keep[*l as usize] { 255 } else { 0 }).collect();
    // Fill holes (background regions not touching the border) smaller than the hole threshold.
    let tissue = GrayImage::from_raw(w, h, mask.clone()).expect("sized");
    let (bg_labels, bg_sizes) = components(&tissue, |v| v == 0, false);
    let mut touches_border = vec![false; bg_sizes.len()];
    for (i, l) in bg_labels.iter().enumerate() {
        let (x, y) = (i as u32 % w, i as u32 / w);
        if *l > 0 && (x == 0 || y == 0 || x == w - 1 || y == h - 1) {
            touches_border[*l as usize] = true;
        }
    }
    for (i, l) in bg_labels.iter().enumerate() {
        let l = *l as usize;
        if l > 0 && !touches_border[l] && (bg_sizes[l] as f64 * px_area) < params.min_hole_area {
            mask[i] = 255;
        }
    }
    TissueMask::new(GrayImage::from_raw(w, h, mask).expect("sized"), downsample, threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(min_tissue_area: f64, min_hole_area: f64) -> TissueParams {
        TissueParams {
            median_kernel: 3,
            threshold: None,
            close_kernel: 3,
            min_tissue_area,
            min_hole_area,
            detect_max_side: 1024,
        }
    }

    #[test]
    fn saturation_of_grey_is_zero_and_of_pure_colour_is_full() {
        let img = RgbImage::from_raw(3, 1, vec![128, 128, 128, 255, 0, 0, 200, 100, 100]).unwrap();
        assert_eq!(saturation(&img).as_raw(), &vec![0, 255, 128]);
    }

    #[test]
    fn otsu_separates_two_populations() {
        let mut v = vec![20u8; 500];
        v.extend(vec![200u8; 500]);
        let t = otsu_threshold(&GrayImage::from_raw(1000, 1, v).unwrap());
        assert!((20..200).contains(&t), "{t}");
    }

    #[test]
    fn bare_glass_has_no_tissue_even_with_otsu() {
        // Saturation noise 0-4 around grey glass, as JPEG leaves it.
        let img = RgbImage::from_fn(64, 64, |x, y| {
            let n = ((x * 7 + y * 13) % 5) as u8;
            image::Rgb([240, 240, 240 - n])
        });
        let p = TissueParams { threshold: None, ..params(0.0, 0.0) };
        let m = detect(&img, 1.0, &p);
        assert_eq!(m.tissue_pixels(), 0);
        assert_eq!(m.threshold, OTSU_FLOOR);
    }

    #[test]
    fn median_removes_isolated_specks() {
        let mut img = GrayImage::new(9, 9);
        img.put_pixel(4, 4, image::Luma([255]));
        assert!(median_blur(&img, 3).as_raw().iter().all(|v| *v == 0));
    }

    /// A pink disc with a small grey hole and a tiny separate pink speck, on grey glass.
    fn synthetic() -> RgbImage {
        RgbImage::from_fn(100, 100, |x, y| {
            let d = ((x as f64 - 50.0).powi(2) + (y as f64 - 50.0).powi(2)).sqrt();
            let in_hole = (x as f64 - 50.0).abs() < 3.0 && (y as f64 - 50.0).abs() < 3.0;
            let speck = (90..93).contains(&x) && (5..8).contains(&y);
            if (d < 30.0 && !in_hole) || speck {
                image::Rgb([220, 120, 180])
            } else {
                image::Rgb([235, 235, 235])
            }
        })
    }

    #[test]
    fn detects_tissue_drops_small_regions_and_fills_small_holes() {
        // Level-0 areas at downsample 2: the speck is ~9 px (36 level-0 px²), the hole ~25 px.
        let m = detect(&synthetic(), 2.0, &params(200.0, 400.0));
        assert_eq!(m.mask.get_pixel(50, 30).0[0], 255, "disc is tissue");
        assert_eq!(m.mask.get_pixel(5, 5).0[0], 0, "glass is not");
        assert_eq!(m.mask.get_pixel(91, 6).0[0], 0, "speck dropped");
        assert_eq!(m.mask.get_pixel(50, 50).0[0], 255, "small hole filled");
        let disc = std::f64::consts::PI * 30.0 * 30.0;
        assert!((m.tissue_pixels() as f64 - disc).abs() / disc < 0.05);
        // Keeping holes: a tiny hole threshold leaves it open.
        let keep_holes = detect(&synthetic(), 2.0, &params(200.0, 1.0));
        assert_eq!(keep_holes.mask.get_pixel(50, 50).0[0], 0);
    }

    #[test]
    fn patch_fraction_uses_level0_coordinates() {
        let m = detect(&synthetic(), 2.0, &params(0.0, 0.0));
        // Level-0 (80,80)..(120,120) is mask (40,40)..(60,60): inside the disc but around the hole.
        let f = m.fraction(80, 80, 40);
        assert!(f > 0.85 && f < 1.0, "{f}");
        assert_eq!(m.fraction(0, 0, 20), 0.0);
        assert_eq!(m.fraction(10_000, 10_000, 20), 0.0);
    }
}
