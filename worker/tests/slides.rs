//! Slide reading, tissue detection, tiling, synthesis and embedding on real slides.

mod common;

use common::data;
use image::RgbImage;
use wsimil_common::grid::TissueParams;
use wsimil_common::models::zoo::Architecture;
use wsimil_common::plan::{TilingSpec, WeightsRef};
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
    // The native reader names the broken tile; OpenSlide (forced) gives libtiff's reason.
    assert!(matches!(err, SlideError::CorruptTile { level: 0, col: 0, row: 0, .. }), "{err}");
    assert!(err.to_string().contains("unreadable.svs") && err.to_string().contains("corrupt tile"), "{err}");
    let o = slide::open_with(&data("unreadable.svs"), slide::ReaderChoice::OpenSlide).unwrap();
    let err = o.read_region(0, 0, 0, w as u32, h as u32).expect_err("unreadable via OpenSlide");
    assert!(matches!(err, SlideError::Read { .. }) && err.to_string().contains("unreadable.svs"), "{err}");
    assert!(!wsimil_worker::error::JobError::from(err).is_transient());

    let err = slide::open(std::path::Path::new("/nonexistent/x.svs")).err().expect("missing");
    assert!(err.to_string().contains("/nonexistent/x.svs") && err.to_string().contains("no such file"), "{err}");
}

