//! DSMIL (Li, Li & Eliceiri, "Dual-stream multiple instance learning network for whole slide image
//! classification with self-supervised contrastive learning", CVPR 2021), on precomputed instance
//! features, as the authors' code (github.com/binli123/dsmil-wsi, `dsmil.py`: `FCLayer`,
//! `BClassifier`, `MILNet`) builds it, with its parameter names, so that its checkpoints load as
//! they are. Two streams over S score streams (one per class, or one for a two-class task):
//!
//! ```text
//! c = i_classifier(x)                                 [N, S]   instance scores (max-pooling stream)
//! V = x   (or ReLU(v(Dropout(x))) with passing_v)    [N, D]
//! Q = q(x), q = Linear-ReLU-Linear-Tanh (128 wide)   [N, 128]
//! m_s = argmax_i c[i, s]                                       the critical instance of stream s
//! A = softmax_N(Q q(x_m)ᵀ / √128)                     [N, S]   attention to each critical instance
//! B = Aᵀ V                                            [S, D]
//! bag = fcc(B), a Conv1d(S, S, kernel D)              [1, S]   (the bag stream)
//! ```
//!
//! Trained with `0.5 · BCE(bag, y) + 0.5 · BCE(max_i c[i], y)` (logits, mean over streams) and
//! scored `0.5 · σ(max_i c[i]) + 0.5 · σ(bag)`, as the authors' training and test code do. A
//! two-class task has one stream, the positive class's (class 1, the authors' Camelyon16 setting);
//! more classes have one stream each with one-hot targets.
//!
//! wsimil's heads read a bag model's logits through a softmax, so the logits DSMIL gives the rest
//! of the pipeline are the log of its scores: `[ln(1 − p), ln p]` for one stream (whose softmax is
//! exactly `[1 − p, p]`), `ln p_s` for several (the softmax then normalises the per-class scores;
//! the ranking is the authors'). They are computed from log-sigmoids, so a score near 0 or 1 stays
//! finite. The raw stream logits travel beside them ([`DsmilState`]) for the loss.

use super::ops::dropout;
use super::params::{linear, Linear};
use super::{softmax, BagOutput, Mode};
use candle_core::{DType, Module, Result, Tensor, D};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DsmilConfig {
    pub in_dim: usize,
    pub n_classes: usize,
    /// Score streams: 1 for two classes (class 1's), else one per class (the authors' num_classes).
    pub streams: usize,
    /// Width of the query network (the authors' 128).
    pub query: usize,
    /// `q` is Linear-ReLU-Linear-Tanh (the authors' default, `nonlinear=True`) or one Linear.
    pub nonlinear: bool,
    /// `V` through Dropout-Linear-ReLU (the authors' `passing_v`) instead of the features as they are.
    pub passing_v: bool,
    /// The dropout before `v` (the authors' `dropout_node`, 0 by default; only with `passing_v`).
    pub dropout: f32,
}

impl DsmilConfig {
    /// The authors' defaults: nonlinear queries 128 wide, `V` the features, no dropout.
    pub fn new(in_dim: usize, n_classes: usize) -> Self {
        let streams = if n_classes == 2 { 1 } else { n_classes };
        DsmilConfig { in_dim, n_classes, streams, query: 128, nonlinear: true, passing_v: false, dropout: 0.0 }
    }
}

/// What a forward pass keeps for the loss: the bag stream's logits [1, S] and the max-pooling
/// stream's, the highest instance score of each stream [1, S].
pub struct DsmilState {
    pub bag: Tensor,
    pub max_instance: Tensor,
}

pub struct Dsmil {
    i_classifier: Linear,
    q: Vec<Linear>,
    v: Option<Linear>,
    /// fcc's weight [S, S, D] as [S, S·D], and its bias [S].
    fcc_weight: Tensor,
    fcc_bias: Tensor,
    cfg: DsmilConfig,
}

