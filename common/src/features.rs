//! Feature Parquet: one row per patch (`x`, `y` at level 0, `feature` as FixedSizeList<Float32>),
//! zstd, with the embedding's provenance in the file metadata. This is the layout every bag
//! classifier reads, whether the features came from wsimil's embedders or were imported.

use crate::grid::TilingProvenance;
use crate::table::{parse_provenance, write_parquet, TableError};
use arrow_array::{FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
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
    /// SHA-256 of the embedder's weights file as its publisher ships it (or as an ICMIL merge
    /// wrote it); none for random weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// The seed of random weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_seed: Option<u64>,
    /// What each feature is (`class token`, `class token + mean patch token`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl EmbeddingProvenance {
    /// Features of `slide` from `embedder` (`architecture`, `feature_dim` wide), nothing else known.
    pub fn new(slide: &str, embedder: &str, architecture: &str, feature_dim: usize) -> Self {
        EmbeddingProvenance {
            slide: slide.into(),
            embedder: embedder.into(),
            architecture: architecture.into(),
            feature_dim,
            preprocessing: None,
            tiling_id: None,
            tiling: None,
            patches_skipped: 0,
            imported_from: None,
            compute: None,
            weights_sha256: None,
            weights_seed: None,
            output: None,
        }
    }
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

    /// Decode a feature file (see [`decode`]: the features are copied once, out of the Parquet
    /// pages, into the bag).
    pub fn from_parquet(what: &str, bytes: Bytes) -> Result<Self, TableError> {
        let d = decode::<f32>(what, bytes, true)?;
        let (xs, ys) = d.coords.expect("asked for the coordinates");
        Ok(FeatureBag { xs, ys, dim: d.dim, features: d.features, provenance: d.provenance })
    }
}

/// How a feature is held in memory: `f32` as stored, or `half::f16` (half the bytes; a bag
/// classifier reads it back as f32, so features differ from the stored ones by f16's rounding,
/// a relative 2^-11).
pub trait FeatureValue: Copy + Send + Sync + 'static {
    /// Read up to `rows` records of a feature column onto the end of `dst`, through `scratch`
    /// where the values need converting (compiled here, at this crate's optimisation, whoever
    /// calls it). Returns (records, values, levels) as the column reader counts them.
    fn read_rows(
        col: &mut FeatureColumn,
        rows: usize,
        levels: &mut Levels,
        dst: &mut Vec<Self>,
        scratch: &mut Vec<f32>,
    ) -> parquet::errors::Result<(usize, usize, usize)>;
    /// The candle dtype of a tensor of these values.
    const DTYPE: candle_core::DType;
}

/// The column reader of a feature column's float leaf.
pub type FeatureColumn = parquet::column::reader::ColumnReaderImpl<parquet::data_type::FloatType>;

/// Definition and repetition levels of a chunk of a feature column (reused between chunks).
#[derive(Default)]
pub struct Levels {
    defs: Vec<i16>,
    reps: Vec<i16>,
}

impl FeatureValue for f32 {
    fn read_rows(
        col: &mut FeatureColumn,
        rows: usize,
        l: &mut Levels,
        dst: &mut Vec<Self>,
        _: &mut Vec<f32>,
    ) -> parquet::errors::Result<(usize, usize, usize)> {
        l.defs.clear();
        l.reps.clear();
        col.read_records(rows, Some(&mut l.defs), Some(&mut l.reps), dst)
    }
    const DTYPE: candle_core::DType = candle_core::DType::F32;
}

impl FeatureValue for half::f16 {
    fn read_rows(
        col: &mut FeatureColumn,
        rows: usize,
        l: &mut Levels,
        dst: &mut Vec<Self>,
        scratch: &mut Vec<f32>,
    ) -> parquet::errors::Result<(usize, usize, usize)> {
        l.defs.clear();
        l.reps.clear();
        scratch.clear();
        let read = col.read_records(rows, Some(&mut l.defs), Some(&mut l.reps), scratch)?;
        dst.extend(scratch.iter().map(|&v| half::f16::from_f32(v)));
        Ok(read)
    }
    const DTYPE: candle_core::DType = candle_core::DType::F16;
}

/// A decoded feature file.
pub struct Decoded<T> {
    /// `features.len() / dim` patches, row-major.
    pub features: Vec<T>,
    pub dim: usize,
    /// The patches' level-0 `x` and `y`, when asked for.
    pub coords: Option<(Vec<i64>, Vec<i64>)>,
    pub provenance: EmbeddingProvenance,
}

/// Rows decoded at a time (their levels, and in half precision their f32 values, are the only
/// transient buffers while a file is decoded: 4,096 rows of 1,536 f32 are 24 MiB).
const DECODE_ROWS: usize = 4096;

