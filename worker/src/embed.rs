//! The embed stage: read each patch of the grid from the best pyramid level, resize it to the
//! embedder's input, normalise, and run the embedder in batches.
//!
//! Patch decoding runs on rayon's pool (parallel over the patches of a batch); the network runs on
//! candle's. Both are off the tokio runtime: the job loop calls this from `spawn_blocking`.

use crate::resample::resize_rgb;
use crate::slide::{SlideError, SlideReader};
use candle_core::{Device, Tensor};
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

/// CHW float planes, normalised: (x/255 − mean) / std.
pub fn normalise(img: &RgbImage, pre: &Preprocessing) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p.0[c] as f32 / 255.0 - pre.mean[c]) / pre.std[c];
        }
    }
    out
}

/// What embedding a slide produced.
pub struct Embedded {
    /// Indices (into the grid) of the patches embedded, in order.
    pub kept: Vec<usize>,
    /// Their features, row-major `[kept, dim]`.
    pub features: Vec<f32>,
    /// Patches left out because a tile under them is corrupt, with the reason.
    pub skipped: Vec<(usize, String)>,
}

/// Embed every patch of `grid` (those on corrupt tiles skipped or failing, per `corrupt`).
pub fn embed_patches(
    slide: &dyn SlideReader,
    grid: &PatchGrid,
    embedder: &dyn Embedder,
    device: &Device,
    batch_size: usize,
    corrupt: CorruptTiles,
) -> Result<Embedded, EmbedError> {
    let pre = embedder.preprocessing();
    let s = pre.input_px as usize;
    let model_err = |source| EmbedError::Model { slide: grid.provenance.slide.clone(), source };
    let mut out = Embedded {
        kept: Vec::new(),
        features: Vec::with_capacity(grid.patches.len() * embedder.feature_dim()),
        skipped: Vec::new(),
    };
    let indices: Vec<usize> = (0..grid.patches.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let read: Vec<Result<Vec<f32>, SlideError>> = chunk
            .par_iter()
            .map(|&i| read_patch(slide, grid, &grid.patches[i], pre.input_px).map(|img| normalise(&img, &pre)))
            .collect();
        let mut planes = Vec::with_capacity(chunk.len() * 3 * s * s);
        let mut n = 0;
        for (&i, r) in chunk.iter().zip(read) {
            match r {
                Ok(p) => {
                    planes.extend_from_slice(&p);
                    out.kept.push(i);
                    n += 1;
                }
                Err(e @ SlideError::CorruptTile { .. }) if corrupt == CorruptTiles::Skip => {
                    out.skipped.push((i, e.to_string()))
                }
                Err(e) => return Err(e.into()),
            }
        }
        if n == 0 {
            continue;
        }
        let x = Tensor::from_vec(planes, (n, 3, s, s), device).map_err(model_err)?;
        let y = embedder.forward(&x).map_err(model_err)?;
        out.features.extend(y.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(model_err)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_lays_out_channel_planes() {
        let img = RgbImage::from_raw(2, 1, vec![255, 0, 51, 0, 255, 102]).unwrap();
        let pre = Preprocessing { input_px: 2, resize: "x".into(), mean: [0.0, 0.5, 0.0], std: [1.0, 0.5, 0.2] };
        let v = normalise(&img, &pre);
        assert_eq!(v.len(), 6);
        assert_eq!(&v[0..2], &[1.0, 0.0]); // R plane
        assert_eq!(&v[2..4], &[-1.0, 1.0]); // G plane: (0-0.5)/0.5, (1-0.5)/0.5
        assert!((v[4] - 1.0).abs() < 1e-6 && (v[5] - 2.0).abs() < 1e-6); // B plane
    }
}
