//! Optimizers over candle `Var`s: RAdam (Liu et al., ICLR 2020), Lookahead (Zhang et al., NeurIPS
//! 2019) and AdamW. TransMIL trains with Lookahead(RAdam) as in the authors' `MyOptimizer` (timm's
//! implementations): RAdam with decoupled weight decay and the SGD-with-momentum fallback while the
//! variance is not yet tractable (N_sma < 5), Lookahead with α = 0.5 and k = 6.
//!
//! Two details of the reference that change the numbers: weight decay skips biases and every 1-D
//! parameter (timm's `add_weight_decay`, which `create_optimizer` applies), and Lookahead's slow
//! weights are taken from the fast ones at the first synchronisation (step k), not at step 0, so
//! the first synchronisation moves nothing.

use candle_core::{backprop::GradStore, Result, Tensor, Var};

pub trait Optimizer {
    /// One update from `grads` (parameters without a gradient are left as they are).
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn learning_rate(&self) -> f64;
}

/// A parameter's value as data. A variable tracks the graph of what is computed from it, so state
/// computed from it directly (moments with an L2 term, Lookahead's slow weights) would hold the
/// previous step's state through that graph, and that one the step's before: a chain that grew by
/// about 100 MB an epoch on ABMIL (bench/train-scale.sh, 1,024-d features). Gradients likewise.
fn value(var: &Var) -> Tensor {
    var.as_tensor().detach()
}

struct Moments {
    m: Tensor,
    v: Tensor,
}

/// What Adam-family optimizers share: parameters, first and second moments, hyper-parameters.
struct AdamState {
    vars: Vec<Var>,
    moments: Vec<Moments>,
    /// Weight decay of each parameter.
    decay: Vec<f64>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
    /// Weight decay as an L2 term added to the gradient (PyTorch's `Adam`), not decoupled.
    l2: bool,
}

impl AdamState {
    fn new(vars: Vec<Var>, decay: Vec<f64>, lr: f64) -> Result<Self> {
        assert_eq!(vars.len(), decay.len(), "one weight decay per parameter");
        let moments =
            vars.iter().map(|v| Ok(Moments { m: v.zeros_like()?, v: v.zeros_like()? })).collect::<Result<_>>()?;
        Ok(AdamState { vars, moments, decay, lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 0, l2: false })
    }

    /// Advance the step, update both moments of every parameter with a gradient, and hand each
    /// (parameter, moments, weight decay) to `apply`.
    fn update(&mut self, grads: &GradStore, mut apply: impl FnMut(&Var, &Moments, f64) -> Result<()>) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        for ((var, st), wd) in self.vars.iter().zip(self.moments.iter_mut()).zip(&self.decay) {
            let Some(g) = grads.get(var) else { continue };
            // A variable's gradient can carry the graph it came from (candle detaches only the
            // gradients of intermediate nodes): the moments take it as data.
            let g = g.detach();
            let g = if self.l2 && *wd != 0.0 { (g + (value(var) * *wd)?)? } else { g };
            let g = &g;
            st.m = ((&st.m * b1)? + (g * (1.0 - b1))?)?;
            st.v = ((&st.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            apply(var, st, *wd)?;
        }
        Ok(())
    }
}

pub struct RAdam(AdamState);

impl RAdam {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let decay = vec![weight_decay; vars.len()];
        Self::with_decay(vars, decay, lr)
    }

    /// Each parameter with its own weight decay.
    pub fn with_decay(vars: Vec<Var>, decay: Vec<f64>, lr: f64) -> Result<Self> {
        Ok(RAdam(AdamState::new(vars, decay, lr)?))
    }
}

