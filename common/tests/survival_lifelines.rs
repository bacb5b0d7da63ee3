//! wsimil's survival statistics against lifelines on a real survival table: the Rossi recidivism
//! data (432 released prisoners, weeks to re-arrest, censored at 52) as lifelines ships it
//! (scripts/fetch-data.sh fetches it from the lifelines wheel and checks its sha256). The expected
//! numbers are lifelines 0.30.3's (`scripts/dev/survival_fixture.py`): a Cox fit of a linear model
//! on seven covariates (Efron's ties), Harrell's C-index, Kaplan-Meier and the log-rank test.

use wsimil_common::survival::{
    censoring_survival, concordance, cox_fit, cumulative_dynamic_auc, kaplan_meier, log_rank, survival_at,
};

struct Rossi {
    time: Vec<f64>,
    event: Vec<bool>,
    x: Vec<Vec<f64>>,
    age: Vec<f64>,
    fin: Vec<bool>,
}

fn rossi(covariates: &[String]) -> Rossi {
    let path = wsimil_common::data_dir().join("rossi.csv");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-data.sh)", path.display()));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let mut r = Rossi { time: vec![], event: vec![], x: vec![], age: vec![], fin: vec![] };
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let v: Vec<f64> = line.split(',').map(|c| c.trim().parse().unwrap()).collect();
        r.time.push(v[col("week")]);
        r.event.push(v[col("arrest")] == 1.0);
        r.age.push(v[col("age")]);
        r.fin.push(v[col("fin")] == 1.0);
        r.x.push(covariates.iter().map(|c| v[col(c)]).collect());
    }
    r
}

#[test]
fn cox_fit_c_index_kaplan_meier_and_log_rank_match_lifelines_on_rossi() {
    let want: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/survival/rossi_lifelines.json")).unwrap(),
    )
    .unwrap();
    let covariates: Vec<String> = serde_json::from_value(want["covariates"].clone()).unwrap();
    let d = rossi(&covariates);
    assert_eq!(d.time.len() as u64, want["rows"].as_u64().unwrap());
    let floats = |k: &str| -> Vec<f64> { serde_json::from_value(want[k].clone()).unwrap() };

    let fit = cox_fit(&d.x, &d.time, &d.event);
    for (i, c) in covariates.iter().enumerate() {
        assert!((fit.coef[i] - floats("coef")[i]).abs() < 1e-6, "{c}: {} vs {}", fit.coef[i], floats("coef")[i]);
        assert!((fit.se[i] / floats("se")[i] - 1.0).abs() < 1e-5, "{c} se: {} vs {}", fit.se[i], floats("se")[i]);
    }
    let ll = want["log_likelihood"].as_f64().unwrap();
    assert!(
        (fit.log_likelihood - ll).abs() < 1e-8,
        "{} vs {ll} after {} iterations",
        fit.log_likelihood,
        fit.iterations
    );

    // Harrell's C of the fitted model's risk, and of a score with many ties (age: older, later).
    let risk: Vec<f64> = d.x.iter().map(|r| r.iter().zip(&fit.coef).map(|(a, b)| a * b).sum()).collect();
    let c = concordance(&risk, &d.time, &d.event).unwrap();
    assert!((c - want["c_index_model"].as_f64().unwrap()).abs() < 1e-12, "{c}");
    let neg_age: Vec<f64> = d.age.iter().map(|a| -a).collect();
    let c_age = concordance(&neg_age, &d.time, &d.event).unwrap();
    assert!((c_age - want["c_index_age"].as_f64().unwrap()).abs() < 1e-12, "{c_age}");

    let km = kaplan_meier(&d.time, &d.event);
    for (w, s) in floats("km_weeks").iter().zip(floats("km_survival")) {
        assert!((survival_at(&km, *w) - s).abs() < 1e-12, "week {w}: {} vs {s}", survival_at(&km, *w));
    }
    // The cumulative/dynamic AUC (scikit-survival's, IPCW from the data itself), follow-up cut
    // where the fixture cut it (everyone left at week 52 is censored there: G(52) = 0).
    let cut = want["td_auc_cut"].as_f64().unwrap();
    let time: Vec<f64> = d.time.iter().map(|t| t.min(cut)).collect();
    let event: Vec<bool> = d.event.iter().zip(&d.time).map(|(e, t)| *e && *t <= cut).collect();
    let g = censoring_survival(&time, &event);
    for (score, key) in [(&risk, "td_auc_model"), (&d.age, "td_auc_age")] {
        for (w, a) in floats("td_auc_weeks").iter().zip(floats(key)) {
            let got = cumulative_dynamic_auc(score, &time, &event, *w, &g).unwrap();
            assert!((got - a).abs() < 1e-12, "{key} at week {w}: {got} vs {a}");
        }
    }
    let (stat, p) = log_rank(&d.time, &d.event, &d.fin);
    let lr = &want["logrank_fin"];
    assert!((stat - lr["statistic"].as_f64().unwrap()).abs() < 1e-10, "{stat}");
    assert!((p - lr["p"].as_f64().unwrap()).abs() < 1e-10, "{p}");
}
