//! Bring your own features: bags from a table (a CSV with one row per instance: label, bag id,
//! feature columns, as the classic MIL benchmarks such as Musk1 are distributed) into wsimil's
//! feature layout, `features/<name>/imported/<bag>.parquet`, plus a manifest, so that
//! `wsimil run --features <name>` trains and evaluates on them like on embedded slides.
//!
//! Feature columns may be standardised (z-scored per column over all instances): the MIL
//! benchmarks come in raw units (Musk1's range over ±300) that a network at lr 2e-4 does not
//! digest. The statistics are computed over the whole table — transductive, as the benchmark
//! literature does it — and recorded nowhere else than in this choice, so it is off unless asked.
//!
//! CLAM's feature files (`extract_features_fp.py`) import the same way: `h5_files/<slide>.h5`
//! (`features` [N, D] and `coords` [N, 2], level-0 top-left corners) or `pt_files/<slide>.pt` (the
//! features tensor alone, `torch.save`), read without Python: HDF5 through the pure-Rust `hdf5-pure`
//! crate, the `.pt` zip through candle's pickle reader.

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wsimil_common::features::{EmbeddingProvenance, FeatureBag};
use wsimil_common::ids::{EmbedderId, SlideId, TilingId};
use wsimil_common::layout;
use wsimil_common::plan::IMPORTED_TILING;
use wsimil_common::store::Store;

/// One bag of a table, instances in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct TableBag {
    pub id: SlideId,
    pub label: String,
    pub dim: usize,
    pub features: Vec<f32>,
}

impl TableBag {
    pub fn len(&self) -> usize {
        self.features.len() / self.dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }
}

/// Column layout of a table: which column is the label, which the bag id; the rest are features.
#[derive(Debug, Clone, Copy)]
pub struct TableLayout {
    pub label_col: usize,
    pub bag_col: usize,
    /// Skip the first row.
    pub header: bool,
}

impl Default for TableLayout {
    /// Musk1's layout (`mil` package): label, bag id, then the features; no header.
    fn default() -> Self {
        TableLayout { label_col: 0, bag_col: 1, header: false }
    }
}

/// Parse a bag table. Every problem names the file and line. A bag's rows must agree on its label.
pub fn read_table(path: &Path, layout: TableLayout) -> anyhow::Result<Vec<TableBag>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut bags: BTreeMap<String, TableBag> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut dim = None;
    for (i, line) in text.lines().enumerate().skip(layout.header as usize) {
        let at = || format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() <= layout.label_col.max(layout.bag_col) + 1 {
            bail!("{}: {} columns: need a label, a bag id and at least one feature", at(), cells.len());
        }
        let features: Vec<f32> = cells
            .iter()
            .enumerate()
            .filter(|(c, _)| *c != layout.label_col && *c != layout.bag_col)
            .map(|(c, v)| {
                v.parse::<f32>().map_err(|_| anyhow::anyhow!("{}: column {}: {v:?} is not a number", at(), c + 1))
            })
            .collect::<anyhow::Result<_>>()?;
        if features.iter().any(|v| !v.is_finite()) {
            bail!("{}: a feature is not finite", at());
        }
        match dim {
            None => dim = Some(features.len()),
            Some(d) if d != features.len() => bail!("{}: {} features, earlier rows have {d}", at(), features.len()),
            _ => {}
        }
        let (bag, label) = (cells[layout.bag_col], cells[layout.label_col]);
        let entry = match bags.get_mut(bag) {
            Some(b) => b,
            None => {
                let id = SlideId::new(bag).map_err(|e| anyhow::anyhow!("{}: bag id {bag:?}: {e}", at()))?;
                order.push(bag.to_string());
                bags.entry(bag.to_string()).or_insert(TableBag {
                    id,
                    label: label.to_string(),
                    dim: features.len(),
                    features: Vec::new(),
                })
            }
        };
        if entry.label != label {
            bail!("{}: bag {bag} has label {label:?} here and {:?} before", at(), entry.label);
        }
        entry.features.extend(features);
    }
    if bags.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(order.into_iter().map(|k| bags.remove(&k).expect("listed")).collect())
}

