//! CLAM (Lu et al., "Data-efficient and weakly supervised computational pathology on whole-slide
//! images", Nature Biomedical Engineering 2021), single- and multi-branch, as the authors' code
//! (github.com/mahmoodlab/CLAM, `models/model_clam.py`) builds them, with its parameter names, so
//! that its checkpoints load as they are:
//!
//! ```text
//! H = Dropout(ReLU(fc(x)))                                  [N, 512]   attention_net.0
//! A = c(Dropout(tanh(a H)) ⊙ Dropout(sigmoid(b H)))         [N, K]     attention_net.3.attention_{a,b,c}
//! M = softmax_N(Aᵀ) H                                       [K, 512]
//! SB (K = 1): logits = classifiers(M)                       [1, C]
//! MB (K = C): logits_c = classifiers.c(M_c)                 [1, C]
//! ```
//!
//! and the instance-level clustering loss that trains beside the bag's cross-entropy (weighted
//! `1 − bag_weight`, the authors' 0.3): for the slide's class c, its branch's top `k_sample`
//! attended patches are taken as class-c evidence (target 1 for `instance_classifiers.c`) and its
//! `k_sample` least attended as not (target 0); in subtyping mode every other class's top patches
//! are also taught "not this class", and the loss is averaged over the classes. Fewer patches than
//! `k_sample` in a bag (where the authors' `topk` fails): all of them.

