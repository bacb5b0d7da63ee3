//! Gated attention MIL (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
//! Learning", ICML 2018), on precomputed instance features:
//!
//! ```text
//! H = ReLU(fc(x))                      [N, L]
//! a = w(tanh(V H) ⊙ sigmoid(U H))      [N, 1]   attention logits, softmax over instances
//! z = Σ softmax(a)_i H_i               [L]      bag embedding
//! logits = classifier(z)
//! ```

use super::ops::dropout;
use super::params::linear;
use super::params::Linear;
use super::{softmax, BagOutput, Mode};
use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbmilConfig {
    pub in_dim: usize,
    pub n_classes: usize,
    /// Width of the reduced instance features (L).
    pub hidden: usize,
    /// Width of the attention network (D).
    pub attention: usize,
    pub dropout: f32,
}

impl AbmilConfig {
    pub fn new(in_dim: usize, n_classes: usize) -> Self {
        AbmilConfig { in_dim, n_classes, hidden: 512, attention: 128, dropout: 0.25 }
    }
}

/// Ilse et al.'s gated attention, `w(tanh(V h) ⊙ sigmoid(U h))`, one logit per instance, with
/// their parameter names (`attention_V.0`, `attention_U.0`, `attention_weights`): ABMIL's, each of
/// DTFD-MIL's tiers' (`Attention_Gated`) and TransMIL's instance head's.
pub(crate) struct Gated {
    v: Linear,
    u: Linear,
    w: Linear,
}

impl Gated {
    pub(crate) fn new(hidden: usize, width: usize, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Gated {
            v: linear(hidden, width, true, vb.pp("attention_V.0"))?,
            u: linear(hidden, width, true, vb.pp("attention_U.0"))?,
            w: linear(width, 1, true, vb.pp("attention_weights"))?,
        })
    }

    /// Raw attention logits of `h` [N, L] as a row, [1, N].
    pub(crate) fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let gate_v = self.v.forward(h)?.tanh()?;
        let gate_u = candle_nn::ops::sigmoid(&self.u.forward(h)?)?;
        self.w.forward(&(gate_v * gate_u)?)?.t()
    }
}

pub struct Abmil {
    fc: Linear,
    attention: Gated,
    classifier: Linear,
    cfg: AbmilConfig,
}

impl Abmil {
    pub fn new(cfg: &AbmilConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Abmil {
            fc: linear(cfg.in_dim, cfg.hidden, true, vb.pp("fc.0"))?,
            attention: Gated::new(cfg.hidden, cfg.attention, vb.clone())?,
            classifier: linear(cfg.hidden, cfg.n_classes, true, vb.pp("classifier"))?,
            cfg: cfg.clone(),
        })
    }

    /// Reduced instance features H: [N, in] → [N, L].
    fn reduce(&self, feats: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let h = self.fc.forward(feats)?.relu()?;
        match mode.rng() {
            Some(rng) => dropout(&h, self.cfg.dropout, rng),
            None => Ok(h),
        }
    }

    /// `bag`: [1, N, in_dim]. Attention is the softmax over instances (sums to 1).
    pub fn forward(&self, bag: &Tensor, mode: &mut Mode, want_attention: bool) -> Result<BagOutput> {
        let x = bag.squeeze(0)?;
        let h = self.reduce(&x, mode)?;
        let a = self.attention.logits(&h)?; // [1, N]
        let a = softmax(&a, mode.is_train())?;
        let z = super::ops::matmul(&a, &h)?; // [1, L]
        let logits = self.classifier.forward(&z)?;
        let attention = if want_attention { Some(a.squeeze(0)?) } else { None };
        Ok(BagOutput { logits, attention, aux: None })
    }

    /// The attention logits of instances `feats` [N, in_dim] (no dropout, no softmax), [N]: each
    /// instance's own, whatever bag it is in.
    pub fn attention_logits(&self, feats: &Tensor) -> Result<Tensor> {
        let h = self.fc.forward(feats)?.relu()?;
        self.attention.logits(&h)?.squeeze(0)
    }

    /// Instance-level path (ICMIL's teacher): the classifier applied to each reduced instance.
    pub fn instance_path(&self, feats: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.fc.forward(feats)?.relu()?;
        let logits = self.classifier.forward(&h)?;
        Ok((h, logits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::params::Params;
    use crate::rng::Rng;
    use candle_core::Device;

    #[test]
    fn attention_is_a_distribution_over_instances() {
        let p = Params::new(0);
        let m = Abmil::new(&AbmilConfig::new(8, 2), p.var_builder(&Device::Cpu)).unwrap();
        let mut r = Rng::new(1);
        let x = Tensor::from_vec((0..7 * 8).map(|_| r.normal() as f32).collect::<Vec<_>>(), (1, 7, 8), &Device::Cpu)
            .unwrap();
        let out = m.forward(&x, &mut Mode::Eval, true).unwrap();
        assert_eq!(out.logits.dims(), &[1, 2]);
        let a = out.attention.unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), 7);
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(a.iter().all(|v| *v > 0.0));
        // The logits are the attention before the softmax: softmax(logits) is the attention.
        let logits = m.attention_logits(&x.squeeze(0).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        let z: f32 = logits.iter().map(|v| v.exp()).sum();
        for (l, a) in logits.iter().zip(&a) {
            assert!((l.exp() / z - a).abs() < 1e-6, "{l} → {a}");
        }
    }
}
