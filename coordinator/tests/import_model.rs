//! Models trained elsewhere, imported as users have them: the official TransMIL code's Lightning
//! checkpoint at full width, CLAM's CLAM_SB checkpoint and DSMIL's MILNet, made by `scripts/dev/import_fixtures.py`
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
    let out = dir.path().join("transmil");
    let res = import(
        "--transmil",
        "transmil.ckpt",
        &["--classes", "normal,tumor", "--embedder", "resnet50-trunc", "--random-weights", "1"],
        &out,
    );
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let card: ModelCard = serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(card.classes, vec!["normal", "tumor"]);
    assert_eq!(card.members[0].embedder.architecture.to_string(), "resnet50-trunc");
    let (got, want) = (logits(&out), want("transmil_logits"));
    let e = close(&got, &want);
    assert!(e < 1e-5, "{got:?} vs {want:?}: {e:.2e}");
}

#[test]
fn a_clam_sb_checkpoint_imports_as_clam_and_scores_with_clams_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clam");
    let res = import(
        "--clam",
        "clam_sb.pt",
        &["--classes", "normal,tumor", "--embedder", "resnet50-trunc", "--random-weights", "1"],
        &out,
    );
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let card: ModelCard = serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
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
    let out = dir.path().join("dsmil");
    let res = import(
        "--dsmil",
        "dsmil.pth",
        &["--classes", "normal,tumor", "--embedder", "resnet50-trunc", "--random-weights", "1"],
        &out,
    );
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let card: ModelCard = serde_json::from_slice(&std::fs::read(out.join("model.json")).unwrap()).unwrap();
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
