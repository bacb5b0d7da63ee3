//! The train stage: one bag classifier per cross-validation fold, as in the TransMIL paper —
//! batch of one bag, cross-entropy, Lookahead(RAdam) at lr 2e-4 and weight decay 1e-5, early
//! stopping on validation loss, the best epoch's weights kept.

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use wsimil_common::features::FeatureBag;
use wsimil_common::metrics::{evaluate, Metrics};
use wsimil_common::models::params::Params;
use wsimil_common::models::{optim, BagModel, BagModelConfig, Mode};
use wsimil_common::plan::{time_bin, time_bins, Head, SurvivalConfig, SurvivalLoss, SurvivalTarget, TrainConfig};
use wsimil_common::records::{EpochRecord, SlidePrediction};
use wsimil_common::rng::Rng;

/// One slide's bag in memory, ready for the model (a bag being scored, the unit tests' toy bags).
pub struct Bag {
    pub slide: String,
    pub label: usize,
    pub features: Tensor,
    pub n: usize,
}

impl Bag {
    /// The bag of `bag`'s features, which it takes (no copy on the CPU).
    pub fn from_features(bag: &mut FeatureBag, label: usize, device: &Device) -> candle_core::Result<Self> {
        let n = bag.len();
        let features = Tensor::from_vec(std::mem::take(&mut bag.features), (1, n, bag.dim), device)?;
        Ok(Bag { slide: bag.provenance.slide.clone(), label, features, n })
    }
}

/// The bags a training job goes through, one at a time: in memory (`Vec<&Bag>`), or streamed from
/// the store within the worker's budget ([`crate::bags::Streamed`]). Training sees the same bags in
/// the same order either way.
pub trait BagSet {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn label(&self, i: usize) -> usize;
    fn slide(&self, i: usize) -> &str;
    /// Call `f` with each bag of `order` (positions in this set), in that order, its features
    /// `[1, N, D]` as f32 on `device`.
    fn visit(
        &self,
        order: &[usize],
        device: &Device,
        f: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<()>;
    /// Every bag once, in order.
    fn visit_all(
        &self,
        device: &Device,
        f: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let all: Vec<usize> = (0..self.len()).collect();
        self.visit(&all, device, f)
    }
}

impl BagSet for Vec<&Bag> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn label(&self, i: usize) -> usize {
        self[i].label
    }

    fn slide(&self, i: usize) -> &str {
        &self[i].slide
    }

    fn visit(
        &self,
        order: &[usize],
        device: &Device,
        f: &mut dyn FnMut(usize, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        for &i in order {
            f(i, &self[i].features.to_device(device)?)?;
        }
        Ok(())
    }
}

/// What a bag model is trained for: the bags' classes (cross-entropy), or their slides' follow-up
/// (a survival loss, `wsimil_common::models::survival`).
pub enum Objective {
    Classify,
    Survival {
        cfg: SurvivalConfig,
        /// Every slide's follow-up, by slide id.
        targets: std::collections::HashMap<String, SurvivalTarget>,
        /// The discrete-time model's inner bin edges (from the training slides' event times).
        edges: Vec<f64>,
    },
}

impl Objective {
    /// A survival objective whose time bins are cut from the event times of `train_slides`.
    pub fn survival(
        cfg: SurvivalConfig,
        targets: std::collections::HashMap<String, SurvivalTarget>,
        train_slides: &[&str],
    ) -> Self {
        let train: Vec<SurvivalTarget> = train_slides.iter().filter_map(|s| targets.get(*s).copied()).collect();
        let edges = time_bins(&train, cfg.bins);
        Objective::Survival { cfg, targets, edges }
    }

    /// How the model's logits are read.
    pub fn head(&self) -> Head {
        match self {
            Objective::Classify => Head::Classes,
            Objective::Survival { cfg, .. } => match cfg.loss {
                SurvivalLoss::Nll => Head::Hazards,
                SurvivalLoss::Cox => Head::Risk,
            },
        }
    }

    fn target(&self, slide: &str) -> candle_core::Result<SurvivalTarget> {
        match self {
            Objective::Survival { targets, .. } => targets
                .get(slide)
                .copied()
                .ok_or_else(|| candle_core::Error::Msg(format!("{slide}: no follow-up in the plan"))),
            Objective::Classify => candle_core::bail!("a classification has no follow-up"),
        }
    }

    /// Bags per step of a loss over a batch (Cox), none for a loss per bag.
    fn cox_batch(&self) -> Option<usize> {
        match self {
            Objective::Survival { cfg, .. } if cfg.loss == SurvivalLoss::Cox => Some(cfg.batch.max(2)),
            _ => None,
        }
    }

