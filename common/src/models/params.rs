//! Trainable parameters with names, seeded initialisation and safetensors IO.
//!
//! Models are built the candle way, `Model::new(cfg, vb)` with `vb.pp("name")` matching the
//! reference checkpoint's tensor names. [`Params`] is the VarBuilder backend for training: a
//! parameter asked for the first time is created from *our* seeded generator (candle's CPU
//! generator cannot be seeded), so the same seed gives the same initial model everywhere.

use crate::rng::Rng;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Params {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    rng: Arc<Mutex<Rng>>,
}

impl Params {
    pub fn new(seed: u64) -> Self {
        Params { vars: Arc::default(), rng: Arc::new(Mutex::new(Rng::new(seed))) }
    }

    /// A VarBuilder that creates missing parameters from the seeded generator.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        self.var_builder_as(device, DType::F32)
    }

    /// As [`Params::var_builder`], the tensors handed out as `dtype` (kept as f32 here).
    pub fn var_builder_as(&self, device: &Device, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Parameters in name order (a stable order for optimizers).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.vars.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn vars(&self) -> Vec<Var> {
        self.vars.lock().unwrap().values().cloned().collect()
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.lock().unwrap().values().map(|v| v.elem_count()).sum()
    }

    /// Snapshot of the current values (detached copies).
    pub fn snapshot(&self) -> Result<BTreeMap<String, Tensor>> {
        self.vars.lock().unwrap().iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?))).collect()
    }

    /// Overwrite every parameter named in `values` (shapes must match); unknown names are an error.
    pub fn assign(&self, values: &BTreeMap<String, Tensor>) -> Result<()> {
        let vars = self.vars.lock().unwrap();
        for (k, t) in values {
            let v = vars.get(k).ok_or_else(|| candle_core::Error::Msg(format!("unknown parameter {k}")))?;
            v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
        }
        Ok(())
    }

    /// Pre-load values (e.g. from a checkpoint) before the model is built: the builder then uses
    /// them instead of initialising.
    pub fn preload(&self, values: impl IntoIterator<Item = (String, Tensor)>) -> Result<()> {
        let mut vars = self.vars.lock().unwrap();
        for (k, t) in values {
            vars.insert(k, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Ok(())
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        safetensors_bytes(&self.snapshot()?)
    }

    fn init(&self, shape: &Shape, init: Init, dev: &Device) -> Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().unwrap();
        let fan_in = || shape.dims().iter().skip(1).product::<usize>().max(1) as f64;
        let data: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n).map(|_| (mean + stdev * rng.normal()) as f32).collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.range(lo, up) as f32).collect(),
            Init::Kaiming { .. } => {
                // He-uniform with ReLU gain; our builders pass explicit bounds instead.
                let bound = (6.0 / fan_in()).sqrt();
                (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
            }
        };
        Tensor::from_vec(data, shape, dev)
    }
}

impl SimpleBackend for Params {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(v) = self.vars.lock().unwrap().get(name) {
            if v.shape() != &s {
                candle_core::bail!("parameter {name}: shape {:?}, model expects {:?}", v.shape(), s)
            }
            return v.as_tensor().to_dtype(dtype);
        }
        let t = self.init(&s, h, dev)?;
        let v = Var::from_tensor(&t)?;
        self.vars.lock().unwrap().insert(name.to_string(), v.clone());
        v.as_tensor().to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.vars.lock().unwrap().get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("parameter {name} has no value and no shape to create it"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.lock().unwrap().contains_key(name)
    }
}

/// PyTorch's default `nn.Linear`: weight and bias uniform in ±1/√fan_in.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let u = Init::Uniform { lo: -bound, up: bound };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", u)?;
    let b = if bias { Some(vb.get_with_hints(out_dim, "bias", u)?) } else { None };
    Ok(Linear { weight: w, bias: b })
}

/// A fully connected layer, `x · wᵀ + b` (weight [out, in]), as candle's `Linear` but with its
/// product through [`super::ops::matmul`] (OpenBLAS on the CPU, the weight read transposed in place).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = match *x.dims() {
            [b1, b2, _, _] => self.weight.broadcast_left((b1, b2))?,
            [b, _, _] => self.weight.broadcast_left(b)?,
            _ => self.weight.clone(),
        };
        let y = super::ops::matmul(x, &w.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// PyTorch's default conv init (uniform ±1/√fan_in) for a weight of `shape` and optional bias.
pub fn conv_weight(
    shape: (usize, usize, usize, usize),
    bias: bool,
    vb: VarBuilder,
) -> Result<(Tensor, Option<Tensor>)> {
    let fan_in = shape.1 * shape.2 * shape.3;
    let bound = 1.0 / (fan_in as f64).sqrt();
    let u = Init::Uniform { lo: -bound, up: bound };
    let w = vb.get_with_hints(shape, "weight", u)?;
    let b = if bias { Some(vb.get_with_hints(shape.0, "bias", u)?) } else { None };
    Ok((w, b))
}

/// LayerNorm parameters (weight 1, bias 0), eps 1e-5 as PyTorch.
pub fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
        eps: 1e-5,
    })
}

/// LayerNorm: candle's fused kernel for inference (it has no backward), ours, fused with a
/// backward, for training.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            super::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
        }
    }
}

/// Encode tensors as a safetensors file (names sorted; F32, F16, BF16, I64, U8).
pub fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let (dtype, bytes): (&str, Vec<u8>) = match t.dtype() {
            DType::F32 => ("F32", t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => {
                ("F16", t.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::BF16 => {
                ("BF16", t.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
            DType::I64 => ("I64", t.flatten_all()?.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::U8 => ("U8", t.flatten_all()?.to_vec1::<u8>()?),
            other => candle_core::bail!("safetensors: unsupported dtype {other:?} for {name}"),
        };
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut head = serde_json::to_vec(&header).expect("json");
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + data.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Decode a safetensors file into named tensors on `device`.
pub fn load_safetensors(bytes: &[u8], device: &Device) -> Result<BTreeMap<String, Tensor>> {
    Ok(candle_core::safetensors::load_buffer(bytes, device)?.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_builds_the_same_parameters_and_they_round_trip() {
        let build = |seed| {
            let p = Params::new(seed);
            let vb = p.var_builder(&Device::Cpu);
            linear(4, 3, true, vb.pp("fc")).unwrap();
            p
        };
        let (a, b, c) = (build(1), build(1), build(2));
        let (sa, sb, sc) = (a.snapshot().unwrap(), b.snapshot().unwrap(), c.snapshot().unwrap());
        let v = |m: &BTreeMap<String, Tensor>| m["fc.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&sa), v(&sb));
        assert_ne!(v(&sa), v(&sc));
        assert!(v(&sa).iter().all(|x| x.abs() <= 0.5));
        let bytes = a.to_safetensors().unwrap();
        let back = load_safetensors(&bytes, &Device::Cpu).unwrap();
        assert_eq!(back.keys().collect::<Vec<_>>(), vec!["fc.bias", "fc.weight"]);
        assert_eq!(v(&back), v(&sa));
    }

    #[test]
    fn preloaded_values_win_and_shape_mismatch_is_named() {
        let p = Params::new(0);
        p.preload([("fc.weight".to_string(), Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap())]).unwrap();
        let l = linear(4, 3, false, p.var_builder(&Device::Cpu).pp("fc")).unwrap();
        assert_eq!(l.weight().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let err = linear(5, 3, false, p.var_builder(&Device::Cpu).pp("fc")).unwrap_err();
        assert!(err.to_string().contains("fc.weight"), "{err}");
    }
}
