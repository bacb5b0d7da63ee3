//! TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for
//! Whole Slide Image Classification", NeurIPS 2021), as the authors' `models/TransMIL.py`:
//!
//! ```text
//! bag [1, N, in] ─ _fc1 (Linear+ReLU) ─ pad to a square by repeating the first instances ─ cls token
//!   ─ layer1 (x + Nyström(LN(x))) ─ pos_layer PPEG (x + dw7 + dw5 + dw3) ─ layer2 ─ LN ─ cls ─ _fc2
//! ```
//!
//! Parameter names match the official state dict (`_fc1.0.weight`, `layer1.attn.to_qkv.weight`,
//! `pos_layer.proj.weight`, …), so a checkpoint from the reference code loads as is. The Nyström
//! attention is lucidrains' `nystrom_attention` that the reference imports: front zero padding to a
//! multiple of the landmarks, landmark means over consecutive groups, iterative pseudo-inverse, a
//! residual depthwise convolution of 33 taps over the sequence of values.
//!
//! One quirk of the reference matters: nystrom-attention 0.0.9, the version the authors pin, returns
//! the *first* n rows of the front-padded sequence (`out[:, :n]`), so when the sequence is padded the
//! outputs are shifted by the padding and the cls token receives a padding row's output; 0.0.11 and
//! later return the last n (`out[:, -n:]`). [`NystromOutput`] picks one; the paper configuration
//! uses the pinned behaviour, and `tests/transmil_parity.rs` checks it against the reference.
//!
//! ## The instance head (wsimil's, for ICMIL; `--transmil-head instance`)
//!
//! TransMIL's own instance path (`_fc1` → LayerNorm → `_fc2` on one patch) ranks patches near
//! chance: `_fc2` only ever sees the cls token after two attention layers. ICMIL needs a teacher
//! that says which patches are lesion, so a TransMIL trained by `wsimil run` carries, beside the
//! authors' network, a gated-attention head on `_fc1`'s output (Ilse et al.'s, as ABMIL's):
//!
//! ```text
//! H = _fc1(bag)   a = w(tanh(V H) ⊙ sigmoid(U H))   head logits = classifier(Σ softmax(a)_i H_i)
//! loss = CE(TransMIL's logits) + CE(head logits)
//! ```
//!
//! Both cross-entropies train `_fc1`; the slide's prediction is still the cls token's. A patch's
//! pseudo-label is `classifier(H_i)` (with the pooling linear, the head's bag logits are the
//! attention-weighted mean of its patches' logits, so the patch and the slide speak the same
//! language), its confidence the raw attention logit `a_i`. Parameters under `instance_head.`;
//! the authors' checkpoints have none and load as the plain network. `docs/icmil.md` has the
//! measurements that chose it.

use super::abmil::Gated;
use super::nystrom::{nystrom_attention, NystromSpec};
use super::ops::{depthwise_conv2d, dropout, matmul, pinv_iterative, DwGeom};
use super::params::Linear;
use super::params::{conv_weight, layer_norm, linear, LayerNorm};
use super::{softmax, BagOutput, Mode};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransMilConfig {
    /// Instance feature width (1024 in the paper, for ResNet50-trunc features).
    pub in_dim: usize,
    pub n_classes: usize,
    pub dim: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub landmarks: usize,
    pub pinv_iterations: usize,
    pub residual_kernel: usize,
    /// Dropout after the attention output projection (training only).
    pub dropout: f32,
    /// Which rows of the padded attention output are kept.
    #[serde(default)]
    pub nystrom_output: NystromOutput,
    /// wsimil's instance head beside the authors' network (module docs); absent from the
    /// configurations of models without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub instance_head: bool,
}

/// Which n rows of the front-padded Nyström attention output a layer returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NystromOutput {
    /// The first n (nystrom-attention 0.0.9, pinned by the official TransMIL code).
    #[default]
    Leading,
    /// The last n, aligned with the input (nystrom-attention 0.0.11 and later).
    Trailing,
}

impl TransMilConfig {
    /// The paper's configuration for `in_dim`-wide features.
    pub fn paper(in_dim: usize, n_classes: usize) -> Self {
        TransMilConfig {
            in_dim,
            n_classes,
            dim: 512,
            heads: 8,
            dim_head: 64,
            landmarks: 256,
            pinv_iterations: 6,
            residual_kernel: 33,
            dropout: 0.1,
            nystrom_output: NystromOutput::Leading,
            instance_head: false,
        }
    }
}