#[test]
fn a_truncated_copy_of_a_slide_says_it_is_truncated() {
    let whole = std::fs::read(data("cmu_small_region.svs")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A copy cut short (a partial download): its directories survive, its tiles do not.
    let path = dir.path().join("partial.svs");
    std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
    let err = slide::open(&path).err().expect("truncated");
    assert!(matches!(err, SlideError::Truncated { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("partial.svs: truncated") && msg.contains(&format!("{} bytes", whole.len() / 2)), "{msg}");
    // Cut inside the first directory: still truncated, not "not a format OpenSlide recognises".
    std::fs::write(&path, &whole[..20]).unwrap();
    let err = slide::open(&path).err().expect("truncated");
    assert!(matches!(err, SlideError::Truncated { .. }), "{err:?}");
}

#[test]
fn a_directory_or_an_empty_file_is_not_a_slide_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = slide::open(dir.path()).err().expect("a directory");
    assert!(err.to_string().contains("is a directory, not a slide file"), "{err}");
    let empty = dir.path().join("empty.svs");
    std::fs::write(&empty, b"").unwrap();
    let err = slide::open(&empty).err().expect("empty");
    assert!(err.to_string().contains("empty.svs") && err.to_string().contains("empty"), "{err}");
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
    assert!(manifest.starts_with("slide_id,path,label,truth\n") && manifest.lines().count() == 3);
    // With the site column, each row ends in its slide's site; nothing else changes.
    let sited = tempfile::tempdir().unwrap();
    build_cohort(&source, &tumour, sited.path(), &SynthOptions { sites: 2, site_column: true, ..opt.clone() }).unwrap();
    let with_sites = std::fs::read_to_string(sited.path().join("manifest.csv")).unwrap();
    let lines: Vec<&str> = with_sites.lines().collect();
    assert_eq!(lines[0], "slide_id,path,label,truth,site");
    for (i, line) in lines[1..].iter().enumerate() {
        assert!(line.ends_with(&format!(",site-{i}")), "{with_sites}");
    }
    assert!(dir.path().join(pos.truth_mask.as_ref().unwrap()).is_file());
    let truth_cell = manifest.lines().nth(1).unwrap().split(',').nth(3).unwrap().to_string();
    assert!(truth_cell.ends_with(".tumour.png") && std::path::Path::new(&truth_cell).is_file(), "{manifest}");
}

/// `--opacity` blends the lesions into the tissue beneath and changes nothing else; `--sites`
/// shifts each site's stain and leaves the crops and lesions where they were.
#[test]
fn fainter_lesions_and_staining_sites_change_only_what_they_say() {
    use wsimil_worker::synth::{build_cohort, read_level0, SynthOptions};
    let src = slide::open(&data("cmu_small_region.svs")).unwrap();
    let source = read_level0(src.as_ref()).unwrap();
    let tumour = image::open(data("target_image.png")).unwrap().to_rgb8();
    let make = |opt: SynthOptions| {
        let dir = tempfile::tempdir().unwrap();
        let slides = build_cohort(&source, &tumour, dir.path(), &opt).unwrap();
        let pixels: Vec<RgbImage> =
            slides.iter().map(|s| slide::open(&s.path).unwrap().read_region(0, 0, 0, 768, 768).unwrap()).collect();
        let masks: Vec<image::GrayImage> = slides
            .iter()
            .map(|s| image::open(dir.path().join(s.truth_mask.as_ref().unwrap())).unwrap().to_luma8())
            .collect();
        (slides, pixels, masks)
    };
    let base =
        SynthOptions { slides: 2, width: 768, height: 768, seed: 5, radius: (150.0, 200.0), ..Default::default() };
    let (b, bp, masks) = make(base.clone());
    let (f, fp, _) = make(SynthOptions { opacity: 0.4, ..base.clone() });
    let (s, sp, _) = make(SynthOptions { sites: 2, ..base.clone() });
    assert_eq!(s.iter().map(|x| x.site).collect::<Vec<_>>(), [0, 1], "slide i from site i mod 2");
    let pos = b.iter().position(|x| x.label == "tumor").unwrap();
    for other in [&f, &s] {
        assert_eq!(
            serde_json::to_string(&b[pos].regions).unwrap(),
            serde_json::to_string(&other[pos].regions).unwrap()
        );
    }
    assert_eq!(bp[1 - pos], fp[1 - pos], "no lesion, nothing to blend");
    // Inside the lesion the faint slide differs; outside it barely (JPEG blocks at the border).
    let (mut inside, mut outside) = ((0f64, 0u64), (0f64, 0u64));
    for (x, y, p) in bp[pos].enumerate_pixels() {
        let d: f64 = p.0.iter().zip(fp[pos].get_pixel(x, y).0).map(|(a, b)| (*a as f64 - b as f64).abs()).sum();
        let m = &masks[pos];
        let lesion = m.get_pixel((x / 8).min(m.width() - 1), (y / 8).min(m.height() - 1)).0[0] > 0;
        let acc = if lesion { &mut inside } else { &mut outside };
        acc.0 += d;
        acc.1 += 1;
    }
    let (inside, outside) = (inside.0 / inside.1.max(1) as f64, outside.0 / outside.1.max(1) as f64);
    assert!(inside > 10.0 && inside > 10.0 * outside, "lesion changed by {inside:.1}, the rest by {outside:.1}");
    // Two sites: the same tissue in another stain.
    assert!(mean_abs_diff(&bp[1 - pos], &sp[1 - pos]) > 3.0);
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.as_raw().len() as f64
}

#[test]
fn efficientnet_lite0_embeds_real_patches() {
    use candle_core::{DType, Device};
    use wsimil_common::models::params::load_safetensors;
    let bytes = std::fs::read(data("efficientnet-lite0.safetensors")).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(
        load_safetensors(&bytes, &Device::Cpu).unwrap().into_iter().collect(),
        DType::F32,
        &Device::Cpu,
    );
    let model = Architecture::EfficientNetLite0.build(vb).unwrap();
    let s = slide::open(&data("cmu_small_region.svs")).unwrap();
    let mut grid = tile_slide(s.as_ref(), "cmu", &spec(), None).unwrap().grid;
    grid.patches.truncate(4);
    let f = wsimil_worker::embed::embed_patches(
        s.as_ref(),
        &grid,
        model.as_ref(),
        &Device::Cpu,
        wsimil_worker::embed::EmbedOptions::f32(2),
    )
    .unwrap()
    .features;
    assert_eq!(f.len(), 4 * 1280);
    assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0 && *v <= 6.0), "ReLU6 features, pooled");
    // Different patches give different features; ImageNet weights are far from constant.
    assert!(f[..1280].iter().zip(&f[1280..2560]).any(|(a, b)| (a - b).abs() > 1e-2));
    let active = f[..1280].iter().filter(|v| **v > 0.0).count();
    assert!(active > 100, "{active} active channels");

    // Half precision, the path a GPU runs (folded in f32, then cast; candle's grouped convolution
    // for the depthwise stages): f16 stands in for bf16, which candle's CPU matmul lacks.
    let vb = candle_nn::VarBuilder::from_tensors(
        load_safetensors(&bytes, &Device::Cpu).unwrap().into_iter().collect(),
        DType::F16,
        &Device::Cpu,
    );
    let half = Architecture::EfficientNetLite0.build(vb).unwrap();
    let opts = wsimil_worker::embed::EmbedOptions { batch_size: 2, dtype: DType::F16, corrupt: Default::default() };
    let h = wsimil_worker::embed::embed_patches(s.as_ref(), &grid, half.as_ref(), &Device::Cpu, opts).unwrap().features;
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let diff: Vec<f32> = f.iter().zip(&h).map(|(a, b)| a - b).collect();
    let rel = norm(&diff) / norm(&f);
    assert!(rel < 0.02, "f16 features differ from f32 by {rel}");
}

