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
    /// The classifier's instance path on each patch alone: the probability of the positive class
    /// (the second of two; column `instance_prob`). Binary runs only.
    pub instance: Option<Vec<f32>>,
    /// The fraction of each patch the slide's lesion covers, where the manifest gives its truth
    /// (column `truth_coverage`; see [`crate::truth`]).
    pub truth: Option<Vec<f32>>,
    pub provenance: PredictionProvenance,
}

impl AttentionMap {
    pub fn to_parquet(&self) -> Result<Vec<u8>, TableError> {
        let what = &self.provenance.slide;
        let mut fields = vec![
            Field::new("x", DataType::Int64, false),
            Field::new("y", DataType::Int64, false),
            Field::new("attention", DataType::Float32, false),
        ];
        let mut columns: Vec<arrow_array::ArrayRef> = vec![
            Arc::new(Int64Array::from(self.xs.clone())),
            Arc::new(Int64Array::from(self.ys.clone())),
            Arc::new(Float32Array::from(self.attention.clone())),
        ];
        for (name, values) in [("instance_prob", &self.instance), ("truth_coverage", &self.truth)] {
            if let Some(v) = values {
                fields.push(Field::new(name, DataType::Float32, false));
                columns.push(Arc::new(Float32Array::from(v.clone())));
            }
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|source| TableError::Arrow { what: what.clone(), source })?;
        write_parquet(what, &batch, &self.provenance)
    }

    pub fn from_parquet(what: &str, bytes: Bytes) -> Result<Self, TableError> {
        let (batch, prov) = read_parquet(what, bytes)?;
        let optional = |name: &str| -> Result<Option<Vec<f32>>, TableError> {
            match batch.schema().index_of(name) {
                Ok(_) => Ok(Some(column::<Float32Array>(what, &batch, name)?.values().to_vec())),
                Err(_) => Ok(None),
            }
        };
        Ok(AttentionMap {
            xs: column::<Int64Array>(what, &batch, "x")?.values().to_vec(),
            ys: column::<Int64Array>(what, &batch, "y")?.values().to_vec(),
            attention: column::<Float32Array>(what, &batch, "attention")?.values().to_vec(),
            instance: optional("instance_prob")?,
            truth: optional("truth_coverage")?,
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
            instance: None,
            truth: None,
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
        // With the instance path's probabilities and the patches' truth.
        let m = AttentionMap { instance: Some(vec![0.2, 0.9]), truth: Some(vec![0.0, 1.0]), ..m };
        assert_eq!(AttentionMap::from_parquet("s", m.to_parquet().unwrap().into()).unwrap(), m);
    }
}
