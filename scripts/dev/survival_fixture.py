"""What lifelines says about the Rossi recidivism data, for wsimil's survival statistics to match.

    python survival_fixture.py DATA/rossi.csv common/tests/fixtures/survival/rossi_lifelines.json

rossi.csv is lifelines' own copy of the data (Rossi, Berk & Lenihan 1980: 432 released prisoners,
weeks to re-arrest, censored at 52), fetched by scripts/fetch-data.sh from the lifelines wheel. With
lifelines (PyPI, in the venv of scripts/dev/pypi-torch-env.sh plus `pip install lifelines==0.30.3`)
this records: the Cox proportional hazards fit of `week, arrest ~ fin + age + race + wexp + mar +
paro + prio` (Efron's ties, no penalty: coefficients, standard errors, log partial likelihood),
Harrell's C-index of its partial hazards and of `age` alone (lifelines' `concordance_index`), the
Kaplan-Meier estimate at a few weeks, and the log-rank test of financial aid (fin) against none.
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
    record = {
        "lifelines": lifelines.__version__,
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
