//! Slide reading, tissue detection, tiling, synthesis and embedding on real slides.

mod common;

use common::data;
use image::RgbImage;
use wsimil_common::grid::TissueParams;
use wsimil_common::plan::TilingSpec;
use wsimil_worker::slide::{self, SlideError};
use wsimil_worker::tiling::tile_slide;

fn spec() -> TilingSpec {
    TilingSpec {
        patch_px: 256,
        target_mpp: 0.5,
        step_fraction: 1.0,
        min_tissue_fraction: 0.25,
        tissue: TissueParams { threshold: None, ..TissueParams::biopsy() },
    }
}

#[test]
fn cmu_slide_opens_with_its_geometry_and_mpp() {
    let s = slide::open(&data("cmu_small_region.svs")).unwrap();
    assert_eq!(s.level_dimensions(0), (2220, 2967));
    assert!((s.mpp().unwrap() - 0.499).abs() < 1e-3);
    assert_eq!(s.objective_power(), Some(20.0));
    assert!(s.reader_name().contains("aperio"), "{}", s.reader_name());
    let img = s.read_region(1000, 1000, 0, 64, 48).unwrap();
    assert_eq!(img.dimensions(), (64, 48));
}

#[test]
fn boxes_pyramid_has_four_levels_and_no_mpp() {
    let s = slide::open(&data("boxes.tiff")).unwrap();
    assert_eq!(s.level_count(), 4);
    assert_eq!(s.level_dimensions(0), (300, 250));
    assert_eq!(s.level_dimensions(3), (37, 31));
    assert_eq!(s.best_level_for_downsample(4.5), 2);
    assert!(s.mpp().is_none());
    // Tiling needs an mpp: without one the error names the file and the fix.
    let err = tile_slide(s.as_ref(), "boxes", &spec(), None).err().expect("no mpp");
    assert!(matches!(err, SlideError::NoMpp { .. }));
    let msg = err.to_string();
    assert!(msg.contains("boxes.tiff") && msg.contains("mpp"), "{msg}");
    // With the manifest's mpp it tiles: 64-px patches at 1 µm/px on a 0.5 µm/px slide are 128 px.
    let small = TilingSpec { patch_px: 64, target_mpp: 1.0, min_tissue_fraction: 0.0, ..spec() };
    let t = tile_slide(s.as_ref(), "boxes", &small, Some(0.5)).unwrap();
    assert_eq!(t.grid.provenance.patch_level0, 128);
    assert_eq!(t.grid.provenance.mpp_source, "manifest");
}

#[test]
fn corrupt_files_fail_with_the_file_named() {
    let err = slide::open(&data("unopenable.tiff")).err().expect("unopenable");
    assert!(matches!(err, SlideError::Open { .. }), "{err}");
    assert!(err.to_string().contains("unopenable.tiff"), "{err}");

    // unreadable.svs opens, but reading its pixels fails.
    let s = slide::open(&data("unreadable.svs")).unwrap();
    let (w, h) = s.level_dimensions(0);
    let err = s.read_region(0, 0, 0, w as u32, h as u32).expect_err("unreadable");
    assert!(matches!(err, SlideError::Read { .. }), "{err}");
    assert!(err.to_string().contains("unreadable.svs"), "{err}");
    assert!(!err.is_transient());

    let err = slide::open(std::path::Path::new("/nonexistent/x.svs")).err().expect("missing");
    assert!(err.to_string().contains("/nonexistent/x.svs") && err.to_string().contains("no such file"), "{err}");
}

#[test]
fn cmu_tiling_finds_the_tissue_half() {
    let s = slide::open(&data("cmu_small_region.svs")).unwrap();
    let t = tile_slide(s.as_ref(), "cmu", &spec(), None).unwrap();
    let p = &t.grid.provenance;
    // 256 px at 0.5 µm/px on a 0.499 µm/px scan.
    assert_eq!(p.patch_level0, 257);
    assert_eq!(p.mpp_source, "slide");
    assert!((p.target_magnification - 20.0).abs() < 0.1);
    // The grid has 8 x 11 = 88 positions; the tissue (a third to a half of the region, checked by
    // eye on the mask) covers 30-60 of them at >= 25%.
    let n = t.grid.patches.len();
    assert!((30..=60).contains(&n), "{n} patches");
    assert!(t.grid.patches.iter().all(|q| q.tissue >= 0.25));
    let tissue = t.mask.pixels().filter(|v| v.0[0] > 0).count() as f64 / (t.mask.width() * t.mask.height()) as f64;
    assert!((0.3..0.75).contains(&tissue), "tissue fraction {tissue}");
}

