//! The Vision Transformer presets against their publishers' own code.
//!
//! `scripts/dev/vit_fixtures.py --out common/tests/fixtures/vit --conch CONCH_CHECKOUT` (PyPI's torch,
//! timm and transformers: scripts/dev/pypi-torch-env.sh) builds each preset the way its users do
//! (timm.create_model with the publisher's arguments, transformers' Dinov2Model, CONCH's CoCa), at
//! width 32 and depth 2, from random weights; saves the state dict as the publisher ships it
//! (`pytorch_model.bin` from torch.save, `model.safetensors` from save_pretrained); and saves its
//! features for two real H&E patches. Here each file goes through wsimil's own loader (the index,
//! the check by name and shape, the read) into the preset's architecture, whose structure
//! (LayerScale, registers, MLP, position embedding, naming, output) comes from wsimil's preset table
//! and only the sizes from the fixture, and both forward passes must give the publisher's features
//! to 1e-4.

use candle_core::{DType, Device, Tensor};
use std::path::PathBuf;
use wsimil_common::models::embedder::{Embedder, Tune};
use wsimil_common::models::vit::{self, PosResample, Vit};
use wsimil_common::models::weights::{self, WeightsFile};
use wsimil_common::models::zoo::{Architecture, FixtureSizes, VitPreset};

fn fixtures() -> PathBuf {
    std::env::var_os("WSIMIL_VIT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit"))
}

fn load(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

/// The two real patches, normalised as the publisher's transform does: (x/255 − mean)/std.
fn inputs(mean: [f32; 3], std: [f32; 3], side: usize) -> Tensor {
    let p = load("patches.safetensors").remove("patches").unwrap();
    let (n, h, w, _) = p.dims4().unwrap();
    assert_eq!((h, w), (side, side), "the fixture's patches are {h}×{w}");
    let x = p.to_dtype(DType::F32).unwrap().permute((0, 3, 1, 2)).unwrap();
    let x = (x / 255.0).unwrap();
    let m = Tensor::from_vec(mean.to_vec(), (1, 3, 1, 1), &Device::Cpu).unwrap();
    let s = Tensor::from_vec(std.to_vec(), (1, 3, 1, 1), &Device::Cpu).unwrap();
    let x = x.broadcast_sub(&m).unwrap().broadcast_div(&s).unwrap().contiguous().unwrap();
    assert_eq!(x.dim(0).unwrap(), n);
    x
}

fn max_rel(got: &Tensor, want: &Tensor) -> f32 {
    let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m.max(1e-12)
}

#[test]
fn every_vit_preset_gives_its_publishers_features() {
    // The fused CPU path runs through OpenBLAS; without it `forward` would be the generic path and
    // this test would compare that path twice.
    assert!(
        wsimil_common::models::blas::blas().is_some(),
        "this test checks the fused CPU path, which needs OpenBLAS: install it (scripts/setup.sh) and leave \
         WSIMIL_BLAS unset"
    );
    let mut checked = Vec::new();
    // Every preset has its fixture (H-optimus-1 is built as H-optimus-0: one fixture for both,
    // checked below), and one timm name with weights from elsewhere.
    let mut stems: Vec<&str> =
        VitPreset::ALL.iter().filter(|p| **p != VitPreset::HOptimus1).map(|p| p.name()).collect();
    stems.push("vit-vit_small_patch14_reg4_dinov2");
    for stem in stems.iter().copied() {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures().join(format!("{stem}.json"))).unwrap()).unwrap();
        let arch: Architecture = meta["preset"].as_str().unwrap().parse().unwrap();
        let file = WeightsFile::open(&fixtures().join(meta["weights"].as_str().unwrap())).unwrap();
        let sizes: FixtureSizes = serde_json::from_value(meta["sizes"].clone()).unwrap();
        let cfg = arch.fixture_config(&sizes, &|n| file.shape(n)).unwrap();
        let needed = vit::tensor_specs(&cfg);
        weights::check(&file, stem, &needed, &|n| vit::ignorable(cfg.naming, n)).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<String> = needed.into_iter().map(|s| s.name).collect();
        let tensors = file.read(Some(&names)).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &Device::Cpu);
        let pre = arch.preprocessing().unwrap();
        let model = Vit::new(&cfg, stem, pre.clone(), vb, Tune::Frozen).unwrap();
        let x = inputs(pre.mean, pre.std, cfg.input_px);
        let want = load(&format!("{stem}.features.safetensors")).remove("features").unwrap();
        let fast = model.forward(&x).unwrap();
        let reference = model.forward_reference(&x).unwrap();
        assert_eq!(fast.dims(), want.dims(), "{stem}");
        assert_eq!(model.feature_dim(), want.dim(1).unwrap(), "{stem}");
        let (e_fast, e_ref) = (max_rel(&fast, &want), max_rel(&reference, &want));
        eprintln!("{stem}: fused CPU path {e_fast:.2e}, generic path {e_ref:.2e}");
        assert!(e_fast < 1e-4 && e_ref < 1e-4, "{stem}: fused CPU path {e_fast:.2e}, generic path {e_ref:.2e}");
        checked.push(stem);
    }
    assert_eq!(checked.len(), VitPreset::ALL.len());
}

