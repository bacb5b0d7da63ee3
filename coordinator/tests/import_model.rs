//! Models trained elsewhere, imported as users have them: the official TransMIL code's Lightning
//! checkpoint at full width, CLAM's CLAM_SB checkpoint, DSMIL's MILNet and DTFD-MIL's four
//! modules, made by `scripts/dev/import_fixtures.py`
//! with the authors' own code (`coordinator/tests/fixtures/import/`). `wsimil import-model` turns
//! each into a model folder; its classifier scores the fixture's bag with the authors' logits.

use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;
use wsimil_common::classifier::ModelCard;
use wsimil_common::models::params::{load_safetensors, Params};
use wsimil_common::models::{BagModel, Mode};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import").join(name)
}

fn import(flag: &str, file: &str, extra: &[&str], out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wsimil"))
        .args(["import-model", flag, fixture(file).to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

/// `import-model FLAG FILE` as a normal/tumor model of resnet50-trunc features, into `out`: it
/// succeeds, and its card.
fn import_ok(flag: &str, file: &str, out: &Path) -> (PathBuf, ModelCard) {
    let res = import(
        flag,
        file,
        &["--classes", "normal,tumor", "--embedder", "resnet50-trunc", "--random-weights", "1"],
        out,
    );
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let card = serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
    (out.to_path_buf(), card)
}

/// The folder's one classifier on the fixture's bag.
fn scored(dir: &Path) -> wsimil_common::models::BagOutput {
    let card: ModelCard = serde_json::from_slice(&std::fs::read(dir.join("model.json")).unwrap()).unwrap();
    assert_eq!(card.members.len(), 1);
    let m = &card.members[0];
    let p = Params::new(0);
    p.preload(
        load_safetensors(&std::fs::read(dir.join(format!("{}.safetensors", m.name))).unwrap(), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let model = BagModel::new(&m.config, p.var_builder(&Device::Cpu)).unwrap();
    let bag =
        candle_core::safetensors::load(fixture("import.safetensors"), &Device::Cpu).unwrap().remove("bag").unwrap();
    model.forward(&bag, &mut Mode::Eval, false).unwrap()
}

/// Its logits.
fn logits(dir: &Path) -> Vec<f32> {
    scored(dir).logits.flatten_all().unwrap().to_vec1().unwrap()
}

fn want(name: &str) -> Vec<f32> {
    let t: Tensor =
        candle_core::safetensors::load(fixture("import.safetensors"), &Device::Cpu).unwrap().remove(name).unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(got: &[f32], want: &[f32]) -> f32 {
    let m = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / m
}

#[test]
fn an_official_transmil_checkpoint_imports_and_scores_with_the_official_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (out, card) = import_ok("--transmil", "transmil.ckpt", &dir.path().join("transmil"));
    assert_eq!(card.classes, vec!["normal", "tumor"]);
    assert_eq!(card.members[0].embedder.architecture.to_string(), "resnet50-trunc");
    let (got, want) = (logits(&out), want("transmil_logits"));
    let e = close(&got, &want);
    assert!(e < 1e-5, "{got:?} vs {want:?}: {e:.2e}");
}

#[test]
fn a_clam_sb_checkpoint_imports_as_clam_and_scores_with_clams_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (out, card) = import_ok("--clam", "clam_sb.pt", &dir.path().join("clam"));
    assert!(
        matches!(&card.members[0].config, wsimil_common::models::BagModelConfig::Clam(c) if !c.multi_branch),
        "{:?}",
        card.members[0].config
    );
    let (got, want) = (logits(&out), want("clam_logits"));
    let e = close(&got, &want);
    assert!(e < 1e-5, "{got:?} vs {want:?}: {e:.2e}");
}

#[test]
fn a_dsmil_checkpoint_imports_as_dsmil_and_scores_with_its_two_streams() {
    let dir = tempfile::tempdir().unwrap();
    let (out, card) = import_ok("--dsmil", "dsmil.pth", &dir.path().join("dsmil"));
    let config = &card.members[0].config;
    assert!(
        matches!(config, wsimil_common::models::BagModelConfig::Dsmil(c) if c.streams == 1 && c.query == 128),
        "{config:?}"
    );
    let got = scored(&out);
    let Some(wsimil_common::models::Aux::Dsmil(state)) = &got.aux else { panic!("not DSMIL") };
    for (t, name) in [(&state.bag, "dsmil_bag"), (&state.max_instance, "dsmil_max")] {
        let (got, want) = (t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want(name));
        let e = close(&got, &want);
        assert!(e < 1e-5, "{name}: {got:?} vs {want:?}: {e:.2e}");
    }
}

/// DTFD-MIL's best_model.pth (four state dicts in one file) imports as DTFD-MIL, its widths read
/// from it, and scores the fixture's bag, split as the authors' test split it, with their logits.
#[test]
fn a_dtfd_checkpoint_imports_as_dtfd_and_scores_with_its_two_tiers() {
    use wsimil_common::models::dtfd::{Distill, Dtfd};
    let dir = tempfile::tempdir().unwrap();
    let (out, card) = import_ok("--dtfd", "dtfd.pth", &dir.path().join("dtfd"));
    let member = &card.members[0];
    let wsimil_common::models::BagModelConfig::Dtfd(c) = &member.config else { panic!("{:?}", member.config) };
    assert_eq!((c.in_dim, c.hidden, c.attention, c.res_layers, c.distill), (1024, 128, 128, 0, Distill::Afs));
    let p = Params::new(0);
    let weights = std::fs::read(out.join(format!("{}.safetensors", member.name))).unwrap();
    p.preload(load_safetensors(&weights, &Device::Cpu).unwrap()).unwrap();
    let model = Dtfd::new(c, p.var_builder(&Device::Cpu)).unwrap();
    let f = candle_core::safetensors::load(fixture("import.safetensors"), &Device::Cpu).unwrap();
    let order: Vec<usize> = f["dtfd_order"].to_vec1::<f32>().unwrap().iter().map(|v| *v as usize).collect();
    let x = f["bag"].squeeze(0).unwrap();
    let got = model.forward_groups(&x, &Dtfd::split(&order, 4), &mut Mode::Eval, false).unwrap();
    let got: Vec<f32> = got.logits.flatten_all().unwrap().to_vec1().unwrap();
    let e = close(&got, &want("dtfd_logits"));
    assert!(e < 1e-5, "{got:?} vs {:?}: {e:.2e}", want("dtfd_logits"));

    // Another model's file is not a DTFD-MIL checkpoint: said, naming the file and what is missing.
    let args = ["--classes", "a,b", "--embedder", "resnet50-trunc", "--random-weights", "1"];
    let res = import("--dtfd", "dsmil.pth", &args, &dir.path().join("x"));
    let e = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && e.contains("dsmil.pth") && e.contains("no state dict under `classifier`"), "{e}");
}

#[test]
fn an_import_that_cannot_fit_is_refused_naming_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let err = |flag, file, extra: &[&str]| {
        let res = import(flag, file, extra, &dir.path().join("x"));
        assert!(!res.status.success());
        String::from_utf8_lossy(&res.stderr).to_string()
    };
    let e = err(
        "--transmil",
        "transmil.ckpt",
        &["--classes", "a,b,c", "--embedder", "resnet50-trunc", "--random-weights", "1"],
    );
    assert!(e.contains("transmil.ckpt: the checkpoint predicts 2 classes; --classes names 3 (a, b, c)"), "{e}");
    let e = err(
        "--transmil",
        "transmil.ckpt",
        &["--classes", "a,b", "--embedder", "efficientnet-lite0", "--random-weights", "1"],
    );
    assert!(e.contains("takes 1024-wide features, but efficientnet-lite0 gives 1280"), "{e}");
    // A CLAM checkpoint given as TransMIL's: not a TransMIL state dict.
    let e =
        err("--transmil", "clam_sb.pt", &["--classes", "a,b", "--embedder", "resnet50-trunc", "--random-weights", "1"]);
    assert!(e.contains("no tensor _fc1.0.weight: not the state dict of a TransMIL checkpoint"), "{e}");
}
