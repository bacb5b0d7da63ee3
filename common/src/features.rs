//! Feature Parquet: one row per patch (`x`, `y` at level 0, `feature` as FixedSizeList<Float32>),
//! zstd, with the embedding's provenance in the file metadata. This is the layout every bag
//! classifier reads, whether the features came from wsimil's embedders or were imported.

use crate::grid::TilingProvenance;
use crate::table::{column, parse_provenance, read_parquet, write_parquet, TableError};
use arrow_array::{Array, FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How an image became a network input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Side of the square network input.
    pub input_px: u32,
    /// Resampling used to go from the patch to `input_px`.
    pub resize: String,
    /// Per-channel mean and standard deviation on [0, 1] RGB.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Resize the patch to this side first, then take its central `input_px` square (the
    /// `Resize(r)` + `CenterCrop(input_px)` of a publisher's transform); none: resize to `input_px`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_px: Option<u32>,
}

/// Where a bag of features came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingProvenance {
    pub slide: String,
    pub embedder: String,
    pub architecture: String,
    pub feature_dim: usize,
    pub preprocessing: Option<Preprocessing>,
    pub tiling_id: Option<String>,
    pub tiling: Option<TilingProvenance>,
    /// Patches that could not be read (corrupt tiles) and were left out of the bag.
    pub patches_skipped: usize,
    /// Where the bag was imported from, for bags not embedded by wsimil.
    pub imported_from: Option<String>,
    /// Device and precision the embedder ran in (`cpu f32`, `cuda:0 bf16`); features from
    /// different precisions differ in their last bits.
    #[serde(default)]
    pub compute: Option<String>,
    /// SHA-256 of the embedder's weights file as its publisher ships it (`random-<seed>` for
    /// random weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// What each feature is (`class token`, `class token + mean patch token`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// The bag of one slide: `n` patches with their `dim`-wide features, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureBag {
    pub xs: Vec<i64>,
    pub ys: Vec<i64>,
    pub dim: usize,
    pub features: Vec<f32>,
    pub provenance: EmbeddingProvenance,
}

impl FeatureBag {
    pub fn len(&self) -> usize {
        self.xs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.xs.is_empty()
    }

    pub fn to_parquet(&self) -> Result<Vec<u8>, TableError> {
        let what = &self.provenance.slide;
        if self.features.len() != self.xs.len() * self.dim || self.ys.len() != self.xs.len() {
            return Err(TableError::invalid(what, "feature matrix does not match the patch count"));
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("y", DataType::Int64, false),
            Field::new("feature", DataType::FixedSizeList(item.clone(), self.dim as i32), false),
        ]));
        let values = Arc::new(Float32Array::from(self.features.clone()));
        let list = FixedSizeListArray::try_new(item, self.dim as i32, values, None)
            .map_err(|source| TableError::Arrow { what: what.clone(), source })?;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(self.xs.clone())),
                Arc::new(Int64Array::from(self.ys.clone())),
                Arc::new(list),
            ],
        )
        .map_err(|source| TableError::Arrow { what: what.clone(), source })?;
        write_parquet(what, &batch, &self.provenance)
    }

    pub fn from_parquet(what: &str, bytes: Bytes) -> Result<Self, TableError> {
        let (batch, prov) = read_parquet(what, bytes)?;
        let xs = column::<Int64Array>(what, &batch, "x")?;
        let ys = column::<Int64Array>(what, &batch, "y")?;
        let list = column::<FixedSizeListArray>(what, &batch, "feature")?;
        let dim = list.value_length() as usize;
        let values = list
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .ok_or_else(|| TableError::invalid(what, "feature items are not Float32"))?;
        if list.null_count() > 0 || values.null_count() > 0 {
            return Err(TableError::invalid(what, "null features"));
        }
        let start = list.offset() * dim;
        let features = values.values()[start..start + list.len() * dim].to_vec();
        Ok(FeatureBag {
            xs: xs.values().to_vec(),
            ys: ys.values().to_vec(),
            dim,
            features,
            provenance: parse_provenance(what, prov)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bag(n: usize, dim: usize) -> FeatureBag {
        FeatureBag {
            xs: (0..n as i64).map(|i| i * 256).collect(),
            ys: (0..n as i64).collect(),
            dim,
            features: (0..n * dim).map(|i| i as f32 * 0.5).collect(),
            provenance: EmbeddingProvenance {
                slide: "s1".into(),
                embedder: "e".into(),
                architecture: "test".into(),
                feature_dim: dim,
                preprocessing: None,
                tiling_id: None,
                tiling: None,
                patches_skipped: 1,
                imported_from: None,
                compute: None,
                weights_sha256: None,
                output: None,
            },
        }
    }

    #[test]
    fn features_round_trip_as_fixed_size_lists() {
        let b = bag(5, 7);
        let bytes = b.to_parquet().unwrap();
        let back = FeatureBag::from_parquet("s1", bytes.clone().into()).unwrap();
        assert_eq!(back, b);
        // The on-disk type is what other tools expect to read.
        let (batch, _) = read_parquet("s1", bytes.into()).unwrap();
        assert!(matches!(batch.schema().field(2).data_type(), DataType::FixedSizeList(_, 7)));
    }

    #[test]
    fn an_empty_bag_round_trips() {
        let b = bag(0, 3);
        let back = FeatureBag::from_parquet("s1", b.to_parquet().unwrap().into()).unwrap();
        assert!(back.is_empty());
        assert_eq!(back.dim, 3);
    }

    #[test]
    fn mismatched_matrix_is_refused() {
        let mut b = bag(2, 3);
        b.features.pop();
        assert!(b.to_parquet().is_err());
    }
}
