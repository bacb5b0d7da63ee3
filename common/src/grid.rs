//! The patch grid of a slide: where the patches are (level-0 pixels) and how much tissue each holds,
//! with the tiling's provenance.

use crate::table::{column, parse_provenance, read_parquet, write_parquet, TableError};
use arrow_array::{Float32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Tissue detection parameters (CLAM's segmentation, in level-0 units where they are areas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TissueParams {
    /// Median blur kernel (odd) applied to the saturation channel.
    pub median_kernel: u32,
    /// Fixed saturation threshold (0–255); `None` uses Otsu's threshold.
    pub threshold: Option<u8>,
    /// Morphological close kernel (square side, pixels of the detection level); 0 = none.
    pub close_kernel: u32,
    /// Connected tissue regions smaller than this (level-0 pixels²) are dropped.
    pub min_tissue_area: f64,
    /// Holes inside tissue larger than this (level-0 pixels²) are kept as holes; smaller are filled.
    pub min_hole_area: f64,
    /// Longest side of the image tissue is detected on; the slide level nearest above is read.
    pub detect_max_side: u32,
}

/// CLAM measures areas in reference patches of 512 × 512 level-0 pixels.
const REF_PATCH_AREA: f64 = 512.0 * 512.0;

impl TissueParams {
    /// CLAM's `tcga` preset: saturation threshold 8, median 7, close 4, tissue regions of at least
    /// 16 reference patches, holes of at least 4.
    pub fn tcga() -> Self {
        TissueParams {
            median_kernel: 7,
            threshold: Some(8),
            close_kernel: 4,
            min_tissue_area: 16.0 * REF_PATCH_AREA,
            min_hole_area: 4.0 * REF_PATCH_AREA,
            detect_max_side: 2048,
        }
    }

    /// CLAM's `bwh_biopsy` preset: as `tcga`, but fragments and holes of one reference patch count.
    pub fn biopsy() -> Self {
        TissueParams { min_tissue_area: REF_PATCH_AREA, min_hole_area: REF_PATCH_AREA, ..Self::tcga() }
    }

    pub fn preset(preset: TissuePreset) -> Self {
        match preset {
            TissuePreset::Tcga => Self::tcga(),
            TissuePreset::Biopsy => Self::biopsy(),
        }
    }
}

/// CLAM's tissue-detection presets (`--tissue-preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TissuePreset {
    /// Resections: small fragments and holes are dropped.
    Tcga,
    /// Biopsies: fragments and holes of one reference patch count.
    Biopsy,
}

/// How a slide was tiled: enough to reproduce the grid and to read its patches again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TilingProvenance {
    pub slide: String,
    pub source_path: String,
    /// Which reader opened the slide (e.g. `openslide 3.4.1 (aperio)`).
    pub reader: String,
    pub level0_width: u64,
    pub level0_height: u64,
    /// Microns per pixel at level 0, and where that figure came from (slide or manifest).
    pub mpp: f64,
    pub mpp_source: String,
    /// Objective magnification of level 0 (≈ 10 / mpp when the slide does not say).
    pub source_magnification: f64,
    pub target_mpp: f64,
    pub target_magnification: f64,
    /// Patch side at the target magnification (what the embedder sees before its own resize).
    pub patch_px: u32,
    /// Patch side and grid step in level-0 pixels.
    pub patch_level0: u64,
    pub step_level0: u64,
    /// Minimum tissue fraction of a kept patch.
    pub min_tissue_fraction: f32,
    pub tissue: TissueParams,
    /// Saturation threshold actually used (Otsu's or the fixed one).
    pub threshold_used: u8,
    /// Downsample of the image tissue was detected on, relative to level 0.
    pub detect_downsample: f64,
    /// Corrupt tiles met while reading that image (taken as background).
    #[serde(default)]
    pub corrupt_tiles: usize,
    pub patches: usize,
}

/// One patch: top-left corner at level 0 and its tissue fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Patch {
    pub x: i64,
    pub y: i64,
    pub tissue: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PatchGrid {
    pub patches: Vec<Patch>,
    pub provenance: TilingProvenance,
}

impl PatchGrid {
    pub fn to_parquet(&self) -> Result<Vec<u8>, TableError> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("y", DataType::Int64, false),
            Field::new("tissue", DataType::Float32, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(self.patches.iter().map(|p| p.x))),
                Arc::new(Int64Array::from_iter_values(self.patches.iter().map(|p| p.y))),
                Arc::new(Float32Array::from_iter_values(self.patches.iter().map(|p| p.tissue))),
            ],
        )
        .map_err(|source| TableError::Arrow { what: self.provenance.slide.clone(), source })?;
        write_parquet(&self.provenance.slide, &batch, &self.provenance)
    }

    pub fn from_parquet(what: &str, bytes: Bytes) -> Result<Self, TableError> {
        let (batch, prov) = read_parquet(what, bytes)?;
        let xs = column::<Int64Array>(what, &batch, "x")?;
        let ys = column::<Int64Array>(what, &batch, "y")?;
        let ts = column::<Float32Array>(what, &batch, "tissue")?;
        let patches =
            (0..batch.num_rows()).map(|i| Patch { x: xs.value(i), y: ys.value(i), tissue: ts.value(i) }).collect();
        Ok(PatchGrid { patches, provenance: parse_provenance(what, prov)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_provenance() -> TilingProvenance {
        TilingProvenance {
            slide: "s1".into(),
            source_path: "/x/s1.svs".into(),
            reader: "test".into(),
            level0_width: 1000,
            level0_height: 800,
            mpp: 0.25,
            mpp_source: "slide".into(),
            source_magnification: 40.0,
            target_mpp: 0.5,
            target_magnification: 20.0,
            patch_px: 256,
            patch_level0: 512,
            step_level0: 512,
            min_tissue_fraction: 0.25,
            tissue: TissueParams::tcga(),
            threshold_used: 17,
            detect_downsample: 16.0,
            corrupt_tiles: 0,
            patches: 2,
        }
    }

    #[test]
    fn patch_grid_round_trips_with_provenance() {
        let g = PatchGrid {
            patches: vec![Patch { x: 0, y: 512, tissue: 0.5 }, Patch { x: 512, y: 0, tissue: 1.0 }],
            provenance: sample_provenance(),
        };
        let bytes = g.to_parquet().unwrap();
        let back = PatchGrid::from_parquet("s1", bytes.into()).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let err = PatchGrid::from_parquet("tiles/t/s9.parquet", Bytes::from_static(b"not parquet")).unwrap_err();
        assert!(err.to_string().contains("tiles/t/s9.parquet"), "{err}");
    }
}
