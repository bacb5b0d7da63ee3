//! wsimil's TransMIL against the authors' PyTorch code: forward, gradients, and seven steps of
//! Lookahead(RAdam) from the same weights. The fixture is made by `scripts/dev/transmil_parity.py`
//! (official `models/TransMIL.py` and `MyOptimizer`, nystrom-attention 0.0.9) at a small width.

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use wsimil_common::models::params::{load_safetensors, Params};
use wsimil_common::models::transmil::{TransMil, TransMilConfig};
use wsimil_common::models::{optim, Mode};
use wsimil_common::rng::Rng;

struct Fixture(BTreeMap<String, Tensor>);

impl Fixture {
    fn load() -> Self {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/transmil_parity.safetensors");
        Fixture(load_safetensors(&std::fs::read(path).unwrap(), &Device::Cpu).unwrap())
    }

    fn get(&self, name: &str) -> &Tensor {
        self.0.get(name).unwrap_or_else(|| panic!("fixture has no {name}"))
    }

    /// Tensors under `prefix.`, with the prefix removed.
    fn group(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.0.iter().filter_map(|(k, v)| k.strip_prefix(&p).map(|n| (n.to_string(), v.clone()))).collect()
    }

    fn model(&self) -> (Params, TransMil) {
        let params = Params::new(0);
        params.preload(self.group("param")).unwrap();
        let cfg = TransMilConfig {
            dim: 32,
            heads: 8,
            dim_head: 4,
            landmarks: 16,
            dropout: 0.0,
            ..TransMilConfig::paper(48, 3)
        };
        let model = TransMil::new(&cfg, params.var_builder(&Device::Cpu)).unwrap();
        // Every reference tensor is used, and the model asked for nothing else.
        assert_eq!(params.named_vars().len(), self.group("param").len());
        (params, model)
    }

    fn label(&self, i: usize) -> u32 {
        self.get("labels").to_vec1::<f32>().unwrap()[i] as u32
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a − b| over max |b|: relative to the tensor's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn loss(model: &TransMil, bag: &Tensor, label: u32, mode: &mut Mode) -> Tensor {
    let out = model.forward(bag, mode, false).unwrap();
    let target = Tensor::new(&[label], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&out.logits, &target).unwrap()
}

#[test]
fn forward_matches_the_reference() {
    let f = Fixture::load();
    let (_, model) = f.model();
    for bag in ["a", "b"] {
        let out = model.forward(f.get(&format!("bag_{bag}")), &mut Mode::Eval, true).unwrap();
        let want = f.get(&format!("logits_{bag}"));
        let err = rel_err(&out.logits, want);
        assert!(err < 1e-5, "bag {bag}: logits {:?} vs {:?} (rel err {err})", flat(&out.logits), flat(want));
    }
}

#[test]
fn gradients_match_the_reference() {
    let f = Fixture::load();
    let (params, model) = f.model();
    let mut rng = Rng::new(1);
    let l = loss(&model, f.get("bag_a"), f.label(0), &mut Mode::Train(&mut rng));
    let want_loss = f.get("loss").to_vec1::<f32>().unwrap()[0];
    assert!((l.to_scalar::<f32>().unwrap() - want_loss).abs() < 1e-5);
    let grads = l.backward().unwrap();
    let want = f.group("grad");
    assert_eq!(want.len(), params.named_vars().len());
    for (name, var) in params.named_vars() {
        let g = grads.get(&var).unwrap_or_else(|| panic!("{name}: no gradient"));
        let err = rel_err(g, &want[&name]);
        assert!(err < 1e-4, "{name}: gradient rel err {err}");
    }
}

#[test]
fn seven_lookahead_radam_steps_match_the_reference() {
    let f = Fixture::load();
    let (params, model) = f.model();
    let before = f.group("param");
    let mut opt = optim::build(optim::OptimizerKind::LookaheadRadam, params.named_vars(), 2e-4, 1e-5).unwrap();
    let want_losses = f.get("loss").to_vec1::<f32>().unwrap();
    let mut rng = Rng::new(1);
    for (step, want) in want_losses.iter().enumerate() {
        let (bag, label) = if step % 2 == 0 { ("bag_a", f.label(0)) } else { ("bag_b", f.label(1)) };
        let l = loss(&model, f.get(bag), label, &mut Mode::Train(&mut rng));
        let got = l.to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-4, "step {step}: loss {got} vs {want}");
        opt.step(&l.backward().unwrap()).unwrap();
    }
    // Compare what the steps changed (the weights themselves differ from the start by ~1e-3).
    let after = f.group("after");
    for (name, var) in params.named_vars() {
        let moved = (var.as_tensor() - &before[&name]).unwrap();
        let want = (&after[&name] - &before[&name]).unwrap();
        let err = rel_err(&moved, &want);
        assert!(err < 5e-3, "{name}: update rel err {err}");
    }
}
