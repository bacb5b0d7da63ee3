//! Classification metrics for slide-level predictions: ROC AUC (one-vs-rest macro for more than two
//! classes), accuracy, balanced accuracy and macro F1, and mean ± sd over folds.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// `None` when a class is missing from the labels (AUC undefined).
    pub auc: Option<f64>,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub f1: f64,
    pub n: usize,
}

/// ROC AUC of scores for a binary problem (`positive[i]` true for the positive class), by the
/// Mann–Whitney statistic with ties counted half. `None` if either class is absent.
pub fn binary_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let rank_sum: f64 = ranks.iter().zip(positive).filter(|(_, p)| **p).map(|(r, _)| r).sum();
    Some((rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos * n_neg) as f64)
}

/// Metrics from per-sample class probabilities `probs[i][c]` and true labels.
pub fn evaluate(probs: &[Vec<f64>], labels: &[usize], n_classes: usize) -> Metrics {
    let n = labels.len();
    let pred: Vec<usize> = probs
        .iter()
        .map(|p| p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0))
        .collect();
    let accuracy = if n == 0 { 0.0 } else { pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / n as f64 };
    let mut recalls = Vec::new();
    let mut f1s = Vec::new();
    for c in 0..n_classes {
        let tp = pred.iter().zip(labels).filter(|(p, l)| **p == c && **l == c).count() as f64;
        let fp = pred.iter().zip(labels).filter(|(p, l)| **p == c && **l != c).count() as f64;
        let fn_ = pred.iter().zip(labels).filter(|(p, l)| **p != c && **l == c).count() as f64;
        if tp + fn_ > 0.0 {
            recalls.push(tp / (tp + fn_));
        }
        f1s.push(if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fn_) });
    }
    let balanced_accuracy = if recalls.is_empty() { 0.0 } else { recalls.iter().sum::<f64>() / recalls.len() as f64 };
    let f1 = if n_classes == 2 { f1s[1] } else { f1s.iter().sum::<f64>() / n_classes.max(1) as f64 };
    let auc = if n_classes == 2 {
        let scores: Vec<f64> = probs.iter().map(|p| p[1]).collect();
        binary_auc(&scores, &labels.iter().map(|l| *l == 1).collect::<Vec<_>>())
    } else {
        let aucs: Option<Vec<f64>> = (0..n_classes)
            .map(|c| {
                let scores: Vec<f64> = probs.iter().map(|p| p[c]).collect();
                binary_auc(&scores, &labels.iter().map(|l| *l == c).collect::<Vec<_>>())
            })
            .collect();
        aucs.map(|a| a.iter().sum::<f64>() / a.len() as f64)
    };
    Metrics { auc, accuracy, balanced_accuracy, f1, n }
}

/// Mean and sample standard deviation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
}

pub fn mean_sd(xs: &[f64]) -> Option<MeanSd> {
    if xs.is_empty() {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    Some(MeanSd { mean, sd })
}

impl std::fmt::Display for MeanSd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} ± {:.3}", self.mean, self.sd)
    }
}

/// A point estimate with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    /// 2.5th and 97.5th percentiles over the bootstrap samples.
    pub ci95: (f64, f64),
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} (95% CI {:.3}–{:.3})", self.value, self.ci95.0, self.ci95.1)
    }
}

/// Metrics of a set of predictions with percentile-bootstrap 95% confidence intervals (slides
/// resampled with replacement `reps` times, seeded; a resample where the AUC is undefined, one
/// class absent, is left out of the AUC's interval).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsCi {
    pub n: usize,
    pub auc: Option<Estimate>,
    pub accuracy: Estimate,
    pub balanced_accuracy: Estimate,
    pub f1: Estimate,
    pub bootstrap_reps: usize,
}