/// The width of a feature file's `feature` column, from the Arrow schema stored beside the
/// Parquet one (which alone would not know the list's fixed size).
fn feature_dim(what: &str, meta: &parquet::file::metadata::ParquetMetaData) -> Result<usize, TableError> {
    let fm = meta.file_metadata();
    let schema = parquet::arrow::parquet_to_arrow_schema(fm.schema_descr(), fm.key_value_metadata())
        .map_err(|source| TableError::Parquet { what: what.to_string(), source })?;
    match schema.field_with_name("feature").map(|f| f.data_type().clone()) {
        Ok(DataType::FixedSizeList(item, d)) if item.data_type() == &DataType::Float32 => Ok(d as usize),
        Ok(_) => Err(TableError::invalid(what, "column \"feature\" is not a fixed-size list of Float32")),
        Err(_) => Err(TableError::invalid(what, "missing column \"feature\"")),
    }
}

/// The leaf column under top-level field `name` (each of ours has exactly one).
fn leaf_of(what: &str, schema: &parquet::schema::types::SchemaDescriptor, name: &str) -> Result<usize, TableError> {
    let root = schema.root_schema().get_fields().iter().position(|f| f.name() == name);
    let leaves: Vec<usize> =
        (0..schema.num_columns()).filter(|&i| Some(schema.get_column_root_idx(i)) == root).collect();
    match leaves[..] {
        [leaf] => Ok(leaf),
        _ => Err(TableError::invalid(what, format!("missing column {name:?}"))),
    }
}

/// Decode a feature file into one buffer sized from its footer. The `feature` column is read with
/// Parquet's column reader, [`DECODE_ROWS`] rows at a time, straight into place: the features exist
/// once, and no Arrow list is built around them (half the time of Arrow's reader,
/// 35 ms instead of 70 ms for 5,000 × 1,024 zstd-compressed features on this project's CPU).
/// Without `coords`, only the `feature` column is read.
pub fn decode<T: FeatureValue>(what: &str, bytes: Bytes, coords: bool) -> Result<Decoded<T>, TableError> {
    use parquet::column::reader::ColumnReader;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let pq = |source| TableError::Parquet { what: what.to_string(), source };
    let reader = SerializedFileReader::new(bytes).map_err(pq)?;
    let meta = reader.metadata();
    let rows = meta.file_metadata().num_rows().max(0) as usize;
    let prov = crate::table::provenance_of(meta);
    let dim = feature_dim(what, meta)?;
    let schema = meta.file_metadata().schema_descr();
    let feature = leaf_of(what, schema, "feature")?;
    let xy = if coords { Some((leaf_of(what, schema, "x")?, leaf_of(what, schema, "y")?)) } else { None };
    let mut features: Vec<T> = Vec::with_capacity(rows * dim);
    let (mut xs, mut ys) = (Vec::with_capacity(if coords { rows } else { 0 }), Vec::new());
    ys.reserve_exact(xs.capacity());
    let (mut scratch, mut levels) = (Vec::new(), Levels::default());
    for g in 0..reader.num_row_groups() {
        let group = reader.get_row_group(g).map_err(pq)?;
        let group_rows = group.metadata().num_rows().max(0) as usize;
        let ColumnReader::FloatColumnReader(mut col) = group.get_column_reader(feature).map_err(pq)? else {
            return Err(TableError::invalid(what, "feature items are not Float32"));
        };
        let mut done = 0;
        while done < group_rows {
            let rows = DECODE_ROWS.min(group_rows - done);
            let (records, values, n_levels) =
                T::read_rows(&mut col, rows, &mut levels, &mut features, &mut scratch).map_err(pq)?;
            if records == 0 {
                break;
            }
            if values != n_levels || values != records * dim {
                return Err(TableError::invalid(what, "null or missing features"));
            }
            done += records;
        }
        if let Some((x, y)) = xy {
            for (leaf, out) in [(x, &mut xs), (y, &mut ys)] {
                let ColumnReader::Int64ColumnReader(mut col) = group.get_column_reader(leaf).map_err(pq)? else {
                    return Err(TableError::invalid(what, "patch coordinates are not Int64"));
                };
                let start = out.len();
                while out.len() - start < group_rows {
                    let (records, ..) =
                        col.read_records(group_rows - (out.len() - start), None, None, out).map_err(pq)?;
                    if records == 0 {
                        break;
                    }
                }
            }
        }
    }
    if features.len() != rows * dim || (coords && (xs.len() != rows || ys.len() != rows)) {
        return Err(TableError::invalid(
            what,
            format!("{} rows in its footer, {} decoded", rows, features.len() / dim.max(1)),
        ));
    }
    Ok(Decoded { features, dim, coords: coords.then_some((xs, ys)), provenance: parse_provenance(what, prov)? })
}