    /// The loss of one bag (cross-entropy, or the discrete-time NLL).
    fn bag_loss(&self, logits: &Tensor, slide: &str, label: usize) -> candle_core::Result<Tensor> {
        match self {
            Objective::Classify => {
                let target = Tensor::new(&[label as u32], logits.device())?;
                candle_nn::loss::cross_entropy(logits, &target)
            }
            Objective::Survival { cfg, edges, .. } => {
                let t = self.target(slide)?;
                let bin = time_bin(edges, t.time).min(cfg.bins.saturating_sub(1));
                wsimil_common::models::survival::discrete_nll(&logits.to_dtype(DType::F32)?, bin, t.event, cfg.alpha)
            }
        }
    }

    /// The Cox loss of a batch of (risk [1, 1], slide) pairs.
    fn batch_loss(&self, batch: &[(Tensor, String)]) -> candle_core::Result<Tensor> {
        let risks: Vec<Tensor> =
            batch.iter().map(|(r, _)| r.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<_>>()?;
        let targets: Vec<SurvivalTarget> =
            batch.iter().map(|(_, s)| self.target(s)).collect::<candle_core::Result<_>>()?;
        let time: Vec<f64> = targets.iter().map(|t| t.time).collect();
        let event: Vec<bool> = targets.iter().map(|t| t.event).collect();
        wsimil_common::models::survival::cox_nll(&Tensor::cat(&risks, 0)?, &time, &event)
    }
}

pub struct Trained {
    pub params: Params,
    pub model: BagModel,
    pub best_epoch: usize,
    pub curve: Vec<EpochRecord>,
}

fn add_grads(acc: &mut Option<GradStore>, new: GradStore, vars: &[Var]) -> candle_core::Result<()> {
    match acc {
        None => *acc = Some(new),
        Some(a) => {
            for v in vars {
                if let Some(g) = new.get(v) {
                    let sum = match a.get(v) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    a.insert(v, sum);
                }
            }
        }
    }
    Ok(())
}

/// Mean loss of `model` over `bags` (evaluation mode): the bags' mean cross-entropy or NLL, or the
/// Cox loss of the whole set as one batch.
pub fn mean_loss(
    model: &BagModel,
    bags: &dyn BagSet,
    objective: &Objective,
    device: &Device,
) -> candle_core::Result<f64> {
    if bags.is_empty() {
        return Ok(f64::NAN);
    }
    let mut total = 0.0;
    let mut risks = Vec::new();
    bags.visit_all(device, &mut |i, x| {
        let out = model.forward(x, &mut Mode::Eval, false)?;
        if objective.cox_batch().is_some() {
            risks.push((out.logits, bags.slide(i).to_string()));
        } else {
            total += objective
                .bag_loss(&out.logits, bags.slide(i), bags.label(i))?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(())
    })?;
    if objective.cox_batch().is_some() {
        return objective.batch_loss(&risks)?.to_dtype(DType::F64)?.to_scalar::<f64>();
    }
    Ok(total / bags.len() as f64)
}

/// The outputs of one bag as `head` reads them (class probabilities, a survival curve, a risk),
/// and optionally its attention over instances.
pub fn predict(
    model: &BagModel,
    bag: &Tensor,
    want_attention: bool,
    head: Head,
) -> candle_core::Result<(Vec<f64>, Option<Vec<f32>>)> {
    let out = model.forward(bag, &mut Mode::Eval, want_attention)?;
    let logits = out.logits.squeeze(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let probs = head.outputs(&logits);
    let att = match out.attention {
        Some(a) => Some(a.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    Ok((probs, att))
}

/// The instance path's probability of the positive class (the second of two) for each instance of
/// `bag` [1, N, D]; `None` for more than two classes, and for a TransMIL without its instance head,
/// whose instance path no loss trained on single patches (a figure that would mean nothing).
pub fn instance_positive(model: &BagModel, bag: &Tensor) -> candle_core::Result<Option<Vec<f32>>> {
    if matches!(model, BagModel::Transmil(m) if !m.has_instance_head()) {
        return Ok(None);
    }
    let (_, logits) = model.instance_path(&bag.squeeze(0)?)?;
    if logits.dim(1)? != 2 {
        return Ok(None);
    }
    let p = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    Ok(Some(p.narrow(1, 1, 1)?.squeeze(1)?.to_vec1::<f32>()?))
}

/// A random subset of `max` instances of a bag (training-time memory bound), in original order.
fn subsample(bag: &Tensor, max: usize, rng: &mut Rng) -> candle_core::Result<Tensor> {
    let n = bag.dim(1)?;
    if max == 0 || n <= max {
        return Ok(bag.clone());
    }
    let mut idx: Vec<u32> = (0..n as u32).collect();
    rng.shuffle(&mut idx);
    idx.truncate(max);
    idx.sort_unstable();
    let idx = Tensor::new(idx.as_slice(), bag.device())?;
    bag.index_select(&idx, 1)
}

/// When training stops and which epoch's weights are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Early stopping on the validation loss (the training loss when there is no validation
    /// set), `patience` epochs at most without improving; the best epoch's weights are kept.
    Early,
    /// Exactly this many epochs, the last one's weights kept (a final model, whose epoch count the
    /// cross-validation chose).
    After(usize),
}

/// Train a bag classifier on `train`, stopping as `stop` says. `log` receives one line per epoch.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model_cfg: &BagModelConfig,
    cfg: &TrainConfig,
    train: &dyn BagSet,
    val: &dyn BagSet,
    objective: &Objective,
    stop: Stop,
    seed: u64,
    device: &Device,
    log: &mut dyn FnMut(&EpochRecord),
) -> candle_core::Result<Trained> {
    let mut rng = Rng::new(seed);
    // Dropout masks off the CPU come from the device's generator (the CPU's from `rng`).
    wsimil_common::models::ops::seed_device(device, seed)?;
    let params = Params::new(rng.next_u64());
    let model = BagModel::new(model_cfg, params.var_builder(device))?;
    let vars = params.vars();
    let mut opt = optim::build(cfg.optimizer, params.named_vars(), cfg.lr, cfg.weight_decay)?;
    let accumulate = cfg.grad_accumulation.max(1);
    let mut best: Option<(f64, usize, std::collections::BTreeMap<String, Tensor>)> = None;
    let mut curve = Vec::new();
    let mut since_best = 0;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let epochs = match stop {
        Stop::Early => cfg.max_epochs,
        Stop::After(n) => n,
    };
    for epoch in 0..epochs {
        let epoch_started = std::time::Instant::now();
        rng.shuffle(&mut order);
        let mut grads = None;
        let mut pending = 0;
        let mut train_loss = 0.0;
        // The Cox loss's batch: each bag's risk with its graph, until the batch is full.
        let mut batch: Vec<(Tensor, String)> = Vec::new();
        let mut batches = 0usize;
        let cox_step =
            |batch: &mut Vec<(Tensor, String)>, opt: &mut Box<dyn optim::Optimizer>| -> candle_core::Result<f64> {
                let loss = objective.batch_loss(batch)?;
                batch.clear();
                opt.step(&loss.backward()?)?;
                loss.to_dtype(DType::F64)?.to_scalar::<f64>()
            };
        train.visit(&order, device, &mut |i, features| {
            let x = subsample(features, cfg.max_train_instances, &mut rng)?;
            let out = model.forward(&x, &mut Mode::Train(&mut rng), false)?;
            if let Some(size) = objective.cox_batch() {
                batch.push((out.logits, train.slide(i).to_string()));
                if batch.len() == size {
                    train_loss += cox_step(&mut batch, &mut opt)?;
                    batches += 1;
                }
                return Ok(());
            }
            let mut loss = objective.bag_loss(&out.logits, train.slide(i), train.label(i))?;
            if let Objective::Classify = objective {
                // CLAM adds its instance clustering loss (the others: the bag's loss alone).
                loss = model.classification_loss(&out, loss, train.label(i))?;
            }
            train_loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            add_grads(&mut grads, (loss / accumulate as f64)?.backward()?, &vars)?;
            pending += 1;
            if pending == accumulate {
                opt.step(&grads.take().expect("accumulated"))?;
                pending = 0;
            }
            Ok(())
        })?;
        if let Some(g) = grads.take() {
            opt.step(&g)?;
        }
        // The epoch's last, short Cox batch steps too when it compares anything.
        if batch.len() >= 2 {
            train_loss += cox_step(&mut batch, &mut opt)?;
            batches += 1;
        }
        let train_loss = match objective.cox_batch() {
            Some(_) => train_loss / batches.max(1) as f64,
            None => train_loss / train.len().max(1) as f64,
        };
        let val_loss = if val.is_empty() { train_loss } else { mean_loss(&model, val, objective, device)? };
        let rec = EpochRecord { epoch, train_loss, val_loss, seconds: epoch_started.elapsed().as_secs_f64() };
        log(&rec);
        curve.push(rec);
        if let Stop::After(n) = stop {
            if epoch + 1 == n {
                best = Some((val_loss, epoch, params.snapshot()?));
            }
            continue;
        }
        if best.as_ref().is_none_or(|(l, _, _)| val_loss < *l) {
            best = Some((val_loss, epoch, params.snapshot()?));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= cfg.patience {
                break;
            }
        }
    }
    let best_epoch = match best {
        Some((_, e, weights)) => {
            params.assign(&weights)?;
            e
        }
        None => 0,
    };
    Ok(Trained { params, model, best_epoch, curve })
}

/// Predictions and metrics of a trained model on `bags` (metrics of classes only: a survival
/// model's risks are judged against the follow-up by the caller).
pub fn test(
    model: &BagModel,
    bags: &dyn BagSet,
    n_classes: usize,
    head: Head,
    device: &Device,
) -> candle_core::Result<(Vec<SlidePrediction>, Option<Metrics>)> {
    let mut preds = Vec::new();
    bags.visit_all(device, &mut |i, x| {
        let (probs, _) = predict(model, x, false, head)?;
        let risk = head.risk(&probs);
        preds.push(SlidePrediction { slide: bags.slide(i).to_string(), label: bags.label(i), probs, risk });
        Ok(())
    })?;
    if !head.is_classes() {
        return Ok((preds, None));
    }
    let metrics = (!preds.is_empty()).then(|| {
        let probs: Vec<Vec<f64>> = preds.iter().map(|p| p.probs.clone()).collect();
        let labels: Vec<usize> = preds.iter().map(|p| p.label).collect();
        evaluate(&probs, &labels, n_classes)
    });
    Ok((preds, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsimil_common::plan::{SurvivalConfig, SurvivalLoss, SurvivalTarget};

    /// Bags of 2-d instances; positives hold a few instances from a shifted cluster.
    fn toy_bags(n_bags: usize, seed: u64) -> Vec<Bag> {
        let mut r = Rng::new(seed);
        (0..n_bags)
            .map(|i| {
                let label = i % 2;
                let n = 8 + r.below(8);
                let mut f = Vec::new();
                for j in 0..n {
                    let shift = if label == 1 && j < 3 { 3.0 } else { 0.0 };
                    f.push((r.normal() + shift) as f32);
                    f.push(r.normal() as f32);
                }
                Bag {
                    slide: format!("s{i}"),
                    label,
                    features: Tensor::from_vec(f, (1, n, 2), &Device::Cpu).unwrap(),
                    n,
                }
            })
            .collect()
    }

    #[test]
    fn abmil_learns_a_toy_mil_problem_and_training_is_reproducible() {
        let bags = toy_bags(40, 1);
        let (tr, te): (Vec<&Bag>, Vec<&Bag>) =
            bags.iter().partition(|b| b.slide.trim_start_matches('s').parse::<usize>().unwrap() < 30);
        let cfg = TrainConfig { max_epochs: 30, patience: 30, lr: 5e-3, ..TrainConfig::default() };
        let mcfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 2, 2);
        let none: Vec<&Bag> = Vec::new();
        let run = |seed| {
            train(&mcfg, &cfg, &tr, &none, &Objective::Classify, Stop::Early, seed, &Device::Cpu, &mut |_| {}).unwrap()
        };
        let a = run(7);
        let (_, m) = test(&a.model, &te, 2, Head::Classes, &Device::Cpu).unwrap();
        let auc = m.unwrap().auc.unwrap();
        assert!(auc > 0.9, "toy AUC {auc}");
        let b = run(7);
        let la: Vec<f64> = a.curve.iter().map(|e| e.train_loss).collect();
        let lb: Vec<f64> = b.curve.iter().map(|e| e.train_loss).collect();
        assert_eq!(la, lb, "same seed, same curve");
    }

    /// Bags whose follow-up shortens with the number of shifted instances they hold.
    fn toy_survival(n_bags: usize, seed: u64) -> (Vec<Bag>, std::collections::HashMap<String, SurvivalTarget>) {
        let mut r = Rng::new(seed);
        let mut targets = std::collections::HashMap::new();
        let bags = (0..n_bags)
            .map(|i| {
                let k = i % 4;
                let n = 10;
                let mut f = Vec::new();
                for j in 0..n {
                    f.push((r.normal() + if j < 2 * k { 3.0 } else { 0.0 }) as f32);
                    f.push(r.normal() as f32);
                }
                let time = 100.0 * (-(k as f64) + 0.3 * r.normal()).exp();
                targets.insert(format!("s{i}"), SurvivalTarget { time, event: r.uniform() < 0.8 });
                Bag {
                    slide: format!("s{i}"),
                    label: 0,
                    features: Tensor::from_vec(f, (1, n, 2), &Device::Cpu).unwrap(),
                    n,
                }
            })
            .collect();
        (bags, targets)
    }

    /// Both survival losses learn to rank held-out bags by their follow-up, reproducibly.
    #[test]
    fn survival_losses_learn_to_rank_a_toy_cohort() {
        let (bags, targets) = toy_survival(80, 5);
        let (tr, te): (Vec<&Bag>, Vec<&Bag>) =
            bags.iter().partition(|b| b.slide.trim_start_matches('s').parse::<usize>().unwrap() < 60);
        let cfg = TrainConfig { max_epochs: 25, patience: 25, lr: 5e-3, ..TrainConfig::default() };
        let mcfg = |outputs| BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 2, outputs);
        let none: Vec<&Bag> = Vec::new();
        let train_ids: Vec<&str> = tr.iter().map(|b| b.slide.as_str()).collect();
        for loss in [SurvivalLoss::Nll, SurvivalLoss::Cox] {
            let sc = SurvivalConfig { loss, batch: 16, ..SurvivalConfig::default() };
            let objective = Objective::survival(sc, targets.clone(), &train_ids);
            let outputs = if loss == SurvivalLoss::Cox { 1 } else { sc.bins };
            let run = || {
                train(&mcfg(outputs), &cfg, &tr, &none, &objective, Stop::Early, 3, &Device::Cpu, &mut |_| {}).unwrap()
            };
            let a = run();
            let (preds, metrics) = test(&a.model, &te, outputs, objective.head(), &Device::Cpu).unwrap();
            assert!(metrics.is_none(), "no class metrics for a survival model");
            let risk: Vec<f64> = preds.iter().map(|p| p.risk.unwrap()).collect();
            let time: Vec<f64> = preds.iter().map(|p| targets[&p.slide].time).collect();
            let event: Vec<bool> = preds.iter().map(|p| targets[&p.slide].event).collect();
            let c = wsimil_common::survival::concordance(&risk, &time, &event).unwrap();
            assert!(c > 0.8, "{loss:?}: held-out C-index {c}");
            let curve = |t: &Trained| t.curve.iter().map(|e| e.train_loss).collect::<Vec<_>>();
            assert_eq!(curve(&a), curve(&run()), "{loss:?}: same seed, same curve");
        }
    }

    #[test]
    fn early_stopping_stops_and_keeps_the_best_epoch() {
        let bags = toy_bags(12, 2);
        let refs: Vec<&Bag> = bags.iter().collect();
        // Validation on label-flipped copies: the better the model fits, the worse val gets.
        let flipped: Vec<Bag> = bags
            .iter()
            .map(|b| Bag { slide: b.slide.clone(), label: 1 - b.label, features: b.features.clone(), n: b.n })
            .collect();
        let val: Vec<&Bag> = flipped.iter().collect();
        let cfg = TrainConfig { max_epochs: 40, patience: 3, lr: 1e-2, ..TrainConfig::default() };
        let mcfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 2, 2);
        let t =
            train(&mcfg, &cfg, &refs, &val, &Objective::Classify, Stop::Early, 0, &Device::Cpu, &mut |_| {}).unwrap();
        assert!(t.curve.len() < 40, "stopped early after {} epochs", t.curve.len());
        let best = t.curve.iter().min_by(|a, b| a.val_loss.total_cmp(&b.val_loss)).unwrap();
        assert_eq!(t.best_epoch, best.epoch);
        let now = mean_loss(&t.model, &val, &Objective::Classify, &Device::Cpu).unwrap();
        assert!((now - best.val_loss).abs() < 1e-6, "restored weights give the best val loss");
    }

    #[test]
    fn a_fixed_epoch_count_trains_exactly_that_long_and_keeps_the_last_epoch() {
        let bags = toy_bags(12, 3);
        let refs: Vec<&Bag> = bags.iter().collect();
        // Patience 1 would stop an early-stopping run at once; a fixed count ignores it.
        let cfg = TrainConfig { max_epochs: 50, patience: 1, lr: 1e-2, ..TrainConfig::default() };
        let mcfg = BagModelConfig::new(wsimil_common::models::BagModelKind::Abmil, 2, 2);
        let none: Vec<&Bag> = Vec::new();
        let t = train(&mcfg, &cfg, &refs, &none, &Objective::Classify, Stop::After(7), 0, &Device::Cpu, &mut |_| {})
            .unwrap();
        assert_eq!((t.curve.len(), t.best_epoch), (7, 6));
    }
}
