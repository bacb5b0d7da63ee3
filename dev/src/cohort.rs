//! A synthetic cohort at TCGA scale for `bench/train-scale.sh`: random features with a planted
//! signal, bag sizes spread as TCGA's are, written in the feature Parquet layout exactly as
//! `wsimil import-bags` leaves it (`features/<name>/imported/<slide>.parquet`, any store, local or
//! `s3://`) with its manifest, and optionally as CLAM's `h5_files/<slide>.h5` (`features` [N, D]
//! f32, `coords` [N, 2]) with CLAM's dataset CSV, for a peer that reads what CLAM writes.
//!
//! - Bag sizes: log-normal around the mean (σ = 0.5, as TCGA's tissue areas spread), clamped to
//!   [mean/4, 3·mean], then scaled so that the cohort has `slides × mean` patches in all.
//! - Features: i.i.d. uniform on [-√3, √3] (unit variance; incompressible, so files are as large
//!   as the features: the hard case for reading).
//! - Signal: half of the slides are positive; in each, a fraction of 2–20 % of the patches is
//!   shifted by 3 standard deviations along one random direction of the feature space (the
//!   "lesion"), so a MIL model learns it and a mean-pooling one barely sees it.

use anyhow::Context;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use wsimil_common::features::{EmbeddingProvenance, FeatureBag};
use wsimil_common::ids::{EmbedderId, SlideId, TilingId};
use wsimil_common::layout;
use wsimil_common::plan::IMPORTED_TILING;
use wsimil_common::rng::Rng;
use wsimil_common::store::Store;

/// What to make.
#[derive(Debug, Clone)]
pub struct CohortSpec {
    pub slides: usize,
    /// Mean patches per slide.
    pub patches: usize,
    pub dim: usize,
    pub seed: u64,
}

/// Patches per slide: log-normal around the mean, clamped, scaled to `slides × patches` in all.
pub fn bag_sizes(spec: &CohortSpec) -> Vec<usize> {
    let mut rng = Rng::new(spec.seed ^ 0x5135);
    let mean = spec.patches as f64;
    let raw: Vec<f64> =
        (0..spec.slides).map(|_| (mean * (0.5 * rng.normal() - 0.125).exp()).clamp(mean / 4.0, mean * 3.0)).collect();
    let scale = mean * spec.slides as f64 / raw.iter().sum::<f64>().max(1.0);
    raw.iter().map(|r| ((r * scale).round() as usize).max(1)).collect()
}

/// Slide `i`'s label (0 or 1, balanced, in a seeded order).
pub fn labels(spec: &CohortSpec) -> Vec<usize> {
    let mut l: Vec<usize> = (0..spec.slides).map(|i| i % 2).collect();
    Rng::new(spec.seed ^ 0x1abe1).shuffle(&mut l);
    l
}

