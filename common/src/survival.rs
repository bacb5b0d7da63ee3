//! Survival statistics: Harrell's C-index (with a bootstrap interval), the Kaplan-Meier estimator,
//! the log-rank test, and the Cox proportional hazards fit of a linear model (Efron's ties), in
//! f64, as lifelines computes them (`tests/survival_lifelines.rs` checks each against lifelines on
//! the Rossi recidivism data).
//!
//! Conventions: `time` is the time to the event or to the last follow-up, `event` whether the
//! event was observed (false: censored), `risk` a score where higher means an earlier event (a
//! Cox model's linear predictor or partial hazard; lifelines' `concordance_index` takes predicted
//! survival times, i.e. the negated risk).

/// Harrell's C-index of `risk` against right-censored `(time, event)`, with lifelines' rules: a
/// pair is comparable when the earlier of the two had the event and the other left later, or was
/// censored at the same time (a death and a censoring at the same time: the censored one is
/// taken as later); two events at the same time are not compared. A comparable pair is
/// concordant when the earlier one has the higher risk; equal risks count a half. `None` when no
/// pair is comparable (no events).
pub fn concordance(risk: &[f64], time: &[f64], event: &[bool]) -> Option<f64> {
    assert!(risk.len() == time.len() && time.len() == event.len(), "one risk, time and event per case");
    let (mut pairs, mut score) = (0u64, 0.0f64);
    for i in (0..time.len()).filter(|&i| event[i]) {
        for j in 0..time.len() {
            let later = time[j] > time[i] || (time[j] == time[i] && !event[j]);
            if j == i || !later {
                continue;
            }
            pairs += 1;
            score += if risk[i] > risk[j] {
                1.0
            } else if risk[i] == risk[j] {
                0.5
            } else {
                0.0
            };
        }
    }
    (pairs > 0).then(|| score / pairs as f64)
}

/// The C-index and its 95 % interval from `reps` bootstrap resamples of the cases (2.5th and
/// 97.5th percentiles; resamples without a comparable pair are skipped).
pub fn concordance_ci(
    risk: &[f64],
    time: &[f64],
    event: &[bool],
    reps: usize,
    seed: u64,
) -> Option<crate::metrics::Estimate> {
    let value = concordance(risk, time, event)?;
    let mut rng = crate::rng::Rng::new(seed);
    let n = risk.len();
    let mut samples = Vec::with_capacity(reps);
    let (mut r, mut t, mut e) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..reps {
        r.clear();
        t.clear();
        e.clear();
        for _ in 0..n {
            let k = rng.below(n);
            r.push(risk[k]);
            t.push(time[k]);
            e.push(event[k]);
        }
        samples.extend(concordance(&r, &t, &e));
    }
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let ci95 = if samples.is_empty() { (value, value) } else { (q(0.025), q(0.975)) };
    Some(crate::metrics::Estimate { value, ci95 })
}

/// The Kaplan-Meier estimate: at each distinct event time, the survival probability just after it.
pub fn kaplan_meier(time: &[f64], event: &[bool]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..time.len()).collect();
    order.sort_by(|&a, &b| time[a].total_cmp(&time[b]));
    let mut at_risk = time.len();
    let mut s = 1.0;
    let mut curve = Vec::new();
    let mut k = 0;
    while k < order.len() {
        let t = time[order[k]];
        let (mut deaths, mut leaving) = (0, 0);
        while k < order.len() && time[order[k]] == t {
            deaths += event[order[k]] as usize;
            leaving += 1;
            k += 1;
        }
        if deaths > 0 {
            s *= 1.0 - deaths as f64 / at_risk as f64;
            curve.push((t, s));
        }
        at_risk -= leaving;
    }
    curve
}

/// The survival probability a Kaplan-Meier curve gives at `t` (1 before the first event).
pub fn survival_at(curve: &[(f64, f64)], t: f64) -> f64 {
    curve.iter().take_while(|(u, _)| *u <= t).last().map_or(1.0, |p| p.1)
}