#[tokio::test]
async fn a_slide_without_tissue_fails_its_tile_job_with_the_reason() {
    use wsimil_common::ids::SlideId;
    use wsimil_common::job::{Job, TileJob};
    use wsimil_common::layout;
    use wsimil_common::store::Store;
    use wsimil_worker::error::JobError;
    use wsimil_worker::jobs::{execute, WorkerContext};
    let dir = tempfile::tempdir().unwrap();
    let glass = RgbImage::from_pixel(1024, 1024, image::Rgb([242, 242, 240]));
    let path = dir.path().join("glass.svs");
    std::fs::write(&path, wsimil_worker::tiff::write_slide(&glass, "glass", &Default::default()).unwrap()).unwrap();
    let store = Store::memory();
    let ctx = WorkerContext::new(store.clone(), wsimil_worker::device::Compute::cpu(), "t");
    let job =
        TileJob { slide: SlideId::new("glass").unwrap(), path: path.display().to_string(), mpp: None, tiling: spec() };
    let err = execute(&ctx, &Job::Tile(job.clone())).await.unwrap_err();
    assert!(matches!(err, JobError::Input(_)) && !err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("glass.svs: no tissue patches found"), "{err}");
    // The mask is kept to look at; the grid (the job's "done" marker) is not written.
    let tiling = job.tiling.id();
    assert!(store.exists(&layout::tissue_mask(&tiling, &job.slide)).await.unwrap());
    assert!(!store.exists(&layout::patch_grid(&tiling, &job.slide)).await.unwrap());
}