/// `ln σ(x) = −softplus(−x)`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    super::survival::softplus(&x.neg()?)?.neg()
}

/// `ln(eᵘ + eᵛ)` element by element, stable.
fn log_add_exp(u: &Tensor, v: &Tensor) -> Result<Tensor> {
    let m = u.maximum(v)?;
    let s = ((u - &m)?.exp()? + (v - &m)?.exp()?)?;
    m + s.log()?
}

/// Mean binary cross-entropy of logits `x` against targets `y` (as `BCEWithLogitsLoss`):
/// `softplus(x) − y·x`.
fn bce_with_logits(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    (super::survival::softplus(x)? - (x * y)?)?.mean_all()
}

impl Dsmil {
    pub fn new(cfg: &DsmilConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        let (d, s) = (cfg.in_dim, cfg.streams);
        let b = vb.pp("b_classifier");
        let q = if cfg.nonlinear {
            vec![linear(d, cfg.query, true, b.pp("q.0"))?, linear(cfg.query, cfg.query, true, b.pp("q.2"))?]
        } else {
            vec![linear(d, cfg.query, true, b.pp("q"))?]
        };
        let v = if cfg.passing_v { Some(linear(d, d, true, b.pp("v.1"))?) } else { None };
        // PyTorch's Conv1d default: uniform in ±1/√(in_channels · kernel).
        let bound = 1.0 / ((s * d) as f64).sqrt();
        let init = candle_nn::Init::Uniform { lo: -bound, up: bound };
        let fcc_weight = b.get_with_hints((s, s, d), "fcc.weight", init)?.reshape((s, s * d))?;
        let fcc_bias = b.get_with_hints(s, "fcc.bias", init)?;
        Ok(Dsmil {
            i_classifier: linear(d, s, true, vb.pp("i_classifier.fc.0"))?,
            q,
            v,
            fcc_weight,
            fcc_bias,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DsmilConfig {
        &self.cfg
    }

    fn query(&self, x: &Tensor) -> Result<Tensor> {
        if !self.cfg.nonlinear {
            return self.q[0].forward(x);
        }
        self.q[1].forward(&self.q[0].forward(x)?.relu()?)?.tanh()
    }

    /// The values `V` [N, D].
    fn values(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        match &self.v {
            None => Ok(x.clone()),
            Some(v) => {
                let x = match mode.rng() {
                    Some(rng) if self.cfg.dropout > 0.0 => dropout(x, self.cfg.dropout, rng)?,
                    _ => x.clone(),
                };
                v.forward(&x)?.relu()
            }
        }
    }

    /// The index of each stream's highest instance score, `scores` [N, S] → [S] (the first of
    /// equal ones).
    fn critical(scores: &Tensor) -> Result<Tensor> {
        scores.to_dtype(DType::F32)?.argmax(0)
    }

    /// The pipeline's logits [R, C] from stream logits `bag` and `max_instance` [R, S] (the log of
    /// `0.5 · σ(max_instance) + 0.5 · σ(bag)`, see the module docs).
    fn scored(&self, bag: &Tensor, max_instance: &Tensor) -> Result<Tensor> {
        let half = 0.5f64.ln();
        let log_p = (log_add_exp(&log_sigmoid(bag)?, &log_sigmoid(max_instance)?)? + half)?;
        if self.cfg.streams != 1 {
            return Ok(log_p);
        }
        let log_q = (log_add_exp(&log_sigmoid(&bag.neg()?)?, &log_sigmoid(&max_instance.neg()?)?)? + half)?;
        Tensor::cat(&[log_q, log_p], D::Minus1)
    }

    /// `bag`: [1, N, in_dim] → the log scores [1, C]; the attention (softmax over instances) is the
    /// predicted class's stream (the only one for two classes); with both streams' raw logits.
    pub fn forward(&self, bag: &Tensor, mode: &mut Mode, want_attention: bool) -> Result<BagOutput> {
        let x = bag.squeeze(0)?;
        let inst = self.i_classifier.forward(&x)?; // [N, S]
        let v = self.values(&x, mode)?; // [N, D]
        let q = self.query(&x)?; // [N, Q]
        let critical = Self::critical(&inst)?;
        let q_max = self.query(&x.index_select(&critical, 0)?)?; // [S, Q]
        let scale = (self.cfg.query as f64).sqrt();
        let raw = (super::ops::matmul(&q_max, &q.t()?)? / scale)?; // [S, N]
        let a = softmax(&raw, mode.is_train())?; // over instances
        let b = super::ops::matmul(&a, &v)?; // [S, D]
        let flat = b.reshape((1, self.cfg.streams * v.dim(1)?))?;
        let bag_logits = super::ops::matmul(&flat, &self.fcc_weight.t()?)?.broadcast_add(&self.fcc_bias)?; // [1, S]
        let max_instance = inst.max_keepdim(0)?; // [1, S]
        let logits = self.scored(&bag_logits, &max_instance)?;
        let attention = if want_attention {
            let stream = if self.cfg.streams == 1 {
                0
            } else {
                logits.squeeze(0)?.to_dtype(DType::F32)?.argmax(0)?.to_scalar::<u32>()? as usize
            };
            Some(a.get(stream)?)
        } else {
            None
        };
        Ok(BagOutput { logits, attention, aux: Some(super::Aux::Dsmil(DsmilState { bag: bag_logits, max_instance })) })
    }

    /// The stream targets of class `label` [1, S]: 1 for the positive class with one stream, one-hot
    /// with several.
    fn targets(&self, label: usize, device: &candle_core::Device) -> Result<Tensor> {
        let y: Vec<f32> = if self.cfg.streams == 1 {
            vec![if label == 1 { 1.0 } else { 0.0 }]
        } else {
            (0..self.cfg.streams).map(|s| if s == label { 1.0 } else { 0.0 }).collect()
        };
        Tensor::from_vec(y, (1, self.cfg.streams), device)
    }

    /// The authors' training loss of a bag of class `label`: `0.5 · BCE(bag) + 0.5 · BCE(max instance)`.
    pub fn loss(&self, state: &DsmilState, label: usize) -> Result<Tensor> {
        let y = self.targets(label, state.bag.device())?;
        let bag = bce_with_logits(&state.bag.to_dtype(DType::F32)?, &y)?;
        let max = bce_with_logits(&state.max_instance.to_dtype(DType::F32)?, &y)?;
        (bag * 0.5)? + (max * 0.5)?
    }

    /// Each instance's score on the positive stream (the only one, or the last class's), [N]: the
    /// max-pooling stream's logit, each instance's own whatever bag it is in.
    pub fn instance_logits(&self, feats: &Tensor) -> Result<Tensor> {
        let s = self.i_classifier.forward(feats)?;
        s.narrow(1, self.cfg.streams - 1, 1)?.squeeze(1)
    }

    /// Instance-level path (ICMIL's teacher): the scores of a one-instance bag, whose critical
    /// instance is itself, so that its attention is 1 and its bag stream is `fcc` on its values:
    /// `(features [N, D], log scores [N, C])`. Differentiable.
    pub fn instance_path(&self, feats: &Tensor) -> Result<(Tensor, Tensor)> {
        let inst = self.i_classifier.forward(feats)?; // [N, S]
        let v = self.values(feats, &mut Mode::Eval)?; // [N, D]
        let (n, d, s) = (v.dim(0)?, v.dim(1)?, self.cfg.streams);
        // A one-instance bag: B = V repeated for each stream, [N, S·D].
        let b = v.unsqueeze(1)?.broadcast_as((n, s, d))?.reshape((n, s * d))?;
        let bag = super::ops::matmul(&b, &self.fcc_weight.t()?)?.broadcast_add(&self.fcc_bias)?; // [N, S]
        Ok((feats.clone(), self.scored(&bag, &inst)?))
    }
}
