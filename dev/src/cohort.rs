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
//! - Survival (`--survival`, `bench/survival.sh`): each slide's follow-up, with the hazard rising
//!   with its lesion share (log hazard ratio 4 × share / 0.2, so the most lesioned slides fail
//!   55 times as fast as lesion-free ones): exponential event times with a median of 693 days
//!   for a lesion-free slide, censored uniformly on [0, 3000] days (a third of the lesion-free
//!   slides censored, a fifth of the cohort), as `time,event` columns of the manifest. Ranking
//!   the slides by their true lesion share gives a C-index of about 0.76: the ceiling a model
//!   can reach.

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
    /// Give each slide a follow-up whose hazard rises with its lesions.
    pub survival: bool,
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

/// The features of one slide: `n` rows, lesion rows shifted along `direction` when positive; and
/// the share of lesion rows drawn (0 for a negative).
pub fn slide_features(spec: &CohortSpec, i: usize, n: usize, positive: bool, direction: &[f32]) -> (Vec<f32>, f64) {
    let mut rng = Rng::new(spec.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let half = 3f32.sqrt();
    let mut f = Vec::with_capacity(n * spec.dim);
    for _ in 0..n * spec.dim {
        // 24 random bits per value: uniform on [-√3, √3).
        let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        f.push((2.0 * u - 1.0) * half);
    }
    let mut share = 0.0;
    if positive {
        share = rng.range(0.02, 0.2);
        for row in f.chunks_mut(spec.dim) {
            if rng.uniform() < share {
                row.iter_mut().zip(direction).for_each(|(v, d)| *v += 3.0 * d);
            }
        }
    }
    (f, share)
}

/// Slide `i`'s follow-up given its lesion share: (days, event observed).
pub fn follow_up(spec: &CohortSpec, i: usize, share: f64) -> (f64, bool) {
    let mut rng = Rng::new(spec.seed ^ 0x5u64.wrapping_add(i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let hazard = (4.0 * share / 0.2).exp() / 1000.0;
    let t = -(1.0 - rng.uniform()).ln() / hazard;
    let c = 3000.0 * rng.uniform();
    ((t.min(c)).round().max(1.0), t <= c)
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
    let extra = if spec.survival { ",time,event" } else { "" };
    let mut manifest = format!("slide_id,path,label{extra}\n");
    let mut clam_csv = format!("case_id,slide_id,label{extra}\n");
    let mut bytes = 0u64;
    // A few slides at a time: generated and encoded on every core, then written.
    for chunk in (0..spec.slides).collect::<Vec<_>>().chunks(8) {
        let made: Vec<(SlideId, Vec<u8>, Option<PathBuf>, f64)> = chunk
            .par_iter()
            .map(|&i| -> anyhow::Result<_> {
                let id = slide_id(i);
                let n = sizes[i];
                let (features, share) = slide_features(spec, i, n, labels[i] == 1, &dir);
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
                Ok((id, bag.to_parquet()?, h5, share))
            })
            .collect::<anyhow::Result<_>>()?;
        for ((id, parquet, h5, share), &i) in made.into_iter().zip(chunk) {
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
            let extra = if spec.survival {
                let (t, e) = follow_up(spec, i, share);
                format!(",{t},{}", e as u8)
            } else {
                String::new()
            };
            manifest.push_str(&format!("{id},{path},{label}{extra}\n"));
            clam_csv.push_str(&format!("{id},{id},{label}{extra}\n"));
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
        let spec = CohortSpec { slides: 1000, patches: 5000, dim: 8, seed: 1, survival: false };
        let s = bag_sizes(&spec);
        let total: usize = s.iter().sum();
        assert!((total as f64 - 5e6).abs() < 1e3, "{total}");
        let (min, max) = (*s.iter().min().unwrap(), *s.iter().max().unwrap());
        assert!(min < 2500 && max > 10_000 && min >= 5000 / 4 - 100 && max <= 3 * 5000 + 600, "{min}..{max}");
        assert_eq!(labels(&spec).iter().sum::<usize>(), 500);
    }

    #[test]
    fn positive_slides_carry_the_lesion_direction_and_negatives_do_not() {
        let spec = CohortSpec { slides: 2, patches: 2000, dim: 64, seed: 3, survival: false };
        let d = direction(&spec);
        let project =
            |f: &[f32]| -> Vec<f32> { f.chunks(64).map(|r| r.iter().zip(&d).map(|(a, b)| a * b).sum()).collect() };
        let lesion_rows = |f: &[f32]| project(f).iter().filter(|&&p| p > 2.0).count();
        let (neg, none) = slide_features(&spec, 0, 2000, false, &d);
        let (pos, share) = slide_features(&spec, 1, 2000, true, &d);
        assert!(none == 0.0 && (0.02..0.2).contains(&share), "{none} {share}");
        // Unit-variance noise projects past 2σ on ~2 % of rows; lesions add 2–20 % at +3σ.
        assert!(lesion_rows(&neg) < 80, "{}", lesion_rows(&neg));
        assert!(lesion_rows(&pos) > lesion_rows(&neg) + 30, "{} vs {}", lesion_rows(&pos), lesion_rows(&neg));
        let var = neg.iter().map(|v| v * v).sum::<f32>() / neg.len() as f32;
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }

    #[test]
    fn follow_up_fails_sooner_with_more_lesions_and_is_a_third_censored() {
        let spec = CohortSpec { slides: 4000, patches: 1, dim: 1, seed: 5, survival: true };
        let lesion_free: Vec<(f64, bool)> = (0..2000).map(|i| follow_up(&spec, i, 0.0)).collect();
        let lesioned: Vec<(f64, bool)> = (2000..4000).map(|i| follow_up(&spec, i, 0.1)).collect();
        let mean = |v: &[(f64, bool)]| v.iter().map(|p| p.0).sum::<f64>() / v.len() as f64;
        assert!(mean(&lesioned) < 0.5 * mean(&lesion_free), "{} vs {}", mean(&lesioned), mean(&lesion_free));
        let censored = lesion_free.iter().filter(|p| !p.1).count() as f64 / 2000.0;
        assert!((0.2..0.45).contains(&censored), "{censored}");
        assert!(lesion_free.iter().all(|p| p.0 >= 1.0 && p.0 <= 3000.0));
    }

    #[tokio::test]
    async fn the_cohort_reads_back_as_imported_features_and_as_clam_h5() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store").to_str().unwrap(), &Default::default()).unwrap();
        let spec = CohortSpec { slides: 3, patches: 50, dim: 16, seed: 9, survival: false };
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
