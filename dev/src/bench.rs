//! What the benchmarks measure: large test slides from real tissue, single-threaded patch reading,
//! a TransMIL training step, an embedder alone and from a slide (with or without its network).

use image::RgbImage;
use std::time::Instant;
use wsimil_common::grid::PatchGrid;
use wsimil_common::models::embedder::Embedder;
use wsimil_common::models::zoo::Architecture;
use wsimil_worker::device::Compute;
use wsimil_worker::embed::{embed_patches, read_patch, EmbedError, EmbedOptions};
use wsimil_worker::resample::resize_rgb;
use wsimil_worker::slide::{SlideError, SlideReader};
use wsimil_worker::synth::mosaic;
use wsimil_worker::tiff::LevelData;

/// The levels of a huge slide (4× steps down to a lowest level of at most `lowest_side`): the
/// lowest is a real-tissue mosaic, the others repeat one real tile, so the file stays small while
/// the geometry is that of a `width × height` scan.
pub fn huge_levels(source: &RgbImage, width: u32, height: u32, lowest_side: u32) -> Vec<LevelData> {
    let mut dims = vec![(width, height)];
    while dims.last().unwrap().0.max(dims.last().unwrap().1) > lowest_side {
        let (w, h) = *dims.last().unwrap();
        dims.push((w.div_ceil(4), h.div_ceil(4)));
    }
    let tile = image::imageops::crop_imm(source, 0, 0, 256.min(source.width()), 256.min(source.height())).to_image();
    let last = dims.len() - 1;
    dims.into_iter()
        .enumerate()
        .map(|(i, (w, h))| {
            if i == last {
                // Tissue at the lowest level's scale: the source shrunk 64x per 4^3 of pyramid.
                let s = 4f64.powi(i as i32);
                let small = resize_rgb(
                    source,
                    ((source.width() as f64 / s * 8.0) as u32).max(8),
                    ((source.height() as f64 / s * 8.0) as u32).max(8),
                );
                LevelData::Image(mosaic(&small, w, h))
            } else {
                LevelData::Repeated { width: w, height: h, tile: tile.clone() }
            }
        })
        .collect()
}

/// Patches resized to `input_px`, not normalised (the readers' benchmarks stop before the network).
fn plain_resize(input_px: u32) -> wsimil_common::features::Preprocessing {
    wsimil_common::features::Preprocessing {
        input_px,
        resize: String::new(),
        mean: [0.0; 3],
        std: [1.0; 3],
        resize_px: None,
    }
}

/// Read, decode and resize every patch of `grid` on the calling thread; (patches, seconds).
pub fn read_all(slide: &dyn SlideReader, grid: &PatchGrid, input_px: u32) -> Result<(usize, f64), SlideError> {
    let pre = plain_resize(input_px);
    let t = Instant::now();
    let mut n = 0;
    for p in &grid.patches {
        let img = read_patch(slide, grid, p, &pre)?;
        std::hint::black_box(&img);
        n += 1;
    }
    Ok((n, t.elapsed().as_secs_f64()))
}

/// Read every patch of `grid` as the embed stage does: `batch` patches at a time, their tiles
/// fetched together first (a slide in a bucket; nothing for a file), then read one by one.
pub fn read_batched(
    slide: &dyn SlideReader,
    grid: &PatchGrid,
    input_px: u32,
    batch: usize,
) -> Result<usize, SlideError> {
    let pre = plain_resize(input_px);
    let mut n = 0;
    for chunk in grid.patches.chunks(batch.max(1)) {
        let regions: Vec<_> = chunk.iter().map(|p| wsimil_worker::embed::patch_region(slide, grid, p)).collect();
        slide.prefetch(&regions)?;
        for p in chunk {
            std::hint::black_box(read_patch(slide, grid, p, &pre)?);
            n += 1;
        }
    }
    Ok(n)
}