#[tokio::test]
async fn the_tile_job_writes_tissue_contours_as_level0_geojson() {
    use wsimil_common::ids::SlideId;
    use wsimil_common::job::{Job, TileJob};
    use wsimil_common::layout;
    use wsimil_common::store::Store;
    use wsimil_worker::jobs::{execute, WorkerContext};
    let store = Store::memory();
    let ctx = WorkerContext::new(store.clone(), wsimil_worker::device::Compute::cpu(), "t");
    let path = data("cmu_small_region.svs");
    let job =
        TileJob { slide: SlideId::new("cmu").unwrap(), path: path.display().to_string(), mpp: None, tiling: spec() };
    execute(&ctx, &Job::Tile(job.clone())).await.unwrap();
    let tiling = job.tiling.id();
    let geo: serde_json::Value = store.get_json(&layout::tissue_contours(&tiling, &job.slide)).await.unwrap();
    let mask_png = store.get(&layout::tissue_mask(&tiling, &job.slide)).await.unwrap();
    let mask = image::load_from_memory(&mask_png).unwrap().to_luma8();
    let grid_key = layout::patch_grid(&tiling, &job.slide);
    let grid = wsimil_common::grid::PatchGrid::from_parquet("grid", store.get(&grid_key).await.unwrap()).unwrap();
    let ds = grid.provenance.detect_downsample;
    assert_eq!(geo["type"], "FeatureCollection");
    let features = geo["features"].as_array().unwrap();
    assert!(!features.is_empty());
    let mut total = 0.0;
    for f in features {
        assert_eq!(f["geometry"]["type"], "Polygon");
        assert_eq!(f["properties"]["classification"]["name"], "Tissue");
        let rings: Vec<Vec<(f64, f64)>> = f["geometry"]["coordinates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap())).collect())
            .collect();
        let mut area = 0.0;
        for r in &rings {
            assert!(r.len() >= 5 && r.first() == r.last(), "closed ring");
            assert!(r.iter().all(|(x, y)| (0.0..=2220.0 + ds).contains(x) && (0.0..=2967.0 + ds).contains(y)));
            // Shoelace: outer rings positive (clockwise with y down), holes negative.
            area += r.windows(2).map(|w| w[0].0 * w[1].1 - w[1].0 * w[0].1).sum::<f64>() / 2.0;
        }
        let stated = f["properties"]["area_level0_px"].as_f64().unwrap();
        assert!((area - stated).abs() < 1e-6 * stated, "{area} vs {stated}");
        total += area;
    }
    // The polygons cover exactly the mask's tissue, in level-0 pixels.
    let tissue = mask.pixels().filter(|v| v.0[0] > 0).count() as f64 * ds * ds;
    assert!((total - tissue).abs() < 1e-6 * tissue, "{total} vs {tissue}");
}

#[test]
fn a_40x_and_a_20x_scan_of_the_same_tissue_give_the_same_physical_patches() {
    use wsimil_worker::embed::read_patch;
    use wsimil_worker::resample::resize_rgb;
    use wsimil_worker::tiff::{write_slide, TiffOptions};
    let src = slide::open(&data("cmu_small_region.svs")).unwrap();
    let base = wsimil_worker::synth::read_level0(src.as_ref()).unwrap(); // 0.499 µm/px: the "20x" scan
    let (w, h) = base.dimensions();
    let dir = tempfile::tempdir().unwrap();
    let (p20, p40) = (dir.path().join("s20.svs"), dir.path().join("s40.svs"));
    std::fs::write(&p20, write_slide(&base, "s20", &TiffOptions::default()).unwrap()).unwrap();
    let up = resize_rgb(&base, w * 2, h * 2);
    let opt40 = TiffOptions { mpp: 0.2495, magnification: 40.0, ..TiffOptions::default() };
    std::fs::write(&p40, write_slide(&up, "s40", &opt40).unwrap()).unwrap();
    let spec = TilingSpec { target_mpp: 0.499, ..spec() };
    let (s20, s40) = (slide::open(&p20).unwrap(), slide::open(&p40).unwrap());
    let g20 = tile_slide(s20.as_ref(), "s20", &spec, None).unwrap().grid;
    let g40 = tile_slide(s40.as_ref(), "s40", &spec, None).unwrap().grid;
    assert_eq!((g20.provenance.patch_level0, g40.provenance.patch_level0), (256, 512));
    assert!((g40.provenance.source_magnification - 40.0).abs() < 1e-9);
    assert!((g20.provenance.target_magnification - g40.provenance.target_magnification).abs() < 1e-9);
    // The same grid in physical space: each 20x patch has its 40x twin at twice the coordinates
    // (tissue masks from differently sized overviews may disagree on a border patch or two).
    let at40: std::collections::HashMap<(i64, i64), &_> = g40.patches.iter().map(|p| ((p.x, p.y), p)).collect();
    let twins: Vec<_> = g20.patches.iter().filter_map(|p| at40.get(&(2 * p.x, 2 * p.y)).map(|q| (p, *q))).collect();
    assert!(twins.len() * 10 >= g20.patches.len() * 9, "{} of {} twinned", twins.len(), g20.patches.len());
    assert!(g40.patches.len() * 10 <= g20.patches.len() * 11, "{} vs {}", g40.patches.len(), g20.patches.len());
    // And the same pixels at the model's input size (up to the 40x copy's upsampling and JPEG
    // re-encoding), far closer than another patch is.
    let pre = Architecture::ResNet50Trunc.preprocessing().unwrap();
    for (a, b) in twins.iter().take(6) {
        let (ia, ib) =
            (read_patch(s20.as_ref(), &g20, a, &pre).unwrap(), read_patch(s40.as_ref(), &g40, b, &pre).unwrap());
        let other = read_patch(s20.as_ref(), &g20, twins[(twins.len() / 2 + 1) % twins.len()].0, &pre).unwrap();
        let (same, _) = diff(&ia, &ib);
        let (different, _) = diff(&ia, &other);
        assert!(same < 6.0 && same * 8.0 < different, "twin diff {same}, other patch {different}");
    }
}

#[test]
fn a_level_too_big_to_read_whole_is_box_reduced_in_strips_past_65500_pixels() {
    use wsimil_worker::tiff::{write_levels, LevelData, TiffOptions};
    use wsimil_worker::tiling::read_overview;
    let src = slide::open(&data("cmu_small_region.svs")).unwrap();
    let tile = src.read_region(1000, 1000, 0, 256, 256).unwrap();
    // One level of 70,000 x 1,000 = 70 M pixels: past the whole-read limit and past the 65,500-pixel
    // side that image libraries refuse.
    let levels = [LevelData::Repeated { width: 70_000, height: 1_000, tile }];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.svs");
    std::fs::write(&path, write_levels(&levels, "wide", &TiffOptions::default()).unwrap()).unwrap();
    let s = slide::open(&path).unwrap();
    let (img, ds, corrupt) = read_overview(s.as_ref(), 2048).unwrap();
    assert_eq!(corrupt.count, 0);
    // 70,000 / 2,048 rounds up to a factor of 35.
    assert_eq!(img.dimensions(), (2000, 28));
    assert_eq!(ds, 35.0);
    for (ox, oy) in [(0u32, 0u32), (7, 3), (1000, 13), (1999, 27)] {
        let block = s.read_region(ox as i64 * 35, oy as i64 * 35, 0, 35, 35).unwrap();
        for c in 0..3 {
            let mean = block.pixels().map(|p| p.0[c] as u64).sum::<u64>() / (35 * 35);
            assert_eq!(img.get_pixel(ox, oy).0[c] as u64, mean, "pixel ({ox}, {oy}) channel {c}");
        }
    }
}

#[test]
fn bigtiff_slides_open_in_both_readers_with_the_same_pixels_as_classic_tiff() {
    use wsimil_worker::slide::{open_with, ReaderChoice};
    use wsimil_worker::tiff::{write_slide, TiffOptions};
    let src = slide::open(&data("cmu_small_region.svs")).unwrap();
    let img = src.read_region(0, 0, 0, 1500, 1200).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (classic, big) = (dir.path().join("classic.svs"), dir.path().join("big.svs"));
    std::fs::write(&classic, write_slide(&img, "c", &TiffOptions::default()).unwrap()).unwrap();
    let bytes = write_slide(&img, "b", &TiffOptions { bigtiff: true, ..TiffOptions::default() }).unwrap();
    assert_eq!(&bytes[..4], b"II+\0");
    std::fs::write(&big, bytes).unwrap();
    let reference = open_with(&classic, ReaderChoice::Native).unwrap();
    for choice in [ReaderChoice::Native, ReaderChoice::OpenSlide] {
        let s = open_with(&big, choice).unwrap();
        assert_eq!(s.level_count(), 2, "{}", s.reader_name());
        assert_eq!(s.level_dimensions(1), (375, 300));
        assert!((s.mpp().unwrap() - 0.499).abs() < 1e-9);
        for (x, y, level, w, h) in [(0, 0, 0, 1500, 1200), (300, 700, 0, 333, 257), (0, 0, 1, 375, 300)] {
            let (a, b) = (s.read_region(x, y, level, w, h).unwrap(), reference.read_region(x, y, level, w, h).unwrap());
            let (mean, max) = diff(&a, &b);
            // The same JPEG tiles: identical through the native reader, within decoder tolerance through OpenSlide.
            if choice == ReaderChoice::Native {
                assert_eq!(max, 0);
            } else {
                assert!(mean < 0.5 && max <= 8, "{mean} {max}");
            }
        }
    }
}

fn diff(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    let d: Vec<u8> = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).collect();
    (d.iter().map(|v| *v as f64).sum::<f64>() / d.len() as f64, d.iter().copied().max().unwrap_or(0))
}