/// Width of the instance head's attention network (ABMIL's D).
const HEAD_ATTENTION: usize = 128;

/// The gated-attention instance head on `_fc1`'s output (module docs).
struct InstanceHead {
    attention: Gated,
    classifier: Linear,
}

impl InstanceHead {
    fn new(cfg: &TransMilConfig, vb: VarBuilder) -> Result<Self> {
        Ok(InstanceHead {
            attention: Gated::new(cfg.dim, HEAD_ATTENTION, vb.clone())?,
            classifier: linear(cfg.dim, cfg.n_classes, true, vb.pp("classifier"))?,
        })
    }

    /// Raw attention logits of reduced instances `h` [N, dim] → [N].
    fn attention_logits(&self, h: &Tensor) -> Result<Tensor> {
        self.attention.logits(h)?.squeeze(0)
    }

    /// The head's bag logits [1, C] of reduced instances `h` [N, dim].
    fn bag_logits(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let a = softmax(&self.attention.logits(h)?, train)?;
        self.classifier.forward(&matmul(&a, h)?)
    }
}

struct NystromAttention {
    to_qkv: Linear,
    to_out: Linear,
    res_conv: Tensor,
    cfg: TransMilConfig,
    /// Train with the composed tensor ops even where the fused CPU op runs (tests compare them).
    composed: bool,
}

/// What the attention needs to report the cls token's attention over the sequence.
struct Probe {
    /// Index of the token whose attention row is wanted (before the front padding).
    row: usize,
}

impl NystromAttention {
    fn new(cfg: &TransMilConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let k = cfg.residual_kernel;
        let bound = 1.0 / (k as f64).sqrt();
        Ok(NystromAttention {
            to_qkv: linear(cfg.dim, inner * 3, false, vb.pp("to_qkv"))?,
            to_out: linear(inner, cfg.dim, true, vb.pp("to_out.0"))?,
            res_conv: vb.pp("res_conv").get_with_hints(
                (cfg.heads, 1, k, 1),
                "weight",
                Init::Uniform { lo: -bound, up: bound },
            )?,
            cfg: cfg.clone(),
            composed: false,
        })
    }

    /// `x`: [B, n, dim] → ([B, n, dim], attention row of `probe` over the n tokens, mean over heads).
    fn forward(&self, x: &Tensor, mode: &mut Mode, probe: Option<Probe>) -> Result<(Tensor, Option<Tensor>)> {
        let (b, n, _) = x.dims3()?;
        let (h, dh, m) = (self.cfg.heads, self.cfg.dim_head, self.cfg.landmarks);
        let pad = (m - n % m) % m;
        let x = if pad > 0 { x.pad_with_zeros(1, pad, 0)? } else { x.clone() };
        let np = n + pad;
        let l = np / m;
        if mode.is_train() && probe.is_none() && !self.composed {
            let spec = NystromSpec {
                heads: h,
                dim_head: dh,
                landmarks: m,
                iters: self.cfg.pinv_iterations,
                kernel: self.cfg.residual_kernel,
                keep_maps_bytes: super::nystrom::KEEP_MAPS_BYTES,
            };
            if let Some(out) = nystrom_attention(&x, self.to_qkv.weight(), &self.res_conv, spec)? {
                return Ok((self.output(out, n, pad, mode)?, None));
            }
        }
        let qkv = self.to_qkv.forward(&x)?;
        let inner = h * dh;
        let heads = |t: Tensor| -> Result<Tensor> { t.reshape((b, np, h, dh))?.transpose(1, 2)?.contiguous() };
        let q = (heads(qkv.narrow(D::Minus1, 0, inner)?)? * (dh as f64).powf(-0.5))?;
        let k = heads(qkv.narrow(D::Minus1, inner, inner)?)?;
        let v = heads(qkv.narrow(D::Minus1, 2 * inner, inner)?)?;
        let landmarks = |t: &Tensor| -> Result<Tensor> { t.reshape((b, h, m, l, dh))?.sum(3)? / l as f64 };
        let (ql, kl) = (landmarks(&q)?, landmarks(&k)?);
        let train = mode.is_train();
        let attn1 = softmax(&matmul(&q, &kl.t()?)?, train)?;
        let attn2 = softmax(&matmul(&ql, &kl.t()?)?, train)?;
        let attn3 = softmax(&matmul(&ql, &k.t()?)?, train)?;
        let attn2_inv = pinv_iterative(&attn2, self.cfg.pinv_iterations)?;
        // The reference computes (attn1 · attn2⁺) · (attn3 · v): an [np, m] × [m, m] product per
        // head, kept for backward, whose cost grows with the bag. Associated the other way,
        // attn1 · (attn2⁺ · (attn3 · v)), the m × m factor meets a [m, dh] matrix instead: the same
        // product (to rounding), 2·np·m² fewer multiply-adds per head forward and twice that
        // backward, and no [np, m] intermediate held (at N = 16,000, 17 GFLOP and 134 MB a layer).
        let mut out = matmul(&attn1, &matmul(&attn2_inv, &matmul(&attn3, &v)?)?)?;
        let half = self.cfg.residual_kernel / 2;
        let geom = DwGeom { stride: (1, 1), pad: (half, half, 0, 0) };
        out = (out + depthwise_conv2d(&v, &self.res_conv, geom)?)?;
        let out = self.output(out.transpose(1, 2)?.reshape((b, np, inner))?, n, pad, mode)?;
        let row = match probe {
            Some(p) => {
                let left = attn1.narrow(2, pad + p.row, 1)?.matmul(&attn2_inv)?; // [B, h, 1, m]
                let r = left.matmul(&attn3)?; // [B, h, 1, np]
                Some(r.mean(1)?.squeeze(1)?.narrow(D::Minus1, pad, n)?) // [B, n]
            }
            None => None,
        };
        Ok((out, row))
    }
}

