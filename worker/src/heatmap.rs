//! Attention heatmaps: each patch's attention, turned into a percentile (as CLAM does, so one
//! outlier does not wash out the map), coloured and blended over the slide's thumbnail.

use image::{Rgb, RgbImage};

/// A perceptually ordered blue → cyan → yellow → red ramp for t in [0, 1].
pub fn colour(t: f32) -> [u8; 3] {
    let stops: [(f32, [f32; 3]); 5] = [
        (0.0, [48.0, 18.0, 160.0]),
        (0.35, [30.0, 150.0, 230.0]),
        (0.6, [120.0, 220.0, 90.0]),
        (0.8, [250.0, 200.0, 40.0]),
        (1.0, [220.0, 30.0, 30.0]),
    ];
    let t = t.clamp(0.0, 1.0);
    for w in stops.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if t <= t1 {
            let f = (t - t0) / (t1 - t0);
            return [0, 1, 2].map(|i| (c0[i] + f * (c1[i] - c0[i])).round() as u8);
        }
    }
    [220, 30, 30]
}

/// Percentile rank of each score in [0, 1] (ties share the mean rank).
pub fn percentiles(scores: &[f32]) -> Vec<f32> {
    let n = scores.len();
    if n <= 1 {
        return vec![1.0; n];
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut out = vec![0f32; n];
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f32 / 2.0 / (n - 1) as f32;
        for k in i..=j {
            out[idx[k]] = r;
        }
        i = j + 1;
    }
    out
}

/// Draw each patch (level-0 top-left `xs, ys`, side `patch_level0`) over `thumb`, whose downsample
/// from level 0 is `level0_width / thumb.width()`.
pub fn render(
    thumb: &RgbImage,
    level0_width: u64,
    xs: &[i64],
    ys: &[i64],
    patch_level0: u64,
    scores: &[f32],
) -> RgbImage {
    let mut out = thumb.clone();
    let ds = level0_width as f64 / thumb.width() as f64;
    let pct = percentiles(scores);
    let alpha = 0.5f32;
    for ((x, y), p) in xs.iter().zip(ys).zip(pct) {
        let c = colour(p);
        let x0 = (*x as f64 / ds).floor() as u32;
        let y0 = (*y as f64 / ds).floor() as u32;
        let x1 = (((*x as u64 + patch_level0) as f64 / ds).ceil() as u32).min(out.width());
        let y1 = (((*y as u64 + patch_level0) as f64 / ds).ceil() as u32).min(out.height());
        for yy in y0..y1 {
            for xx in x0..x1 {
                let Rgb(px) = *out.get_pixel(xx, yy);
                let blended = [0, 1, 2].map(|i| ((1.0 - alpha) * px[i] as f32 + alpha * c[i] as f32).round() as u8);
                out.put_pixel(xx, yy, Rgb(blended));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_rank_scores() {
        assert_eq!(percentiles(&[0.3, 0.1, 0.2]), vec![1.0, 0.0, 0.5]);
        assert_eq!(percentiles(&[0.5, 0.5]), vec![0.5, 0.5]);
    }

    #[test]
    fn hot_patches_are_red_and_untouched_areas_keep_the_thumbnail() {
        let thumb = RgbImage::from_pixel(20, 10, Rgb([255, 255, 255]));
        // Level 0 is 200 px wide: downsample 10; two 50-px patches.
        let img = render(&thumb, 200, &[0, 100], &[0, 0], 50, &[0.1, 0.9]);
        let hot = img.get_pixel(12, 2).0;
        let cold = img.get_pixel(2, 2).0;
        assert!(hot[0] > hot[2], "hot patch is red: {hot:?}");
        assert!(cold[2] > cold[0], "cold patch is blue: {cold:?}");
        assert_eq!(img.get_pixel(19, 9).0, [255, 255, 255]);
    }
}