/// The censoring's survival function G (the Kaplan-Meier estimate with censoring as the event;
/// at a time shared with events, the events leave first, as scikit-survival's reverse estimate):
/// at each distinct time, G just after it.
pub fn censoring_survival(time: &[f64], event: &[bool]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..time.len()).collect();
    order.sort_by(|&a, &b| time[a].total_cmp(&time[b]));
    let (mut at_risk, mut g, mut k) = (time.len(), 1.0, 0);
    let mut curve = Vec::new();
    while k < order.len() {
        let t = time[order[k]];
        let (mut deaths, mut censored) = (0, 0);
        while k < order.len() && time[order[k]] == t {
            if event[order[k]] {
                deaths += 1;
            } else {
                censored += 1;
            }
            k += 1;
        }
        if censored > 0 {
            g *= 1.0 - censored as f64 / (at_risk - deaths) as f64;
        }
        curve.push((t, g));
        at_risk -= deaths + censored;
    }
    curve
}

/// The cumulative/dynamic AUC at time `t` (Uno et al. 2007, as scikit-survival's
/// `cumulative_dynamic_auc`): how well `risk` ranks the cases whose event came by `t` above those
/// still event-free after `t`, each case weighted by 1/G(its time) (inverse probability of
/// censoring, `censoring` from [`censoring_survival`]); equal risks count a half. `None` where there
/// is no case or no control, or G has reached 0 at a case.
pub fn cumulative_dynamic_auc(
    risk: &[f64],
    time: &[f64],
    event: &[bool],
    t: f64,
    censoring: &[(f64, f64)],
) -> Option<f64> {
    let controls: Vec<f64> = (0..time.len()).filter(|&j| time[j] > t).map(|j| risk[j]).collect();
    let (mut num, mut den) = (0.0, 0.0);
    for i in (0..time.len()).filter(|&i| event[i] && time[i] <= t) {
        let g = survival_at(censoring, time[i]);
        if g <= 0.0 {
            return None;
        }
        let w = 1.0 / g;
        let score: f64 = controls
            .iter()
            .map(|&r| {
                if risk[i] > r {
                    1.0
                } else if risk[i] == r {
                    0.5
                } else {
                    0.0
                }
            })
            .sum();
        num += w * score;
        den += w * controls.len() as f64;
    }
    (den > 0.0).then(|| num / den)
}

/// The log-rank test of two groups (`group[i]` true: the first): the chi-squared statistic with
/// one degree of freedom and its p-value.
pub fn log_rank(time: &[f64], event: &[bool], group: &[bool]) -> (f64, f64) {
    let mut times: Vec<f64> = (0..time.len()).filter(|&i| event[i]).map(|i| time[i]).collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    let (mut observed, mut expected, mut variance) = (0.0, 0.0, 0.0);
    for &t in &times {
        let (mut n, mut n1, mut d, mut d1) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..time.len() {
            if time[i] >= t {
                n += 1.0;
                n1 += group[i] as u8 as f64;
            }
            if time[i] == t && event[i] {
                d += 1.0;
                d1 += group[i] as u8 as f64;
            }
        }
        observed += d1;
        expected += d * n1 / n;
        if n > 1.0 {
            variance += d * (n1 / n) * (1.0 - n1 / n) * (n - d) / (n - 1.0);
        }
    }
    let stat = if variance > 0.0 { (observed - expected).powi(2) / variance } else { 0.0 };
    (stat, chi2_1_sf(stat))
}

/// P(χ²₁ > x) = erfc(√(x/2)).
pub fn chi2_1_sf(x: f64) -> f64 {
    erfc((x / 2.0).max(0.0).sqrt())
}