/// The features of one slide: `n` rows, lesion rows shifted along `direction` when positive.
pub fn slide_features(spec: &CohortSpec, i: usize, n: usize, positive: bool, direction: &[f32]) -> Vec<f32> {
    let mut rng = Rng::new(spec.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let half = 3f32.sqrt();
    let mut f = Vec::with_capacity(n * spec.dim);
    for _ in 0..n * spec.dim {
        // 24 random bits per value: uniform on [-√3, √3).
        let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        f.push((2.0 * u - 1.0) * half);
    }
    if positive {
        let share = rng.range(0.02, 0.2);
        for row in f.chunks_mut(spec.dim) {
            if rng.uniform() < share {
                row.iter_mut().zip(direction).for_each(|(v, d)| *v += 3.0 * d);
            }
        }
    }
    f
}

/// A unit vector of the feature space (the lesions' direction).
pub fn direction(spec: &CohortSpec) -> Vec<f32> {
    let mut rng = Rng::new(spec.seed ^ 0xd1ec);
    let v: Vec<f32> = (0..spec.dim).map(|_| rng.normal() as f32).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn slide_id(i: usize) -> SlideId {
    SlideId::new(format!("TCGA-SYN-{i:05}")).expect("safe id")
}

/// Write the cohort to `store` under `name` (and to `h5_dir` when given); returns the manifest
/// text and the bytes of features written.
pub async fn write_cohort(
    store: &Store,
    name: &EmbedderId,
    spec: &CohortSpec,
    h5_dir: Option<&Path>,
) -> anyhow::Result<(String, u64)> {
    let sizes = bag_sizes(spec);
    let labels = labels(spec);
    let dir = direction(spec);
    let tiling = TilingId::new(IMPORTED_TILING).expect("safe");
    if let Some(d) = h5_dir {
        std::fs::create_dir_all(d.join("h5_files")).with_context(|| d.display().to_string())?;
    }
    let mut manifest = String::from("slide_id,path,label\n");
    let mut clam_csv = String::from("case_id,slide_id,label\n");
    let mut bytes = 0u64;
    // A few slides at a time: generated and encoded on every core, then written.
    for chunk in (0..spec.slides).collect::<Vec<_>>().chunks(8) {
        let made: Vec<(SlideId, Vec<u8>, Option<PathBuf>)> = chunk
            .par_iter()
            .map(|&i| -> anyhow::Result<_> {
                let id = slide_id(i);
                let n = sizes[i];
                let features = slide_features(spec, i, n, labels[i] == 1, &dir);
                let (xs, ys): (Vec<i64>, Vec<i64>) = (0..n as i64).map(|k| ((k % 200) * 256, (k / 200) * 256)).unzip();
                let h5 = match h5_dir {
                    Some(d) => {
                        Some(write_h5(&d.join("h5_files").join(format!("{id}.h5")), &features, spec.dim, &xs, &ys)?)
                    }
                    None => None,
                };
                let bag = FeatureBag {
                    xs,
                    ys,
                    dim: spec.dim,
                    features,
                    provenance: EmbeddingProvenance {
                        imported_from: Some(format!("wsimil-dev make-cohort seed {}", spec.seed)),
                        ..EmbeddingProvenance::new(id.as_str(), name.as_str(), "imported", spec.dim)
                    },
                };
                Ok((id, bag.to_parquet()?, h5))
            })
            .collect::<anyhow::Result<_>>()?;
        for ((id, parquet, h5), &i) in made.into_iter().zip(chunk) {
            bytes += parquet.len() as u64;
            let key = layout::features(name, &tiling, &id);
            store.put(&key, parquet).await?;
            // The manifest's path: the slide's CLAM file, else its feature file (any object that
            // is there; `run --features` reads the features from the store).
            let path = match (h5, store.local_path(&key)) {
                (Some(h5), _) => std::fs::canonicalize(&h5)?.display().to_string(),
                (None, Some(local)) => std::fs::canonicalize(local)?.display().to_string(),
                (None, None) => format!("{}/{key}", store.location().trim_end_matches('/')),
            };
            let label = if labels[i] == 1 { "tumor" } else { "normal" };
            manifest.push_str(&format!("{id},{path},{label}\n"));
            clam_csv.push_str(&format!("{id},{id},{label}\n"));
        }
    }
    if let Some(d) = h5_dir {
        std::fs::write(d.join("dataset.csv"), clam_csv)?;
    }
    Ok((manifest, bytes))
}

/// One CLAM feature file: `features` [N, D] f32 and `coords` [N, 2] i64, as CLAM's
/// `extract_features_fp.py` writes them.
fn write_h5(path: &Path, features: &[f32], dim: usize, xs: &[i64], ys: &[i64]) -> anyhow::Result<PathBuf> {
    let n = xs.len() as u64;
    let coords: Vec<i64> = xs.iter().zip(ys).flat_map(|(x, y)| [*x, *y]).collect();
    let mut b = hdf5_pure::FileBuilder::new();
    b.create_dataset("features").with_f32_data(features).with_shape(&[n, dim as u64]);
    b.create_dataset("coords").with_i64_data(&coords).with_shape(&[n, 2]);
    b.write(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bag_sizes_spread_around_the_mean_and_add_up_to_the_cohort() {
        let spec = CohortSpec { slides: 1000, patches: 5000, dim: 8, seed: 1 };
        let s = bag_sizes(&spec);
        let total: usize = s.iter().sum();
        assert!((total as f64 - 5e6).abs() < 1e3, "{total}");
        let (min, max) = (*s.iter().min().unwrap(), *s.iter().max().unwrap());
        assert!(min < 2500 && max > 10_000 && min >= 5000 / 4 - 100 && max <= 3 * 5000 + 600, "{min}..{max}");
        assert_eq!(labels(&spec).iter().sum::<usize>(), 500);
    }

    #[test]
    fn positive_slides_carry_the_lesion_direction_and_negatives_do_not() {
        let spec = CohortSpec { slides: 2, patches: 2000, dim: 64, seed: 3 };
        let d = direction(&spec);
        let project =
            |f: &[f32]| -> Vec<f32> { f.chunks(64).map(|r| r.iter().zip(&d).map(|(a, b)| a * b).sum()).collect() };
        let lesion_rows = |f: &[f32]| project(f).iter().filter(|&&p| p > 2.0).count();
        let neg = slide_features(&spec, 0, 2000, false, &d);
        let pos = slide_features(&spec, 1, 2000, true, &d);
        // Unit-variance noise projects past 2σ on ~2 % of rows; lesions add 2–20 % at +3σ.
        assert!(lesion_rows(&neg) < 80, "{}", lesion_rows(&neg));
        assert!(lesion_rows(&pos) > lesion_rows(&neg) + 30, "{} vs {}", lesion_rows(&pos), lesion_rows(&neg));
        let var = neg.iter().map(|v| v * v).sum::<f32>() / neg.len() as f32;
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }

    #[tokio::test]
    async fn the_cohort_reads_back_as_imported_features_and_as_clam_h5() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store").to_str().unwrap(), &Default::default()).unwrap();
        let spec = CohortSpec { slides: 3, patches: 50, dim: 16, seed: 9 };
        let name = EmbedderId::new("syn").unwrap();
        let (manifest, bytes) = write_cohort(&store, &name, &spec, Some(&dir.path().join("clam"))).await.unwrap();
        assert_eq!(manifest.lines().count(), 4);
        assert!(bytes > (3 * 50 * 16 * 4) as u64);
        let tiling = TilingId::new(IMPORTED_TILING).unwrap();
        let key = layout::features(&name, &tiling, &slide_id(1));
        let bag = FeatureBag::from_parquet(key.as_ref(), store.get(&key).await.unwrap()).unwrap();
        assert_eq!((bag.len(), bag.dim), (bag_sizes(&spec)[1], 16));
        let h5 = wsimil_coordinator::import::read_clam_h5(&dir.path().join("clam/h5_files/TCGA-SYN-00001.h5")).unwrap();
        assert_eq!(h5.features, bag.features);
        assert_eq!(h5.coords.unwrap().len(), bag.len());
    }
}