/// Z-score every feature column over all instances of all bags (constant columns become 0).
pub fn standardise(bags: &mut [TableBag]) {
    let Some(dim) = bags.first().map(|b| b.dim) else { return };
    let mut sum = vec![0f64; dim];
    let mut sq = vec![0f64; dim];
    let mut n = 0f64;
    for b in bags.iter() {
        for row in b.features.chunks(dim) {
            for (c, v) in row.iter().enumerate() {
                sum[c] += *v as f64;
                sq[c] += (*v as f64) * (*v as f64);
            }
            n += 1.0;
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let sd: Vec<f64> = sq.iter().zip(&mean).map(|(q, m)| (q / n - m * m).max(0.0).sqrt()).collect();
    for b in bags.iter_mut() {
        for row in b.features.chunks_mut(dim) {
            for (c, v) in row.iter_mut().enumerate() {
                *v = if sd[c] > 0.0 { ((*v as f64 - mean[c]) / sd[c]) as f32 } else { 0.0 };
            }
        }
    }
}

/// Open a CSV written by other tools (CLAM's dataset and split files: rows may be ragged, as pandas
/// writes them) and find the columns named `names` (header cells compared trimmed). Errors name the
/// file and, for a missing column, list the columns it has.
pub fn open_csv_columns<const N: usize>(
    path: &Path,
    names: [&str; N],
) -> anyhow::Result<(csv::Reader<std::fs::File>, [usize; N])> {
    let mut rd =
        csv::ReaderBuilder::new().flexible(true).from_path(path).with_context(|| format!("{}", path.display()))?;
    let header = rd.headers().with_context(|| format!("{}", path.display()))?.clone();
    let mut at = [0; N];
    for (slot, name) in at.iter_mut().zip(names) {
        *slot = header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| anyhow::anyhow!("{}: no {name:?} column (columns: {:?})", path.display(), header))?;
    }
    Ok((rd, at))
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Store one imported bag under `features/<name>/imported/<slide>.parquet`; `source` is the
/// absolute path of the file it came from, for its provenance.
async fn put_bag(store: &Store, name: &EmbedderId, slide: &SlideId, bag: Imported, source: &str) -> anyhow::Result<()> {
    let n = bag.features.len() / bag.dim.max(1);
    let (xs, ys) = match bag.coords {
        Some(c) => c.into_iter().unzip(),
        None => ((0..n as i64).collect(), vec![0; n]),
    };
    let fb = FeatureBag {
        xs,
        ys,
        dim: bag.dim,
        features: bag.features,
        provenance: EmbeddingProvenance {
            slide: slide.to_string(),
            embedder: name.to_string(),
            architecture: "imported".into(),
            feature_dim: bag.dim,
            preprocessing: None,
            tiling_id: None,
            tiling: None,
            patches_skipped: 0,
            imported_from: Some(source.to_string()),
            compute: None,
            weights_sha256: None,
            weights_seed: None,
            output: None,
        },
    };
    let tiling = TilingId::new(IMPORTED_TILING).expect("safe");
    store.put(&layout::features(name, &tiling, slide), fb.to_parquet()?).await?;
    Ok(())
}

/// Features of one bag as read from a file: `dim`-wide rows, and patch corners when the file has them.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    pub dim: usize,
    pub features: Vec<f32>,
    pub coords: Option<Vec<(i64, i64)>>,
}

/// Write each bag's features under `features/<name>/imported/` and return the manifest text
/// (`slide_id,path,label`, the path being the source table).
pub async fn write_bags(
    store: &Store,
    name: &EmbedderId,
    bags: Vec<TableBag>,
    source: &Path,
) -> anyhow::Result<String> {
    let source = absolute(source).display().to_string();
    let mut manifest = String::from("slide_id,path,label\n");
    for b in bags {
        manifest.push_str(&format!("{},{source},{}\n", b.id, b.label));
        let bag = Imported { dim: b.dim, features: b.features, coords: None };
        put_bag(store, name, &b.id, bag, &source).await?;
    }
    Ok(manifest)
}

/// A CLAM `.h5` feature file: `features` [N, D] (any float type) and, when present, `coords` [N, 2]
/// (level-0 top-left corners of the patches).
pub fn read_clam_h5(path: &Path) -> anyhow::Result<Imported> {
    let what = || format!("{}", path.display());
    let file = hdf5_pure::File::open(path).map_err(|e| anyhow::anyhow!("{}: not a readable HDF5 file: {e}", what()))?;
    let ds = file.dataset("features").map_err(|e| anyhow::anyhow!("{}: no \"features\" dataset: {e}", what()))?;
    let shape = ds.shape().map_err(|e| anyhow::anyhow!("{}: features: {e}", what()))?;
    let [n, dim] = shape[..] else { bail!("{}: features has shape {shape:?}, expected [N, D]", what()) };
    let features = ds.read_f32().map_err(|e| anyhow::anyhow!("{}: features: {e}", what()))?;
    if features.len() as u64 != n * dim {
        bail!("{}: features: {} values for shape {shape:?}", what(), features.len());
    }
    let coords = match file.dataset("coords") {
        Err(_) => None,
        Ok(c) => {
            let v = c.read_i64().map_err(|e| anyhow::anyhow!("{}: coords: {e}", what()))?;
            if v.len() as u64 != 2 * n {
                bail!("{}: coords holds {} values for {n} patches", what(), v.len());
            }
            Some(v.chunks(2).map(|p| (p[0], p[1])).collect())
        }
    };
    Ok(Imported { dim: dim as usize, features, coords })
}

/// Import CLAM features for the slides of CLAM's dataset CSV (`slide_id` and `label` columns;
/// others such as `case_id` ignored) from `dir` (CLAM's feature directory: `h5_files/<slide>.h5`,
/// preferred for its coordinates, or `pt_files/<slide>.pt`; or the files directly in `dir`).
/// Every slide's file is found before anything is written. Returns the manifest text.
pub async fn import_clam(store: &Store, name: &EmbedderId, dir: &Path, csv_path: &Path) -> anyhow::Result<String> {
    let (mut rd, [id_c, label_c]) = open_csv_columns(csv_path, ["slide_id", "label"])?;
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (i, rec) in rd.records().enumerate() {
        let rec = rec.with_context(|| format!("{}:{}", csv_path.display(), i + 2))?;
        let (id, label) = (rec.get(id_c).unwrap_or("").trim(), rec.get(label_c).unwrap_or("").trim());
        let slide =
            SlideId::new(id).map_err(|e| anyhow::anyhow!("{}:{}: slide_id {id:?}: {e}", csv_path.display(), i + 2))?;
        let candidates = [
            dir.join("h5_files").join(format!("{id}.h5")),
            dir.join(format!("{id}.h5")),
            dir.join("pt_files").join(format!("{id}.pt")),
            dir.join(format!("{id}.pt")),
        ];
        match candidates.into_iter().find(|p| p.is_file()) {
            Some(p) => found.push((slide, label.to_string(), p)),
            None => missing.push(id.to_string()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{}: no feature file (h5_files/<id>.h5 or pt_files/<id>.pt) for {} slide(s): {}",
            dir.display(),
            missing.len(),
            missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let mut manifest = String::from("slide_id,path,label\n");
    for (slide, label, path) in found {
        let bag = if path.extension().is_some_and(|e| e == "h5") { read_clam_h5(&path)? } else { read_clam_pt(&path)? };
        let source = absolute(&path).display().to_string();
        put_bag(store, name, &slide, bag, &source).await?;
        manifest.push_str(&format!("{slide},{source},{label}\n"));
    }
    Ok(manifest)
}

/// A CLAM `.pt` feature file: a tensor [N, D] saved with `torch.save` (or a dict holding one under
/// `features`), any float dtype.
pub fn read_clam_pt(path: &Path) -> anyhow::Result<Imported> {
    use candle_core::pickle::{Object, Stack};
    let what = || format!("{}", path.display());
    let open = || -> anyhow::Result<zip::ZipArchive<std::io::BufReader<std::fs::File>>> {
        Ok(zip::ZipArchive::new(std::io::BufReader::new(std::fs::File::open(path)?))?)
    };
    let mut zip = open().with_context(|| format!("{}: not a PyTorch zip file", what()))?;
    let pkl = zip
        .file_names()
        .filter_map(|f| f.ok())
        .find(|f| f.ends_with("data.pkl"))
        .map(|f| f.into_owned())
        .ok_or_else(|| anyhow::anyhow!("{}: no data.pkl inside (not a torch.save file)", what()))?;
    let dir = PathBuf::from(pkl.strip_suffix(".pkl").expect("checked"));
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(zip.by_name(&pkl)?))
        .with_context(|| format!("{}: unreadable pickle", what()))?;
    let obj = match stack.finalize()? {
        Object::Dict(kv) => kv
            .into_iter()
            .find(|(k, _)| *k == Object::Unicode("features".into()))
            .map(|(_, v)| v)
            .ok_or_else(|| anyhow::anyhow!("{}: a dict without a \"features\" tensor", what()))?,
        o => o,
    };
    let info = obj
        .into_tensor_info(Object::Unicode("features".into()), &dir)?
        .ok_or_else(|| anyhow::anyhow!("{}: does not hold a tensor", what()))?;
    if !info.layout.is_contiguous() || info.layout.start_offset() != 0 {
        bail!("{}: the features tensor is a strided view; save a contiguous copy (tensor.contiguous())", what());
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_name(&info.path)?, &mut bytes)?;
    let dims = info.layout.shape().dims().to_vec();
    let want = info.layout.shape().elem_count() * info.dtype.size_in_bytes();
    if bytes.len() < want {
        bail!("{}: tensor data holds {} bytes, its shape {dims:?} needs {want}", what(), bytes.len());
    }
    let t = candle_core::Tensor::from_raw_buffer(&bytes[..want], info.dtype, &dims, &candle_core::Device::Cpu)?;
    let (n, dim) = t.dims2().with_context(|| format!("{}: features must be [N, D]", what()))?;
    let features = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    debug_assert_eq!(features.len(), n * dim);
    Ok(Imported { dim, features, coords: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bags.csv");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn rows_group_into_bags_in_file_order() {
        let (_d, p) = table("1,b2,0.5,1\n0,b1,2,3\n1,b2,4,5\n");
        let bags = read_table(&p, TableLayout::default()).unwrap();
        assert_eq!(bags.len(), 2);
        assert_eq!((bags[0].id.as_str(), bags[0].label.as_str(), bags[0].len()), ("b2", "1", 2));
        assert_eq!(bags[0].features, vec![0.5, 1.0, 4.0, 5.0]);
        assert_eq!(bags[1].features, vec![2.0, 3.0]);
    }

    #[test]
    fn bad_rows_are_named_with_their_line() {
        let (_d, p) = table("1,b1,0.5,1\n1,b1,x,1\n");
        let e = read_table(&p, TableLayout::default()).unwrap_err().to_string();
        assert!(e.contains("bags.csv:2") && e.contains("\"x\" is not a number"), "{e}");
        let (_d, p) = table("1,b1,0.5,1\n0,b1,1,1\n");
        let e = read_table(&p, TableLayout::default()).unwrap_err().to_string();
        assert!(e.contains("bags.csv:2") && e.contains("bag b1 has label"), "{e}");
        let (_d, p) = table("1,b1,0.5,1\n1,b2,1\n");
        let e = read_table(&p, TableLayout::default()).unwrap_err().to_string();
        assert!(e.contains("bags.csv:2") && e.contains("1 features, earlier rows have 2"), "{e}");
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// The fixture's features: row i, column j holds i + j/8 (scripts/dev/clam_features_fixture.py).
    fn expected() -> Vec<f32> {
        (0..5).flat_map(|i| (0..8).map(move |j| i as f32 + j as f32 / 8.0)).collect()
    }

    #[test]
    fn clam_h5_files_give_features_and_coordinates() {
        let b = read_clam_h5(&fixture("clam_slide.h5")).unwrap();
        assert_eq!(b.dim, 8);
        assert_eq!(b.features, expected());
        assert_eq!(b.coords.unwrap(), (0..5).map(|i| (256 * i, 512 * i + 7)).collect::<Vec<_>>());
    }

    #[test]
    fn clam_pt_files_give_the_features_tensor() {
        let b = read_clam_pt(&fixture("clam_slide.pt")).unwrap();
        assert_eq!((b.dim, b.coords), (8, None));
        assert_eq!(b.features, expected());
        let e = read_clam_pt(&fixture("clam_slide.h5")).unwrap_err().to_string();
        assert!(e.contains("clam_slide.h5: not a PyTorch zip file"), "{e}");
    }

    #[tokio::test]
    async fn a_clam_feature_folder_imports_for_every_slide_of_its_csv() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("h5_files")).unwrap();
        std::fs::create_dir_all(dir.path().join("pt_files")).unwrap();
        std::fs::copy(fixture("clam_slide.h5"), dir.path().join("h5_files/s1.h5")).unwrap();
        std::fs::copy(fixture("clam_slide.pt"), dir.path().join("pt_files/s2.pt")).unwrap();
        let csv = dir.path().join("dataset.csv");
        std::fs::write(&csv, "case_id,slide_id,label\nc1,s1,tumor\nc2,s2,normal\n").unwrap();
        let store = Store::memory();
        let name = EmbedderId::new("clam-r50").unwrap();
        let manifest = import_clam(&store, &name, dir.path(), &csv).await.unwrap();
        let lines: Vec<&str> = manifest.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("s1,") && lines[1].ends_with("h5_files/s1.h5,tumor"), "{}", lines[1]);
        assert!(lines[2].ends_with("pt_files/s2.pt,normal"), "{}", lines[2]);
        let tiling = TilingId::new(IMPORTED_TILING).unwrap();
        for (slide, has_coords) in [("s1", true), ("s2", false)] {
            let key = layout::features(&name, &tiling, &SlideId::new(slide).unwrap());
            let bag = FeatureBag::from_parquet(key.as_ref(), store.get(&key).await.unwrap()).unwrap();
            assert_eq!((bag.len(), bag.dim), (5, 8));
            assert_eq!(bag.features, expected());
            assert_eq!(bag.xs[4], if has_coords { 1024 } else { 4 });
            assert!(bag.provenance.imported_from.unwrap().ends_with(if has_coords { ".h5" } else { ".pt" }));
        }
        // A slide without a file: nothing is written, and the error names it.
        std::fs::write(&csv, "case_id,slide_id,label\nc1,s1,tumor\nc3,s3,normal\n").unwrap();
        let other = EmbedderId::new("other").unwrap();
        let e = import_clam(&store, &other, dir.path(), &csv).await.unwrap_err().to_string();
        assert!(e.contains("for 1 slide(s): s3"), "{e}");
        let key = layout::features(&other, &tiling, &SlideId::new("s1").unwrap());
        assert!(!store.exists(&key).await.unwrap());
    }

    #[test]
    fn standardised_columns_have_zero_mean_and_unit_variance() {
        let (_d, p) = table("1,a,1,7\n1,a,2,7\n0,b,3,7\n0,b,6,7\n");
        let mut bags = read_table(&p, TableLayout::default()).unwrap();
        standardise(&mut bags);
        let col0: Vec<f32> = bags.iter().flat_map(|b| b.features.chunks(2).map(|r| r[0]).collect::<Vec<_>>()).collect();
        let mean = col0.iter().sum::<f32>() / 4.0;
        let var = col0.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{mean} {var}");
        // A constant column carries no information: zero.
        assert!(bags.iter().all(|b| b.features.chunks(2).all(|r| r[1] == 0.0)));
    }
}
