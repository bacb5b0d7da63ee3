//! The predictions table a person and a notebook read, one writer for both of its kinds: a run's
//! out-of-fold predictions (`runs/<run>/round-<r>/predictions.{csv,parquet}`, with the fold each
//! slide was tested in) and `wsimil predict`'s (`applied/<name>/predictions.{csv,parquet}`, labels
//! where the manifest gives them).
//!
//! Columns: `slide_id`, `label` (empty where unknown), `fold` (run tables only), `predicted` (the
//! class of highest probability), then `prob_<class>` for every class in the model's order. The
//! CSV holds probabilities to 6 decimals; the Parquet file the f64s, with a provenance note.

use anyhow::Result;
use arrow_array::{Float64Array, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use object_store::path::Path as Key;
use std::sync::Arc;
use wsimil_common::store::Store;
use wsimil_common::table::write_parquet;

/// One slide's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub slide: String,
    /// Index of its label among the classes, where known.
    pub label: Option<usize>,
    /// The fold it was tested in (out-of-fold predictions).
    pub fold: Option<u32>,
    /// Class probabilities, in the classes' order.
    pub probs: Vec<f64>,
}

impl Prediction {
    /// A slide's prediction by the model of the fold it was tested in (a fold report's row).
    pub fn out_of_fold(p: &wsimil_common::records::SlidePrediction, fold: u32) -> Self {
        Prediction { slide: p.slide.clone(), label: Some(p.label), fold: Some(fold), probs: p.probs.clone() }
    }

    /// The class of highest probability (the last of ties, as `wsimil_common::metrics` counts it).
    pub fn predicted(&self) -> usize {
        self.probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
    }
}

/// Where a table goes, and what it says about itself.
pub struct Table<'a> {
    pub csv: Key,
    pub parquet: Key,
    pub classes: &'a [String],
    /// With a `fold` column (a run's out-of-fold predictions).
    pub folds: bool,
    /// The Parquet file's provenance note.
    pub provenance: serde_json::Value,
}

impl Table<'_> {
    /// The CSV text of `rows`.
    pub fn csv(&self, rows: &[Prediction]) -> String {
        let classes = self.classes;
        let probs = classes.iter().map(|c| format!("prob_{c}")).collect::<Vec<_>>().join(",");
        let mut csv = format!("slide_id,label,{}predicted,{probs}\n", if self.folds { "fold," } else { "" });
        for r in rows {
            let label = r.label.map(|l| classes[l].as_str()).unwrap_or("");
            let fold = match (self.folds, r.fold) {
                (true, Some(k)) => format!("{k},"),
                (true, None) => ",".into(),
                (false, _) => String::new(),
            };
            let probs: Vec<String> = r.probs.iter().map(|p| format!("{p:.6}")).collect();
            csv.push_str(&format!("{},{label},{fold}{},{}\n", r.slide, classes[r.predicted()], probs.join(",")));
        }
        csv
    }

    /// The Parquet record batch of `rows`.
    pub fn batch(&self, rows: &[Prediction]) -> Result<RecordBatch> {
        let classes = self.classes;
        let mut fields = vec![Field::new("slide_id", DataType::Utf8, false), Field::new("label", DataType::Utf8, true)];
        let mut cols: Vec<Arc<dyn arrow_array::Array>> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.slide.as_str()))),
            Arc::new(StringArray::from(rows.iter().map(|r| r.label.map(|l| classes[l].as_str())).collect::<Vec<_>>())),
        ];
        if self.folds {
            fields.push(Field::new("fold", DataType::Int32, true));
            cols.push(Arc::new(Int32Array::from(rows.iter().map(|r| r.fold.map(|k| k as i32)).collect::<Vec<_>>())));
        }
        fields.push(Field::new("predicted", DataType::Utf8, false));
        cols.push(Arc::new(StringArray::from_iter_values(rows.iter().map(|r| classes[r.predicted()].as_str()))));
        for (c, name) in classes.iter().enumerate() {
            fields.push(Field::new(format!("prob_{name}"), DataType::Float64, false));
            cols.push(Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.probs[c]))));
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    /// Write both files.
    pub async fn write(&self, store: &Store, rows: &[Prediction]) -> Result<()> {
        let parquet = write_parquet("predictions", &self.batch(rows)?, &self.provenance)?;
        store.put(&self.parquet, parquet).await?;
        store.put(&self.csv, self.csv(rows).into_bytes()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;

    fn classes() -> Vec<String> {
        vec!["normal".into(), "tumor".into()]
    }

    fn rows() -> Vec<Prediction> {
        vec![
            Prediction { slide: "a".into(), label: Some(1), fold: Some(0), probs: vec![0.25, 0.75] },
            Prediction { slide: "b".into(), label: None, fold: Some(1), probs: vec![0.5, 0.5] },
        ]
    }

    #[tokio::test]
    async fn both_kinds_of_table_are_written_with_their_columns() {
        let classes = classes();
        let store = Store::memory();
        for folds in [true, false] {
            let table = Table {
                csv: Key::from(format!("p-{folds}.csv")),
                parquet: Key::from(format!("p-{folds}.parquet")),
                classes: &classes,
                folds,
                provenance: serde_json::json!({"kind": "test"}),
            };
            table.write(&store, &rows()).await.unwrap();
            let csv = String::from_utf8(store.get(&table.csv).await.unwrap().to_vec()).unwrap();
            let want = if folds {
                "slide_id,label,fold,predicted,prob_normal,prob_tumor\na,tumor,0,tumor,0.250000,0.750000\n\
                 b,,1,tumor,0.500000,0.500000\n"
            } else {
                "slide_id,label,predicted,prob_normal,prob_tumor\na,tumor,tumor,0.250000,0.750000\n\
                 b,,tumor,0.500000,0.500000\n"
            };
            assert_eq!(csv, want, "a tie goes to the last class, as the metrics count it");
            let (batch, _) = wsimil_common::table::read_parquet("p", store.get(&table.parquet).await.unwrap()).unwrap();
            let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
            assert_eq!(names.contains(&"fold".to_string()), folds, "{names:?}");
            let label: &StringArray = wsimil_common::table::column("p", &batch, "label").unwrap();
            assert_eq!((label.value(0), label.is_null(1)), ("tumor", true));
            let tumour: &Float64Array = wsimil_common::table::column("p", &batch, "prob_tumor").unwrap();
            assert_eq!(tumour.values().to_vec(), vec![0.75, 0.5]);
        }
    }
}
