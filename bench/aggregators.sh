#!/usr/bin/env bash
# The MIL aggregators side by side on the ICMIL bench's cohorts (issue 28's comparison; Musk1's is
# bench/musk1.sh): per seed, the cohort bench/icmil-rounds.sh makes (SLIDES semi-synthetic slides of
# real CMU tissue with small, faint planted lesions, 3 staining sites, embedded once by ImageNet
# EfficientNet-Lite0), then every model of MODELS trained by the same `wsimil run` on the same folds
# and features (2-fold cross-validation, up to 30 epochs, patience 8, each model's own loss, wsimil's
# optimizer), with TRAIN_SEEDS classifier seeds. Per model: out-of-fold slide AUC, the instance
# path's AUC over every patch against the lesion masks, the attention's AUC within positive slides,
# and seconds of training per run, each mean ± sd over cohorts and classifier seeds.
# Last line: `aggregators: ...` every model's figures, and the best slide AUC against ABMIL's
# (ICMIL's reference classifier; the comparison is wsimil's models against each other, no peer).
set -euo pipefail
cd "$(dirname "$0")/.."
export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
source bench/lib.sh
wsimil_bins
SEEDS=${SEEDS:-1 2 3}
MODELS=${MODELS:-abmil transmil clam-sb clam-mb dsmil dtfd}
TRAIN_SEEDS=${TRAIN_SEEDS:-0 101 202}
SLIDES=${SLIDES:-40}
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-aggregators.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
for seed in $SEEDS; do
  dir="$work/seed-$seed"
  small_lesion_cohort "$dir/cohort" "$SLIDES" "$seed"
  # Tile and embed once; every run below finds the features in the store.
  "$WSIMIL" run --manifest "$dir/cohort/manifest.csv" --store "$dir/store" --tissue-preset biopsy \
    --until embed --run features >"$dir/features.log" 2>&1
  for model in $MODELS; do
    for ts in $TRAIN_SEEDS; do
      "$WSIMIL" run --manifest "$dir/cohort/manifest.csv" --store "$dir/store" --tissue-preset biopsy --folds 2 \
        --model "$model" --landmarks 64 --epochs 30 --patience 8 --seed 0 --train-seed "$ts" \
        --run "$model-$ts" >"$dir/$model-$ts.log" 2>&1
    done
  done
done
wall=$(( $(date +%s) - start ))
python3 - "$work" "$wall" "$MODELS" "$TRAIN_SEEDS" "$SEEDS" <<'PY'
import json, re, statistics as st, sys
work, wall, models, train_seeds, seeds = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5].split()
ms = lambda v: (st.mean(v), st.stdev(v) if len(v) > 1 else 0.0)
def train_secs(log):
    # The report's stage line: "  train   2 planned, 2 computed, ... 12.3 s".
    for line in open(log):
        m = re.match(r"^\s+train\s+\d+ planned.*?([\d.]+) s\s*$", line)
        if m:
            return float(m.group(1))
    return None
table, auc = [], {}
for model in models:
    figs = {"auc": [], "inst": [], "att": [], "secs": []}
    for seed in seeds:
        for ts in train_seeds:
            d = f"{work}/seed-{seed}"
            m = json.load(open(f"{d}/store/runs/{model}-{ts}/round-0/metrics.json"))
            i = m.get("instance") or {}
            figs["auc"].append(m["pooled"]["auc"])
            for key, name in [("inst", "instance_auc"), ("att", "attention_auc")]:
                if i.get(name) is not None:
                    figs[key].append(i[name])
            s = train_secs(f"{d}/{model}-{ts}.log")
            if s is not None:
                figs["secs"].append(s)
    f = lambda key: "n/a" if not figs[key] else "{:.3f} ± {:.3f}".format(*ms(figs[key]))
    secs = "n/a" if not figs["secs"] else "{:.0f}".format(st.mean(figs["secs"]))
    per_cohort = [st.mean(figs["auc"][k * len(train_seeds):(k + 1) * len(train_seeds)]) for k in range(len(seeds))]
    print(f"aggregators: {model}: slide AUC {f('auc')} (per cohort " + ", ".join(f"{v:.3f}" for v in per_cohort)
          + f"), instance AUC {f('inst')}, attention AUC {f('att')}, {secs} s of training a run", file=sys.stderr)
    table.append(f"{model} {ms(figs['auc'])[0]:.3f}")
    auc[model] = ms(figs["auc"])[0]
best = max(auc, key=auc.get)
ratio = f"{auc[best] / auc['abmil']:.2f}x" if "abmil" in auc else "n/a (ABMIL not run)"
print(f"aggregators: {len(seeds)} cohorts x {len(train_seeds)} classifier seeds, mean out-of-fold slide AUC: "
      + ", ".join(table) + f"; best ({best}) vs ABMIL = {ratio} ({auc[best]:.3f} vs {auc.get('abmil', float('nan')):.3f}); wall {wall} s")
PY