/// Regions that are aligned, unaligned, cross tile edges, and run off the slide.
const REGIONS: [(i64, i64, u32, u32); 6] = [
    (0, 0, 240, 240),
    (1000, 1000, 256, 256),
    (237, 1199, 300, 170),
    (2100, 2900, 200, 200),
    (-50, -20, 100, 80),
    (500, 0, 1, 1),
];

#[test]
fn the_native_reader_matches_openslide_on_the_real_cmu_slide() {
    use wsimil_worker::slide::{open_with, ReaderChoice};
    let path = data("cmu_small_region.svs");
    let n = open_with(&path, ReaderChoice::Native).unwrap();
    let o = open_with(&path, ReaderChoice::OpenSlide).unwrap();
    assert!(n.reader_name().contains("native") && n.reader_name().contains("aperio"), "{}", n.reader_name());
    assert_eq!(n.level_count(), o.level_count());
    for l in 0..n.level_count() {
        assert_eq!(n.level_dimensions(l), o.level_dimensions(l));
        assert!((n.level_downsample(l) - o.level_downsample(l)).abs() < 1e-9);
    }
    assert_eq!(n.mpp(), o.mpp());
    assert_eq!(n.objective_power(), o.objective_power());
    for (x, y, w, h) in REGIONS {
        let (a, b) = (n.read_region(x, y, 0, w, h).unwrap(), o.read_region(x, y, 0, w, h).unwrap());
        let (mean, max) = diff(&a, &b);
        eprintln!("region {x},{y} {w}x{h}: mean {mean:.3} max {max}");
        assert!(mean < 1.0 && max <= 40, "region {x},{y} {w}x{h}: mean {mean:.3}, max {max}");
    }
    // Auto picks the native reader for Aperio.
    assert!(slide::open(&path).unwrap().reader_name().contains("native"));
}