/// What a feature file holds, read from its footer alone: enough to plan memory before reading it.
#[derive(Debug, Clone, PartialEq)]
pub struct BagShape {
    pub patches: usize,
    pub dim: usize,
    /// The file's size in the store (what a read of it holds before it is decoded).
    pub file_bytes: u64,
    pub provenance: EmbeddingProvenance,
}

impl BagShape {
    /// Bytes of the decoded features, `elem` bytes per value.
    pub fn decoded_bytes(&self, elem: usize) -> u64 {
        (self.patches * self.dim * elem) as u64
    }
}

/// Bytes from the end of a feature file read first for its footer: the provenance record
/// (the tiling's settings) makes footers of a few KiB.
pub const FOOTER_GUESS: u64 = 64 << 10;

/// The shape of a feature file from `tail`, its last bytes, or how many of its last bytes the
/// footer needs when `tail` is too short (`Ok(Err(n))`).
pub fn shape_from_tail(what: &str, tail: &Bytes, file_bytes: u64) -> Result<Result<BagShape, u64>, TableError> {
    use parquet::file::metadata::ParquetMetaDataReader;
    let pq = |source| TableError::Parquet { what: what.to_string(), source };
    let mut reader = ParquetMetaDataReader::new();
    match reader.try_parse_sized(tail, file_bytes) {
        Ok(()) => {}
        Err(parquet::errors::ParquetError::NeedMoreData(n)) => return Ok(Err(n as u64)),
        Err(e) => return Err(pq(e)),
    }
    let meta = reader.finish().map_err(pq)?;
    let provenance: EmbeddingProvenance = parse_provenance(what, crate::table::provenance_of(&meta))?;
    let dim = feature_dim(what, &meta)?;
    let patches = meta.file_metadata().num_rows().max(0) as usize;
    Ok(Ok(BagShape { patches, dim, file_bytes, provenance }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::read_parquet;

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
                weights_seed: None,
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
    fn decoding_without_coordinates_or_into_half_precision_keeps_every_feature() {
        // More rows than one decode batch, so the batches are stitched in order.
        let b = bag(DECODE_ROWS + 37, 3);
        let bytes: Bytes = b.to_parquet().unwrap().into();
        let d = decode::<f32>("s1", bytes.clone(), false).unwrap();
        assert!(d.coords.is_none());
        assert_eq!((d.dim, &d.features), (3, &b.features));
        let h = decode::<half::f16>("s1", bytes, false).unwrap();
        let back: Vec<f32> = h.features.iter().map(|v| v.to_f32()).collect();
        let expect: Vec<f32> = b.features.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(back, expect);
        // f16 really rounds: at least one value of the ramp is not exact in half precision.
        assert_ne!(back, b.features);
    }

    #[test]
    fn files_of_several_row_groups_and_pages_decode_whole_and_in_order() {
        use parquet::arrow::ArrowWriter;
        use parquet::file::properties::WriterProperties;
        let b = bag(103, 5);
        let (batch, _) = read_parquet("s1", b.to_parquet().unwrap().into()).unwrap();
        let prov = serde_json::to_string(&b.provenance).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(10))
            .set_data_page_row_count_limit(3)
            .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
                crate::table::PROVENANCE_KEY.to_string(),
                prov,
            )]))
            .build();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let back = FeatureBag::from_parquet("s1", buf.into()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn the_footer_alone_gives_the_bag_shape_or_asks_for_more_of_the_tail() {
        let b = bag(50, 16);
        let bytes: Bytes = b.to_parquet().unwrap().into();
        let size = bytes.len() as u64;
        let whole = shape_from_tail("s1", &bytes, size).unwrap().unwrap();
        assert_eq!((whole.patches, whole.dim, whole.file_bytes), (50, 16, size));
        assert_eq!(whole.provenance, b.provenance);
        assert_eq!(whole.decoded_bytes(4), 50 * 16 * 4);
        // Twelve bytes hold the length but not the footer: the answer is how much more to read.
        let tail = bytes.slice(bytes.len() - 12..);
        let need = shape_from_tail("s1", &tail, size).unwrap().unwrap_err();
        assert!(need > 12 && need < size, "{need}");
        let tail = bytes.slice(bytes.len() - need as usize..);
        assert_eq!(shape_from_tail("s1", &tail, size).unwrap().unwrap(), whole);
        // Not Parquet: an error naming the file.
        let err = shape_from_tail("f/s1.parquet", &Bytes::from_static(b"0123456789abcdef"), 16).unwrap_err();
        assert!(err.to_string().starts_with("f/s1.parquet"), "{err}");
    }

    #[test]
    fn mismatched_matrix_is_refused() {
        let mut b = bag(2, 3);
        b.features.pop();
        assert!(b.to_parquet().is_err());
    }
}
