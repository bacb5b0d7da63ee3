//! The embed stage: read each patch of the grid from the best pyramid level, resize it to the
//! embedder's input, and run the embedder in batches on the worker's device.
//!
//! Decoding runs on a thread of its own (each batch's patches in parallel on rayon's pool), a
//! bounded channel ahead of the network; normalisation runs on the device, from the decoded bytes.
//! Everything here is off the tokio runtime: the job loop calls it from `spawn_blocking`.

use crate::resample::resize_rgb;
use crate::slide::{Region, SlideError, SlideReader};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use wsimil_common::features::Preprocessing;
use wsimil_common::grid::{Patch, PatchGrid};
use wsimil_common::models::embedder::Embedder;
use wsimil_common::plan::CorruptTiles;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Slide(#[from] SlideError),
    #[error("{slide}: embedder failed: {source}")]
    Model {
        slide: String,
        #[source]
        source: candle_core::Error,
    },
}

/// Read one patch as the embedder wants it: from the pyramid level closest above the target
/// resolution, resized to the input (or, when the preprocessing says, resized to `resize_px` and
/// its centre cropped to the input, as a publisher's `Resize` + `CenterCrop` does).
pub fn read_patch(
    slide: &dyn SlideReader,
    grid: &PatchGrid,
    p: &Patch,
    pre: &Preprocessing,
) -> Result<RgbImage, SlideError> {
    let (x, y, level, w, h) = patch_region(slide, grid, p);
    let img = slide.read_region(x, y, level, w, h)?;
    Ok(fit(img, pre))
}

/// The region a patch is read from: the pyramid level closest above the grid's target resolution,
/// and the patch's side at that level.
pub fn patch_region(slide: &dyn SlideReader, grid: &PatchGrid, p: &Patch) -> Region {
    let prov = &grid.provenance;
    let want_ds = prov.patch_level0 as f64 / prov.patch_px as f64;
    let level = slide.best_level_for_downsample(want_ds);
    let ds = slide.level_downsample(level);
    let side = ((prov.patch_level0 as f64 / ds).round() as u32).max(1);
    (p.x, p.y, level, side, side)
}

/// A patch brought to the network's input as `pre` says.
pub fn fit(img: RgbImage, pre: &Preprocessing) -> RgbImage {
    let input = pre.input_px;
    let resized = pre.resize_px.unwrap_or(input).max(input);
    let img = if img.dimensions() == (resized, resized) { img } else { resize_rgb(&img, resized, resized) };
    if resized == input {
        return img;
    }
    let off = (resized - input) / 2;
    image::imageops::crop_imm(&img, off, off, input, input).to_image()
}

/// A batch of patches as the embedder's input: `pixels` are `n` RGB images of `side × side`, row
/// by row (as decoded), turned on `device` into normalised planes [n, 3, side, side] of `dtype`:
/// (x/255 − mean)/std per channel. The bytes travel to a GPU as they are (a quarter of f32's),
/// and the arithmetic runs there; on the CPU the planes are written directly, images in parallel
/// (candle's strided element-wise ops run on one thread: 0.5–0.8 ms a patch at 224 px).
pub fn to_input(
    pixels: Vec<u8>,
    n: usize,
    side: usize,
    pre: &Preprocessing,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let (scale, shift) = normalisation(pre);
    let plane = side * side;
    if pixels.len() != n * plane * 3 {
        candle_core::bail!("{} bytes are not {n} RGB images of {side}²", pixels.len())
    }
    if !device.is_cpu() {
        return normalise_on_device(pixels, n, side, (scale, shift), device, dtype);
    }
    let mut planes = vec![0f32; pixels.len()];
    planes.par_chunks_mut(3 * plane).zip(pixels.par_chunks(3 * plane)).for_each(|(out, img)| {
        for (c, out) in out.chunks_mut(plane).enumerate() {
            let (a, b) = (scale[c], shift[c]);
            for (o, px) in out.iter_mut().zip(img[c..].iter().step_by(3)) {
                *o = *px as f32 * a + b;
            }
        }
    });
    Tensor::from_vec(planes, (n, 3, side, side), device)?.to_dtype(dtype)
}