#[test]
fn the_native_reader_matches_openslide_on_ycbcr_pyramids() {
    use wsimil_worker::slide::{open_with, ReaderChoice};
    let src = slide::open(&data("cmu_small_region.svs")).unwrap();
    let img = wsimil_worker::synth::read_level0(src.as_ref()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.svs");
    std::fs::write(&path, wsimil_worker::tiff::write_slide(&img, "p", &Default::default()).unwrap()).unwrap();
    let n = open_with(&path, ReaderChoice::Native).unwrap();
    let o = open_with(&path, ReaderChoice::OpenSlide).unwrap();
    assert_eq!(n.level_count(), o.level_count());
    assert_eq!(n.level_count(), 3);
    for level in 0..3 {
        // Regions in level coordinates, placed at level-0 coordinates that map to whole level
        // pixels: at a fractional position OpenSlide interpolates while the native reader floors
        // (a sub-pixel shift, not a difference in pixels).
        let ds = n.level_downsample(level).round() as i64;
        for (x, y, w, h) in REGIONS {
            let (x, y) = (x * ds, y * ds);
            let (a, b) = (n.read_region(x, y, level, w, h).unwrap(), o.read_region(x, y, level, w, h).unwrap());
            let (mean, max) = diff(&a, &b);
            eprintln!("level {level} region {x},{y} {w}x{h}: mean {mean:.3} max {max}");
            assert!(mean < 1.5 && max <= 48, "level {level} region {x},{y}: mean {mean:.3}, max {max}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_tile_skips_the_patches_on_it_or_fails_the_slide_by_policy() {
    use wsimil_common::features::FeatureBag;
    use wsimil_common::ids::SlideId;
    use wsimil_common::job::{EmbedJob, Job, TileJob};
    use wsimil_common::layout;
    use wsimil_common::plan::{CorruptTiles, EmbedderSpec};
    use wsimil_common::store::Store;
    use wsimil_worker::jobs::{execute, WorkerContext};
    let tumour = image::open(data("target_image.png")).unwrap().to_rgb8();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::memory();
    let ctx = WorkerContext::new(store.clone(), wsimil_worker::device::Compute::cpu(), "t");
    // A slide of real tumour tissue (every patch is tissue) whose first level-0 tile is broken:
    // the header is 8 bytes and that tile's data follows; wipe its tables.
    let broken_slide = |name: &str, side: u32| {
        let img = wsimil_worker::synth::mosaic(&tumour, side, side);
        let opt = wsimil_worker::tiff::TiffOptions { mpp: 0.5, ..Default::default() };
        let mut bytes = wsimil_worker::tiff::write_slide(&img, name, &opt).unwrap();
        bytes[10..60].fill(0);
        let path = dir.path().join(format!("{name}.svs"));
        std::fs::write(&path, bytes).unwrap();
        path
    };

    // Tissue detection over the broken tile (a 1024² slide's overview is level 0): the tile counts
    // as background, is recorded in the grid's provenance, and the job succeeds.
    let small = broken_slide("small", 1024);
    let tile =
        TileJob { slide: SlideId::new("small").unwrap(), path: small.display().to_string(), mpp: None, tiling: spec() };
    execute(&ctx, &Job::Tile(tile.clone())).await.unwrap();
    let key = layout::patch_grid(&tile.tiling.id(), &tile.slide);
    let grid = wsimil_common::grid::PatchGrid::from_parquet(key.as_ref(), store.get(&key).await.unwrap()).unwrap();
    assert_eq!(grid.provenance.corrupt_tiles, 1);
    assert_eq!(grid.patches.len(), 15, "the broken tile's area reads as glass");

    // Embedding: 4096² at 0.5 µm/px, 512-px patches at 1 µm/px = 16 patches of 1024 level-0 pixels;
    // the overview comes from level 1 (intact), the patch at (0, 0) reads the broken tile.
    let path = broken_slide("broken", 4096);
    let slide = SlideId::new("broken").unwrap();
    let tiling = TilingSpec { patch_px: 512, target_mpp: 1.0, min_tissue_fraction: 0.5, ..spec() };
    let tile = TileJob { slide: slide.clone(), path: path.display().to_string(), mpp: None, tiling: tiling.clone() };
    execute(&ctx, &Job::Tile(tile)).await.unwrap();
    for policy in [CorruptTiles::Skip, CorruptTiles::Fail] {
        let embedder = EmbedderSpec {
            architecture: Architecture::EfficientNetLite0,
            weights: WeightsRef::Random(1),
            batch_size: 8,
            corrupt_tiles: policy,
        };
        let job = EmbedJob {
            slide: slide.clone(),
            path: path.display().to_string(),
            tiling: tiling.id(),
            embedder: embedder.clone(),
            release_slide: false,
        };
        let result = execute(&ctx, &Job::Embed(job)).await;
        match policy {
            CorruptTiles::Skip => {
                result.unwrap();
                let key = layout::features(&embedder.id(), &tiling.id(), &slide);
                let bag = FeatureBag::from_parquet(key.as_ref(), store.get(&key).await.unwrap()).unwrap();
                assert_eq!(bag.provenance.tiling.as_ref().unwrap().patches, 16);
                assert_eq!(bag.len(), 15, "the patch on the broken tile is left out");
                assert_eq!(bag.provenance.patches_skipped, 1);
                assert!(!bag.xs.iter().zip(&bag.ys).any(|(x, y)| *x == 0 && *y == 0));
                store.delete(&key).await.unwrap();
            }
            CorruptTiles::Fail => {
                let err = result.unwrap_err().to_string();
                assert!(
                    err.contains("broken.svs") && err.contains("corrupt tile at level 0, column 0, row 0"),
                    "{err}"
                );
            }
        }
    }
}

#[test]
fn the_embedding_pipeline_gives_the_same_features_at_any_batch_size_and_stops_at_a_broken_patch() {
    use candle_core::{DType, Device};
    use wsimil_common::plan::CorruptTiles;
    use wsimil_worker::embed::{embed_patches, EmbedOptions};
    let tumour = image::open(data("target_image.png")).unwrap().to_rgb8();
    let dir = tempfile::tempdir().unwrap();
    // Real tumour tissue, 4096² at 0.5 µm/px, its first level-0 tile broken (as above).
    let img = wsimil_worker::synth::mosaic(&tumour, 4096, 4096);
    let opt = wsimil_worker::tiff::TiffOptions { mpp: 0.5, ..Default::default() };
    let mut bytes = wsimil_worker::tiff::write_slide(&img, "broken", &opt).unwrap();
    bytes[10..60].fill(0);
    let path = dir.path().join("broken.svs");
    std::fs::write(&path, bytes).unwrap();
    let s = slide::open(&path).unwrap();
    let tiling = TilingSpec { patch_px: 512, target_mpp: 1.0, min_tissue_fraction: 0.5, ..spec() };
    let mut grid = tile_slide(s.as_ref(), "broken", &tiling, None).unwrap().grid;
    assert_eq!(grid.patches.len(), 16);
    // The broken patch last: the decoder meets it in the last batch, after the network has run.
    let broken = grid.patches.iter().position(|p| (p.x, p.y) == (0, 0)).unwrap();
    grid.patches.rotate_left(broken + 1);
    let p = wsimil_common::models::params::Params::new(5);
    let model = Architecture::EfficientNetLite0.build(p.var_builder(&Device::Cpu)).unwrap();
    let run = |batch: usize, corrupt| {
        let opts = EmbedOptions { batch_size: batch, dtype: DType::F32, corrupt };
        embed_patches(s.as_ref(), &grid, model.as_ref(), &Device::Cpu, opts)
    };
    let one = run(1, CorruptTiles::Skip).unwrap();
    assert_eq!(one.kept, (0..15).collect::<Vec<_>>());
    assert_eq!(one.skipped.len(), 1);
    assert_eq!(one.skipped[0].0, 15);
    for batch in [4, 16] {
        let other = run(batch, CorruptTiles::Skip).unwrap();
        assert_eq!((&other.kept, other.skipped.len()), (&one.kept, 1));
        let worst = one.features.iter().zip(&other.features).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "batch {batch}: features differ by {worst}");
    }
    let err = run(4, CorruptTiles::Fail).err().expect("a broken patch fails the slide").to_string();
    assert!(err.contains("broken.svs") && err.contains("corrupt tile"), "{err}");
}