impl NystromAttention {
    /// The heads' outputs in token order [B, np, h·dh] → `to_out`, dropout, the n rows kept.
    fn output(&self, heads: Tensor, n: usize, pad: usize, mode: &mut Mode) -> Result<Tensor> {
        let mut out = self.to_out.forward(&heads)?;
        if let Some(rng) = mode.rng() {
            out = dropout(&out, self.cfg.dropout, rng)?;
        }
        match self.cfg.nystrom_output {
            NystromOutput::Leading => out.narrow(1, 0, n),
            NystromOutput::Trailing => out.narrow(1, pad, n),
        }
    }
}

struct TransLayer {
    norm: LayerNorm,
    attn: NystromAttention,
}

impl TransLayer {
    fn new(cfg: &TransMilConfig, vb: VarBuilder) -> Result<Self> {
        Ok(TransLayer { norm: layer_norm(cfg.dim, vb.pp("norm"))?, attn: NystromAttention::new(cfg, vb.pp("attn"))? })
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode, probe: Option<Probe>) -> Result<(Tensor, Option<Tensor>)> {
        let (a, row) = self.attn.forward(&self.norm.forward(x, mode.is_train())?, mode, probe)?;
        Ok(((x + a)?, row))
    }
}

/// Pyramid position encoding generator: depthwise 7×7, 5×5 and 3×3 convolutions over the tokens
/// laid out on their square grid, added to the identity.
struct Ppeg {
    convs: Vec<(Tensor, Tensor, usize)>,
}

