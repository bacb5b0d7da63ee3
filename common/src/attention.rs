//! Per-patch attention of a slide's prediction, with the prediction itself in the provenance:
//! what heatmaps are drawn from, and what a pathologist's viewer can overlay.

use crate::table::{column, parse_provenance, read_parquet, write_parquet, TableError};
use arrow_array::{Float32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionProvenance {
    pub slide: String,
    pub round: u32,
    /// The cross-validation fold whose model (never trained on this slide) predicted it.
    pub fold: u32,
    pub classes: Vec<String>,
    /// Index into `classes`; none for a slide of an unlabelled cohort (`wsimil predict`).
    pub label: Option<usize>,
    pub probs: Vec<f64>,
    pub model: String,
    pub embedder: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMap {
    pub xs: Vec<i64>,
    pub ys: Vec<i64>,
    pub attention: Vec<f32>,
    pub provenance: PredictionProvenance,
}

impl AttentionMap {
    pub fn to_parquet(&self) -> Result<Vec<u8>, TableError> {
        let what = &self.provenance.slide;
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("y", DataType::Int64, false),
            Field::new("attention", DataType::Float32, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(self.xs.clone())),
                Arc::new(Int64Array::from(self.ys.clone())),
                Arc::new(Float32Array::from(self.attention.clone())),
            ],
        )
        .map_err(|source| TableError::Arrow { what: what.clone(), source })?;
        write_parquet(what, &batch, &self.provenance)
    }

    pub fn from_parquet(what: &str, bytes: Bytes) -> Result<Self, TableError> {
        let (batch, prov) = read_parquet(what, bytes)?;
        Ok(AttentionMap {
            xs: column::<Int64Array>(what, &batch, "x")?.values().to_vec(),
            ys: column::<Int64Array>(what, &batch, "y")?.values().to_vec(),
            attention: column::<Float32Array>(what, &batch, "attention")?.values().to_vec(),
            provenance: parse_provenance(what, prov)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_map_round_trips() {
        let m = AttentionMap {
            xs: vec![0, 256],
            ys: vec![512, 0],
            attention: vec![0.25, 0.75],
            provenance: PredictionProvenance {
                slide: "s".into(),
                round: 0,
                fold: 2,
                classes: vec!["normal".into(), "tumor".into()],
                label: Some(1),
                probs: vec![0.1, 0.9],
                model: "transmil".into(),
                embedder: "e".into(),
            },
        };
        assert_eq!(AttentionMap::from_parquet("s", m.to_parquet().unwrap().into()).unwrap(), m);
    }
}