/// Seconds per TransMIL training step (forward, backward, Lookahead(RAdam) update; dropout on),
/// the paper's configuration for `in_dim`-wide features with `landmarks` landmarks, on one random
/// bag of `n` instances, averaged over `steps` after one warm-up step.
pub fn transmil_step_secs(
    n: usize,
    in_dim: usize,
    landmarks: usize,
    steps: usize,
    dev: &candle_core::Device,
) -> candle_core::Result<f64> {
    use candle_core::Tensor;
    use wsimil_common::models::params::Params;
    use wsimil_common::models::transmil::{TransMil, TransMilConfig};
    use wsimil_common::models::{optim, Mode};
    let params = Params::new(1);
    let cfg = TransMilConfig { landmarks, ..TransMilConfig::paper(in_dim, 2) };
    let model = TransMil::new(&cfg, params.var_builder(dev))?;
    let mut opt = optim::build(optim::OptimizerKind::LookaheadRadam, params.named_vars(), 2e-4, 1e-5)?;
    let mut rng = wsimil_common::rng::Rng::new(2);
    wsimil_common::models::ops::seed_device(dev, 2)?;
    let x = Tensor::randn(0f32, 1.0, (1, n, in_dim), dev)?;
    let target = Tensor::new(&[1u32], dev)?;
    let mut step = || -> candle_core::Result<()> {
        let out = model.forward(&x, &mut Mode::Train(&mut rng), false)?;
        let loss = candle_nn::loss::cross_entropy(&out.logits, &target)?;
        opt.step(&loss.backward()?)?;
        // Reading the loss back waits for a GPU to finish the step.
        loss.to_scalar::<f32>().map(|_| ())
    };
    step()?;
    let t = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    Ok(t.elapsed().as_secs_f64() / steps.max(1) as f64)
}

/// A patch embedder with random weights (BatchNorm folded as in every wsimil run) in `compute`'s
/// device and precision.
pub fn random_embedder(architecture: &Architecture, compute: &Compute) -> candle_core::Result<Box<dyn Embedder>> {
    let params = wsimil_common::models::params::Params::new(1);
    architecture.build(params.var_builder_as(&compute.device, compute.dtype))
}

/// Images per second of a patch embedder alone: the best of `iters` forward passes over a batch of
/// `batch` random 224 × 224 images, after one warm-up pass, each pass ending with the features
/// back in host memory as f32 (so a GPU's time is all counted).
pub fn embed_model_rate(
    architecture: &Architecture,
    batch: usize,
    iters: usize,
    compute: &Compute,
) -> candle_core::Result<f64> {
    use candle_core::{DType, Tensor};
    let model = random_embedder(architecture, compute)?;
    let px = model.preprocessing().input_px as usize;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, px, px), &compute.device)?.to_dtype(compute.dtype)?;
    let pass = || -> candle_core::Result<f64> {
        let t = Instant::now();
        let y = model.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        std::hint::black_box(y);
        Ok(t.elapsed().as_secs_f64())
    };
    pass()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        best = best.min(pass()?);
    }
    Ok(batch as f64 / best)
}

/// The embed stage without its network: each patch's per-channel mean of the normalised input, so a
/// pipeline run through it measures what the CPU side (read, decode, resize) and the upload can
/// feed a device: the ceiling of the end-to-end rate.
pub struct NoNetwork(pub wsimil_common::features::Preprocessing);

impl Embedder for NoNetwork {
    fn architecture(&self) -> String {
        "none".into()
    }
    fn feature_dim(&self) -> usize {
        3
    }
    fn preprocessing(&self) -> wsimil_common::features::Preprocessing {
        self.0.clone()
    }
    fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        x.mean(3)?.mean(2)
    }
}