/// The complementary error function (W. J. Cody's rational approximations, relative error below
/// 1e-15 on the ranges used here).
pub fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    // erfc(x) = exp(-x²) · P(x)/Q(x) for x ≥ 0.5; 1 − erf(x) from its series below.
    if x < 0.5 {
        // erf's Maclaurin series converges fast here.
        let (mut term, mut sum, x2) = (x, x, x * x);
        for n in 1..40 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        return 1.0 - sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    // Continued fraction (Lentz): erfc(x) = exp(-x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...)))).
    let mut f = x;
    let (mut c, mut d) = (x, 0.0);
    for k in 1..300 {
        let a = k as f64 / 2.0;
        d = x + a * d;
        d = if d.abs() < 1e-300 { 1e-300 } else { d };
        c = x + a / c;
        c = if c.abs() < 1e-300 { 1e-300 } else { c };
        d = 1.0 / d;
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    (-x * x).exp() / (f * std::f64::consts::PI.sqrt())
}

/// A fitted Cox proportional hazards model.
#[derive(Debug, Clone, PartialEq)]
pub struct CoxFit {
    pub coef: Vec<f64>,
    /// Standard errors: the square roots of the inverse information's diagonal.
    pub se: Vec<f64>,
    pub log_likelihood: f64,
    pub iterations: usize,
}

/// Efron's log partial likelihood of `beta` with its gradient and Hessian; `x` holds one row of
/// `p` covariates per case.
pub fn efron(x: &[Vec<f64>], time: &[f64], event: &[bool], beta: &[f64]) -> (f64, Vec<f64>, Vec<Vec<f64>>) {
    let p = beta.len();
    let eta: Vec<f64> = x.iter().map(|r| r.iter().zip(beta).map(|(a, b)| a * b).sum()).collect();
    let w: Vec<f64> = eta.iter().map(|e| e.exp()).collect();
    let mut times: Vec<f64> = (0..time.len()).filter(|&i| event[i]).map(|i| time[i]).collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    let (mut ll, mut grad, mut hess) = (0.0, vec![0.0; p], vec![vec![0.0; p]; p]);
    // Sums of w, w·x and w·x·xᵀ over a set of cases.
    let sums = |cases: &mut dyn Iterator<Item = usize>| {
        let (mut s0, mut s1, mut s2) = (0.0, vec![0.0; p], vec![vec![0.0; p]; p]);
        for i in cases {
            s0 += w[i];
            for a in 0..p {
                s1[a] += w[i] * x[i][a];
                for b in 0..p {
                    s2[a][b] += w[i] * x[i][a] * x[i][b];
                }
            }
        }
        (s0, s1, s2)
    };
    for &t in &times {
        let dead: Vec<usize> = (0..time.len()).filter(|&i| time[i] == t && event[i]).collect();
        let d = dead.len() as f64;
        let (r0, r1, r2) = sums(&mut (0..time.len()).filter(|&i| time[i] >= t));
        let (d0, d1, d2) = sums(&mut dead.iter().copied());
        for &i in &dead {
            ll += eta[i];
            for a in 0..p {
                grad[a] += x[i][a];
            }
        }
        for l in 0..dead.len() {
            let f = l as f64 / d;
            let phi = r0 - f * d0;
            ll -= phi.ln();
            for a in 0..p {
                let s1a = r1[a] - f * d1[a];
                grad[a] -= s1a / phi;
                for b in 0..p {
                    let s1b = r1[b] - f * d1[b];
                    hess[a][b] -= (r2[a][b] - f * d2[a][b]) / phi - s1a * s1b / (phi * phi);
                }
            }
        }
    }
    (ll, grad, hess)
}

/// Fit a Cox model by Newton-Raphson on Efron's partial likelihood (lifelines' default), halving
/// a step that lowers the likelihood, until the step is below 1e-10.
pub fn cox_fit(x: &[Vec<f64>], time: &[f64], event: &[bool]) -> CoxFit {
    let p = x.first().map_or(0, |r| r.len());
    let mut beta = vec![0.0; p];
    let (mut ll, mut grad, mut hess) = efron(x, time, event, &beta);
    let mut iterations = 0;
    for it in 1..=100 {
        iterations = it;
        let neg: Vec<Vec<f64>> = hess.iter().map(|r| r.iter().map(|v| -v).collect()).collect();
        let step = solve(&neg, &grad);
        let mut scale = 1.0;
        loop {
            let trial: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b + scale * s).collect();
            let (l2, g2, h2) = efron(x, time, event, &trial);
            if l2 >= ll - 1e-12 || scale < 1e-6 {
                beta = trial;
                (ll, grad, hess) = (l2, g2, h2);
                break;
            }
            scale /= 2.0;
        }
        if step.iter().map(|s| (s * scale).abs()).fold(0.0, f64::max) < 1e-10 {
            break;
        }
    }
    let neg: Vec<Vec<f64>> = hess.iter().map(|r| r.iter().map(|v| -v).collect()).collect();
    let se = (0..p)
        .map(|a| {
            let mut e = vec![0.0; p];
            e[a] = 1.0;
            solve(&neg, &e)[a].sqrt()
        })
        .collect();
    CoxFit { coef: beta, se, log_likelihood: ll, iterations }
}

