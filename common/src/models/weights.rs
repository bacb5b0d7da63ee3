//! Weights files as their publishers ship them: safetensors, or PyTorch's `torch.save` of a state
//! dict (the zip format of `.bin`, `.pth`, `.pt`), read by name with nothing converted by hand.
//!
//! A file is indexed first (names, shapes, dtypes: a safetensors header, a PyTorch pickle), so a
//! file that does not fit an architecture is refused at once, with the missing, unexpected and
//! misshaped tensors named ([`check`]), before any tensor is read. A state dict saved from a
//! `DataParallel` model (`module.` before every name) or nested under `state_dict`/`model` reads as
//! the plain one.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a weights file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `torch.save`'s zip archive (PyTorch ≥ 1.6).
    TorchZip,
}

/// What is wrong with a weights file, naming it.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: cannot read the weights: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "{path}: not a weights file wsimil reads ({reason}); give safetensors or a state dict saved by torch.save"
    )]
    Format { path: PathBuf, reason: String },
    #[error("{path}: does not fit {architecture}: {}", mismatch(missing, unexpected, misshaped))]
    Mismatch {
        path: PathBuf,
        architecture: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
        /// (name, shape in the file, shape the architecture needs)
        misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
}

fn mismatch(missing: &[String], unexpected: &[String], misshaped: &[(String, Vec<usize>, Vec<usize>)]) -> String {
    const FIRST: usize = 5;
    let list = |v: Vec<String>| {
        let more = if v.len() > FIRST { format!(", … {} more", v.len() - FIRST) } else { String::new() };
        format!("{}{more}", v.into_iter().take(FIRST).collect::<Vec<_>>().join(", "))
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("{} missing ({})", missing.len(), list(missing.to_vec())));
    }
    if !misshaped.is_empty() {
        let v = misshaped.iter().map(|(n, got, want)| format!("{n}: {got:?} in the file, {want:?} needed")).collect();
        parts.push(format!("{} misshaped ({})", misshaped.len(), list(v)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("{} unexpected ({})", unexpected.len(), list(unexpected.to_vec())));
    }
    parts.join("; ")
}

/// One tensor of a file's index.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

enum Source {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Torch(candle_core::pickle::PthTensors),
}

/// An opened weights file: its index, and its tensors on request.
pub struct WeightsFile {
    path: PathBuf,
    format: Format,
    /// By the name the architecture uses (a `module.` prefix removed).
    index: BTreeMap<String, Entry>,
    /// The name in the file, where it differs.
    stored: BTreeMap<String, String>,
    source: Source,
}

impl WeightsFile {
    /// Index `path`: safetensors (by its header) or a PyTorch zip state dict.
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let io = |reason: String| WeightsError::Io { path: path.to_path_buf(), reason };
        let format_err = |reason: String| WeightsError::Format { path: path.to_path_buf(), reason };
        let mut head = [0u8; 9];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| io(e.to_string()))?;
            let n = f.read(&mut head).map_err(|e| io(e.to_string()))?;
            if n < head.len() {
                return Err(format_err(format!("{n} bytes")));
            }
        }
        let (format, source, raw): (Format, Source, Vec<(String, Entry)>) = if &head[..4] == b"PK\x03\x04" {
            let mut found = None;
            for key in [None, Some("state_dict"), Some("model")] {
                let t = match candle_core::pickle::PthTensors::new(path, key) {
                    Ok(t) => t,
                    // The top level was read (a bad archive fails there); a key it lacks is not
                    // where the tensors are: try the next.
                    Err(_) if key.is_some() => continue,
                    Err(e) => return Err(format_err(e.to_string())),
                };
                if !t.tensor_infos().is_empty() {
                    found = Some(t);
                    break;
                }
            }
            let t = found.ok_or_else(|| format_err("a PyTorch archive with no state dict of tensors".into()))?;
            let raw = t
                .tensor_infos()
                .iter()
                .map(|(n, i)| (n.clone(), Entry { dtype: i.dtype, shape: i.layout.dims().to_vec() }))
                .collect();
            (Format::TorchZip, Source::Torch(t), raw)
        } else if head[8] == b'{' {
            // SAFETY: the file is mapped read-only for as long as this value lives; wsimil does not
            // write weights files, and a user who rewrites one while it is read gets wrong numbers,
            // not unsoundness beyond what reading a changing file gives.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .map_err(|e| format_err(format!("safetensors: {e}")))?;
            let mut raw = Vec::new();
            for (n, v) in st.tensors() {
                let dtype = DType::try_from(v.dtype()).map_err(|e| format_err(format!("{n}: {e}")))?;
                raw.push((n, Entry { dtype, shape: v.shape().to_vec() }));
            }
            (Format::Safetensors, Source::Safetensors(st), raw)
        } else if head[0] == 0x80 {
            return Err(format_err(
                "a legacy (pre-1.6) torch.save pickle; load it in PyTorch and save it again with torch.save".into(),
            ));
        } else {
            return Err(format_err("neither safetensors nor a PyTorch zip archive".into()));
        };
        let strip = !raw.is_empty() && raw.iter().all(|(n, _)| n.starts_with("module."));
        let mut index = BTreeMap::new();
        let mut stored = BTreeMap::new();
        for (n, e) in raw {
            let name = if strip { n["module.".len()..].to_string() } else { n.clone() };
            if name != n {
                stored.insert(name.clone(), n);
            }
            index.insert(name, e);
        }
        Ok(WeightsFile { path: path.to_path_buf(), format, index, stored, source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn index(&self) -> &BTreeMap<String, Entry> {
        &self.index
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|e| e.shape.clone())
    }

    /// The tensors named (all of them when `names` is `None`), as stored, on the CPU.
    pub fn read(&self, names: Option<&[String]>) -> Result<BTreeMap<String, Tensor>, WeightsError> {
        let all: Vec<String>;
        let names = match names {
            Some(n) => n,
            None => {
                all = self.index.keys().cloned().collect();
                &all
            }
        };
        let mut out = BTreeMap::new();
        for name in names {
            let stored = self.stored.get(name).unwrap_or(name);
            let err =
                |e: candle_core::Error| WeightsError::Io { path: self.path.clone(), reason: format!("{name}: {e}") };
            let t = match &self.source {
                Source::Safetensors(st) => st.load(stored, &Device::Cpu).map_err(err)?,
                Source::Torch(t) => t.get(stored).map_err(err)?.ok_or_else(|| WeightsError::Io {
                    path: self.path.clone(),
                    reason: format!("{name}: in the index but not readable"),
                })?,
            };
            out.insert(name.clone(), t);
        }
        Ok(out)
    }
}