#[test]
fn synthetic_slides_open_in_openslide_and_match_their_source() {
    use wsimil_worker::synth::{build_cohort, read_level0, SynthOptions};
    let src = slide::open(&data("cmu_small_region.svs")).unwrap();
    let source = read_level0(src.as_ref()).unwrap();
    let tumour = image::open(data("target_image.png")).unwrap().to_rgb8();
    let dir = tempfile::tempdir().unwrap();
    let opt = SynthOptions { slides: 2, width: 1024, height: 1536, radius: (100.0, 150.0), ..SynthOptions::default() };
    let slides = build_cohort(&source, &tumour, dir.path(), &opt).unwrap();
    assert_eq!(slides.len(), 2);
    let pos = slides.iter().find(|s| s.label == "tumor").unwrap();
    assert!(!pos.regions.is_empty() && pos.tumour_fraction > 0.0);
    let neg = slides.iter().find(|s| s.label == "normal").unwrap();
    assert!(neg.regions.is_empty() && neg.tumour_fraction == 0.0);
    for s in &slides {
        let o = slide::open(&s.path).unwrap();
        assert!(o.reader_name().contains("aperio"), "{}", o.reader_name());
        assert_eq!(o.level_dimensions(0), (1024, 1536));
        assert_eq!(o.level_count(), 2);
        assert!((o.mpp().unwrap() - 0.499).abs() < 1e-6);
        // Level 1 is the 4x reduction and agrees with level 0 downsampled.
        let l0 = o.read_region(0, 0, 0, 1024, 1536).unwrap();
        let l1 = o.read_region(0, 0, 1, 256, 384).unwrap();
        let down = wsimil_worker::resample::resize_rgb(&l0, 256, 384);
        assert!(mean_abs_diff(&l1, &down) < 6.0);
    }
    let manifest = std::fs::read_to_string(dir.path().join("manifest.csv")).unwrap();
    assert!(manifest.starts_with("slide_id,path,label\n") && manifest.lines().count() == 3);
    assert!(dir.path().join(pos.truth_mask.as_ref().unwrap()).is_file());
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.as_raw().len() as f64
}

#[test]
fn efficientnet_lite0_embeds_real_patches() {
    use candle_core::{DType, Device};
    use wsimil_common::models::{embedder, params::load_safetensors};
    let bytes = std::fs::read(data("efficientnet-lite0.safetensors")).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(
        load_safetensors(&bytes, &Device::Cpu).unwrap().into_iter().collect(),
        DType::F32,
        &Device::Cpu,
    );
    let model = embedder::build("efficientnet-lite0", vb).unwrap();
    let s = slide::open(&data("cmu_small_region.svs")).unwrap();
    let mut grid = tile_slide(s.as_ref(), "cmu", &spec(), None).unwrap().grid;
    grid.patches.truncate(4);
    let f = wsimil_worker::embed::embed_patches(s.as_ref(), &grid, model.as_ref(), &Device::Cpu, 2).unwrap();
    assert_eq!(f.len(), 4 * 1280);
    assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0 && *v <= 6.0), "ReLU6 features, pooled");
    // Different patches give different features; ImageNet weights are far from constant.
    assert!(f[..1280].iter().zip(&f[1280..2560]).any(|(a, b)| (a - b).abs() > 1e-2));
    let active = f[..1280].iter().filter(|v| **v > 0.0).count();
    assert!(active > 100, "{active} active channels");
}

#[tokio::test]
async fn a_slide_without_tissue_fails_its_tile_job_with_the_reason() {
    use wsimil_common::ids::SlideId;
    use wsimil_common::job::{Job, TileJob};
    use wsimil_common::layout;
    use wsimil_common::store::Store;
    use wsimil_worker::jobs::{execute, JobError, WorkerContext};
    let dir = tempfile::tempdir().unwrap();
    let glass = RgbImage::from_pixel(1024, 1024, image::Rgb([242, 242, 240]));
    let path = dir.path().join("glass.svs");
    std::fs::write(&path, wsimil_worker::tiff::write_slide(&glass, "glass", &Default::default()).unwrap()).unwrap();
    let store = Store::memory();
    let ctx = WorkerContext::new(store.clone(), candle_core::Device::Cpu, "t");
    let job =
        TileJob { slide: SlideId::new("glass").unwrap(), path: path.display().to_string(), mpp: None, tiling: spec() };
    let err = execute(&ctx, &Job::Tile(job.clone())).await.unwrap_err();
    assert!(matches!(err, JobError::Permanent(_)));
    assert!(err.to_string().contains("glass.svs: no tissue patches found"), "{err}");
    // The mask is kept to look at; the grid (the job's "done" marker) is not written.
    let tiling = job.tiling.id();
    assert!(store.exists(&layout::tissue_mask(&tiling, &job.slide)).await.unwrap());
    assert!(!store.exists(&layout::patch_grid(&tiling, &job.slide)).await.unwrap());
}