impl Ppeg {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let mut convs = Vec::new();
        for (name, k) in [("proj", 7), ("proj1", 5), ("proj2", 3)] {
            let (w, b) = conv_weight((dim, 1, k, k), true, vb.pp(name))?;
            convs.push((w, b.expect("bias requested"), k));
        }
        Ok(Ppeg { convs })
    }

    /// `x + conv7(x) + conv5(x) + conv3(x)` (each 'same'-padded, with its bias) is one 7×7
    /// depthwise convolution: the three kernels centred in a 7×7 one and summed, plus 1 at the
    /// centre for `x` itself, the biases summed. So one pass over the tokens forward and one
    /// backward instead of three each, and no token-sized partial sums kept for backward (equal to
    /// the three convolutions to rounding). The kernels' gradients come back through the padding
    /// of those small kernels.
    fn forward(&self, x: &Tensor, side: usize) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let cls = x.narrow(1, 0, 1)?;
        let feat = x.narrow(1, 1, side * side)?.transpose(1, 2)?.reshape((b, c, side, side))?;
        let k = self.convs.iter().map(|(_, _, k)| *k).max().unwrap_or(1);
        let mut centre = vec![0f32; k * k];
        centre[k * k / 2] = 1.0;
        let mut kernel = Tensor::from_vec(centre, (1, 1, k, k), x.device())?.to_dtype(x.dtype())?;
        let mut bias: Option<Tensor> = None;
        for (w, bw, kw) in &self.convs {
            let p = (k - kw) / 2;
            kernel = kernel.broadcast_add(&w.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?)?;
            bias = Some(match bias {
                Some(sum) => (sum + bw)?,
                None => bw.clone(),
            });
        }
        let mut y = depthwise_conv2d(&feat, &kernel, DwGeom::same_pad(k, k, 1))?;
        if let Some(bias) = bias {
            y = y.broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        }
        let y = y.flatten_from(2)?.transpose(1, 2)?;
        Tensor::cat(&[cls, y], 1)
    }
}

pub struct TransMil {
    fc1: Linear,
    cls_token: Tensor,
    layer1: TransLayer,
    pos_layer: Ppeg,
    layer2: TransLayer,
    norm: LayerNorm,
    fc2: Linear,
    head: Option<InstanceHead>,
    cfg: TransMilConfig,
}