/// A `torch.save` of a dict of state dicts, one under each of `keys` (DTFD-MIL's `best_model.pth`:
/// one per module), read whole: each tensor named `<key>.<name>` (a `module.` prefix within a state
/// dict, `DataParallel`'s, removed). A key that is not there is refused, naming it.
pub fn read_torch_nested(path: &Path, keys: &[&str]) -> Result<BTreeMap<String, Tensor>, WeightsError> {
    let format_err = |reason: String| WeightsError::Format { path: path.to_path_buf(), reason };
    let mut head = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path)
            .map_err(|e| WeightsError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
        f.read_exact(&mut head).map_err(|e| format_err(e.to_string()))?;
    }
    if &head != b"PK\x03\x04" {
        return Err(format_err(format!("not a PyTorch zip archive holding state dicts under {}", keys.join(", "))));
    }
    let mut out = BTreeMap::new();
    for key in keys {
        let t = candle_core::pickle::PthTensors::new(path, Some(key)).map_err(|e| {
            format_err(format!("no state dict under `{key}` ({e}); it should hold {}", keys.join(", ")))
        })?;
        let names: Vec<String> = t.tensor_infos().keys().cloned().collect();
        let strip = !names.is_empty() && names.iter().all(|n| n.starts_with("module."));
        for n in names {
            let tensor = t
                .get(&n)
                .map_err(|e| WeightsError::Io { path: path.to_path_buf(), reason: format!("{key}.{n}: {e}") })?
                .expect("in the index");
            let name = if strip { &n["module.".len()..] } else { n.as_str() };
            out.insert(format!("{key}.{name}"), tensor);
        }
    }
    Ok(out)
}

/// Check a file against what an architecture needs: every tensor present with its shape, and no
/// tensor the architecture does not know except those `ignorable` says the features do not use.
pub fn check(
    file: &WeightsFile,
    architecture: &str,
    needed: &[super::vit::TensorSpec],
    ignorable: &dyn Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let shapes: BTreeMap<String, Vec<usize>> = file.index.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
    check_shapes(&file.path, &shapes, architecture, needed, ignorable)
}

