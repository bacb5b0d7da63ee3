//! Image resampling with a triangle filter widened by the scale factor (antialiased bilinear, as
//! PIL's `BILINEAR` resize): downscaling averages every source pixel instead of skipping some.
//!
//! The convolution is fast_image_resize's (SSE4.1/AVX2 chosen at run time): resizing every patch
//! to the embedder's input is on the hot path of tiling, and a portable scalar loop cost more than
//! decoding the patch.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{GrayImage, RgbImage};
use std::cell::RefCell;

thread_local! {
    // A resizer keeps scratch buffers and the detected CPU features: one per thread.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Resize interleaved 8-bit pixels of `pixel` type from `sw × sh` to `dw × dh`.
fn resize_raw(src: &[u8], pixel: PixelType, (sw, sh): (u32, u32), (dw, dh): (u32, u32)) -> Vec<u8> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let from = ImageRef::new(sw, sh, src, pixel).expect("buffer matches its dimensions");
    let mut to = Image::new(dw, dh, pixel);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER.with(|r| r.borrow_mut().resize(&from, &mut to, &opts)).expect("same pixel types");
    to.into_vec()
}

pub fn resize_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    RgbImage::from_raw(w, h, resize_raw(img.as_raw(), PixelType::U8x3, img.dimensions(), (w, h))).expect("sized")
}

pub fn resize_gray(img: &GrayImage, w: u32, h: u32) -> GrayImage {
    GrayImage::from_raw(w, h, resize_raw(img.as_raw(), PixelType::U8, img.dimensions(), (w, h))).expect("sized")
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
    fn large_downscales_do_not_alias() {
        // A one-pixel checkerboard shrunk 4x is flat grey (point sampling would keep it black).
        let cb = GrayImage::from_fn(64, 64, |x, y| image::Luma([if (x + y) % 2 == 0 { 0 } else { 254 }]));
        let r = resize_gray(&cb, 16, 16);
        assert!(r.as_raw().iter().all(|v| (*v as i32 - 127).abs() <= 2), "{:?}", &r.as_raw()[..8]);
    }

    #[test]
    fn fit_within_keeps_aspect() {
        assert_eq!(fit_within(4000, 2000, 1000), (1000, 500));
        assert_eq!(fit_within(10, 20, 1000), (10, 20));
    }
}
