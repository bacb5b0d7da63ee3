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

/// One slide's survival prediction: its risk (higher: an earlier event), its follow-up where known,
/// and in a run's table its fold and risk group (above its fold's training median: high).
#[derive(Debug, Clone, PartialEq)]
pub struct SurvivalRow {
    pub slide: String,
    pub fold: Option<u32>,
    pub follow_up: Option<wsimil_common::plan::SurvivalTarget>,
    pub risk: f64,
    pub high_risk: Option<bool>,
}

impl SurvivalRow {
    /// The risks, times and events of the rows with follow-up (what the C-index is computed on).
    pub fn columns(rows: &[SurvivalRow]) -> (Vec<f64>, Vec<f64>, Vec<bool>) {
        let known = rows.iter().filter_map(|r| Some((r.risk, r.follow_up?)));
        let (risk, t): (Vec<f64>, Vec<_>) = known.unzip();
        (risk, t.iter().map(|t| t.time).collect(), t.iter().map(|t| t.event).collect())
    }
}

/// A survival model's predictions table: `slide_id`, `fold` (run tables), `time`, `event` (empty
/// where unknown), `risk`, `risk_group` (`high`/`low`, run tables).
pub struct SurvivalTable {
    pub csv: Key,
    pub parquet: Key,
    /// A run's out-of-fold table (with `fold` and `risk_group`).
    pub folds: bool,
    pub provenance: serde_json::Value,
}

impl SurvivalTable {
    pub fn csv(&self, rows: &[SurvivalRow]) -> String {
        let mut csv = format!(
            "slide_id,{}time,event,risk{}\n",
            if self.folds { "fold," } else { "" },
            if self.folds { ",risk_group" } else { "" }
        );
        for r in rows {
            let fold = if self.folds {
                format!("{},", r.fold.map(|k| k.to_string()).unwrap_or_default())
            } else {
                String::new()
            };
            let (time, event) = r
                .follow_up
                .map_or((String::new(), String::new()), |t| (t.time.to_string(), (t.event as u8).to_string()));
            let group = match (self.folds, r.high_risk) {
                (true, Some(h)) => format!(",{}", if h { "high" } else { "low" }),
                (true, None) => ",".into(),
                (false, _) => String::new(),
            };
            csv.push_str(&format!("{},{fold}{time},{event},{:.6}{group}\n", r.slide, r.risk));
        }
        csv
    }

    pub fn batch(&self, rows: &[SurvivalRow]) -> Result<RecordBatch> {
        let mut fields = vec![Field::new("slide_id", DataType::Utf8, false)];
        let mut cols: Vec<Arc<dyn arrow_array::Array>> =
            vec![Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.slide.as_str())))];
        if self.folds {
            fields.push(Field::new("fold", DataType::Int32, true));
            cols.push(Arc::new(Int32Array::from(rows.iter().map(|r| r.fold.map(|k| k as i32)).collect::<Vec<_>>())));
        }
        fields.push(Field::new("time", DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(rows.iter().map(|r| r.follow_up.map(|t| t.time)).collect::<Vec<_>>())));
        fields.push(Field::new("event", DataType::Int32, true));
        cols.push(Arc::new(Int32Array::from(
            rows.iter().map(|r| r.follow_up.map(|t| t.event as i32)).collect::<Vec<_>>(),
        )));
        fields.push(Field::new("risk", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.risk))));
        if self.folds {
            fields.push(Field::new("risk_group", DataType::Utf8, true));
            let g: Vec<Option<&str>> =
                rows.iter().map(|r| r.high_risk.map(|h| if h { "high" } else { "low" })).collect();
            cols.push(Arc::new(StringArray::from(g)));
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }

    pub async fn write(&self, store: &Store, rows: &[SurvivalRow]) -> Result<()> {
        let parquet = write_parquet("predictions", &self.batch(rows)?, &self.provenance)?;
        store.put(&self.parquet, parquet).await?;
        store.put(&self.csv, self.csv(rows).into_bytes()).await?;
        Ok(())
    }
}

/// A survival predictions CSV ([`SurvivalTable`]) back as rows.
pub fn read_survival_csv(bytes: &[u8]) -> Result<Vec<SurvivalRow>> {
    let mut rd = csv::Reader::from_reader(bytes);
    let header = rd.headers()?.clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(slide_c), Some(risk_c)) = (col("slide_id"), col("risk")) else {
        anyhow::bail!("survival predictions: no slide_id or risk column");
    };
    let (fold_c, time_c, event_c, group_c) = (col("fold"), col("time"), col("event"), col("risk_group"));
    let mut rows = Vec::new();
    for rec in rd.records() {
        let rec = rec?;
        let get = |c: Option<usize>| c.and_then(|c| rec.get(c)).filter(|v| !v.is_empty());
        let follow_up = match (get(time_c), get(event_c)) {
            (Some(t), Some(e)) => Some(wsimil_common::plan::SurvivalTarget { time: t.parse()?, event: e == "1" }),
            _ => None,
        };
        rows.push(SurvivalRow {
            slide: rec.get(slide_c).unwrap_or("").to_string(),
            fold: get(fold_c).and_then(|f| f.parse().ok()),
            follow_up,
            risk: rec.get(risk_c).unwrap_or("").parse()?,
            high_risk: get(group_c).map(|g| g == "high"),
        });
    }
    Ok(rows)
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

    #[tokio::test]
    async fn a_survival_table_writes_its_columns_and_reads_back() {
        use wsimil_common::plan::SurvivalTarget;
        let rows = vec![
            SurvivalRow {
                slide: "a".into(),
                fold: Some(1),
                follow_up: Some(SurvivalTarget { time: 410.0, event: true }),
                risk: 0.5,
                high_risk: Some(true),
            },
            SurvivalRow { slide: "b".into(), fold: Some(0), follow_up: None, risk: -1.25, high_risk: Some(false) },
        ];
        let store = Store::memory();
        let table = SurvivalTable {
            csv: Key::from("s.csv"),
            parquet: Key::from("s.parquet"),
            folds: true,
            provenance: serde_json::json!({"kind": "test"}),
        };
        table.write(&store, &rows).await.unwrap();
        let csv = store.get(&table.csv).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&csv).unwrap(),
            "slide_id,fold,time,event,risk,risk_group\na,1,410,1,0.500000,high\nb,0,,,-1.250000,low\n"
        );
        assert_eq!(read_survival_csv(&csv).unwrap(), rows);
        let (batch, _) = wsimil_common::table::read_parquet("s", store.get(&table.parquet).await.unwrap()).unwrap();
        let risk: &Float64Array = wsimil_common::table::column("s", &batch, "risk").unwrap();
        assert_eq!(risk.values().to_vec(), vec![0.5, -1.25]);
    }
}