/// `a · x = b` for a small dense `a`, by Gaussian elimination with partial pivoting.
fn solve(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a.iter().zip(b).map(|(r, v)| r.iter().copied().chain([*v]).collect()).collect();
    for c in 0..n {
        let piv = (c..n).max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs())).unwrap_or(c);
        m.swap(c, piv);
        let d = m[c][c];
        if d == 0.0 {
            continue;
        }
        let pivot = m[c].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / d;
                for (v, p) in row.iter_mut().zip(&pivot).skip(c) {
                    *v -= f * p;
                }
            }
        }
    }
    (0..n).map(|i| if m[i][i] != 0.0 { m[i][n] / m[i][i] } else { 0.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concordance_follows_the_pair_rules() {
        // Case 0 dies at 1 (risk 3), case 1 dies at 2 (risk 2), case 2 is censored at 2 (risk 2),
        // case 3 dies at 2 (risk 1), case 4 is censored at 0.5 (comparable with nobody).
        let (risk, time) = ([3.0, 2.0, 2.0, 1.0, 9.0], [1.0, 2.0, 2.0, 2.0, 0.5]);
        let event = [true, true, false, true, false];
        // Pairs: 0 with 1, 2, 3 (all concordant); 1 with 2 (censored at the same time: tie, 0.5);
        // 3 with 2 (risk 1 < 2: discordant). Deaths 1 and 3 at the same time: not compared.
        assert_eq!(concordance(&risk, &time, &event), Some(3.5 / 5.0));
        assert_eq!(concordance(&risk, &time, &[false; 5]), None);
    }

    #[test]
    fn kaplan_meier_and_log_rank_on_a_small_table() {
        let time = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0];
        let event = [true, true, false, true, false, true];
        let km = kaplan_meier(&time, &event);
        // 6 at risk: 1 dies (5/6); 5 at risk at 2: 1 dies (·4/5); 3 at risk at 3: 1 dies (·2/3); 1 at 5.
        let want = [(1.0, 5.0 / 6.0), (2.0, 5.0 / 6.0 * 0.8), (3.0, 5.0 / 6.0 * 0.8 * 2.0 / 3.0), (5.0, 0.0)];
        for ((t, s), (wt, ws)) in km.iter().zip(want) {
            assert!(*t == wt && (s - ws).abs() < 1e-12, "{km:?}");
        }
        assert_eq!(survival_at(&km, 0.5), 1.0);
        assert_eq!(survival_at(&km, 2.5), km[1].1);
        let (stat, p) = log_rank(&time, &event, &[true, true, true, false, false, false]);
        assert!(stat > 0.0 && (0.0..=1.0).contains(&p));
        let (same, p_same) = log_rank(&time, &event, &[true; 6]);
        assert_eq!((same, p_same), (0.0, 1.0), "one group: nothing to test");
    }

    #[test]
    fn erfc_matches_known_values() {
        for (x, want) in [
            (0.0, 1.0),
            (0.3, 0.671_373_240_540_872_6),
            (1.0, 0.157_299_207_050_285_13),
            (2.5, 4.069_520_174_449_59e-4),
            (-1.0, 1.842_700_792_949_715),
        ] {
            assert!(((erfc(x) - want) / want).abs() < 1e-12, "erfc({x}) = {} vs {want}", erfc(x));
        }
        assert!((chi2_1_sf(3.841_458_820_694_124) - 0.05).abs() < 1e-12);
    }
}
