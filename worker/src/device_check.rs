//! `wsimil check-device`: what a device runs against the CPU's reference, op by op and model by
//! model, in a few seconds. The acceptance check for a GPU worker: the CUDA paths (the depthwise
//! tap sum with its written-out backward, dropout drawn on the device, the normalisation of the
//! input on the device, candle's kernels in half precision) cannot be tested on a machine without
//! one, so every GPU machine should pass this before it embeds a cohort.
//!
//! Every check builds the same thing twice from the same seed, once on the device in the
//! worker's precision and once on the CPU in f32 through the CPU's own kernels, and reports the
//! relative error `max|a − b| / max|b|` (or, for whole networks, `‖a − b‖ / ‖b‖`) against a
//! tolerance for that precision.

use crate::device::Compute;
use crate::embed::to_input;
use candle_core::{DType, Device, Result, Tensor, Var};
use wsimil_common::features::Preprocessing;
use wsimil_common::models::ops::{depthwise_conv2d, depthwise_conv2d_taps, dropout_device_rng, seed_device, DwGeom};
use wsimil_common::models::params::{load_safetensors, Params};
use wsimil_common::models::transmil::{TransMil, TransMilConfig};
use wsimil_common::models::zoo::Architecture;
use wsimil_common::models::Mode;
use wsimil_common::rng::Rng;

/// One comparison: its error and the most it may be.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub err: f64,
    pub tol: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.err.is_finite() && self.err <= self.tol
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "ok" } else { "FAIL" };
        write!(f, "{verdict:4} {:44} error {:.2e} (tolerance {:.0e})", self.name, self.err, self.tol)
    }
}

fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut r = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| r.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu)
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// `max|a − b| / max|b|`.
fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (host(a)?, host(b)?);
    if a.len() != b.len() {
        return Ok(f64::INFINITY);
    }
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// `‖a − b‖ / ‖b‖`.
fn l2_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (host(a)?, host(b)?);
    if a.len() != b.len() {
        return Ok(f64::INFINITY);
    }
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    Ok((diff / norm.max(f64::MIN_POSITIVE)).sqrt())
}

/// What [`check_device`] compared, and what it could not (with the reason).
#[derive(Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    pub skipped: Vec<String>,
}

