//! Survival losses on a bag model's logits, differentiable (candle ops only): the discrete-time
//! negative log-likelihood that MCAT and PORPOISE train with (Zadeh & Schmid 2020), and the Cox
//! partial likelihood over a batch of bags (as PORPOISE's `CoxSurvLoss`). The statistics that judge
//! the result (C-index, Kaplan-Meier, log-rank) are in [`crate::survival`].

use candle_core::{DType, Result, Tensor};

/// `log(1 + e^x)`, stable for any `x`: `relu(x) + log(1 + e^{−|x|})`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// The discrete-time NLL of one bag: `logits` [1, K] are the per-bin hazards' logits
/// (`h_k = sigmoid(z_k)`, `S_k = Π_{j≤k}(1 − h_j)`), `bin` the bin of the slide's time, `event`
/// whether the event was observed there (else censored in it). An event in bin y costs
/// `−log S_{y−1} − log h_y`, a censoring `−log S_y`; the censored term is weighted `1 − alpha` (the
/// authors' `(1 − α)·(censored + uncensored) + α·uncensored`). Written with softplus
/// (`−log h = softplus(−z)`, `−log(1 − h) = softplus(z)`) instead of the authors' logs clamped at
/// 1e-7: the same where the clamp is not reached, and exact where it would be.
pub fn discrete_nll(logits: &Tensor, bin: usize, event: bool, alpha: f64) -> Result<Tensor> {
    let z = logits.flatten_all()?;
    let k = z.dim(0)?;
    if bin >= k {
        candle_core::bail!("time bin {bin} of a model with {k} bins");
    }
    // −log S_{y−1}: the bins survived before y.
    let before = if bin == 0 {
        Tensor::zeros((), z.dtype(), z.device())?
    } else {
        softplus(&z.narrow(0, 0, bin)?)?.sum_all()?
    };
    let zy = z.narrow(0, bin, 1)?.sum_all()?;
    if event {
        before + softplus(&zy.neg()?)?
    } else {
        (before + softplus(&zy)?)? * (1.0 - alpha)
    }
}

