//! The embed stage: read each patch of the grid from the best pyramid level, resize it to the
//! embedder's input, and run the embedder in batches on the worker's device.
//!
//! Decoding runs on a thread of its own (each batch's patches in parallel on rayon's pool), a
//! bounded channel ahead of the network; normalisation runs on the device, from the decoded bytes.
//! Everything here is off the tokio runtime: the job loop calls it from `spawn_blocking`.

use crate::resample::resize_rgb;
use crate::slide::{SlideError, SlideReader};
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
/// resolution, resized to `input_px`.
pub fn read_patch(slide: &dyn SlideReader, grid: &PatchGrid, p: &Patch, input_px: u32) -> Result<RgbImage, SlideError> {
    let prov = &grid.provenance;
    let want_ds = prov.patch_level0 as f64 / prov.patch_px as f64;
    let level = slide.best_level_for_downsample(want_ds);
    let ds = slide.level_downsample(level);
    let side = ((prov.patch_level0 as f64 / ds).round() as u32).max(1);
    let img = slide.read_region(p.x, p.y, level, side, side)?;
    Ok(if side == input_px { img } else { resize_rgb(&img, input_px, input_px) })
}

/// A batch of patches as the embedder's input: `pixels` are `n` RGB images of `side × side`, row
/// by row (as decoded), turned on `device` into normalised planes [n, 3, side, side] of `dtype`:
/// (x/255 − mean)/std per channel. The bytes travel to the device as they are (a quarter of f32's),
/// and the arithmetic runs there.
pub fn to_input(
    pixels: Vec<u8>,
    n: usize,
    side: usize,
    pre: &Preprocessing,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let x = Tensor::from_vec(pixels, (n, side, side, 3), device)?.to_dtype(DType::F32)?.permute((0, 3, 1, 2))?;
    let scale: Vec<f32> = (0..3).map(|c| 1.0 / (255.0 * pre.std[c])).collect();
    let shift: Vec<f32> = (0..3).map(|c| -pre.mean[c] / pre.std[c]).collect();
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
    input_px: u32,
    corrupt: CorruptTiles,
) -> Result<Decoded, SlideError> {
    let read: Vec<Result<RgbImage, SlideError>> =
        chunk.par_iter().map(|&i| read_patch(slide, grid, &grid.patches[i], input_px)).collect();
    let px = (input_px * input_px * 3) as usize;
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
/// batch k. The first error stops both sides.
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
        scope.spawn(move || {
            for chunk in indices.chunks(opts.batch_size.max(1)) {
                let d = decode_batch(slide, grid, chunk, pre.input_px, opts.corrupt);
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
        for d in rx {
            let d = d?;
            out.skipped.extend(d.skipped);
            let n = d.kept.len();
            if n == 0 {
                continue;
            }
            out.kept.extend(d.kept);
            let y = to_input(d.pixels, n, s, &pre, device, opts.dtype)
                .and_then(|x| embedder.forward(&x))
                .and_then(|y| y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .map_err(model_err)?;
            out.features.extend(y);
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_planes_are_normalised_per_channel_from_interleaved_bytes() {
        // Two 1×1 images as decoded: (255, 0, 51) and (0, 255, 102).
        let pixels = vec![255, 0, 51, 0, 255, 102];
        let pre = Preprocessing { input_px: 1, resize: "x".into(), mean: [0.0, 0.5, 0.0], std: [1.0, 0.5, 0.2] };
        let x = to_input(pixels, 2, 1, &pre, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(x.dims(), &[2, 3, 1, 1]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [1.0, -1.0, 1.0, 0.0, 1.0, 2.0];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?} vs {want:?}");
        }
        let h = to_input(vec![255; 12], 1, 2, &pre, &Device::Cpu, DType::BF16).unwrap();
        assert_eq!((h.dtype(), h.dims()), (DType::BF16, &[1usize, 3, 2, 2][..]));
    }
}
