//! wsimil's CLAM against the authors' own CLAM_SB and CLAM_MB (github.com/mahmoodlab/CLAM,
//! `models/model_clam.py`): logits, raw attention, the instance clustering loss and the gradients
//! of the authors' training loss (0.7 · cross-entropy + 0.3 · instance loss), from the same
//! weights. The fixture is made by `scripts/dev/clam_parity.py` (small widths built from the
//! authors' own layers; CLAM_SB with 2 classes, CLAM_MB with 3 in subtyping mode).

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use wsimil_common::models::clam::ClamConfig;
use wsimil_common::models::params::Params;
use wsimil_common::models::{BagModel, BagModelConfig, Mode};

mod parity;

use parity::{close, flat};

fn fixture() -> BTreeMap<String, Tensor> {
    parity::fixture("clam_parity.safetensors")
}

/// Model `name` of the fixture, its parameters under the authors' names.
fn model(f: &BTreeMap<String, Tensor>, name: &str, n_classes: usize, multi_branch: bool) -> (Params, BagModel) {
    let (params, n) = parity::params(f, name);
    let cfg = ClamConfig {
        hidden: 16,
        attention: 8,
        k_sample: 4,
        subtyping: multi_branch,
        // The reference was recorded in eval mode; training's kernels (with their backward) run
        // here without dropout.
        dropout: 0.0,
        ..ClamConfig::new(24, n_classes, multi_branch)
    };
    let m = BagModel::new(&BagModelConfig::Clam(cfg), params.var_builder(&Device::Cpu)).unwrap();
    assert_eq!(params.named_vars().len(), n, "{name}: every reference tensor used, nothing else asked for");
    (params, m)
}

fn check(name: &str, n_classes: usize, multi_branch: bool, label: usize) {
    let f = fixture();
    let (params, m) = model(&f, name, n_classes, multi_branch);
    let out = m.forward(&f["bag"], &mut Mode::Eval, true).unwrap();
    close(&flat(&out.logits), &flat(&f[&format!("{name}.logits")]), &format!("{name} logits"));
    let Some(wsimil_common::models::Aux::Clam(state)) = out.aux.as_ref() else { panic!("{name}: no CLAM state") };
    close(&flat(&state.raw_attention), &flat(&f[&format!("{name}.raw_attention")]), &format!("{name} raw attention"));
    let BagModel::Clam(clam) = &m else { unreachable!() };
    let inst = clam.instance_loss(state, label).unwrap();
    close(&flat(&inst), &flat(&f[&format!("{name}.instance_loss")]), &format!("{name} instance loss"));
    // The authors' training loss, its gradients parameter by parameter (training's kernels).
    let mut rng = wsimil_common::rng::Rng::new(0);
    let out = m.forward(&f["bag"], &mut Mode::Train(&mut rng), false).unwrap();
    close(&flat(&out.logits), &flat(&f[&format!("{name}.logits")]), &format!("{name} logits, training kernels"));
    let ce = candle_nn::loss::cross_entropy(&out.logits, &Tensor::new(&[label as u32], &Device::Cpu).unwrap()).unwrap();
    let loss = m.classification_loss(&out, ce, label).unwrap();
    let grads = loss.backward().unwrap();
    let vars: BTreeMap<String, _> = params.named_vars().into_iter().collect();
    let prefix = format!("{name}.grad.");
    let mut compared = 0;
    for (k, var) in &vars {
        match (f.get(&format!("{prefix}{k}")), grads.get(var)) {
            (Some(want), Some(got)) => {
                close(&flat(got), &flat(want), &format!("{name} ∂{k}"));
                compared += 1;
            }
            // A parameter the loss does not reach (another class's instance classifier) has no
            // gradient on either side.
            (None, got) => assert!(got.is_none_or(|g| flat(g).iter().all(|v| *v == 0.0)), "{name} ∂{k}: only wsimil's"),
            (Some(_), None) => panic!("{name} ∂{k}: only the reference's"),
        }
    }
    assert!(compared >= 9, "{name}: {compared} gradients compared");
}

#[test]
fn clam_sb_matches_the_authors_code() {
    check("sb", 2, false, 1);
}

#[test]
fn clam_mb_in_subtyping_mode_matches_the_authors_code() {
    check("mb", 3, true, 2);
}
