#!/usr/bin/env bash
# Survival on a semi-synthetic cohort whose hazard rises with its planted lesions (`wsimil-dev
# make-cohort --survival`: SLIDES slides of about PATCHES patches of DIM-d features; ranking the
# slides by their true lesion share gives a C-index of about 0.76, the ceiling): `wsimil run
# --task survival` with FOLDS folds, EPOCHS epochs (early stopping with patience = epochs: the
# best validation epoch's model scores the test fold), for ABMIL and TransMIL with the discrete-time
# NLL and the Cox loss. For each: the out-of-fold C-index pooled (95% bootstrap CI), per fold (mean
# ± sd), the log-rank p of the risk groups, and seconds per fold (the fold reports' wall time: the
# bags read, training, validation, the test and training slides scored).
#
# Beside it, the peer users would run: MCAT's/PORPOISE's training loop with the authors' losses
# (bench/py/survival.py: PyTorch from scripts/dev/pypi-torch-env.sh, one bag a step from CLAM h5
# files through a DataLoader with 2 workers, the same gated-attention model), on wsimil's folds, for
# ABMIL with both losses; skipped with a message when absent.
#
# The cohort is made once in SURVIVAL_DIR (default ~/.cache/wsimil/bench/survival). SLIDES, PATCHES,
# DIM, FOLDS, EPOCHS, LR, MODELS (default "abmil transmil"; clam-sb and clam-mb train survival too)
# and LOSSES (default "nll cox") override the settings.
# Last line: `survival: wsimil vs pytorch = N.Nx (seconds per fold, ABMIL, discrete-time NLL; ...)`;
# where the ABMIL NLL row is not run (MODELS, LOSSES), the last row run, marked as such.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
wsimil_bins
SLIDES=${SLIDES:-400}
PATCHES=${PATCHES:-500}
DIM=${DIM:-256}
FOLDS=${FOLDS:-5}
EPOCHS=${EPOCHS:-10}
LR=${LR:-1e-3}
MODELS=${MODELS:-abmil transmil}
LOSSES=${LOSSES:-nll cox}
WORK=${SURVIVAL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wsimil/bench/survival}
PY=$(torch_python torch h5py numpy)
log() { echo "survival: $*" >&2; }
[[ -z $PY ]] && log "PyTorch with h5py not found (scripts/dev/pypi-torch-env.sh): peer skipped"

COHORT=$WORK/n$SLIDES-p$PATCHES-d$DIM
if [[ ! -f $COHORT/done ]]; then
  rm -rf "$COHORT"
  mkdir -p "$COHORT"
  "$WSIMIL_DEV" make-cohort --store "$COHORT/store" --name syn --slides "$SLIDES" --patches "$PATCHES" --dim "$DIM" \
    --seed 1 --survival --manifest-out "$COHORT/cohort.csv" --h5-dir "$COHORT/clam" >&2
  touch "$COHORT/done"
fi
STORE=$COHORT/store

# wsimil_survival MODEL LOSS -> "pooled lo hi folds_mean folds_sd logrank_p secs_per_fold run"
wsimil_survival() {
  local model=$1 loss=$2 run="$1-$2-e$EPOCHS-f$FOLDS"
  rm -rf "$STORE/runs/$run"
  "$WSIMIL" run --features syn --manifest "$COHORT/cohort.csv" --store "$STORE" --run "$run" --task survival \
    --survival-loss "$loss" --model "$model" --folds "$FOLDS" --epochs "$EPOCHS" --patience "$EPOCHS" --lr "$LR" \
    --landmarks 64 >"$COHORT/$run.log" 2>&1 || { tail -20 "$COHORT/$run.log" >&2; return 1; }
  python3 - "$STORE/runs/$run" "$FOLDS" "$run" <<'PY'
import json, sys
d, k, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = json.load(open(f"{d}/round-0/metrics.json"))["survival"]
secs = [json.load(open(f"{d}/round-0/fold-{i}/metrics.json"))["seconds"] for i in range(k)]
c, f = m["c_index"], m["c_index_folds"]
print(f"{c['value']:.3f} {c['ci95'][0]:.3f} {c['ci95'][1]:.3f} {f['mean']:.3f} {f['sd']:.3f} {m['log_rank_p']:.2e} {sum(secs) / k:.2f} {run}")
PY
}

# peer_survival LOSS RUN -> "pooled folds_mean folds_sd secs_per_fold"
peer_survival() {
  local loss=$1 run=$2
  "$PY" bench/py/survival.py --h5-dir "$COHORT/clam" --plan "$STORE/runs/$run/plan.json" --loss "$loss" \
    --epochs "$EPOCHS" --lr "$LR" >"$COHORT/peer-$loss.log" 2>&1 || { tail -20 "$COHORT/peer-$loss.log" >&2; return 1; }
  python3 - "$COHORT/peer-$loss.log" <<'PY'
import statistics, sys
folds = [l.split() for l in open(sys.argv[1]) if l.startswith("fold ")]
pooled = [l.split()[1] for l in open(sys.argv[1]) if l.startswith("pooled ")][0]
c = [float(f[3]) for f in folds]
secs = [float(f[2]) for f in folds]
print(f"{float(pooled):.3f} {statistics.mean(c):.3f} {statistics.stdev(c):.3f} {sum(secs) / len(secs):.2f}")
PY
}

head_w='' head_p='' head_c='' line=''
for model in $MODELS; do
  for loss in $LOSSES; do
    read -r c lo hi fm fs p secs run < <(wsimil_survival "$model" "$loss")
    line="$model $loss: C-index $c ($lo-$hi) pooled, $fm ± $fs per fold, log-rank p $p; $secs s per fold"
    if [[ $model == abmil && -n $PY ]]; then
      read -r pc pm ps psecs < <(peer_survival "$loss" "$run")
      line+="; pytorch: C-index $pc pooled, $pm ± $ps per fold; $psecs s per fold"
      if [[ $loss == nll ]]; then head_w=$secs head_p=$psecs head_c="C-index $c vs $pc"; fi
    elif [[ $model == abmil && $loss == nll ]]; then
      head_w=$secs head_c="C-index $c"
    fi
    log "$line"
  done
done
if [[ -n $head_p ]]; then
  ratio=$(awk -v w="$head_w" -v p="$head_p" 'BEGIN {printf "%.1f", p / w}')
  echo "survival: wsimil vs pytorch = ${ratio}x (seconds per fold, ABMIL, discrete-time NLL, $SLIDES slides x $PATCHES patches x $DIM, $EPOCHS epochs: $head_w vs $head_p; $head_c pooled out-of-fold)"
elif [[ -z $head_w ]]; then
  echo "survival: no ABMIL NLL row, so no peer ratio (MODELS=$MODELS, LOSSES=$LOSSES, $SLIDES slides x $PATCHES patches x $DIM, $EPOCHS epochs); last row: $line"
else
  echo "survival: wsimil = $head_w s per fold (ABMIL, discrete-time NLL, $head_c; peer skipped)"
fi