#[test]
fn h_optimus_1_is_h_optimus_0s_architecture() {
    // TRIDENT and Bioptimus build both the same way; one fixture serves both presets.
    let (a, b) = (VitPreset::HOptimus0.spec(), VitPreset::HOptimus1.spec());
    assert_eq!((a.config, a.mean, a.std, a.patch_px), (b.config, b.mean, b.std, b.patch_px));
}

#[test]
fn position_grids_resample_as_timm_hugging_face_and_conch_v15_do() {
    let t = load("resample.safetensors");
    let grid = &t["grid"];
    for g in [16usize, 5] {
        for (how, key) in [(PosResample::TimmBicubicAntialias, "timm"), (PosResample::Bicubic, "hf")] {
            let r = vit::resample_matrix(7, g, how);
            let r = Tensor::from_vec(r, (g, 7), &Device::Cpu).unwrap();
            // Separable: the grid [7, 7, C] resampled along rows, then columns.
            let c = grid.dim(1).unwrap();
            let x = grid.reshape((7, 7 * c)).unwrap();
            let y =
                r.matmul(&x).unwrap().reshape((g, 7, c)).unwrap().transpose(0, 1).unwrap().reshape((7, g * c)).unwrap();
            let y = r.matmul(&y.contiguous().unwrap()).unwrap().reshape((g, g, c)).unwrap().transpose(0, 1).unwrap();
            let y = y.contiguous().unwrap().reshape((g * g, c)).unwrap();
            let e = max_rel(&y, &t[&format!("{key}_{g}")]);
            assert!(e < 1e-5, "{key} to {g}×{g}: {e:.2e}");
        }
    }
    // CONCH v1.5: 7×7 to the 5×5 its trunk is built at (bilinear), then to 9×9 and back to 7×7
    // (bicubic at the scale factor (g + 0.1)/5): the round trip is not the identity.
    for g in [9usize, 7] {
        let r = vit::resample_matrix(7, g, PosResample::Conch15 { build_grid: 5 });
        let r = Tensor::from_vec(r, (g, 7), &Device::Cpu).unwrap();
        let c = grid.dim(1).unwrap();
        let x = grid.reshape((7, 7 * c)).unwrap();
        let y = r.matmul(&x).unwrap().reshape((g, 7, c)).unwrap().transpose(0, 1).unwrap().reshape((7, g * c)).unwrap();
        let y = r.matmul(&y.contiguous().unwrap()).unwrap().reshape((g, g, c)).unwrap().transpose(0, 1).unwrap();
        let y = y.contiguous().unwrap().reshape((g * g, c)).unwrap();
        let e = max_rel(&y, &t[&format!("conch15_{g}")]);
        assert!(e < 1e-5, "conch15 to {g}×{g}: {e:.2e}");
    }
}

#[test]
fn a_file_for_another_preset_is_refused_with_the_tensors_that_differ() {
    // UNI's file (class token only, GELU MLP) read as UNI2-h (8 registers, SwiGLU, patch 14):
    // the error names the file and what differs, before any tensor is read.
    let file = WeightsFile::open(&fixtures().join("uni.pytorch_model.bin")).unwrap();
    let arch = Architecture::Vit(VitPreset::Uni2H);
    let err = arch.read_weights(&file).expect_err("refused").to_string();
    assert!(err.contains("uni.pytorch_model.bin: does not fit uni2-h"), "{err}");
    assert!(err.contains("missing (reg_token") || err.contains("reg_token"), "{err}");
    assert!(err.contains("misshaped (") && err.contains("patch_embed.proj.weight"), "{err}");
    // And at full size the reduced file is misshaped everywhere: counted, the first few named.
    let err = Architecture::Vit(VitPreset::Uni).read_weights(&file).expect_err("refused").to_string();
    assert!(err.contains("does not fit uni: ") && err.contains("more)"), "{err}");
}

