//! wsimil's DTFD-MIL against the authors' own modules (github.com/hrzhang1123/DTFD-MIL,
//! `Model/Attention.py`, `Model/network.py`, the steps of `Main_DTFD_MIL.py`'s training): on the
//! same bag split the same way, each pseudo-bag's tier-1 logits, what is distilled for tier 2,
//! tier 2's logits, both losses, and the gradients each of the authors' two optimizers steps with
//! (tier 1's from the tier-1 loss, tier 2's from the tier-2 loss). The fixture is made by
//! `scripts/dev/dtfd_parity.py` (AFS with two classes, MaxMinS with three and a residual block,
//! MaxS).

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use wsimil_common::models::dtfd::{Distill, Dtfd, DtfdConfig};
use wsimil_common::models::params::Params;
use wsimil_common::models::{Aux, BagModel, BagModelConfig, Mode};

mod parity;

use parity::{close, flat};

fn fixture() -> BTreeMap<String, Tensor> {
    parity::fixture("dtfd_parity.safetensors")
}

/// Case `name`'s configuration, as the fixture script builds it.
fn config(name: &str) -> DtfdConfig {
    let (n_classes, distill, instances, res_layers) = match name {
        "afs" => (2, Distill::Afs, 4, 0),
        "maxmins" => (3, Distill::Maxmins, 8, 1),
        "maxs" => (2, Distill::Maxs, 4, 0),
        _ => unreachable!("{name}"),
    };
    DtfdConfig { hidden: 16, attention: 8, distill, instances, res_layers, ..DtfdConfig::new(24, n_classes) }
}

fn model(f: &BTreeMap<String, Tensor>, name: &str) -> (Params, BagModel) {
    let (params, n) = parity::params(f, name);
    let m = BagModel::new(&BagModelConfig::Dtfd(config(name)), params.var_builder(&Device::Cpu)).unwrap();
    assert_eq!(params.named_vars().len(), n, "{name}: every reference tensor used, nothing else asked for");
    (params, m)
}

fn check(name: &str) {
    let f = fixture();
    let (params, m) = model(&f, name);
    let BagModel::Dtfd(dtfd) = &m else { panic!("{name}: not DTFD") };
    let order: Vec<usize> = flat(&f[&format!("{name}.order")]).iter().map(|v| *v as usize).collect();
    let groups = Dtfd::split(&order, 4);
    let label = flat(&f[&format!("{name}.label")])[0] as usize;
    // Training's kernels (no dropout: the authors' rates are 0).
    let mut rng = wsimil_common::rng::Rng::new(0);
    let out = dtfd.forward_groups(&f["bag"], &groups, &mut Mode::Train(&mut rng), false).unwrap();
    let Some(Aux::Dtfd(state)) = &out.aux else { panic!("{name}: no DTFD state") };
    close(&flat(&state.pseudo_logits), &flat(&f[&format!("{name}.pseudo")]), &format!("{name} tier-1 logits"));
    close(&flat(&state.distilled), &flat(&f[&format!("{name}.distilled")]), &format!("{name} distilled"));
    close(&flat(&out.logits), &flat(&f[&format!("{name}.logits")]), &format!("{name} tier-2 logits"));
    let loss0 = dtfd.pseudo_loss(state, label).unwrap();
    close(&flat(&loss0), &flat(&f[&format!("{name}.loss0")]), &format!("{name} tier-1 loss"));
    // The pipeline's bag loss is tier 2's cross-entropy; the model adds the tier-1 loss.
    let target = Tensor::new(&[label as u32], &Device::Cpu).unwrap();
    let loss1 = candle_nn::loss::cross_entropy(&out.logits, &target).unwrap();
    close(&flat(&loss1), &flat(&f[&format!("{name}.loss1")]), &format!("{name} tier-2 loss"));
    let loss = m.classification_loss(&out, loss1.clone(), label).unwrap();
    let sum = (loss0 + loss1).unwrap();
    close(&flat(&loss), &flat(&sum), &format!("{name} training loss"));
    let compared = parity::grads_close(&f, name, &params, &loss.backward().unwrap());
    assert_eq!(compared, if name == "maxmins" { 19 } else { 17 }, "{name}: every parameter's gradient compared");
    // Evaluation's kernels give the same logits on the same split.
    let eval = dtfd.forward_groups(&f["bag"], &groups, &mut Mode::Eval, true).unwrap();
    close(&flat(&eval.logits), &flat(&out.logits), &format!("{name} logits, evaluation kernels"));
    let a = flat(eval.attention.as_ref().unwrap());
    assert_eq!(a.len(), 13);
    assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{name}: attention over the whole bag sums to 1");
}

#[test]
fn dtfd_with_attention_pooled_distillation_matches_the_authors_code() {
    check("afs");
}

#[test]
fn dtfd_with_max_min_instances_and_a_residual_block_matches_the_authors_code() {
    check("maxmins");
}

#[test]
fn dtfd_with_max_instances_matches_the_authors_code() {
    check("maxs");
}

/// ICMIL's teacher reads the instance path: the logits DTFD gives a bag of that one instance,
/// whatever it distils.
#[test]
fn the_instance_path_is_the_prediction_for_a_one_instance_bag() {
    let f = fixture();
    for name in ["afs", "maxmins", "maxs"] {
        let (_, m) = model(&f, name);
        let (_, logits) = m.instance_path(&f["bag"]).unwrap();
        for i in [0, 6, 12] {
            let one = f["bag"].narrow(0, i, 1).unwrap().unsqueeze(0).unwrap();
            let want = m.forward(&one, &mut Mode::Eval, false).unwrap().logits;
            close(&flat(&logits.get(i).unwrap()), &flat(&want), &format!("{name} instance {i}"));
        }
    }
}

/// A slide scored twice gets one answer: evaluation's split is drawn the same way each time.
#[test]
fn evaluation_is_deterministic() {
    let f = fixture();
    let (_, m) = model(&f, "afs");
    let bag = f["bag"].unsqueeze(0).unwrap();
    let a = flat(&m.forward(&bag, &mut Mode::Eval, false).unwrap().logits);
    let b = flat(&m.forward(&bag, &mut Mode::Eval, false).unwrap().logits);
    assert_eq!(a, b);
}
