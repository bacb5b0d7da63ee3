//! wsimil's ABMIL against Ilse et al.'s own GatedAttention (AttentionDeepMIL's model.py): attention,
//! bag probability and gradients from the same weights. The fixture is made by
//! `scripts/dev/abmil_parity.py` (the reference's MNIST CNN replaced by the identity, small widths).
//!
//! The reference scores a bag with one sigmoid output; wsimil's classifier has one logit per class.
//! Logits (0, z) give softmax = (1 − σ(z), σ(z)), so the reference's classifier becomes wsimil's
//! with a zero first row, and cross-entropy equals the reference's Bernoulli likelihood.

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use wsimil_common::models::abmil::{Abmil, AbmilConfig};
use wsimil_common::models::params::{load_safetensors, Params};
use wsimil_common::models::Mode;
use wsimil_common::rng::Rng;

fn fixture() -> BTreeMap<String, Tensor> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/abmil_parity.safetensors");
    load_safetensors(&std::fs::read(path).unwrap(), &Device::Cpu).unwrap()
}

/// The reference's names → wsimil's, with its one-output classifier as logits (0, z).
fn our_name(reference: &str) -> String {
    reference
        .replace("feature_extractor_part2.0.", "fc.0.")
        .replace("attention_w.", "attention_weights.")
        .replace("classifier.0.", "classifier.")
}

fn model(f: &BTreeMap<String, Tensor>) -> (Params, Abmil) {
    let params = Params::new(0);
    let mut values = Vec::new();
    for (k, v) in f.iter().filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n, v))) {
        let v = if k.starts_with("classifier.") {
            Tensor::cat(&[&v.zeros_like().unwrap(), v], 0).unwrap()
        } else {
            v.clone()
        };
        values.push((our_name(k), v));
    }
    let n = values.len();
    params.preload(values).unwrap();
    let cfg = AbmilConfig { hidden: 16, attention: 8, dropout: 0.0, ..AbmilConfig::new(800, 2) };
    let m = Abmil::new(&cfg, params.var_builder(&Device::Cpu)).unwrap();
    assert_eq!(params.named_vars().len(), n, "every reference tensor used, nothing else asked for");
    (params, m)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn attention_and_bag_probability_match_the_reference() {
    let f = fixture();
    let (_, m) = model(&f);
    let out = m.forward(&f["bag"], &mut Mode::Eval, true).unwrap();
    let p = flat(&candle_nn::ops::softmax_last_dim(&out.logits).unwrap())[1];
    let want = flat(&f["y_prob"])[0];
    assert!((p - want).abs() < 1e-6, "{p} vs {want}");
    let (a, want) = (flat(&out.attention.unwrap()), flat(&f["attention"]));
    assert_eq!(a.len(), 9);
    assert!(a.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-6), "{a:?} vs {want:?}");
}

#[test]
fn gradients_match_the_reference() {
    let f = fixture();
    let (params, m) = model(&f);
    let mut rng = Rng::new(0);
    let out = m.forward(&f["bag"], &mut Mode::Train(&mut rng), false).unwrap();
    let loss = candle_nn::loss::cross_entropy(&out.logits, &Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let vars: BTreeMap<String, _> = params.named_vars().into_iter().collect();
    // The attention bias shifts every logit alike, so softmax makes its true gradient zero and both
    // sides return rounding noise: errors are measured against the largest gradient of the model
    // when a tensor's own are that small.
    let global =
        f.iter().filter(|(k, _)| k.starts_with("grad.")).flat_map(|(_, v)| flat(v)).fold(0f32, |m, v| m.max(v.abs()));
    for (k, want) in f.iter().filter_map(|(k, v)| k.strip_prefix("grad.").map(|n| (n, v))) {
        let g = grads.get(&vars[&our_name(k)]).unwrap();
        // The classifier's second row is the reference's (its first row has the opposite gradient).
        let g = if k.starts_with("classifier.") { g.narrow(0, 1, 1).unwrap() } else { g.clone() };
        let (g, want) = (flat(&g), flat(want));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3 * global);
        let err = g.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err < 1e-4, "{k}: gradient rel err {err}");
    }
}
