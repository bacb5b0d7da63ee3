#!/usr/bin/env bash
# ICMIL rounds on the semi-synthetic cohort, measured: does letting the bag classifier teach the
# patch embedder buy anything?
#
# Per seed: a 32-slide cohort of real CMU tissue with small planted lesions (radius 100-180 level-0
# px, at most 2 per positive slide: a few partly covered positive patches per slide), embedded by
# ImageNet EfficientNet-Lite0 (generic, not trained on pathology: weak for this task), ABMIL
# (ICMIL's reference classifier) in 2-fold cross-validation; then 2 ICMIL rounds (2 fine-tuning
# shards per fold, the last 3 blocks trainable, 16 confident patches per training slide, 2 epochs,
# lr 1e-4: the paper's 1e-5 barely moves an embedder on a few hundred patches). Out-of-fold AUC
# (pooled over the 32 slides) per round.
# Control: round 0 retrained with two other classifier seeds on the same folds and features, so a
# round's change can be set against how much retraining alone moves the AUC.
# Last line: `icmil-rounds: ...`. SEEDS (default "1 2 3") picks the cohorts.
set -euo pipefail
cd "$(dirname "$0")/.."
export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
source bench/lib.sh
wsimil_bins
SEEDS=${SEEDS:-1 2 3}
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-icmil.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
common=(--tissue-preset biopsy --folds 2 --model abmil --epochs 30 --patience 8)
rows=()
for seed in $SEEDS; do
  dir="$work/seed-$seed"
  "$WSIMIL" demo-cohort --out "$dir/cohort" --slides 32 --seed "$seed" --radius 100,180 --max-regions 2 >/dev/null
  "$WSIMIL" run --manifest "$dir/cohort/manifest.csv" --store "$dir/store" "${common[@]}" --seed 0 \
    --icmil-rounds 2 --icmil-shards 2 --icmil-epochs 2 --icmil-lr 1e-4 --icmil-patches-per-slide 16 \
    --icmil-trainable-blocks 3 >"$dir/icmil.log" 2>&1
  grep -E '^  round [0-9]:' "$dir/icmil.log" | sed "s/^/icmil-rounds: seed $seed:/" >&2
  for ts in 101 202; do
    "$WSIMIL" run --manifest "$dir/cohort/manifest.csv" --store "$dir/store" "${common[@]}" --seed 0 \
      --train-seed "$ts" >"$dir/control-$ts.log" 2>&1
  done
  rows+=("$(python3 - "$dir" <<'PY'
import glob, json, sys
d = sys.argv[1]
auc = lambda p: json.load(open(p))["pooled"]["auc"]
runs = {}
for p in glob.glob(f"{d}/store/runs/*/round-*/metrics.json"):
    run, rnd = p.split("/")[-3], int(p.split("/")[-2].split("-")[1])
    runs.setdefault(run, {})[rnd] = auc(p)
icmil = next(r for r in runs.values() if len(r) == 3)
controls = [r[0] for r in runs.values() if len(r) == 1]
print(json.dumps({"rounds": [icmil[0], icmil[1], icmil[2]], "control": controls}))
PY
)")
  echo "icmil-rounds: seed $seed: ${rows[-1]}" >&2
done
wall=$(( $(date +%s) - start ))
python3 - "$wall" "${rows[@]}" <<'PY'
import json, statistics as st, sys
wall, rows = sys.argv[1], [json.loads(r) for r in sys.argv[2:]]
sd = lambda v: st.stdev(v) if len(v) > 1 else 0.0
r = list(zip(*[row["rounds"] for row in rows]))
# Retraining noise: per cohort, the spread of round 0 over its three classifier seeds.
noise = st.mean(sd([row["rounds"][0]] + row["control"]) for row in rows)
d1 = [b - a for a, b in zip(r[0], r[1])]
d2 = [c - a for a, c in zip(r[0], r[2])]
for row in rows:
    print("  rounds", " ".join(f"{a:.3f}" for a in row["rounds"]), "| round 0 retrained:",
          " ".join(f"{a:.3f}" for a in row["control"]), file=sys.stderr)
print(f"icmil-rounds: out-of-fold AUC over {len(rows)} cohorts: round 0 {st.mean(r[0]):.3f} ± {sd(r[0]):.3f}, "
      f"round 1 {st.mean(r[1]):.3f} ± {sd(r[1]):.3f} (Δ {st.mean(d1):+.3f}, up in {sum(x > 0 for x in d1)}/{len(d1)}), "
      f"round 2 {st.mean(r[2]):.3f} ± {sd(r[2]):.3f} (Δ {st.mean(d2):+.3f}, up in {sum(x > 0 for x in d2)}/{len(d2)}); "
      f"retraining noise (sd of round 0 over 3 classifier seeds) {noise:.3f}; wall {wall} s")
PY