/// Per channel, the `(scale, shift)` that take a byte to its normalised value: `x·scale + shift`
/// = (x/255 − mean)/std.
fn normalisation(pre: &Preprocessing) -> (Vec<f32>, Vec<f32>) {
    let scale = (0..3).map(|c| 1.0 / (255.0 * pre.std[c])).collect();
    let shift = (0..3).map(|c| -pre.mean[c] / pre.std[c]).collect();
    (scale, shift)
}

/// [`to_input`] for a GPU: the bytes uploaded as they are, the arithmetic in tensor operations there.
fn normalise_on_device(
    pixels: Vec<u8>,
    n: usize,
    side: usize,
    (scale, shift): (Vec<f32>, Vec<f32>),
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let x = Tensor::from_vec(pixels, (n, side, side, 3), device)?.to_dtype(DType::F32)?.permute((0, 3, 1, 2))?;
    let scale = Tensor::from_vec(scale, (1, 3, 1, 1), device)?;
    let shift = Tensor::from_vec(shift, (1, 3, 1, 1), device)?;
    x.broadcast_mul(&scale)?.broadcast_add(&shift)?.to_dtype(dtype)
}

/// How to embed a slide's patches.
#[derive(Debug, Clone, Copy)]
pub struct EmbedOptions {
    /// Patches per forward pass.
    pub batch_size: usize,
    /// The embedder's dtype (its input is cast to it; features come back as f32).
    pub dtype: DType,
    pub corrupt: CorruptTiles,
}

impl EmbedOptions {
    pub fn f32(batch_size: usize) -> Self {
        EmbedOptions { batch_size, dtype: DType::F32, corrupt: CorruptTiles::default() }
    }
}

/// Decoded batches waiting for the device: the decoder runs this far ahead of the network.
pub const PREFETCH_BATCHES: usize = 2;

/// What embedding a slide produced.
pub struct Embedded {
    /// Indices (into the grid) of the patches embedded, in order.
    pub kept: Vec<usize>,
    /// Their features, row-major `[kept, dim]`.
    pub features: Vec<f32>,
    /// Patches left out because a tile under them is corrupt, with the reason.
    pub skipped: Vec<(usize, String)>,
}

/// One batch read and decoded on the CPU.
struct Decoded {
    kept: Vec<usize>,
    skipped: Vec<(usize, String)>,
    /// `kept.len()` RGB images, as decoded.
    pixels: Vec<u8>,
}

