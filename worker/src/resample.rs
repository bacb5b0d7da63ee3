//! Image resampling with a triangle filter widened by the scale factor (antialiased bilinear, as
//! PIL's `BILINEAR` resize): downscaling averages every source pixel instead of skipping some.

use image::{GrayImage, RgbImage};

/// For each output index, the first source index and its normalised weights.
fn filter_taps(src: usize, dst: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = src as f64 / dst as f64;
    let support = scale.max(1.0);
    (0..dst)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = ((center + support).ceil() as usize).min(src);
            let mut w: Vec<f32> = (lo..hi)
                .map(|j| {
                    let d = ((j as f64 + 0.5 - center) / support).abs();
                    (1.0 - d).max(0.0) as f32
                })
                .collect();
            let sum: f32 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|x| *x /= sum);
            } else {
                // Degenerate (tiny source): nearest pixel.
                w = vec![0.0; hi - lo];
                let nearest = (center.floor() as usize).clamp(lo, hi - 1);
                w[nearest - lo] = 1.0;
            }
            (lo, w)
        })
        .collect()
}

/// Resize interleaved `channels`-per-pixel bytes from `sw × sh` to `dw × dh`.
fn resize_raw(src: &[u8], channels: usize, (sw, sh): (u32, u32), (dw, dh): (u32, u32)) -> Vec<u8> {
    let (sw, sh, dw, dh) = (sw as usize, sh as usize, dw as usize, dh as usize);
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let xt = filter_taps(sw, dw);
    let yt = filter_taps(sh, dh);
    // Horizontal pass into f32 rows, then vertical pass.
    let mut tmp = vec![0f32; sh * dw * channels];
    for y in 0..sh {
        let row = &src[y * sw * channels..(y + 1) * sw * channels];
        let out = &mut tmp[y * dw * channels..(y + 1) * dw * channels];
        for (x, (lo, w)) in xt.iter().enumerate() {
            for c in 0..channels {
                let mut acc = 0f32;
                for (k, wk) in w.iter().enumerate() {
                    acc += wk * row[(lo + k) * channels + c] as f32;
                }
                out[x * channels + c] = acc;
            }
        }
    }
    let mut dst = vec![0u8; dh * dw * channels];
    for (y, (lo, w)) in yt.iter().enumerate() {
        let out = &mut dst[y * dw * channels..(y + 1) * dw * channels];
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (k, wk) in w.iter().enumerate() {
                acc += wk * tmp[(lo + k) * dw * channels + i];
            }
            *o = acc.round().clamp(0.0, 255.0) as u8;
        }
    }
    dst
}

pub fn resize_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    RgbImage::from_raw(w, h, resize_raw(img.as_raw(), 3, img.dimensions(), (w, h))).expect("sized")
}

pub fn resize_gray(img: &GrayImage, w: u32, h: u32) -> GrayImage {
    GrayImage::from_raw(w, h, resize_raw(img.as_raw(), 1, img.dimensions(), (w, h))).expect("sized")
}

/// Scale `(w, h)` so that the longer side is at most `max_side`, keeping the aspect ratio.
pub fn fit_within(w: u32, h: u32, max_side: u32) -> (u32, u32) {
    let long = w.max(h);
    if long <= max_side {
        return (w, h);
    }
    let s = max_side as f64 / long as f64;
    (((w as f64 * s).round() as u32).max(1), ((h as f64 * s).round() as u32).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant_at_any_scale() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 200, 77]));
        for (w, h) in [(224, 224), (5, 3), (37, 23), (80, 11)] {
            let r = resize_rgb(&img, w, h);
            assert_eq!(r.dimensions(), (w, h));
            assert!(r.pixels().all(|p| p.0 == [10, 200, 77]), "{w}x{h}");
        }
    }

    #[test]
    fn halving_weights_neighbours_by_a_widened_triangle() {
        // Output 0 is centred at source 1.0: taps 0, 1, 2 at distances 0.5, 0.5, 1.5 of a triangle
        // of half-width 2 weigh 0.75, 0.75, 0.25 (normalised by 1.75), as PIL's bilinear.
        let img = GrayImage::from_raw(4, 1, vec![0, 100, 200, 50]).unwrap();
        let r = resize_gray(&img, 2, 1);
        let o0: f64 = (0.75 * 0.0 + 0.75 * 100.0 + 0.25 * 200.0) / 1.75;
        let o1: f64 = (0.25 * 100.0 + 0.75 * 200.0 + 0.75 * 50.0) / 1.75;
        assert_eq!(r.as_raw(), &vec![o0.round() as u8, o1.round() as u8]);
    }

    #[test]
    fn fit_within_keeps_aspect() {
        assert_eq!(fit_within(4000, 2000, 1000), (1000, 500));
        assert_eq!(fit_within(10, 20, 1000), (10, 20));
    }
}
