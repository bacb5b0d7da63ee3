//! Parquet files as wsimil writes them: one record batch, zstd, and a JSON provenance record in the
//! file's key-value metadata under [`PROVENANCE_KEY`].

use arrow_array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

/// Metadata key holding the JSON provenance of every Parquet file wsimil writes.
pub const PROVENANCE_KEY: &str = "wsimil.provenance";

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{what}: {source}")]
    Parquet {
        what: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{what}: {source}")]
    Arrow {
        what: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl TableError {
    pub fn invalid(what: &str, reason: impl Into<String>) -> Self {
        TableError::Invalid { what: what.to_string(), reason: reason.into() }
    }
}

/// Encode `batch` as a zstd Parquet file with `provenance` in its metadata.
pub fn write_parquet(
    what: &str,
    batch: &RecordBatch,
    provenance: &impl serde::Serialize,
) -> Result<Vec<u8>, TableError> {
    let prov = serde_json::to_string(provenance).expect("provenance serialises");
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid zstd level")))
        .set_key_value_metadata(Some(vec![KeyValue::new(PROVENANCE_KEY.to_string(), prov)]))
        .build();
    let pq = |source| TableError::Parquet { what: what.to_string(), source };
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).map_err(pq)?;
    w.write(batch).map_err(pq)?;
    w.close().map_err(pq)?;
    Ok(buf)
}

/// Decode a Parquet file into one batch and its raw provenance JSON.
pub fn read_parquet(what: &str, bytes: Bytes) -> Result<(RecordBatch, Option<String>), TableError> {
    let pq = |source| TableError::Parquet { what: what.to_string(), source };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(pq)?;
    let prov = provenance_of(builder.metadata());
    let schema = builder.schema().clone();
    let reader = builder.build().map_err(pq)?;
    let batches =
        reader.collect::<Result<Vec<_>, _>>().map_err(|source| TableError::Arrow { what: what.to_string(), source })?;
    let batch = arrow_select::concat::concat_batches(&schema, &batches)
        .map_err(|source| TableError::Arrow { what: what.to_string(), source })?;
    Ok((batch, prov))
}

/// The raw provenance JSON of a file's metadata.
pub fn provenance_of(meta: &parquet::file::metadata::ParquetMetaData) -> Option<String> {
    meta.file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == PROVENANCE_KEY).and_then(|k| k.value.clone()))
}

/// Parse the provenance record of a file into `T`.
pub fn parse_provenance<T: serde::de::DeserializeOwned>(what: &str, prov: Option<String>) -> Result<T, TableError> {
    let s = prov.ok_or_else(|| TableError::invalid(what, format!("no {PROVENANCE_KEY} metadata")))?;
    serde_json::from_str(&s).map_err(|e| TableError::invalid(what, format!("bad provenance: {e}")))
}

/// A typed column of `batch`, or an error naming the file and the column.
pub fn column<'a, A: 'static>(what: &str, batch: &'a RecordBatch, name: &str) -> Result<&'a A, TableError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| TableError::invalid(what, format!("missing column {name:?}")))?
        .as_any()
        .downcast_ref::<A>()
        .ok_or_else(|| TableError::invalid(what, format!("column {name:?} has an unexpected type")))
}
