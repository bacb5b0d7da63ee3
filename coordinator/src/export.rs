//! Features out of the store as the other MIL codebases read them: one HDF5 file per slide with
//! `features` [N, D] f32 and `coords` [N, 2] i64 (level-0 top-left corners), the layout CLAM's
//! `extract_features_fp.py` and TRIDENT's `run_batch_of_slides.py` write and CLAM, TRIDENT, STAMP
//! and MIL-Lab load.
//!
//! The attributes are TRIDENT's (`IO.save_h5` of its coords and features): on `coords` the patch
//! side at the target magnification (`patch_size`) and at level 0 (`patch_size_level0`, what
//! TRIDENT's slide encoders take as the tile size), both magnifications, the overlap in target
//! pixels, the slide's name, the folder and the level-0 size; on `features` the name, the folder
//! and the encoder. One more on `features`, `wsimil_provenance`, holds the bag's whole provenance
//! as JSON (embedder, weights' SHA-256, preprocessing, tiling), so nothing wsimil knew is lost on
//! the way out. Imported bags carry no tiling: their `coords` get only the name and folder, as
//! TRIDENT's legacy (CLAM) files, which its readers accept.
//!
//! Layouts: `clam` writes `DIR/h5_files/<slide>.h5` and CLAM's `DIR/dataset.csv`
//! (`case_id,slide_id,label`), which `wsimil import-clam --features-dir DIR --csv DIR/dataset.csv`
//! reads back; `trident` writes `DIR/features_<encoder>/<slide>.h5` as TRIDENT names its folders.
//! Files are written whole to a temporary name and renamed, so an interrupted export leaves no
//! truncated file, and a second one writes every file again (they are a view of the store).

use anyhow::Context;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use wsimil_common::features::FeatureBag;
use wsimil_common::grid::TilingProvenance;
use wsimil_common::ids::{EmbedderId, SlideId, TilingId};
use wsimil_common::layout;
use wsimil_common::store::Store;

/// Where the files go inside the export folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum H5Layout {
    /// `h5_files/<slide>.h5` and `dataset.csv`, as CLAM's feature extraction leaves them.
    Clam,
    /// `features_<encoder>/<slide>.h5`, as TRIDENT names its output folders.
    Trident,
}

/// One slide to export, with its class name when it has one.
#[derive(Debug, Clone)]
pub struct ExportSlide {
    pub id: SlideId,
    pub label: Option<String>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The folder holding the `.h5` files.
    pub dir: PathBuf,
    pub slides: usize,
    pub patches: usize,
    pub dim: usize,
    /// Slides asked for that have no features in the store, left out.
    pub missing: Vec<SlideId>,
}

/// The name TRIDENT's folder and `encoder` attribute get for features of `architecture`.
fn encoder_name(bag: &FeatureBag) -> String {
    let a = &bag.provenance.architecture;
    if a == "imported" {
        bag.provenance.embedder.clone()
    } else {
        a.replace([':', '/'], "_")
    }
}