/// Patches per second from a slide to features: every tissue patch of `grid` read, decoded,
/// resized, normalised and embedded in batches of `batch`, as the embed stage does. With
/// `decode_only`, everything but the network ([`NoNetwork`], with `architecture`'s input size).
pub fn embed_slide_rate(
    slide: &dyn SlideReader,
    grid: &PatchGrid,
    architecture: &Architecture,
    batch: usize,
    compute: &Compute,
    decode_only: bool,
) -> Result<(usize, f64), EmbedError> {
    let model_err = |source| EmbedError::Model { slide: grid.provenance.slide.clone(), source };
    let model: Box<dyn Embedder> = match architecture.preprocessing() {
        Some(pre) if decode_only => Box::new(NoNetwork(pre)),
        _ => random_embedder(architecture, compute).map_err(model_err)?,
    };
    let opts = EmbedOptions { batch_size: batch, dtype: compute.dtype, corrupt: Default::default() };
    // One warm-up batch (a GPU compiles and allocates on the first pass).
    let warm = PatchGrid { patches: grid.patches.iter().take(batch).cloned().collect(), ..grid.clone() };
    embed_patches(slide, &warm, model.as_ref(), &compute.device, opts)?;
    let t = Instant::now();
    let out = embed_patches(slide, grid, model.as_ref(), &compute.device, opts)?;
    Ok((out.kept.len(), out.kept.len() as f64 / t.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_levels_step_by_four_and_only_the_lowest_is_a_full_image() {
        let src = RgbImage::from_pixel(300, 200, image::Rgb([200, 100, 150]));
        let levels = huge_levels(&src, 100_000, 80_000, 2048);
        let dims: Vec<(u32, u32)> = levels
            .iter()
            .map(|l| match l {
                LevelData::Image(i) => i.dimensions(),
                LevelData::Repeated { width, height, .. } => (*width, *height),
            })
            .collect();
        assert_eq!(dims, vec![(100_000, 80_000), (25_000, 20_000), (6_250, 5_000), (1_563, 1_250)]);
        assert!(matches!(levels[3], LevelData::Image(_)));
        assert!(matches!(levels[0], LevelData::Repeated { .. }));
    }

    #[test]
    fn decode_only_runs_every_patch_through_the_pipeline_without_a_network() {
        let dir = tempfile::tempdir().unwrap();
        // Real tissue (the CMU slide's), as a small slide of this test's own.
        let cmu = wsimil_worker::slide::open(&wsimil_common::data_dir().join("cmu_small_region.svs")).unwrap();
        let tissue = wsimil_worker::synth::read_level0(cmu.as_ref()).unwrap();
        let path = dir.path().join("mosaic.svs");
        let opt = wsimil_worker::tiff::TiffOptions { mpp: 0.5, ..Default::default() };
        std::fs::write(&path, wsimil_worker::tiff::write_slide(&mosaic(&tissue, 1024, 768), "m", &opt).unwrap())
            .unwrap();
        let slide = wsimil_worker::slide::open(&path).unwrap();
        let mut grid =
            wsimil_worker::tiling::tile_slide(slide.as_ref(), "m", &crate::cli::bench_tiling(256, 0.5), None)
                .unwrap()
                .grid;
        grid.patches = (0..9).map(|i| wsimil_common::grid::Patch { x: i * 48, y: i * 32, tissue: 1.0 }).collect();
        let arch = Architecture::ResNet50Trunc;
        let (n, rate) = embed_slide_rate(slide.as_ref(), &grid, &arch, 4, &Compute::cpu(), true).unwrap();
        assert_eq!(n, 9);
        assert!(rate.is_finite() && rate > 0.0);
        let pre = arch.preprocessing().unwrap();
        assert_eq!(NoNetwork(pre.clone()).preprocessing().input_px, 224, "the embedder's input size is kept");
    }

    #[test]
    fn a_transmil_training_step_runs_and_is_timed() {
        let s = transmil_step_secs(40, 24, 8, 2, &candle_core::Device::Cpu).unwrap();
        assert!(s > 0.0 && s.is_finite());
    }
}