use super::ops::dropout;
use super::params::{linear, Linear};
use super::{softmax, BagOutput, Mode};
use candle_core::{DType, Module, Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClamConfig {
    pub in_dim: usize,
    pub n_classes: usize,
    /// One attention branch and one bag classifier (CLAM_SB), or one of each per class (CLAM_MB).
    pub multi_branch: bool,
    /// Width of the reduced instance features (the authors' "small" and "big": 512).
    pub hidden: usize,
    /// Width of the attention network ("small": 256, "big": 384).
    pub attention: usize,
    pub dropout: f32,
    /// Patches per side of the clustering loss (the authors' B = 8).
    pub k_sample: usize,
    /// Subtyping mode: the other classes' top patches are taught "not this class" too (the
    /// authors' `--subtyping`, for tasks whose classes are all tumour subtypes).
    pub subtyping: bool,
    /// Weight of the bag's cross-entropy in the training loss (the authors' `--bag_weight`, 0.7).
    pub bag_weight: f64,
}

impl ClamConfig {
    /// The authors' defaults: size "small", gated attention, dropout 0.25, B = 8, bag weight 0.7.
    pub fn new(in_dim: usize, n_classes: usize, multi_branch: bool) -> Self {
        ClamConfig {
            in_dim,
            n_classes,
            multi_branch,
            hidden: 512,
            attention: 256,
            dropout: 0.25,
            k_sample: 8,
            subtyping: false,
            bag_weight: 0.7,
        }
    }

    fn branches(&self) -> usize {
        if self.multi_branch {
            self.n_classes
        } else {
            1
        }
    }
}

pub struct Clam {
    fc: Linear,
    attention_a: Linear,
    attention_b: Linear,
    attention_c: Linear,
    /// SB: one layer [C, L]; MB: one [1, L] per class.
    classifiers: Vec<Linear>,
    instance_classifiers: Vec<Linear>,
    cfg: ClamConfig,
}

/// What a training forward pass keeps for the clustering loss: the reduced instances [N, L] and
/// the raw attention [K, N].
pub struct ClamState {
    pub h: Tensor,
    pub raw_attention: Tensor,
}

impl Clam {
    pub fn new(cfg: &ClamConfig, vb: candle_nn::VarBuilder) -> Result<Self> {
        let gate = vb.pp("attention_net.3");
        let classifiers: Result<Vec<Linear>> = if cfg.multi_branch {
            (0..cfg.n_classes).map(|c| linear(cfg.hidden, 1, true, vb.pp(format!("classifiers.{c}")))).collect()
        } else {
            linear(cfg.hidden, cfg.n_classes, true, vb.pp("classifiers")).map(|l| vec![l])
        };
        Ok(Clam {
            fc: linear(cfg.in_dim, cfg.hidden, true, vb.pp("attention_net.0"))?,
            attention_a: linear(cfg.hidden, cfg.attention, true, gate.pp("attention_a.0"))?,
            attention_b: linear(cfg.hidden, cfg.attention, true, gate.pp("attention_b.0"))?,
            attention_c: linear(cfg.attention, cfg.branches(), true, gate.pp("attention_c"))?,
            classifiers: classifiers?,
            instance_classifiers: (0..cfg.n_classes)
                .map(|c| linear(cfg.hidden, 2, true, vb.pp(format!("instance_classifiers.{c}"))))
                .collect::<Result<_>>()?,
            cfg: cfg.clone(),
        })
    }

    fn drop(&self, x: Tensor, mode: &mut Mode) -> Result<Tensor> {
        match mode.rng() {
            Some(rng) => dropout(&x, self.cfg.dropout, rng),
            None => Ok(x),
        }
    }

    /// The raw attention [K, N] of reduced instances `h` [N, L].
    fn attention(&self, h: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let a = self.drop(self.attention_a.forward(h)?.tanh()?, mode)?;
        let b = self.drop(candle_nn::ops::sigmoid(&self.attention_b.forward(h)?)?, mode)?;
        self.attention_c.forward(&(a * b)?)?.t()
    }

    /// The bag logits [1, C] of the pooled features `m` [K, L].
    fn classify(&self, m: &Tensor) -> Result<Tensor> {
        if !self.cfg.multi_branch {
            return self.classifiers[0].forward(m);
        }
        let per_class: Vec<Tensor> =
            self.classifiers.iter().enumerate().map(|(c, l)| l.forward(&m.narrow(0, c, 1)?)).collect::<Result<_>>()?;
        Tensor::cat(&per_class, 1)
    }

    /// `bag`: [1, N, in_dim] → logits [1, C]; the attention (softmax over instances) is the single
    /// branch's, or the predicted class's branch; with the state the clustering loss needs.
    pub fn forward(&self, bag: &Tensor, mode: &mut Mode, want_attention: bool) -> Result<BagOutput> {
        let x = bag.squeeze(0)?;
        let h = self.fc.forward(&x)?.relu()?;
        let h = self.drop(h, mode)?;
        let raw = self.attention(&h, mode)?; // [K, N]
        let a = softmax(&raw, mode.is_train())?;
        let m = super::ops::matmul(&a, &h)?; // [K, L]
        let logits = self.classify(&m)?;
        let attention = if want_attention {
            let branch = if self.cfg.multi_branch {
                logits.squeeze(0)?.to_dtype(DType::F32)?.argmax(0)?.to_scalar::<u32>()? as usize
            } else {
                0
            };
            Some(a.get(branch)?)
        } else {
            None
        };
        Ok(BagOutput { logits, attention, aux: Some(super::Aux::Clam(ClamState { h, raw_attention: raw })) })
    }

    /// The clustering loss of a bag of class `label` from its forward pass's state.
    pub fn instance_loss(&self, state: &ClamState, label: usize) -> Result<Tensor> {
        let n = state.h.dim(0)?;
        let k = self.cfg.k_sample.min(n).max(1);
        let raw = state.raw_attention.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let device = state.h.device();
        // The indices of the k highest (or lowest) attention of a branch, as `torch.topk` takes them.
        let top = |branch: usize, highest: bool| -> Result<Tensor> {
            let row = &raw[branch];
            let mut idx: Vec<u32> = (0..n as u32).collect();
            idx.sort_by(|&i, &j| {
                let (a, b) = (row[i as usize], row[j as usize]);
                if highest {
                    b.total_cmp(&a)
                } else {
                    a.total_cmp(&b)
                }
            });
            idx.truncate(k);
            Tensor::new(idx.as_slice(), device)
        };
        let targets = |value: u32, count: usize| Tensor::new(vec![value; count].as_slice(), device);
        let mut total: Option<Tensor> = None;
        for c in 0..self.cfg.n_classes {
            let branch = if self.cfg.multi_branch { c } else { 0 };
            let (instances, target) = if c == label {
                let both = Tensor::cat(&[top(branch, true)?, top(branch, false)?], 0)?;
                (state.h.index_select(&both, 0)?, Tensor::cat(&[targets(1, k)?, targets(0, k)?], 0)?)
            } else if self.cfg.subtyping {
                (state.h.index_select(&top(branch, true)?, 0)?, targets(0, k)?)
            } else {
                continue;
            };
            let logits = self.instance_classifiers[c].forward(&instances)?;
            let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &target)?;
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
        }
        let total = match total {
            Some(t) => t,
            None => Tensor::zeros((), DType::F32, device)?,
        };
        if self.cfg.subtyping {
            total / self.cfg.n_classes as f64
        } else {
            Ok(total)
        }
    }

    pub fn config(&self) -> &ClamConfig {
        &self.cfg
    }

    /// The raw attention of instances `feats` [N, in_dim] on one branch (the single one, or the
    /// last class's), [N]: each instance's own, whatever bag it is in.
    pub fn attention_logits(&self, feats: &Tensor) -> Result<Tensor> {
        let h = self.fc.forward(feats)?.relu()?;
        let raw = self.attention(&h, &mut Mode::Eval)?;
        raw.get(raw.dim(0)? - 1)
    }

    /// Instance-level path (ICMIL's teacher): the bag classifier(s) on each reduced instance, as
    /// the bag prediction of a one-instance bag.
    pub fn instance_path(&self, feats: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.fc.forward(feats)?.relu()?;
        let logits = if self.cfg.multi_branch {
            let per_class: Vec<Tensor> = self.classifiers.iter().map(|l| l.forward(&h)).collect::<Result<_>>()?;
            Tensor::cat(&per_class, 1)?
        } else {
            self.classifiers[0].forward(&h)?
        };
        Ok((h, logits))
    }
}