/// A CNN's weights file named as a Vision Transformer (ResNet-50's, CLAM's trunk, from wsimil's own
/// builder on random weights): refused at once, naming the file, the ViT tensors it lacks and the
/// CNN tensors it holds instead, for a preset and for a timm name alike.
#[test]
fn a_cnns_weights_file_is_refused_for_a_vit_naming_what_it_lacks_and_what_it_holds() {
    let params = wsimil_common::models::params::Params::new(1);
    Architecture::ResNet50Trunc.build(params.var_builder(&Device::Cpu)).unwrap();
    let tensors = params.snapshot().unwrap();
    assert!(tensors.contains_key("conv1.weight"), "{:?}", tensors.keys().take(5).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet50.safetensors");
    std::fs::write(&path, wsimil_common::models::params::safetensors_bytes(&tensors).unwrap()).unwrap();
    let file = WeightsFile::open(&path).unwrap();
    let timm: Architecture = "vit:vit_small_patch16_224".parse().unwrap();
    for arch in [Architecture::Vit(VitPreset::Uni), timm] {
        let err = arch.read_weights(&file).expect_err("refused").to_string();
        assert!(err.contains(&format!("resnet50.safetensors: does not fit {arch}: ")), "{err}");
        assert!(err.contains(" missing (cls_token, pos_embed, patch_embed.proj.weight"), "what it lacks: {err}");
        assert!(err.contains(" unexpected (bn1.bias") && err.contains("conv1.weight"), "what it holds: {err}");
    }
}

/// Every preset at full size against its publisher's library, without shipping gigabytes:
/// `scripts/dev/vit_fixtures.py --shapes` records, from timm, transformers and CONCH's own code at
/// full size (on PyTorch's meta device), every tensor of the state dict each publisher ships, the
/// width of the features its code returns, and its model card's preprocessing. Through the path a
/// user's weights file takes (`Architecture::fit_vit` on the file's shapes, then the tensors it
/// expects), each preset must expect exactly those tensors (the rest of the file being what it
/// ignores, CONCH's text tower), give features of that width, and prepare patches the same way
/// (mean, std, input side, and the resize and crop of the eval transform TRIDENT builds).
#[test]
fn every_preset_expects_exactly_its_publishers_full_size_tensors() {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("full_size.json")).unwrap()).unwrap();
    let mut names: Vec<String> = VitPreset::ALL.iter().map(|p| p.name().to_string()).collect();
    names.push("vit:vit_small_patch14_reg4_dinov2@imagenet".into());
    for name in &names {
        let entry = record.get(name.as_str()).unwrap_or_else(|| panic!("{name}: not in full_size.json"));
        let shipped: std::collections::BTreeMap<String, Vec<usize>> =
            serde_json::from_value(entry["tensors"].clone()).unwrap();
        let arch: Architecture = name.parse().unwrap();
        let cfg = arch.fit_vit(&|n| shipped.get(n).cloned()).unwrap();
        let needed = vit::tensor_specs(&cfg);
        for spec in &needed {
            assert_eq!(shipped.get(&spec.name), Some(&spec.shape), "{name}: {} (expected {:?})", spec.name, spec.shape);
        }
        let expected: std::collections::HashSet<&str> = needed.iter().map(|s| s.name.as_str()).collect();
        let unused: Vec<&String> =
            shipped.keys().filter(|n| !expected.contains(n.as_str()) && !vit::ignorable(cfg.naming, n)).collect();
        assert!(unused.is_empty(), "{name}: the publisher ships tensors wsimil neither reads nor ignores: {unused:?}");
        assert_eq!(arch.feature_dim(), entry["feature_dim"].as_u64().map(|d| d as usize), "{name}: features");
        let pre = arch.preprocessing().unwrap();
        let floats = |k: &str| -> Vec<f32> { serde_json::from_value(entry[k].clone()).unwrap() };
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&pre.mean, &floats("mean")) && close(&pre.std, &floats("std")), "{name}: {pre:?} vs {entry}");
        assert_eq!(Some(pre.input_px as u64), entry["input_px"].as_u64(), "{name}: input side");
        // The publisher's eval transform (TRIDENT's): resize the patch to `resize`, then crop the
        // centre `crop` (none: the resize gives the input).
        if let Some(t) = entry.get("transform") {
            let resize = t["resize"].as_u64().unwrap() as u32;
            let input = t["crop"].as_u64().map_or(resize, |c| c as u32);
            assert_eq!(pre.input_px, input, "{name}: {t}");
            assert_eq!(pre.resize_px, (resize > input).then_some(resize), "{name}: {t}");
        } else {
            assert!(name.starts_with("vit:"), "{name}: no transform recorded");
        }
    }
    assert_eq!(record.as_object().unwrap().len(), names.len(), "an entry for every preset, and only those");
}