impl TransMil {
    pub fn new(cfg: &TransMilConfig, vb: VarBuilder) -> Result<Self> {
        Ok(TransMil {
            fc1: linear(cfg.in_dim, cfg.dim, true, vb.pp("_fc1.0"))?,
            cls_token: vb.get_with_hints((1, 1, cfg.dim), "cls_token", Init::Randn { mean: 0.0, stdev: 1.0 })?,
            layer1: TransLayer::new(cfg, vb.pp("layer1"))?,
            pos_layer: Ppeg::new(cfg.dim, vb.pp("pos_layer"))?,
            layer2: TransLayer::new(cfg, vb.pp("layer2"))?,
            norm: layer_norm(cfg.dim, vb.pp("norm"))?,
            fc2: linear(cfg.dim, cfg.n_classes, true, vb.pp("_fc2"))?,
            head: if cfg.instance_head { Some(InstanceHead::new(cfg, vb.pp("instance_head"))?) } else { None },
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TransMilConfig {
        &self.cfg
    }

    /// Train with the composed tensor version of the attention even where the fused CPU op runs
    /// (the two are compared by the tests; the composed one is what other devices run).
    pub fn composed_attention(mut self) -> Self {
        self.layer1.attn.composed = true;
        self.layer2.attn.composed = true;
        self
    }

    /// Whether it carries wsimil's instance head (module docs).
    pub fn has_instance_head(&self) -> bool {
        self.head.is_some()
    }

    /// `bag`: [1, N, in_dim]. With `want_attention`, also the cls token's attention in the second
    /// layer over the N real instances (mean over heads), the usual TransMIL heatmap. In training,
    /// a model with the instance head also returns the head's bag logits ([`super::Aux::TransmilHead`]).
    pub fn forward(&self, bag: &Tensor, mode: &mut Mode, want_attention: bool) -> Result<BagOutput> {
        let (b, n, _) = bag.dims3()?;
        let h = self.fc1.forward(bag)?.relu()?;
        let aux = match &self.head {
            Some(head) if mode.is_train() && b == 1 => {
                Some(super::Aux::TransmilHead(head.bag_logits(&h.squeeze(0)?, true)?))
            }
            _ => None,
        };
        let side = (n as f64).sqrt().ceil() as usize;
        let add = side * side - n;
        let h = if add > 0 { Tensor::cat(&[h.clone(), h.narrow(1, 0, add)?], 1)? } else { h };
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.dim))?;
        let h = Tensor::cat(&[cls, h], 1)?;
        let (h, _) = self.layer1.forward(&h, mode, None)?;
        let h = self.pos_layer.forward(&h, side)?;
        let probe = want_attention.then_some(Probe { row: 0 });
        let (h, row) = self.layer2.forward(&h, mode, probe)?;
        // LayerNorm is per token: normalise the cls token alone.
        let h = self.norm.forward(&h.narrow(1, 0, 1)?, mode.is_train())?.squeeze(1)?;
        let logits = self.fc2.forward(&h)?;
        // Attention over tokens 1..=N (skip cls, drop the square padding's repeats).
        let attention = match row {
            Some(r) => Some(r.narrow(1, 1, n)?.squeeze(0)?),
            None => None,
        };
        Ok(BagOutput { logits, attention, aux })
    }

    /// Instance-level path (ICMIL's teacher). With the instance head: its classifier on each
    /// instance's `_fc1` output. Without (the authors' network): `_fc1`, the final LayerNorm and
    /// `_fc2` applied to each instance on its own, no attention, a path no loss ever trained on
    /// single patches. `feats`: [N, in_dim] → ([N, dim] reduced, [N, C] logits).
    pub fn instance_path(&self, feats: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let reduced = self.fc1.forward(feats)?.relu()?;
        let logits = match &self.head {
            Some(head) => head.classifier.forward(&reduced)?,
            None => self.fc2.forward(&self.norm.forward(&reduced, train)?)?,
        };
        Ok((reduced, logits))
    }

    /// The instance head's raw attention logits of `feats` [N, in_dim] → [N] (each instance's own,
    /// on a scale shared by every slide); `None` without the head.
    pub fn head_attention_logits(&self, feats: &Tensor) -> Result<Option<Tensor>> {
        match &self.head {
            Some(head) => Ok(Some(head.attention_logits(&self.fc1.forward(feats)?.relu()?)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    fn small_cfg() -> TransMilConfig {
        TransMilConfig { dim: 32, heads: 2, dim_head: 16, landmarks: 16, ..TransMilConfig::paper(12, 3) }
    }

    fn bag(n: usize, d: usize, seed: u64) -> Tensor {
        let mut r = Rng::new(seed);
        Tensor::from_vec((0..n * d).map(|_| r.normal() as f32).collect::<Vec<_>>(), (1, n, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn shapes_for_bags_smaller_and_larger_than_the_landmarks() {
        let cfg = small_cfg();
        let p = Params::new(0);
        let m = TransMil::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        for n in [1, 2, 5, 16, 17, 50] {
            let out = m.forward(&bag(n, 12, n as u64), &mut Mode::Eval, true).unwrap();
            assert_eq!(out.logits.dims(), &[1, 3], "n={n}");
            let a = out.attention.unwrap();
            assert_eq!(a.dims(), &[n], "n={n}");
        }
    }

    #[test]
    fn parameter_names_match_the_official_state_dict() {
        let p = Params::new(0);
        TransMil::new(&TransMilConfig::paper(1024, 2), p.var_builder(&Device::Cpu)).unwrap();
        let names: Vec<String> = p.named_vars().into_iter().map(|(k, _)| k).collect();
        for expected in [
            "_fc1.0.weight",
            "cls_token",
            "layer1.norm.weight",
            "layer1.attn.to_qkv.weight",
            "layer1.attn.to_out.0.bias",
            "layer1.attn.res_conv.weight",
            "pos_layer.proj.weight",
            "pos_layer.proj1.bias",
            "pos_layer.proj2.weight",
            "layer2.attn.to_qkv.weight",
            "norm.bias",
            "_fc2.weight",
        ] {
            assert!(names.iter().any(|n| n == expected), "missing {expected}");
        }
        assert!(!names.iter().any(|n| n == "layer1.attn.to_qkv.bias"), "to_qkv has no bias");
        // The reference module's shapes for 1024-d input and 2 classes: _fc1 524,800 + cls 512 +
        // 2 layers x (LN 1,024 + qkv 786,432 + out 262,656 + res_conv 264) + PPEG 44,032 + LN 1,024
        // + _fc2 1,026.
        assert_eq!(p.num_parameters(), 2_672_146);
    }

    #[test]
    fn attention_over_instances_is_a_distribution_when_exact() {
        // With N+1+padding <= landmarks the Nyström approximation is exact softmax attention up to
        // the pseudo-inverse, so the cls row sums to ~1 over all tokens; over the real instances it
        // is a part of that.
        let cfg = small_cfg();
        let p = Params::new(1);
        let m = TransMil::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        let a = m.forward(&bag(9, 12, 3), &mut Mode::Eval, true).unwrap().attention.unwrap();
        let s = a.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(s > 0.0 && s < 1.05, "{s}");
    }

    /// The fused CPU attention (what training runs) against the composed tensor ops (what other
    /// devices run): the same loss and the same gradient for every parameter, across bag sizes that
    /// pad and that do not; n = 3 pads whole landmark groups with zeros, whose equal columns tie
    /// for the pseudo-inverse's scale (the gradient is shared among ties in both).
    #[test]
    fn the_fused_attention_trains_exactly_as_the_composed_one() {
        crate::models::blas::for_test();
        let cfg = TransMilConfig { dim: 32, heads: 2, dim_head: 16, landmarks: 16, ..TransMilConfig::paper(12, 3) };
        let p = Params::new(5);
        let fused = TransMil::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        let composed = TransMil::new(&cfg, p.var_builder(&Device::Cpu)).unwrap().composed_attention();
        let target = Tensor::new(&[2u32], &Device::Cpu).unwrap();
        for n in [3, 15, 16, 37, 70] {
            let x = bag(n, 12, 10 + n as u64);
            let run = |m: &TransMil| {
                let mut rng = Rng::new(n as u64);
                let out = m.forward(&x, &mut Mode::Train(&mut rng), false).unwrap();
                let loss = candle_nn::loss::cross_entropy(&out.logits, &target).unwrap();
                let grads = loss.backward().unwrap();
                (loss.to_scalar::<f32>().unwrap(), grads)
            };
            let ((la, ga), (lb, gb)) = (run(&fused), run(&composed));
            assert!((la - lb).abs() < 1e-5 * lb.abs().max(1.0), "n={n}: loss {la} vs {lb}");
            for (name, var) in p.named_vars() {
                let (a, b) = (ga.get(&var).unwrap(), gb.get(&var).unwrap());
                let (a, b) = (
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-8);
                let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                assert!(err < 1e-5, "n={n}, {name}: gradient rel err {err}");
            }
        }
    }

    fn head_cfg() -> TransMilConfig {
        TransMilConfig { instance_head: true, ..small_cfg() }
    }

    /// The head's patch logits are what it says of a bag made of that patch alone, and its bag
    /// logits the attention-weighted mean of its patches' logits: one language for both.
    #[test]
    fn the_instance_heads_patch_logits_pool_into_its_bag_logits() {
        let p = Params::new(3);
        let m = TransMil::new(&head_cfg(), p.var_builder(&Device::Cpu)).unwrap();
        assert!(m.has_instance_head());
        let x = bag(7, 12, 8);
        let (_, inst) = m.instance_path(&x.squeeze(0).unwrap(), false).unwrap();
        let a = m.head_attention_logits(&x.squeeze(0).unwrap()).unwrap().unwrap();
        let w = candle_nn::ops::softmax_last_dim(&a).unwrap();
        let want = w.unsqueeze(0).unwrap().matmul(&inst).unwrap();
        let mut rng = Rng::new(0);
        let out = m.forward(&x, &mut Mode::Train(&mut rng), false).unwrap();
        let Some(crate::models::Aux::TransmilHead(got)) = &out.aux else { panic!("no head logits in training") };
        let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "bag logits vs pooled patch logits: {d}");
        for i in [0, 4] {
            let one = x.narrow(1, i, 1).unwrap();
            let out = m.forward(&one, &mut Mode::Train(&mut rng), false).unwrap();
            let Some(crate::models::Aux::TransmilHead(got)) = &out.aux else { panic!() };
            let d = (got.squeeze(0).unwrap() - inst.get(i).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "patch {i} alone");
        }
        assert!(m.forward(&x, &mut Mode::Eval, false).unwrap().aux.is_none(), "scoring does not run the head");
    }

    /// Without the head: the authors' network, its parameters and its configuration as before.
    #[test]
    fn without_the_head_the_network_and_its_configuration_are_the_authors() {
        let (plain, with) = (Params::new(0), Params::new(0));
        TransMil::new(&small_cfg(), plain.var_builder(&Device::Cpu)).unwrap();
        TransMil::new(&head_cfg(), with.var_builder(&Device::Cpu)).unwrap();
        let names = |p: &Params| p.named_vars().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert!(!names(&plain).iter().any(|n| n.starts_with("instance_head.")));
        let head: Vec<String> = names(&with).into_iter().filter(|n| n.starts_with("instance_head.")).collect();
        assert_eq!(head.len(), 8, "{head:?}");
        // dim 32: V and U 32x128 + 128, w 128 + 1, classifier 32x3 + 3.
        assert_eq!(with.num_parameters() - plain.num_parameters(), 2 * (32 * 128 + 128) + 129 + 32 * 3 + 3);
        let json = serde_json::to_string(&small_cfg()).unwrap();
        assert!(!json.contains("instance_head"), "{json}");
        let back: TransMilConfig = serde_json::from_str(&json).unwrap();
        assert!(!back.instance_head);
        assert!(serde_json::to_string(&head_cfg()).unwrap().contains("\"instance_head\":true"));
    }

    /// Bags of noise, the positive ones with 2 of 16 patches shifted: trained on the bags' labels
    /// alone, the head's patch probabilities find the shifted patches.
    #[test]
    fn the_instance_head_learns_which_patches_make_a_bag_positive() {
        use crate::models::optim::{Adam, Optimizer};
        let cfg = TransMilConfig { dim: 16, heads: 2, dim_head: 8, landmarks: 8, ..TransMilConfig::paper(6, 2) };
        let cfg = TransMilConfig { instance_head: true, ..cfg };
        let p = Params::new(11);
        let m =
            crate::models::BagModel::new(&crate::models::BagModelConfig::Transmil(cfg), p.var_builder(&Device::Cpu))
                .unwrap();
        let mut r = Rng::new(5);
        let bags: Vec<(Tensor, usize, Vec<bool>)> = (0..32)
            .map(|i| {
                let label = i % 2;
                let lesion: Vec<bool> = (0..16).map(|j| label == 1 && j % 8 == 3).collect();
                let v: Vec<f32> = lesion
                    .iter()
                    .flat_map(|&l| {
                        (0..6).map(|c| r.normal() as f32 + if l && c < 2 { 2.5 } else { 0.0 }).collect::<Vec<_>>()
                    })
                    .collect();
                (Tensor::from_vec(v, (1, 16, 6), &Device::Cpu).unwrap(), label, lesion)
            })
            .collect();
        let vars: Vec<_> = p.named_vars().into_iter().map(|(_, v)| v).collect();
        let mut opt = Adam::new(vars, 5e-3, 0.0).unwrap();
        let mut rng = Rng::new(1);
        for _ in 0..15 {
            for (x, label, _) in &bags {
                let out = m.forward(x, &mut Mode::Train(&mut rng), false).unwrap();
                let target = Tensor::new(&[*label as u32], &Device::Cpu).unwrap();
                let bag_loss = candle_nn::loss::cross_entropy(&out.logits, &target).unwrap();
                let loss = m.classification_loss(&out, bag_loss, *label).unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
        }
        let (mut scores, mut truth) = (Vec::new(), Vec::new());
        for (x, _, lesion) in &bags {
            let (_, logits) = m.instance_path(&x.squeeze(0).unwrap()).unwrap();
            let prob = candle_nn::ops::softmax_last_dim(&logits).unwrap().narrow(1, 1, 1).unwrap();
            scores.extend(prob.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from));
            truth.extend(lesion.iter().copied());
        }
        let auc = crate::metrics::binary_auc(&scores, &truth).unwrap();
        assert!(auc > 0.95, "the head's patch AUC {auc}");
    }

    #[test]
    fn gradients_reach_every_parameter() {
        // With the head and its loss: every parameter of both, the head's included.
        let p = Params::new(2);
        let m = crate::models::BagModel::new(
            &crate::models::BagModelConfig::Transmil(head_cfg()),
            p.var_builder(&Device::Cpu),
        )
        .unwrap();
        let mut rng = Rng::new(0);
        let out = m.forward(&bag(20, 12, 4), &mut Mode::Train(&mut rng), false).unwrap();
        let target = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let bag_loss = candle_nn::loss::cross_entropy(&out.logits, &target).unwrap();
        let loss = m.classification_loss(&out, bag_loss, 1).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in p.named_vars() {
            let g = grads.get(&v).unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert!(norm > 0.0, "zero gradient for {name}");
        }
    }
}