/// Export the features of `slides` (`features/<embedder>/<tiling>/<slide>.parquet`) to `to`.
/// Slides without features in the store (a run's failed slides) are left out and named in
/// [`Exported::missing`]; none at all is an error, before anything is written.
pub async fn export_h5(
    store: &Store,
    embedder: &EmbedderId,
    tiling: &TilingId,
    slides: &[ExportSlide],
    to: &Path,
    h5_layout: H5Layout,
) -> anyhow::Result<Exported> {
    // One listing says which slides have features (not a request per slide).
    let stored: std::collections::HashSet<String> = store
        .list(&layout::features_prefix(embedder, tiling))
        .await?
        .iter()
        .filter_map(|k| k.filename().map(String::from))
        .collect();
    let (present, missing): (Vec<&ExportSlide>, Vec<&ExportSlide>) =
        slides.iter().partition(|s| stored.contains(&format!("{}.parquet", s.id)));
    let missing: Vec<SlideId> = missing.into_iter().map(|s| s.id.clone()).collect();
    if present.is_empty() {
        anyhow::bail!(
            "{}: no features under features/{embedder}/{tiling}/ for any of the {} slides; embed them first",
            store.location(),
            slides.len()
        );
    }
    // Reads run ahead (a bucket's latency), conversions and writes one bag at a time: at most a
    // few bags in memory whatever the cohort.
    let mut bags = futures::stream::iter(present.iter().map(|&s| async move {
        let key = layout::features(embedder, tiling, &s.id);
        let bytes = store.get(&key).await.with_context(|| format!("{}: {key}", store.location()))?;
        let bag = FeatureBag::from_parquet(key.as_ref(), bytes)?;
        anyhow::Ok((s, bag))
    }))
    .buffered(4);
    let mut out = Exported { dir: to.to_path_buf(), slides: 0, patches: 0, dim: 0, missing };
    while let Some(next) = bags.next().await {
        let (slide, bag) = next?;
        if out.slides == 0 {
            out.dir = match h5_layout {
                H5Layout::Clam => to.join("h5_files"),
                H5Layout::Trident => to.join(format!("features_{}", encoder_name(&bag))),
            };
            std::fs::create_dir_all(&out.dir).with_context(|| format!("{}: cannot create", out.dir.display()))?;
        } else if bag.dim != out.dim {
            anyhow::bail!("{}: {}-d features, the slides before it {}-d", slide.id, bag.dim, out.dim);
        }
        let path = out.dir.join(format!("{}.h5", slide.id));
        let tmp = out.dir.join(format!(".{}.h5.partial", slide.id));
        let bytes = to_h5(&bag, &slide.id, &out.dir)?;
        std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
        out.slides += 1;
        out.patches += bag.len();
        out.dim = bag.dim;
    }
    if h5_layout == H5Layout::Clam {
        let mut csv = String::from("case_id,slide_id,label\n");
        for s in &present {
            csv.push_str(&format!("{},{},{}\n", s.id, s.id, s.label.as_deref().unwrap_or("")));
        }
        let path = to.join("dataset.csv");
        std::fs::write(&path, csv).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(out)
}

/// A magnification as TRIDENT writes it: an integer where it is one (20, 40), else as measured.
fn magnification(m: f64) -> hdf5_pure::AttrValue {
    if (m - m.round()).abs() < 1e-6 {
        hdf5_pure::AttrValue::I64(m.round() as i64)
    } else {
        hdf5_pure::AttrValue::F64(m)
    }
}

/// TRIDENT's `coords` attributes of a tiling.
fn coords_attrs(t: &TilingProvenance) -> Vec<(&'static str, hdf5_pure::AttrValue)> {
    use hdf5_pure::AttrValue::I64;
    // Overlap in pixels at the target magnification: the patch side less the grid step there.
    let step_px = (t.step_level0 as f64 * t.patch_px as f64 / t.patch_level0.max(1) as f64).round() as i64;
    vec![
        ("patch_size", I64(t.patch_px as i64)),
        ("patch_size_level0", I64(t.patch_level0 as i64)),
        ("level0_magnification", magnification(t.source_magnification)),
        ("target_magnification", magnification(t.target_magnification)),
        ("overlap", I64((t.patch_px as i64 - step_px).max(0))),
        ("level0_width", I64(t.level0_width as i64)),
        ("level0_height", I64(t.level0_height as i64)),
    ]
}

/// One slide's HDF5 file, in memory.
pub fn to_h5(bag: &FeatureBag, slide: &SlideId, dir: &Path) -> anyhow::Result<Vec<u8>> {
    use hdf5_pure::AttrValue::String as Str;
    let n = bag.len() as u64;
    anyhow::ensure!(bag.features.len() as u64 == n * bag.dim as u64, "{slide}: feature matrix does not match its rows");
    let coords: Vec<i64> = bag.xs.iter().zip(&bag.ys).flat_map(|(x, y)| [*x, *y]).collect();
    let savetodir = dir.display().to_string();
    let mut b = hdf5_pure::FileBuilder::new();
    let f = b.create_dataset("features").with_f32_data(&bag.features).with_shape(&[n, bag.dim as u64]);
    f.set_attr("name", Str(slide.to_string()));
    f.set_attr("savetodir", Str(savetodir.clone()));
    f.set_attr("encoder", Str(encoder_name(bag)));
    f.set_attr("wsimil_provenance", Str(serde_json::to_string(&bag.provenance)?));
    let c = b.create_dataset("coords").with_i64_data(&coords).with_shape(&[n, 2]);
    if let Some(t) = &bag.provenance.tiling {
        for (k, v) in coords_attrs(t) {
            c.set_attr(k, v);
        }
    }
    c.set_attr("name", Str(slide.to_string()));
    c.set_attr("savetodir", Str(savetodir));
    b.finish().map_err(|e| anyhow::anyhow!("{slide}: cannot encode HDF5: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsimil_common::features::EmbeddingProvenance;
    use wsimil_common::grid::TissueParams;

    fn tiling(slide: &str) -> TilingProvenance {
        TilingProvenance {
            slide: slide.into(),
            source_path: format!("/slides/{slide}.svs"),
            reader: "openslide 4.0.0 (aperio)".into(),
            level0_width: 46_000,
            level0_height: 32_000,
            mpp: 0.2527,
            mpp_source: "slide".into(),
            source_magnification: 40.0,
            target_mpp: 0.5,
            target_magnification: 20.0,
            patch_px: 256,
            patch_level0: 512,
            step_level0: 384,
            min_tissue_fraction: 0.5,
            tissue: TissueParams::tcga(),
            threshold_used: 8,
            detect_downsample: 64.0,
            corrupt_tiles: 0,
            patches: 3,
        }
    }

    fn bag(slide: &str, n: usize, dim: usize, seed: f32) -> FeatureBag {
        let mut provenance = EmbeddingProvenance::new(slide, "uni-0123abcd", "uni", dim);
        provenance.tiling = Some(tiling(slide));
        provenance.weights_sha256 = Some("ab".repeat(32));
        FeatureBag {
            xs: (0..n as i64).map(|i| i * 384).collect(),
            ys: (0..n as i64).map(|i| 1000 + i).collect(),
            dim,
            features: (0..n * dim).map(|i| seed + i as f32 / 7.0).collect(),
            provenance,
        }
    }

    async fn store_with(bags: &[FeatureBag]) -> (Store, EmbedderId, TilingId) {
        let store = Store::memory();
        let (e, t) = (EmbedderId::new("uni-0123abcd").unwrap(), TilingId::new("t256-0.5").unwrap());
        for b in bags {
            let id = SlideId::new(b.provenance.slide.as_str()).unwrap();
            store.put(&layout::features(&e, &t, &id), b.to_parquet().unwrap()).await.unwrap();
        }
        (store, e, t)
    }

    fn slide(id: &str, label: &str) -> ExportSlide {
        ExportSlide { id: SlideId::new(id).unwrap(), label: Some(label.into()) }
    }

    #[tokio::test]
    async fn clam_layout_round_trips_through_import_clam_with_trident_attributes() {
        let bags = [bag("s1", 3, 5, 0.0), bag("s2", 4, 5, 100.0)];
        let (store, e, t) = store_with(&bags).await;
        let dir = tempfile::tempdir().unwrap();
        let slides = [slide("s1", "tumor"), slide("s2", "normal"), slide("failed", "tumor")];
        let out = export_h5(&store, &e, &t, &slides, dir.path(), H5Layout::Clam).await.unwrap();
        assert_eq!((out.slides, out.patches, out.dim), (2, 7, 5));
        assert_eq!(out.missing, vec![SlideId::new("failed").unwrap()], "a slide without features is left out, named");
        assert_eq!(out.dir, dir.path().join("h5_files"));
        let csv = std::fs::read_to_string(dir.path().join("dataset.csv")).unwrap();
        assert_eq!(csv, "case_id,slide_id,label\ns1,s1,tumor\ns2,s2,normal\n");

        // The file: the bag's features and corners, as CLAM reads them.
        let path = out.dir.join("s1.h5");
        let back = crate::import::read_clam_h5(&path).unwrap();
        assert_eq!((back.dim, &back.features), (5, &bags[0].features));
        let corners: Vec<(i64, i64)> = bags[0].xs.iter().copied().zip(bags[0].ys.iter().copied()).collect();
        assert_eq!(back.coords.as_ref(), Some(&corners));

        // TRIDENT's attributes, with the tiling's values.
        use hdf5_pure::AttrValue::{String as Str, I64};
        let file = hdf5_pure::File::open(&path).unwrap();
        let c = file.dataset("coords").unwrap().attrs().unwrap();
        assert_eq!(c["patch_size"], I64(256));
        assert_eq!(c["patch_size_level0"], I64(512));
        assert_eq!(c["level0_magnification"], I64(40));
        assert_eq!(c["target_magnification"], I64(20));
        assert_eq!(c["overlap"], I64(64), "a step of 384 level-0 pixels is 192 of 256 target pixels");
        assert_eq!((&c["level0_width"], &c["level0_height"]), (&I64(46_000), &I64(32_000)));
        assert_eq!(c["name"], Str("s1".into()));
        let f = file.dataset("features").unwrap().attrs().unwrap();
        assert_eq!(f["encoder"], Str("uni".into()));
        let Str(prov) = &f["wsimil_provenance"] else { panic!("{:?}", f["wsimil_provenance"]) };
        let prov: EmbeddingProvenance = serde_json::from_str(prov).unwrap();
        assert_eq!(prov, bags[0].provenance, "the whole provenance goes out with the features");

        // And back in: import-clam of the export gives the same bags.
        let name = EmbedderId::new("back").unwrap();
        let manifest =
            crate::import::import_clam(&store, &name, dir.path(), &dir.path().join("dataset.csv")).await.unwrap();
        assert_eq!(manifest.lines().count(), 3, "{manifest}");
        assert!(manifest.contains("s2,") && manifest.ends_with(",normal\n"), "{manifest}");
        let imported = TilingId::new(wsimil_common::plan::IMPORTED_TILING).unwrap();
        for b in &bags {
            let id = SlideId::new(b.provenance.slide.as_str()).unwrap();
            let key = layout::features(&name, &imported, &id);
            let got = FeatureBag::from_parquet("back", store.get(&key).await.unwrap()).unwrap();
            assert_eq!((&got.features, &got.xs, &got.ys), (&b.features, &b.xs, &b.ys), "{id}");
        }
    }

    #[tokio::test]
    async fn trident_layout_names_its_folder_after_the_encoder_and_nothing_is_left_half_written() {
        let (store, e, t) = store_with(&[bag("s1", 2, 3, 1.0)]).await;
        let dir = tempfile::tempdir().unwrap();
        let out = export_h5(&store, &e, &t, &[slide("s1", "a")], dir.path(), H5Layout::Trident).await.unwrap();
        assert_eq!(out.dir, dir.path().join("features_uni"));
        let names: Vec<String> =
            std::fs::read_dir(&out.dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["s1.h5"], "no partial files, no CLAM CSV");
        assert!(!dir.path().join("dataset.csv").exists());
    }

    #[tokio::test]
    async fn no_features_for_any_slide_is_an_error_before_anything_is_written() {
        let (store, e, t) = store_with(&[]).await;
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("out");
        let err = export_h5(&store, &e, &t, &[slide("s9", "a")], &to, H5Layout::Clam).await.unwrap_err().to_string();
        assert!(err.contains("features/uni-0123abcd/t256-0.5/") && err.contains("1 slides"), "{err}");
        assert!(!to.exists());
    }

    #[test]
    fn a_magnification_is_an_integer_where_it_is_one() {
        assert_eq!(magnification(20.0), hdf5_pure::AttrValue::I64(20));
        assert_eq!(magnification(39.6), hdf5_pure::AttrValue::F64(39.6));
    }
}