/// [`evaluate`] with bootstrap intervals.
pub fn evaluate_ci(probs: &[Vec<f64>], labels: &[usize], n_classes: usize, reps: usize, seed: u64) -> MetricsCi {
    let point = evaluate(probs, labels, n_classes);
    let n = labels.len();
    let mut rng = crate::rng::Rng::new(seed);
    let (mut aucs, mut accs, mut baccs, mut f1s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut p, mut l) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..if n == 0 { 0 } else { reps } {
        p.clear();
        l.clear();
        for _ in 0..n {
            let i = rng.below(n);
            p.push(probs[i].clone());
            l.push(labels[i]);
        }
        let m = evaluate(&p, &l, n_classes);
        aucs.extend(m.auc);
        accs.push(m.accuracy);
        baccs.push(m.balanced_accuracy);
        f1s.push(m.f1);
    }
    let interval = |v: &mut Vec<f64>, value: f64| {
        v.sort_by(f64::total_cmp);
        let q = |f: f64| if v.is_empty() { value } else { v[((v.len() - 1) as f64 * f).round() as usize] };
        Estimate { value, ci95: (q(0.025), q(0.975)) }
    };
    MetricsCi {
        n,
        auc: point.auc.map(|a| interval(&mut aucs, a)),
        accuracy: interval(&mut accs, point.accuracy),
        balanced_accuracy: interval(&mut baccs, point.balanced_accuracy),
        f1: interval(&mut f1s, point.f1),
        bootstrap_reps: reps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_intervals_hold_the_point_estimate_and_shrink_with_more_slides() {
        let mut r = crate::rng::Rng::new(1);
        let make = |n: usize, r: &mut crate::rng::Rng| {
            let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
            let probs: Vec<Vec<f64>> = labels
                .iter()
                .map(|&l| {
                    let p = (0.35 + 0.3 * l as f64 + 0.8 * (r.uniform() - 0.5)).clamp(0.0, 1.0);
                    vec![1.0 - p, p]
                })
                .collect();
            (probs, labels)
        };
        let (p, l) = make(40, &mut r);
        let small = evaluate_ci(&p, &l, 2, 500, 7);
        let auc = small.auc.unwrap();
        assert_eq!(auc.value, evaluate(&p, &l, 2).auc.unwrap());
        assert!(auc.ci95.0 <= auc.value && auc.value <= auc.ci95.1 && auc.ci95.0 < auc.ci95.1, "{auc}");
        for (name, e) in
            [("accuracy", small.accuracy), ("balanced accuracy", small.balanced_accuracy), ("F1", small.f1)]
        {
            assert!(e.ci95.0 <= e.value && e.value <= e.ci95.1 && e.ci95.0 < e.ci95.1, "{name}: {e}");
        }
        assert_eq!(small.balanced_accuracy.value, evaluate(&p, &l, 2).balanced_accuracy);
        assert_eq!(small.f1.value, evaluate(&p, &l, 2).f1);
        let (p, l) = make(400, &mut r);
        let big = evaluate_ci(&p, &l, 2, 500, 7);
        let width = |e: Estimate| e.ci95.1 - e.ci95.0;
        assert!(width(big.auc.unwrap()) < width(auc), "{} vs {}", big.auc.unwrap(), auc);
        // Seeded: the same intervals again.
        assert_eq!(evaluate_ci(&p, &l, 2, 500, 7), big);
    }

    #[test]
    fn auc_counts_pairs_and_ties() {
        assert_eq!(binary_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(binary_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        assert_eq!(binary_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // 3 of 4 positive/negative pairs ordered correctly.
        assert_eq!(binary_auc(&[0.1, 0.6, 0.5, 0.9], &[false, false, true, true]), Some(0.75));
        assert_eq!(binary_auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn accuracy_balanced_accuracy_and_f1() {
        // 3 negatives all right, 1 of 2 positives right.
        let probs: Vec<Vec<f64>> = [0.1, 0.2, 0.3, 0.9, 0.4].iter().map(|p| vec![1.0 - p, *p]).collect();
        let m = evaluate(&probs, &[0, 0, 0, 1, 1], 2);
        assert!((m.accuracy - 0.8).abs() < 1e-12);
        assert!((m.balanced_accuracy - 0.75).abs() < 1e-12);
        assert!((m.f1 - 2.0 / 3.0).abs() < 1e-12); // tp 1, fp 0, fn 1
        assert_eq!(m.auc, Some(1.0));
    }

    #[test]
    fn multiclass_auc_is_macro_one_vs_rest() {
        let probs = vec![vec![0.8, 0.1, 0.1], vec![0.1, 0.8, 0.1], vec![0.1, 0.1, 0.8]];
        let m = evaluate(&probs, &[0, 1, 2], 3);
        assert_eq!(m.auc, Some(1.0));
        assert_eq!(m.accuracy, 1.0);
    }

    #[test]
    fn multiclass_f1_and_balanced_accuracy_are_macro_and_their_intervals_hold_them() {
        // Class 0: 2 of 2 right; class 1: 1 of 2 (one called 2); class 2: 1 of 1.
        let probs = vec![
            vec![0.7, 0.2, 0.1],
            vec![0.6, 0.3, 0.1],
            vec![0.1, 0.8, 0.1],
            vec![0.1, 0.3, 0.6],
            vec![0.2, 0.2, 0.6],
        ];
        let labels = [0, 0, 1, 1, 2];
        let m = evaluate(&probs, &labels, 3);
        assert!((m.accuracy - 0.8).abs() < 1e-12);
        assert!((m.balanced_accuracy - (1.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
        // F1 per class: 1, 2/3 (tp 1, fn 1), 2/3 (tp 1, fp 1); macro: their mean.
        assert!((m.f1 - (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12, "{}", m.f1);
        let mut r = crate::rng::Rng::new(4);
        let labels: Vec<usize> = (0..90).map(|i| i % 3).collect();
        let probs: Vec<Vec<f64>> = labels
            .iter()
            .map(|&l| {
                let mut p: Vec<f64> = (0..3).map(|c| r.uniform() + if c == l { 0.6 } else { 0.0 }).collect();
                let s: f64 = p.iter().sum();
                p.iter_mut().for_each(|v| *v /= s);
                p
            })
            .collect();
        let ci = evaluate_ci(&probs, &labels, 3, 300, 1);
        let point = evaluate(&probs, &labels, 3);
        assert_eq!(ci.auc.unwrap().value, point.auc.unwrap());
        for (name, e) in [
            ("AUC", ci.auc.unwrap()),
            ("accuracy", ci.accuracy),
            ("balanced accuracy", ci.balanced_accuracy),
            ("macro F1", ci.f1),
        ] {
            assert!(e.ci95.0 <= e.value && e.value <= e.ci95.1 && e.ci95.0 < e.ci95.1, "{name}: {e}");
        }
    }

    #[test]
    fn mean_sd_is_the_sample_sd() {
        let m = mean_sd(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(m.mean, 2.0);
        assert!((m.sd - 1.0).abs() < 1e-12);
        assert!(mean_sd(&[]).is_none());
    }
}