fn decode_batch(
    slide: &dyn SlideReader,
    grid: &PatchGrid,
    chunk: &[usize],
    pre: &Preprocessing,
    corrupt: CorruptTiles,
) -> Result<Decoded, SlideError> {
    // A slide in a bucket fetches the batch's tiles in a few coalesced ranged reads, at once,
    // rather than one request per tile as the parallel reads below first touch them.
    let regions: Vec<Region> = chunk.iter().map(|&i| patch_region(slide, grid, &grid.patches[i])).collect();
    slide.prefetch(&regions)?;
    let read: Vec<Result<RgbImage, SlideError>> =
        chunk.par_iter().map(|&i| read_patch(slide, grid, &grid.patches[i], pre)).collect();
    let px = (pre.input_px * pre.input_px * 3) as usize;
    let mut d = Decoded { kept: Vec::new(), skipped: Vec::new(), pixels: Vec::with_capacity(chunk.len() * px) };
    for (&i, r) in chunk.iter().zip(read) {
        match r {
            Ok(img) => {
                d.pixels.extend_from_slice(img.as_raw());
                d.kept.push(i);
            }
            Err(e @ SlideError::CorruptTile { .. }) if corrupt == CorruptTiles::Skip => {
                d.skipped.push((i, e.to_string()))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(d)
}

/// Embed every patch of `grid` (those on corrupt tiles skipped or failing, per `opts.corrupt`).
///
/// A pipeline: one thread reads and decodes batches (each batch's patches in parallel on rayon's
/// pool) into a bounded channel of [`PREFETCH_BATCHES`], while this thread moves each batch to
/// `device` and runs the network, so on a GPU the decoding of batch k+1 overlaps the network on
/// batch k; batch k+1 is uploaded before batch k's features are read back. The first error stops
/// both sides.
pub fn embed_patches(
    slide: &dyn SlideReader,
    grid: &PatchGrid,
    embedder: &dyn Embedder,
    device: &Device,
    opts: EmbedOptions,
) -> Result<Embedded, EmbedError> {
    let pre = embedder.preprocessing();
    let s = pre.input_px as usize;
    let model_err = |source| EmbedError::Model { slide: grid.provenance.slide.clone(), source };
    let indices: Vec<usize> = (0..grid.patches.len()).collect();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(PREFETCH_BATCHES);
        let indices = &indices;
        let pre_ref = &pre;
        scope.spawn(move || {
            for chunk in indices.chunks(opts.batch_size.max(1)) {
                let d = decode_batch(slide, grid, chunk, pre_ref, opts.corrupt);
                let failed = d.is_err();
                // A closed channel: the network side failed and stopped listening.
                if tx.send(d).is_err() || failed {
                    break;
                }
            }
        });
        let mut out = Embedded {
            kept: Vec::new(),
            features: Vec::with_capacity(grid.patches.len() * embedder.feature_dim()),
            skipped: Vec::new(),
        };
        // The batch whose features are still on the device. A GPU runs its kernels asynchronously:
        // the next batch's bytes are uploaded (and, on the host, staged) before this thread waits
        // for the features of the one before, and its network is queued right after.
        let mut queued: Option<Tensor> = None;
        let read_back = |y: Tensor| y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        for d in rx {
            let d = d?;
            out.skipped.extend(d.skipped);
            let n = d.kept.len();
            if n == 0 {
                continue;
            }
            out.kept.extend(d.kept);
            let x = to_input(d.pixels, n, s, &pre, device, opts.dtype).map_err(model_err)?;
            if let Some(y) = queued.take() {
                out.features.extend(read_back(y).map_err(model_err)?);
            }
            queued = Some(embedder.forward(&x).map_err(model_err)?);
        }
        if let Some(y) = queued {
            out.features.extend(read_back(y).map_err(model_err)?);
        }
        Ok(out)
    })
}

/// A slide whose colour changes across it (`width × height`, 128 px tiles, in `dir`) and its
/// tiling at 64 px with no patches yet: for tests that lay their own.
#[cfg(test)]
pub(crate) fn gradient_slide(
    dir: &std::path::Path,
    width: u32,
    height: u32,
) -> (Box<dyn SlideReader>, wsimil_common::grid::PatchGrid) {
    let img = RgbImage::from_fn(width, height, |x, y| image::Rgb([(x / 2) as u8, (y / 2) as u8, ((x + y) / 4) as u8]));
    let opt = crate::tiff::TiffOptions { tile: 128, min_level_side: 128, ..Default::default() };
    let path = dir.join("gradient.tiff");
    std::fs::write(&path, crate::tiff::write_slide(&img, "gradient", &opt).unwrap()).unwrap();
    let slide = crate::slide::open(&path).unwrap();
    let spec = wsimil_common::plan::TilingSpec {
        patch_px: 64,
        target_mpp: opt.mpp,
        step_fraction: 1.0,
        min_tissue_fraction: 0.0,
        tissue: wsimil_common::grid::TissueParams::biopsy(),
    };
    let mut grid = crate::tiling::tile_slide(slide.as_ref(), "gradient", &spec, Some(opt.mpp)).unwrap().grid;
    grid.patches.clear();
    (slide, grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each patch's per-channel mean of its normalised input: a feature that says which patch it is.
    struct MeanColour(Preprocessing);

    impl Embedder for MeanColour {
        fn architecture(&self) -> String {
            "mean-colour".into()
        }
        fn feature_dim(&self) -> usize {
            3
        }
        fn preprocessing(&self) -> Preprocessing {
            self.0.clone()
        }
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            x.mean(3)?.mean(2)
        }
    }

    #[test]
    fn features_come_back_in_grid_order_whatever_the_batch_size() {
        // Each patch's mean red, green and blue: a feature that says which patch it came from.
        let net = MeanColour(Preprocessing {
            input_px: 16,
            resize: "bilinear".into(),
            mean: [0.0; 3],
            std: [1.0; 3],
            resize_px: None,
        });
        let dir = tempfile::tempdir().unwrap();
        let (slide, mut grid) = gradient_slide(dir.path(), 512, 512);
        grid.patches = (0..11).map(|i| Patch { x: (i % 7) * 64, y: (i / 7) * 192, tissue: 1.0 }).collect();
        let want: Vec<f32> = grid
            .patches
            .iter()
            .flat_map(|p| {
                let px = read_patch(slide.as_ref(), &grid, p, &net.0).unwrap();
                (0..3).map(move |c| px.pixels().map(|v| v[c] as f32 / 255.0).sum::<f32>() / 256.0)
            })
            .collect();
        for batch in [1, 2, 4, 11, 64] {
            let out = embed_patches(slide.as_ref(), &grid, &net, &Device::Cpu, EmbedOptions::f32(batch)).unwrap();
            assert_eq!(out.kept, (0..11).collect::<Vec<_>>(), "batch {batch}");
            assert_eq!(out.features.len(), want.len(), "batch {batch}: every batch's features, the last one too");
            for (i, (a, b)) in out.features.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-5, "batch {batch}, patch {}, channel {}: {a} vs {b}", i / 3, i % 3);
            }
        }
    }

    #[test]
    fn a_resize_then_centre_crop_takes_the_middle_of_the_resized_patch() {
        // GigaPath's Resize(256) + CenterCrop(224) on a 256 px patch: the central 224 px, unscaled.
        let img = RgbImage::from_fn(256, 256, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let pre =
            Preprocessing { input_px: 224, resize: "x".into(), mean: [0.0; 3], std: [1.0; 3], resize_px: Some(256) };
        let out = fit(img.clone(), &pre);
        assert_eq!(out.dimensions(), (224, 224));
        assert_eq!(out.get_pixel(0, 0).0, [16, 16, 7]);
        assert_eq!(out.get_pixel(223, 223).0, [239, 239, 7]);
        // Without the crop the whole patch is resized.
        let whole = fit(img, &Preprocessing { resize_px: None, ..pre });
        assert_eq!(whole.dimensions(), (224, 224));
        assert!(whole.get_pixel(0, 0).0[0] < 2, "the corner stays the corner");
    }

    #[test]
    fn input_planes_are_normalised_per_channel_from_interleaved_bytes() {
        // Two 1×1 images as decoded: (255, 0, 51) and (0, 255, 102).
        let pixels = vec![255, 0, 51, 0, 255, 102];
        let pre = Preprocessing {
            input_px: 1,
            resize: "x".into(),
            mean: [0.0, 0.5, 0.0],
            std: [1.0, 0.5, 0.2],
            resize_px: None,
        };
        let x = to_input(pixels, 2, 1, &pre, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(x.dims(), &[2, 3, 1, 1]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [1.0, -1.0, 1.0, 0.0, 1.0, 2.0];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
        }
        let h = to_input(vec![255; 12], 1, 2, &pre, &Device::Cpu, DType::BF16).unwrap();
        assert_eq!((h.dtype(), h.dims()), (DType::BF16, &[1usize, 3, 2, 2][..]));
        assert!(to_input(vec![0; 11], 1, 2, &pre, &Device::Cpu, DType::F32).is_err(), "short of a whole image");
    }

    #[test]
    fn the_gpu_normalisation_matches_the_cpu_one() {
        let pre = Preprocessing {
            input_px: 5,
            resize: "x".into(),
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            resize_px: None,
        };
        let pixels: Vec<u8> = (0..3 * 5 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let cpu = to_input(pixels.clone(), 3, 5, &pre, &Device::Cpu, DType::F32).unwrap();
        let dev = normalise_on_device(pixels.clone(), 3, 5, normalisation(&pre), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(cpu.dims(), dev.dims());
        let (a, b) = (
            cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            dev.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-5));
        // Image 1, green plane, row 2, column 3: byte (1·25 + 2·5 + 3)·3 + 1 of the interleaved input.
        let at = ((25 + 2 * 5 + 3) * 3 + 1) as usize;
        let want = (pixels[at] as f32 / 255.0 - 0.456) / 0.224;
        assert!((a[75 + 25 + 2 * 5 + 3] - want).abs() < 1e-5);
    }
}