impl Optimizer for RAdam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let s = &self.0;
        let t = (s.step + 1) as f64;
        let (b1, b2, lr, eps) = (s.beta1, s.beta2, s.lr, s.eps);
        let beta2_t = b2.powf(t);
        let n_sma_max = 2.0 / (1.0 - b2) - 1.0;
        let n_sma = n_sma_max - 2.0 * t * beta2_t / (1.0 - beta2_t);
        let rectified = n_sma >= 5.0;
        let step_size = if rectified {
            lr * ((1.0 - beta2_t) * (n_sma - 4.0) / (n_sma_max - 4.0) * (n_sma - 2.0) / n_sma * n_sma_max
                / (n_sma_max - 2.0))
                .sqrt()
                / (1.0 - b1.powf(t))
        } else {
            lr / (1.0 - b1.powf(t))
        };
        self.0.update(grads, |var, st, wd| {
            let p = if wd != 0.0 { (value(var) * (1.0 - wd * lr))? } else { value(var) };
            let update = if rectified { (&st.m / (st.v.sqrt()? + eps)?)? } else { st.m.clone() };
            var.set(&(p - (update * step_size)?)?)
        })
    }

    fn learning_rate(&self) -> f64 {
        self.0.lr
    }
}

/// AdamW (Loshchilov & Hutter 2019), as PyTorch's.
pub struct AdamW(AdamState);

impl AdamW {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let decay = vec![weight_decay; vars.len()];
        Self::with_decay(vars, decay, lr)
    }

    /// Each parameter with its own weight decay.
    pub fn with_decay(vars: Vec<Var>, decay: Vec<f64>, lr: f64) -> Result<Self> {
        Ok(AdamW(AdamState::new(vars, decay, lr)?))
    }
}

impl AdamState {
    /// Adam's bias-corrected step; the weight decay decoupled (AdamW) unless it went into the
    /// gradient ([`Adam`]).
    fn adam_step(&mut self, grads: &GradStore) -> Result<()> {
        let t = (self.step + 1) as f64;
        let (c1, c2) = (1.0 - self.beta1.powf(t), 1.0 - self.beta2.powf(t));
        let (lr, eps, l2) = (self.lr, self.eps, self.l2);
        self.update(grads, |var, st, wd| {
            let decoupled = if l2 { 0.0 } else { wd };
            let p = (value(var) * (1.0 - lr * decoupled))?;
            let denom = ((&st.v / c2)?.sqrt()? + eps)?;
            let update = ((&st.m / denom)? * (lr / c1))?;
            var.set(&(p - update)?)
        })
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.0.adam_step(grads)
    }

    fn learning_rate(&self) -> f64 {
        self.0.lr
    }
}

/// Adam with weight decay as an L2 term of the gradient, as PyTorch's `Adam(weight_decay=…)`: what
/// ICMIL's authors fine-tune the embedder with (lr 1e-5, weight decay 1e-4).
pub struct Adam(AdamState);

impl Adam {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let decay = vec![weight_decay; vars.len()];
        let mut s = AdamState::new(vars, decay, lr)?;
        s.l2 = true;
        Ok(Adam(s))
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.0.adam_step(grads)
    }

    fn learning_rate(&self) -> f64 {
        self.0.lr
    }
}

/// Scale the gradients of `vars` together so that their joint L2 norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`, which divides by the norm plus 1e-6). Returns the norm before.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v) {
                let scaled = (g * scale)?;
                grads.insert(v, scaled);
            }
        }
    }
    Ok(norm)
}

/// Lookahead: every `k` inner steps, slow weights move `alpha` of the way to the fast weights and
/// the fast weights restart from them. As timm's, the slow weights are first taken at step k.
pub struct Lookahead<O> {
    inner: O,
    vars: Vec<Var>,
    slow: Option<Vec<Tensor>>,
    alpha: f64,
    k: u64,
    steps: u64,
}

impl<O: Optimizer> Lookahead<O> {
    pub fn new(inner: O, vars: Vec<Var>, alpha: f64, k: u64) -> Result<Self> {
        Ok(Lookahead { inner, vars, slow: None, alpha, k, steps: 0 })
    }
}

