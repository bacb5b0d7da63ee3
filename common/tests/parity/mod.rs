//! What the bag models' parity tests share: their fixtures (made with the authors' own code by
//! `scripts/dev/<model>_parity.py`) and the comparison, relative to the reference's largest value.

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use wsimil_common::models::params::{load_safetensors, Params};

/// `tests/fixtures/<name>`, every tensor by name.
pub fn fixture(name: &str) -> BTreeMap<String, Tensor> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    load_safetensors(&std::fs::read(&path).unwrap(), &Device::Cpu).unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `got` is `want` to 1e-5 of the reference's largest value (at least 1e-3).
pub fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let e = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    assert!(e < 1e-5, "{what}: {got:?} vs {want:?} ({e:.2e})");
}

/// Every parameter's gradient in `grads` against case `name`'s reference (`<name>.grad.<its
/// name>`), each to [`close`]; a parameter either side lacks fails. How many were compared.
/// A gradient that is zero by symmetry (the bias of the layer whose outputs a softmax takes:
/// adding a constant to every logit changes nothing) is float noise on both sides, of either
/// sign: where the reference's is below 1e-6 of the case's largest gradient, wsimil's must be
/// too. (CLAM's test compares its own way: some of its parameters have no gradient on either side.)
#[allow(dead_code)]
pub fn grads_close(
    f: &BTreeMap<String, Tensor>,
    name: &str,
    params: &Params,
    grads: &candle_core::backprop::GradStore,
) -> usize {
    let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let prefix = format!("{name}.grad.");
    let global = f.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(_, v)| largest(&flat(v))).fold(0f32, f32::max);
    let mut compared = 0;
    for (k, var) in params.named_vars() {
        let want = f.get(&format!("{prefix}{k}")).unwrap_or_else(|| panic!("{name} ∂{k}: only wsimil's"));
        let got = grads.get(&var).unwrap_or_else(|| panic!("{name} ∂{k}: only the reference's"));
        let (got, want) = (flat(got), flat(want));
        if largest(&want) < 1e-6 * global {
            let g = largest(&got);
            assert!(g < 1e-6 * global, "{name} ∂{k}: zero in the reference (to {global:.2e}), {g:.2e} here");
        } else {
            close(&got, &want, &format!("{name} ∂{k}"));
        }
        compared += 1;
    }
    compared
}

/// Parameters preloaded with case `name`'s state dict (`<name>.param.<authors' name>`), and how
/// many tensors it holds.
pub fn params(f: &BTreeMap<String, Tensor>, name: &str) -> (Params, usize) {
    let params = Params::new(0);
    let prefix = format!("{name}.param.");
    let values: Vec<(String, Tensor)> =
        f.iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v.clone()))).collect();
    let n = values.len();
    params.preload(values).unwrap();
    (params, n)
}