/// Every check on `compute`'s device and precision, against the CPU in f32.
pub fn check_device(compute: &Compute) -> Result<Report> {
    let dev = &compute.device;
    let half = compute.dtype != DType::F32;
    // Whole networks: measured on the CPU in f16, 1.9e-3 (ResNet50-trunc) and 3.6e-3 (Lite0);
    // bf16 keeps 3 fewer mantissa bits (8× the rounding), so about 3e-2 is expected there. A
    // wrong kernel or layout gives errors near 1.
    let net_tol = match compute.dtype {
        DType::BF16 => 6e-2,
        DType::F16 => 1e-2,
        _ => 1e-4,
    };
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let mut push = |name: &str, err: f64, tol: f64| out.push(Check { name: name.to_string(), err, tol });

    // The depthwise tap sum (what every device but the CPU runs) against the CPU's direct op,
    // forward and both gradients: PPEG's 7×7 and an EfficientNet stride-2 5×5.
    let geoms = [
        ("7x7", (2, 16, 13, 13), 7, DwGeom::same_pad(7, 7, 1)),
        ("5x5/2", (2, 8, 15, 15), 5, DwGeom::tf_same(15, 15, 5, 5, 2)),
    ];
    for (i, (name, (b, c, h, w), k, g)) in geoms.into_iter().enumerate() {
        let (x, wt) = (random(&[b, c, h, w], 10 + i as u64)?, random(&[c, 1, k, k], 20 + i as u64)?);
        let want = depthwise_conv2d(&x, &wt, g)?;
        let probe = random(want.dims(), 30 + i as u64)?;
        let grads = |x: &Tensor, wt: &Tensor, probe: &Tensor, taps: bool| -> Result<(Tensor, Tensor, Tensor)> {
            let (x, wt) = (Var::from_tensor(x)?, Var::from_tensor(wt)?);
            let y = if taps { depthwise_conv2d_taps(&x, &wt, g)? } else { depthwise_conv2d(&x, &wt, g)? };
            let g = (&y * probe)?.sum_all()?.backward()?;
            let gx = g.get(&x).cloned().ok_or_else(|| candle_core::Error::Msg("no input gradient".into()))?;
            let gw = g.get(&wt).cloned().ok_or_else(|| candle_core::Error::Msg("no kernel gradient".into()))?;
            Ok((y, gx, gw))
        };
        let (y0, gx0, gw0) = grads(&x, &wt, &probe, false)?;
        let (y1, gx1, gw1) = grads(&x.to_device(dev)?, &wt.to_device(dev)?, &probe.to_device(dev)?, true)?;
        push(&format!("depthwise {name} forward"), max_rel(&y1, &y0)?, 1e-5);
        push(&format!("depthwise {name} input gradient"), max_rel(&gx1, &gx0)?, 1e-5);
        push(&format!("depthwise {name} kernel gradient"), max_rel(&gw1, &gw0)?, 1e-5);
    }

    // Dropout drawn on the device: the share zeroed, and (off the CPU) the same mask for a seed.
    let ones = Tensor::ones(100_000, DType::F32, dev)?;
    let kept = host(&dropout_device_rng(&ones, 0.25)?)?;
    let zeroed = kept.iter().filter(|v| **v == 0.0).count() as f64 / kept.len() as f64;
    push("dropout p = 0.25: share zeroed", (zeroed - 0.25).abs(), 0.01);
    if !dev.is_cpu() {
        let draw = |seed| -> Result<Vec<f32>> {
            seed_device(dev, seed)?;
            host(&dropout_device_rng(&ones, 0.25)?)
        };
        let (a, b) = (draw(7)?, draw(7)?);
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count() as f64;
        push("dropout: same seed, same mask", differ, 0.0);
    }

    // The input's normalisation on the device.
    let pre = Preprocessing {
        input_px: 32,
        resize: "x".into(),
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        resize_px: None,
    };
    let mut r = Rng::new(5);
    let pixels: Vec<u8> = (0..2 * 32 * 32 * 3).map(|_| r.below(256) as u8).collect();
    let want = to_input(pixels.clone(), 2, 32, &pre, &Device::Cpu, DType::F32)?;
    let got = to_input(pixels, 2, 32, &pre, dev, compute.dtype)?;
    push("input normalisation", max_rel(&got, &want)?, if half { 1e-2 } else { 1e-6 });

    // TransMIL: logits, and one training step's gradients (dropout off: the masks differ by device).
    let cfg = TransMilConfig { landmarks: 32, dropout: 0.0, ..TransMilConfig::paper(64, 2) };
    let bag = random(&[1, 300, 64], 40)?;
    let run = |d: &Device| -> Result<(Tensor, Vec<Tensor>)> {
        let params = Params::new(3);
        let model = TransMil::new(&cfg, params.var_builder(d))?;
        let x = bag.to_device(d)?;
        let logits = model.forward(&x, &mut Mode::Eval, false)?.logits;
        let mut rng = Rng::new(1);
        let train = model.forward(&x, &mut Mode::Train(&mut rng), false)?.logits;
        let loss = candle_nn::loss::cross_entropy(&train, &Tensor::new(&[1u32], d)?)?;
        let g = loss.backward()?;
        let grads = params.named_vars().iter().filter_map(|(_, v)| g.get(v).cloned()).collect();
        Ok((logits, grads))
    };
    let ((l0, g0), (l1, g1)) = (run(&Device::Cpu)?, run(dev)?);
    push("transmil logits", max_rel(&l1, &l0)?, 1e-3);
    let worst = if g0.len() == g1.len() && !g0.is_empty() {
        g0.iter().zip(&g1).map(|(a, b)| max_rel(b, a)).collect::<Result<Vec<_>>>()?.into_iter().fold(0.0, f64::max)
    } else {
        f64::INFINITY
    };
    push("transmil gradients (worst parameter)", worst, 1e-2);

    // The embedders in the worker's precision against f32 on the CPU: ResNet50-trunc with seeded
    // random weights (its skip connections keep the signal), EfficientNet-Lite0 with its ImageNet
    // weights (random ones shrink the signal to ~1e-8 by the last stage, under half precision's
    // range), when the data folder has them.
    let x = random(&[2, 3, 224, 224], 50)?;
    // Two Vision Transformers with seeded random weights: ViT-S/16 (GELU, class token) and the
    // DINOv2-with-registers layout the big pathology models share (SwiGLU-free at this size, but
    // registers, LayerScale and a resampled position grid).
    let mut nets = vec![
        (Architecture::ResNet50Trunc, None),
        (Architecture::Timm("vit_small_patch16_224".into()), None),
        (Architecture::Timm("vit_small_patch14_reg4_dinov2@imagenet".into()), None),
    ];
    let lite0 = wsimil_common::data_dir().join("efficientnet-lite0.safetensors");
    match std::fs::read(&lite0) {
        Ok(bytes) => nets.push((Architecture::EfficientNetLite0, Some(load_safetensors(&bytes, &Device::Cpu)?))),
        Err(e) => skipped.push(format!("efficientnet-lite0 features: {}: {e}", lite0.display())),
    }
    for (arch, weights) in nets {
        let build = |d: &Device, dt: DType| match &weights {
            Some(w) => arch.build(candle_nn::VarBuilder::from_tensors(w.clone().into_iter().collect(), dt, d)),
            None => arch.build(Params::new(4).var_builder_as(d, dt)),
        };
        let want = build(&Device::Cpu, DType::F32)?.forward(&x)?;
        let got = build(dev, compute.dtype)?.forward(&x.to_device(dev)?.to_dtype(compute.dtype)?)?;
        let name = format!("{arch} features ({})", compute.dtype.as_str());
        push(&name, l2_rel(&got, &want)?, net_tol);
    }
    Ok(Report { checks: out, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_passes_on_the_cpu() {
        // On the CPU the tap sum still runs against the direct op; the rest compare like with like.
        let report = check_device(&Compute::cpu()).unwrap();
        assert!(report.skipped.is_empty(), "the tests have the data folder: {:?}", report.skipped);
        let checks = report.checks;
        assert_eq!(checks.len(), 14, "{checks:?}");
        for c in &checks {
            assert!(c.passed(), "{c}");
        }
    }

    #[test]
    fn half_precision_stays_within_its_tolerances() {
        // What a GPU's bf16 run is held to, here in f16 (candle's CPU matmul has no bf16).
        let compute = Compute { dtype: DType::F16, ..Compute::cpu() };
        for c in check_device(&compute).unwrap().checks {
            assert!(c.passed(), "{c}");
        }
    }

    #[test]
    fn a_check_fails_past_its_tolerance_or_on_nan() {
        let c = |err| Check { name: "x".into(), err, tol: 1e-3 };
        assert!(c(1e-3).passed() && !c(2e-3).passed() && !c(f64::NAN).passed() && !c(f64::INFINITY).passed());
        assert!(c(5e-2).to_string().starts_with("FAIL"));
        let (a, b) =
            (Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(), Tensor::new(&[1f32, 4.0], &Device::Cpu).unwrap());
        assert!((max_rel(&a, &b).unwrap() - 0.5).abs() < 1e-9);
        assert!((l2_rel(&a, &b).unwrap() - 2.0 / 17f64.sqrt()).abs() < 1e-9);
    }
}