impl<O: Optimizer> Optimizer for Lookahead<O> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.inner.step(grads)?;
        self.steps += 1;
        if self.steps.is_multiple_of(self.k) {
            match &mut self.slow {
                None => self.slow = Some(self.vars.iter().map(|v| value(v).copy()).collect::<Result<_>>()?),
                Some(slow) => {
                    for (var, slow) in self.vars.iter().zip(slow.iter_mut()) {
                        *slow = (&*slow + ((value(var) - &*slow)? * self.alpha)?)?;
                        var.set(slow)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }
}

/// Weight decay per named parameter as the reference applies it: none for biases and 1-D
/// parameters (LayerNorm and BatchNorm scales), `weight_decay` for the rest.
pub fn decay_of(name: &str, var: &Var, weight_decay: f64) -> f64 {
    if var.rank() <= 1 || name.ends_with(".bias") {
        0.0
    } else {
        weight_decay
    }
}

/// The optimizers a run can train its bag classifier with (`--optimizer`; the names plans hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// Lookahead(RAdam), k = 6, α = 0.5: the TransMIL paper's.
    LookaheadRadam,
    Radam,
    Adamw,
}

/// The optimizer a [`crate::plan::TrainConfig`] names, over named parameters.
pub fn build(kind: OptimizerKind, named: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Result<Box<dyn Optimizer>> {
    let decay: Vec<f64> = named.iter().map(|(n, v)| decay_of(n, v, weight_decay)).collect();
    let vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
    Ok(match kind {
        OptimizerKind::LookaheadRadam => {
            Box::new(Lookahead::new(RAdam::with_decay(vars.clone(), decay, lr)?, vars, 0.5, 6)?)
        }
        OptimizerKind::Radam => Box::new(RAdam::with_decay(vars, decay, lr)?),
        OptimizerKind::Adamw => Box::new(AdamW::with_decay(vars, decay, lr)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quadratic_steps(opt: &mut dyn Optimizer, x: &Var, n: usize) -> f32 {
        for _ in 0..n {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        x.as_tensor().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// What an optimizer keeps between steps is data, never a graph back to earlier steps.
    #[test]
    fn state_kept_between_steps_holds_no_graph_of_earlier_steps() {
        let x = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let w = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let loss = |x: &Var, w: &Var| {
            (x.as_tensor().sqr().unwrap().sum_all().unwrap() + w.as_tensor().sum_all().unwrap()).unwrap()
        };
        let mut adam = Adam::new(vec![x.clone(), w.clone()], 0.1, 0.5).unwrap();
        let mut la = Lookahead::new(
            RAdam::new(vec![x.clone(), w.clone()], 0.1, 0.5).unwrap(),
            vec![x.clone(), w.clone()],
            0.5,
            2,
        )
        .unwrap();
        for _ in 0..5 {
            adam.step(&loss(&x, &w).backward().unwrap()).unwrap();
            la.step(&loss(&x, &w).backward().unwrap()).unwrap();
        }
        for m in adam.0.moments.iter().chain(&la.inner.0.moments) {
            assert!(!m.m.track_op() && !m.v.track_op(), "moments hold a graph");
        }
        assert!(la.slow.as_ref().unwrap().iter().all(|s| !s.track_op()), "slow weights hold a graph");
    }

    #[test]
    fn radam_first_steps_are_momentum_sgd_then_rectified() {
        // Step 1: N_sma < 5, so the update is lr * m / (1 - beta1) = lr * g exactly.
        let x = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = RAdam::new(vec![x.clone()], 0.1, 0.0).unwrap();
        let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let v = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!((v[0] - (1.0 - 0.1 * 2.0)).abs() < 1e-6, "{v:?}");
        assert!((v[1] - (-2.0 + 0.1 * 4.0)).abs() < 1e-6, "{v:?}");
    }

    /// PyTorch's Adam with weight decay: the decay enters the gradient, so it goes through the
    /// moments (AdamW's does not): the two steps differ, and Adam's is the L2 one by hand.
    #[test]
    fn adam_adds_its_weight_decay_to_the_gradient_as_pytorch_does() {
        let (lr, wd) = (0.1, 0.5);
        let x = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![x.clone()], lr, wd).unwrap();
        for _ in 0..2 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
        // By hand: g = 2x + wd·x, m and v bias-corrected, two steps.
        let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0f64; 2], [0f64; 2]);
        for t in 1..=2 {
            for i in 0..2 {
                let g = 2.0 * p[i] + wd * p[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let (mh, vh) = (m[i] / (1.0 - 0.9f64.powi(t)), v[i] / (1.0 - 0.999f64.powi(t)));
                p[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-5, "{got:?} vs {p:?}");
        }
    }

    #[test]
    fn clipping_scales_the_joint_gradient_norm_and_leaves_small_ones() {
        let (a, b) = (Var::new(&[3.0f32], &Device::Cpu).unwrap(), Var::new(&[4.0f32], &Device::Cpu).unwrap());
        let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap() + b.as_tensor().sqr().unwrap().sum_all().unwrap())
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let mut grads = loss.backward().unwrap(); // (3, 4): norm 5
        let norm = clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let g = |v: &Var, grads: &GradStore| grads.get(v).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((g(&a, &grads) - 0.6).abs() < 1e-5 && (g(&b, &grads) - 0.8).abs() < 1e-5);
        let before = g(&a, &grads);
        clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 5.0).unwrap();
        assert_eq!(g(&a, &grads), before, "under the bound: untouched");
    }

    #[test]
    fn every_optimizer_minimises_a_quadratic() {
        for kind in [OptimizerKind::LookaheadRadam, OptimizerKind::Radam, OptimizerKind::Adamw] {
            let x = Var::new(&[3.0f32, -1.0, 0.5], &Device::Cpu).unwrap();
            let mut opt = build(kind, vec![("x".into(), x.clone())], 0.05, 0.0).unwrap();
            let end = quadratic_steps(opt.as_mut(), &x, 1000);
            assert!(end < 0.05, "{kind:?}: {end}");
        }
    }

    #[test]
    fn lookahead_syncs_fast_weights_to_the_slow_ones_every_k_steps() {
        // Adam steps on a linear loss move x by -lr each; the slow weights are taken at step k
        // (nothing moves), and at step 2k x is pulled back to slow + alpha * (fast - slow).
        let x = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let mut la = Lookahead::new(AdamW::new(vec![x.clone()], 0.1, 0.0).unwrap(), vec![x.clone()], 0.5, 2).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let loss = x.as_tensor().sum_all().unwrap(); // gradient 1
            la.step(&loss.backward().unwrap()).unwrap();
            seen.push(x.as_tensor().to_vec1::<f32>().unwrap()[0]);
        }
        let want = [-0.1, -0.2, -0.3, -0.3]; // fast -0.4 at step 4, halfway from slow -0.2
        assert!(seen.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-4), "{seen:?}");
    }

    #[test]
    fn weight_decay_skips_biases_and_one_dimensional_parameters() {
        let d = Device::Cpu;
        let w = Var::new(&[[1.0f32]], &d).unwrap();
        let norm = Var::new(&[1.0f32], &d).unwrap();
        assert_eq!(decay_of("layer1.attn.to_qkv.weight", &w, 1e-5), 1e-5);
        assert_eq!(decay_of("_fc1.0.bias", &w, 1e-5), 0.0);
        assert_eq!(decay_of("norm.weight", &norm, 1e-5), 0.0);
        // Through the optimizer: RAdam's first step is p·(1 − lr·wd) − lr·g, with gradient 1 here.
        let mut opt =
            build(OptimizerKind::Radam, vec![("w".into(), w.clone()), ("n.weight".into(), norm.clone())], 0.5, 0.1)
                .unwrap();
        let loss = (w.as_tensor().sum_all().unwrap() + norm.as_tensor().sum_all().unwrap()).unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let w_now = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        let n_now = norm.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((w_now - (0.95 - 0.5)).abs() < 1e-6, "{w_now}");
        assert!((n_now - 0.5).abs() < 1e-6, "{n_now}");
    }

    #[test]
    fn optimizer_names_are_the_strings_plans_hold() {
        for (kind, name) in [
            (OptimizerKind::LookaheadRadam, "lookahead-radam"),
            (OptimizerKind::Radam, "radam"),
            (OptimizerKind::Adamw, "adamw"),
        ] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
            assert_eq!(<OptimizerKind as clap::ValueEnum>::from_str(name, false).unwrap(), kind);
        }
        assert!(serde_json::from_str::<OptimizerKind>("\"sgdx\"").is_err());
    }
}