/// [`check`] over tensors' shapes by name (of the file at `path`, perhaps renamed).
pub fn check_shapes(
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    architecture: &str,
    needed: &[super::vit::TensorSpec],
    ignorable: &dyn Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for s in needed {
        match shapes.get(&s.name) {
            None => missing.push(s.name.clone()),
            Some(shape) if *shape != s.shape => misshaped.push((s.name.clone(), shape.clone(), s.shape.clone())),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = needed.iter().map(|s| s.name.as_str()).collect();
    let unexpected: Vec<String> =
        shapes.keys().filter(|n| !known.contains(n.as_str()) && !ignorable(n)).cloned().collect();
    if missing.is_empty() && misshaped.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    Err(WeightsError::Mismatch {
        path: path.to_path_buf(),
        architecture: architecture.into(),
        missing,
        unexpected,
        misshaped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::vit::TensorSpec;

    fn write_safetensors(dir: &Path, tensors: &[(&str, &[usize])]) -> PathBuf {
        let map: BTreeMap<String, Tensor> = tensors
            .iter()
            .map(|(n, s)| (n.to_string(), Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap()))
            .collect();
        let p = dir.join("w.safetensors");
        std::fs::write(&p, crate::models::params::safetensors_bytes(&map).unwrap()).unwrap();
        p
    }

    #[test]
    fn a_file_that_does_not_fit_names_what_is_missing_unexpected_and_misshaped() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_safetensors(dir.path(), &[("a", &[2, 3]), ("b", &[4]), ("x", &[1]), ("head.weight", &[2])]);
        let f = WeightsFile::open(&p).unwrap();
        assert_eq!(f.format(), Format::Safetensors);
        let need = |n: &str, s: &[usize]| TensorSpec { name: n.into(), shape: s.to_vec() };
        let needed: Vec<TensorSpec> =
            (0..7).map(|i| need(&format!("m{i}"), &[1])).chain([need("a", &[2, 3]), need("b", &[5])]).collect();
        let err = check(&f, "uni", &needed, &|n| n == "head.weight").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("{}: does not fit uni: 7 missing (m0, m1, m2, m3, m4, … 2 more)", p.display())),
            "{text}"
        );
        assert!(text.contains("1 misshaped (b: [4] in the file, [5] needed)"), "{text}");
        assert!(text.contains("1 unexpected (x)"), "{text}");
        assert!(
            check(&f, "uni", &[need("a", &[2, 3]), need("b", &[4]), need("x", &[1])], &|n| n == "head.weight").is_ok()
        );
    }

    /// A download cut short: refused when the file is opened (before any slide is read), naming it.
    #[test]
    fn a_truncated_weights_file_is_refused_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let whole = std::fs::read(write_safetensors(dir.path(), &[("a", &[64, 64]), ("b", &[16])])).unwrap();
        let torch = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit/pixels-vit_tiny.pytorch_model.bin"),
        )
        .unwrap();
        for (name, bytes) in [("cut.safetensors", &whole), ("cut.bin", &torch)] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
            let err =
                WeightsFile::open(&p).err().unwrap_or_else(|| panic!("{name}: a truncated file opened")).to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn data_parallel_prefixes_are_dropped_and_tensors_read_by_their_plain_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_safetensors(dir.path(), &[("module.a", &[2]), ("module.b.c", &[1, 3])]);
        let f = WeightsFile::open(&p).unwrap();
        assert_eq!(f.index().keys().collect::<Vec<_>>(), vec!["a", "b.c"]);
        let t = f.read(None).unwrap();
        assert_eq!(t["b.c"].dims(), &[1, 3]);
    }

    /// A checkpoint that keeps its network under "model" beside other entries, with no
    /// "state_dict": found there (the "state_dict" it lacks does not stop the search).
    #[test]
    fn a_state_dict_under_model_is_read_by_its_names() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights/model_key.pth");
        let f = WeightsFile::open(&p).unwrap();
        assert_eq!(f.format(), Format::TorchZip);
        assert_eq!(f.index().keys().collect::<Vec<_>>(), vec!["a", "b.c"]);
        let t = f.read(None).unwrap();
        assert_eq!(t["a"].to_vec2::<f32>().unwrap(), vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
        assert_eq!(t["b.c"].to_vec1::<f32>().unwrap(), vec![10.0, 11.0, 12.0, 13.0]);
    }

    #[test]
    fn other_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        for (bytes, why) in [
            (&b"\x80\x02}q\x00(X\x01\x00\x00\x00a"[..], "legacy"),
            (&b"hello, world, not weights"[..], "neither safetensors nor"),
            (&b"PK"[..], "2 bytes"),
        ] {
            let p = dir.path().join("w.bin");
            std::fs::write(&p, bytes).unwrap();
            let err = WeightsFile::open(&p).err().expect("refused").to_string();
            assert!(err.contains("w.bin") && err.contains(why), "{err}");
        }
        let err = WeightsFile::open(&dir.path().join("nope.bin")).err().expect("missing").to_string();
        assert!(err.contains("nope.bin: cannot read the weights"), "{err}");
    }
}
