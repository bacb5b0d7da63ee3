"""What lifelines says about the Rossi recidivism data, for wsimil's survival statistics to match.

    python survival_fixture.py DATA/rossi.csv common/tests/fixtures/survival/rossi_lifelines.json

rossi.csv is lifelines' own copy of the data (Rossi, Berk & Lenihan 1980: 432 released prisoners,
weeks to re-arrest, censored at 52), fetched by scripts/fetch-data.sh from the lifelines wheel. With
lifelines (PyPI, in the venv of scripts/dev/pypi-torch-env.sh plus `pip install lifelines==0.30.3`)
this records: the Cox proportional hazards fit of `week, arrest ~ fin + age + race + wexp + mar +
paro + prio` (Efron's ties, no penalty: coefficients, standard errors, log partial likelihood),
Harrell's C-index of its partial hazards and of `age` alone (lifelines' `concordance_index`), the
Kaplan-Meier estimate at a few weeks, and the log-rank test of financial aid (fin) against none;
with scikit-survival (`pip install scikit-survival==0.28.0`), the cumulative/dynamic AUC of the
partial hazards and of `age` at weeks 10, 20, 30 and 40 (inverse probability of censoring weights
from the data itself, follow-up cut at 49.5 weeks).
Only numbers derived from the data are committed, never the data.
"""

import json
import sys

import lifelines
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index


def main(csv, out):
    df = pd.read_csv(csv)
    covariates = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
    cph = CoxPHFitter().fit(df, duration_col="week", event_col="arrest")
    risk = cph.predict_partial_hazard(df[covariates]).values
    km = KaplanMeierFitter().fit(df["week"], df["arrest"])
    weeks = [5, 10, 20, 30, 40, 52]
    a, b = df[df.fin == 1], df[df.fin == 0]
    lr = logrank_test(a["week"], b["week"], a["arrest"], b["arrest"])
    import numpy as np
    import sksurv
    from sksurv.metrics import cumulative_dynamic_auc

    # Everyone left at week 52 is censored there, so the censoring's survival is 0 at 52 and an
    # arrest in week 52 has no weight: follow-up is cut at 49.5 weeks for this figure (arrests after
    # week 49 become censorings at 49.5).
    cut = 49.5
    y = np.array(
        list(zip((df["arrest"] == 1) & (df["week"] <= cut), np.minimum(df["week"], cut).astype(float))),
        dtype=[("e", bool), ("t", float)],
    )
    auc_weeks = [10, 20, 30, 40]
    auc_model, _ = cumulative_dynamic_auc(y, y, risk, auc_weeks)
    auc_age, _ = cumulative_dynamic_auc(y, y, df["age"].values.astype(float), auc_weeks)
    record = {
        "lifelines": lifelines.__version__,
        "sksurv": sksurv.__version__,
        "td_auc_cut": cut,
        "td_auc_weeks": auc_weeks,
        "td_auc_model": [float(v) for v in auc_model],
        "td_auc_age": [float(v) for v in auc_age],
        "rows": len(df),
        "covariates": covariates,
        "coef": [float(cph.params_[c]) for c in covariates],
        "se": [float(cph.standard_errors_[c]) for c in covariates],
        "log_likelihood": float(cph.log_likelihood_),
        "c_index_model": float(concordance_index(df["week"], -risk, df["arrest"])),
        "c_index_model_lifelines_attr": float(cph.concordance_index_),
        # A score with many ties (integer ages): the tie rule matters here.
        "c_index_age": float(concordance_index(df["week"], df["age"], df["arrest"])),
        "km_weeks": weeks,
        "km_survival": [float(km.survival_function_at_times(w).iloc[0]) for w in weeks],
        "logrank_fin": {"statistic": float(lr.test_statistic), "p": float(lr.p_value)},
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
