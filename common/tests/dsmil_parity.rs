//! wsimil's DSMIL against the authors' own MILNet (github.com/binli123/dsmil-wsi, `dsmil.py`):
//! the bag stream's logits, the max-pooling stream's, the attention to the critical instances, the
//! authors' training loss (`0.5 · BCE(bag) + 0.5 · BCE(max instance)`) with its gradients, and the
//! averaged score, from the same weights. The fixture is made by `scripts/dev/dsmil_parity.py` (the
//! query network 16 wide; one stream for two classes, three one-hot streams, and the value network
//! of `passing_v`).

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use wsimil_common::models::dsmil::DsmilConfig;
use wsimil_common::models::params::Params;
use wsimil_common::models::{Aux, BagModel, BagModelConfig, Mode};

mod parity;

use parity::{close, flat};

fn fixture() -> BTreeMap<String, Tensor> {
    parity::fixture("dsmil_parity.safetensors")
}

/// Case `name` of the fixture, its parameters under the authors' names.
fn model(f: &BTreeMap<String, Tensor>, name: &str, streams: usize, passing_v: bool) -> (Params, BagModel) {
    let (params, n) = parity::params(f, name);
    let n_classes = if streams == 1 { 2 } else { streams };
    let cfg = DsmilConfig { query: 16, passing_v, ..DsmilConfig::new(24, n_classes) };
    assert_eq!(cfg.streams, streams, "{name}: the streams a {n_classes}-class task gets");
    let m = BagModel::new(&BagModelConfig::Dsmil(cfg), params.var_builder(&Device::Cpu)).unwrap();
    assert_eq!(params.named_vars().len(), n, "{name}: every reference tensor used, nothing else asked for");
    (params, m)
}

/// The class a case's label names (one stream: its 0/1; several: the one-hot's place).
fn label(f: &BTreeMap<String, Tensor>, name: &str) -> usize {
    let y = flat(&f[&format!("{name}.label")]);
    if y.len() == 1 {
        y[0] as usize
    } else {
        y.iter().position(|v| *v == 1.0).unwrap()
    }
}

fn check(name: &str, streams: usize, passing_v: bool) {
    let f = fixture();
    let (params, m) = model(&f, name, streams, passing_v);
    let bag = f["bag"].unsqueeze(0).unwrap();
    let out = m.forward(&bag, &mut Mode::Eval, true).unwrap();
    let Some(Aux::Dsmil(state)) = &out.aux else { panic!("{name}: no DSMIL state") };
    close(&flat(&state.bag), &flat(&f[&format!("{name}.bag")]), &format!("{name} bag stream"));
    close(&flat(&state.max_instance), &flat(&f[&format!("{name}.max")]), &format!("{name} max-pooling stream"));
    // The scores the pipeline reads: 0.5·σ(max) + 0.5·σ(bag), through the softmax of the log scores
    // for one stream, as they are for several.
    let logits = flat(&out.logits);
    let scores: Vec<f32> = if streams == 1 {
        vec![1.0 / (1.0 + (logits[0] - logits[1]).exp())]
    } else {
        logits.iter().map(|l| l.exp()).collect()
    };
    close(&scores, &flat(&f[&format!("{name}.score_avg")]), &format!("{name} averaged score"));
    // The attention shown is the predicted stream's (the only one for two classes).
    let a = f[&format!("{name}.A")].to_vec2::<f32>().unwrap();
    let stream = if streams == 1 { 0 } else { (0..streams).max_by(|&i, &j| scores[i].total_cmp(&scores[j])).unwrap() };
    let want: Vec<f32> = a.iter().map(|row| row[stream]).collect();
    close(&flat(out.attention.as_ref().unwrap()), &want, &format!("{name} attention"));

    // The authors' training loss, its gradients parameter by parameter (training's kernels).
    let y = label(&f, name);
    let mut rng = wsimil_common::rng::Rng::new(0);
    let out = m.forward(&bag, &mut Mode::Train(&mut rng), false).unwrap();
    close(&flat(&out.logits), &logits, &format!("{name} logits, training kernels"));
    let unused = Tensor::new(f32::NAN, &Device::Cpu).unwrap();
    let loss = m.classification_loss(&out, unused, y).unwrap();
    close(&flat(&loss), &flat(&f[&format!("{name}.loss")]), &format!("{name} loss"));
    let compared = parity::grads_close(&f, name, &params, &loss.backward().unwrap());
    assert_eq!(compared, if passing_v { 10 } else { 8 }, "{name}: every parameter's gradient compared");
}

#[test]
fn dsmil_with_one_stream_for_two_classes_matches_the_authors_code() {
    check("bin", 1, false);
}

#[test]
fn dsmil_with_a_stream_per_class_matches_the_authors_code() {
    check("multi", 3, false);
}

#[test]
fn dsmil_with_its_value_network_matches_the_authors_code() {
    check("passv", 1, true);
}

/// ICMIL's teacher reads the instance path: the scores DSMIL gives a bag of that one instance.
#[test]
fn the_instance_path_is_the_score_of_a_one_instance_bag() {
    let f = fixture();
    for (name, streams, passing_v) in [("bin", 1, false), ("multi", 3, false), ("passv", 1, true)] {
        let (_, m) = model(&f, name, streams, passing_v);
        let (reduced, logits) = m.instance_path(&f["bag"]).unwrap();
        assert_eq!(reduced.dims(), f["bag"].dims());
        for i in [0, 5, 12] {
            let one = f["bag"].narrow(0, i, 1).unwrap().unsqueeze(0).unwrap();
            let want = m.forward(&one, &mut Mode::Eval, false).unwrap().logits;
            close(&flat(&logits.get(i).unwrap()), &flat(&want), &format!("{name} instance {i}"));
        }
    }
}