/// The negative Cox partial log-likelihood of a batch, averaged over the batch as PORPOISE's
/// `CoxSurvLoss` does: `−(1/B) Σ_{i: event} (r_i − log Σ_{j: t_j ≥ t_i} e^{r_j})` for risks `risk`
/// [B] (Breslow's ties: tied times share their risk sets). Stable: the batch's largest risk is taken
/// out of the sum first.
pub fn cox_nll(risk: &Tensor, time: &[f64], event: &[bool]) -> Result<Tensor> {
    let r = risk.flatten_all()?;
    let b = r.dim(0)?;
    if time.len() != b || event.len() != b {
        candle_core::bail!("{b} risks for {} times and {} events", time.len(), event.len());
    }
    let (device, dtype) = (r.device().clone(), r.dtype());
    let m = r.to_dtype(DType::F64)?.max(0)?.to_scalar::<f64>()?;
    let at_risk: Vec<f32> = (0..b).flat_map(|i| (0..b).map(move |j| (time[j] >= time[i]) as u8 as f32)).collect();
    let at_risk = Tensor::from_vec(at_risk, (b, b), &device)?.to_dtype(dtype)?;
    let sum = at_risk.matmul(&(&r - m)?.exp()?.unsqueeze(1)?)?.squeeze(1)?;
    let lse = (sum.log()? + m)?;
    let events: Vec<f32> = event.iter().map(|&e| e as u8 as f32).collect();
    let events = Tensor::from_vec(events, b, &device)?.to_dtype(dtype)?;
    ((&r - lse)? * events)?.sum_all()?.neg()? / b as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The discrete-time NLL written as the authors' code computes it (hazards, cumulative
    /// product, padded survival, gathered logs), in f64 on plain numbers.
    fn authors_nll(z: &[f64], y: usize, censored: bool, alpha: f64) -> f64 {
        let h: Vec<f64> = z.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
        let mut s_pad = vec![1.0];
        for hk in &h {
            let last = *s_pad.last().unwrap();
            s_pad.push(last * (1.0 - hk));
        }
        let c = censored as u8 as f64;
        let uncensored = -(1.0 - c) * (s_pad[y].max(1e-7).ln() + h[y].max(1e-7).ln());
        let censored_l = -c * s_pad[y + 1].max(1e-7).ln();
        (1.0 - alpha) * (censored_l + uncensored) + alpha * uncensored
    }

    #[test]
    fn the_discrete_nll_is_the_authors_formula() {
        let z = [0.3, -1.2, 2.0, -0.4];
        let logits = Tensor::new(&[z], &Device::Cpu).unwrap();
        for y in 0..4 {
            for censored in [false, true] {
                for alpha in [0.0, 0.4] {
                    let got = discrete_nll(&logits, y, !censored, alpha).unwrap().to_scalar::<f64>().unwrap();
                    let want = authors_nll(&z, y, censored, alpha);
                    assert!((got - want).abs() < 1e-12, "bin {y} censored {censored} α {alpha}: {got} vs {want}");
                }
            }
        }
        assert!(discrete_nll(&logits, 4, true, 0.0).is_err(), "a bin the model does not have");
    }

    #[test]
    fn the_discrete_nll_stays_finite_where_the_hazards_saturate() {
        let logits = Tensor::new(&[[80f32, -80.0]], &Device::Cpu).unwrap();
        let l = discrete_nll(&logits, 1, true, 0.0).unwrap().to_scalar::<f32>().unwrap();
        assert!(l.is_finite() && (l - 160.0).abs() < 1e-3, "{l}");
    }

    /// On a linear model without tied times, the batch Cox loss is Efron's (= Breslow's) negative
    /// log partial likelihood over the batch size, and its gradient the same scaled, as
    /// `crate::survival::efron` (checked against lifelines) computes them.
    #[test]
    fn the_cox_loss_and_its_gradient_are_the_partial_likelihoods() {
        let mut rng = crate::rng::Rng::new(4);
        let (n, d) = (24, 3);
        let x: Vec<Vec<f64>> = (0..n).map(|_| (0..d).map(|_| rng.normal()).collect()).collect();
        let time: Vec<f64> = (0..n).map(|i| 1.0 + i as f64 * 0.37 + rng.normal().abs()).collect();
        let event: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
        let beta = [0.4, -0.7, 0.2];
        let (loglik, grad, _) = crate::survival::efron(&x, &time, &event, &beta);
        let xt = Tensor::from_vec(x.concat(), (n, d), &Device::Cpu).unwrap();
        let b = Var::from_tensor(&Tensor::new(&beta, &Device::Cpu).unwrap()).unwrap();
        let risk = xt.matmul(&b.as_tensor().unsqueeze(1).unwrap()).unwrap();
        let loss = cox_nll(&risk, &time, &event).unwrap();
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - (-loglik / n as f64)).abs() < 1e-12, "{got} vs {}", -loglik / n as f64);
        let g = loss.backward().unwrap().get(&b).unwrap().to_vec1::<f64>().unwrap();
        for k in 0..d {
            assert!((g[k] + grad[k] / n as f64).abs() < 1e-12, "∂β{k}: {} vs {}", g[k], -grad[k] / n as f64);
        }
    }

    #[test]
    fn tied_times_share_their_risk_sets() {
        // Two events at t = 1 with risks a, b and a censoring at 2 with risk c: each event's set is
        // all three (Breslow).
        let r = Tensor::new(&[0.5f64, -0.2, 1.1], &Device::Cpu).unwrap();
        let got = cox_nll(&r, &[1.0, 1.0, 2.0], &[true, true, false]).unwrap().to_scalar::<f64>().unwrap();
        let lse = (0.5f64.exp() + (-0.2f64).exp() + 1.1f64.exp()).ln();
        let want = -((0.5 - lse) + (-0.2 - lse)) / 3.0;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}
