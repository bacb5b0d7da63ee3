#!/usr/bin/env bash
# Training at TCGA scale within a memory budget: `wsimil run --features` on synthetic cohorts of
# 100, 400 and 1,000 slides (TCGA-like bag sizes around 5,300 patches of 1,024-d f32 features:
# 20.4 GB at 1,000 slides; `wsimil-dev make-cohort`, a planted signal), ABMIL, one split (70 % train,
# 10 % validation, 20 % test), EPOCHS epochs. For each size: seconds per epoch and peak memory with
# a bag budget below the cohort (BUDGET_GB), and with a budget that holds the cohort where this
# machine can (the all-in-memory path). Beside it, the peer users would run: a training loop as
# CLAM's, one bag per step from per-slide h5 files through a DataLoader with 2 workers, the same
# model and split (bench/py/train_scale.py, PyPI torch + h5py from scripts/dev/pypi-torch-env.sh;
# skipped with a message when absent). Then the same run with the features only in a bucket
# (SeaweedFS on loopback) at S3_SLIDES slides.
#
# Memory: peak PSS of the whole process tree (bench/py/peak_mem.py: the peer's workers share the
# parent's libraries; PSS counts each page once) for both, and wsimil's peak RSS (/usr/bin/time).
# Seconds per epoch: the mean of epochs 2.. (epoch 1 also warms the page cache), the training pass
# and the validation pass, from wsimil's fold report and the peer's own clock.
#
# The cohort is made once and kept in TRAIN_SCALE_DIR (default ~/.cache/wsimil/bench/train-scale;
# 41 GB at 1,000 slides with the peer's h5 copy). SIZES, PATCHES, DIM, EPOCHS, BUDGET_GB, S3_SLIDES
# override the settings.
# Last line: `train-scale: wsimil vs pytorch = N.Nx (seconds per epoch at 1,000 slides; peak ...)`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
wsimil_bins
SIZES=${SIZES:-100 400 1000}
PATCHES=${PATCHES:-5300}
DIM=${DIM:-1024}
EPOCHS=${EPOCHS:-3}
BUDGET_GB=${BUDGET_GB:-1}
S3_SLIDES=${S3_SLIDES:-100}
WORK=${TRAIN_SCALE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wsimil/bench/train-scale}
largest=$(tr ' ' '\n' <<<"$SIZES" | sort -n | tail -1)
PY=$(torch_python torch h5py)
have_peer=1
if [[ -z $PY ]]; then
  have_peer=0
  echo "train-scale: PyTorch with h5py not found (scripts/dev/pypi-torch-env.sh): peer skipped" >&2
fi
log() { echo "train-scale: $*" >&2; }

# The cohort (and CLAM's h5 copy for the peer), made once for these settings.
tag="n$largest-p$PATCHES-d$DIM"
COHORT=$WORK/$tag
if [[ ! -f $COHORT/done || ($have_peer == 1 && ! -f $COHORT/clam/dataset.csv) ]]; then
  rm -rf "$WORK"
  mkdir -p "$COHORT"
  need=$(( largest * PATCHES * DIM * 4 * (1 + have_peer) / 1000000000 + 2 ))
  free=$(df -P -BG "$WORK" | awk 'NR==2 {sub("G", "", $4); print $4}')
  if (( free < need )); then
    echo "train-scale: the cohort needs ${need} GB on $WORK, ${free} GB free (set TRAIN_SCALE_DIR or SIZES)" >&2
    exit 1
  fi
  h5=()
  [[ $have_peer == 1 ]] && h5=(--h5-dir "$COHORT/clam")
  log "making the cohort: $largest slides x $PATCHES patches x $DIM ($need GB)"
  t0=$(date +%s)
  "$WSIMIL_DEV" make-cohort --store "$COHORT/store" --name syn --slides "$largest" --patches "$PATCHES" \
    --dim "$DIM" --manifest-out "$COHORT/all.csv" "${h5[@]}" >&2
  log "cohort made in $(( $(date +%s) - t0 )) s"
  touch "$COHORT/done"
fi
STORE=$COHORT/store

# The first N slides, one split: 70 % train, 10 % validation, 20 % test.
manifest() {
  awk -F, -v n="$1" 'NR == 1 {print $0 ",split"; next} NR - 1 <= n {
    i = (NR - 2) % 10; print $0 "," (i < 7 ? "train" : (i == 7 ? "val" : "test")) }' "$COHORT/all.csv" >"$COHORT/m$1.csv"
  echo "$COHORT/m$1.csv"
}

# Bytes of features of the first N slides (their Parquet files).
cohort_bytes() {
  awk -F, -v n="$1" -v d="$STORE/features/syn/imported" 'NR > 1 && NR - 1 <= n {print d "/" $1 ".parquet"}' \
    "$COHORT/all.csv" | xargs stat -c %s | awk '{s += $1} END {print s}'
}

# The store's flags (S3's endpoint), for wsimil and wsimil-dev alike.
STORE_FLAGS=()

# wsimil_run NAME STORE MANIFEST BUDGET_GB [more flags for wsimil run]
#   -> "secs_per_epoch rss_gib pss_gib reads hits waited_s test_auc"
wsimil_run() {
  local name=$1 store=$2 m=$3 gb=$4
  shift 4
  local out=$COHORT/$name.log
  python3 bench/py/peak_mem.py "$COHORT/$name.pss" /usr/bin/time -f 'RSS %M' "$WSIMIL" run --features syn \
    --manifest "$m" --store "$store" "${STORE_FLAGS[@]}" --model abmil --epochs "$EPOCHS" --patience "$EPOCHS" \
    --bag-cache-gb "$gb" "$@" >"$out" 2>&1 || { tail -20 "$out" >&2; return 1; }
  local run report
  run=$(grep -o 'run run-[0-9a-f]*' "$out" | head -1 | cut -d' ' -f2)
  "$WSIMIL_DEV" store-get --store "$store" "${STORE_FLAGS[@]}" "runs/$run/round-0/fold-0/metrics.json" >"$COHORT/$name.json"
  echo "$run" >"$COHORT/$name.run"
  python3 - "$out" "$COHORT/$name.pss" "$COHORT/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[3]))
rss = [l.split()[1] for l in open(sys.argv[1]) if l.startswith("RSS ")][-1]
pss = open(sys.argv[2]).read().split()[1]
secs = [e["seconds"] for e in r["curve"]][1:] or [r["curve"][0]["seconds"]]
b = r["bags"]
auc = (r.get("test") or {}).get("auc")
print(f"{sum(secs) / len(secs):.2f} {int(rss) / 2**20:.2f} {int(pss) / 1024:.2f} {b['reads']} {b['hits']} {b['waited_s']:.1f} "
      + ("-" if auc is None else f"{auc:.4f}"))
PY
}

peer_run() {
  local n=$1
  local plan=$STORE/runs/$(cat "$COHORT/stream-$n.run")/plan.json
  python3 bench/py/peak_mem.py "$COHORT/peer-$n.pss" "$PY" bench/py/train_scale.py --h5-dir "$COHORT/clam" \
    --plan "$plan" --epochs "$EPOCHS" >"$COHORT/peer-$n.log" 2>&1 || { tail -20 "$COHORT/peer-$n.log" >&2; return 1; }
  python3 - "$COHORT/peer-$n.log" "$COHORT/peer-$n.pss" <<'PY'
import sys
secs = [float(l.split()[2]) for l in open(sys.argv[1]) if l.startswith("epoch ")]
secs = secs[1:] or secs
pss = open(sys.argv[2]).read().split()[1]
print(f"{sum(secs) / len(secs):.2f} {int(pss) / 1024:.2f}")
PY
}

avail_gb=$(awk '/MemAvailable/ {printf "%d", $2 / 1e6}' /proc/meminfo)
rows=()
for n in $SIZES; do
  m=$(manifest "$n")
  bytes=$(cohort_bytes "$n")
  gb=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1e9}')
  rm -rf "$STORE/runs"
  read -r s_secs s_rss s_pss s_reads s_hits s_wait s_auc < <(wsimil_run "stream-$n" "$STORE" "$m" "$BUDGET_GB")
  line="n=$n ($gb GB of features): budget $BUDGET_GB GB: $s_secs s/epoch, peak RSS $s_rss GiB (PSS $s_pss), $s_reads reads + $s_hits from memory, waited $s_wait s, test AUC $s_auc"
  m_secs=-
  # The all-in-memory path: a budget that holds every bag, where this machine has the room.
  hold=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b * 1.05 / 1e9 + 1}')
  if awk -v h="$hold" -v a="$avail_gb" 'BEGIN {exit !(h + 2 < a)}'; then
    rm -rf "$STORE/runs"
    read -r m_secs m_rss m_pss _ m_hits _ m_auc < <(wsimil_run "memory-$n" "$STORE" "$m" "$hold")
    line+="; in memory ($hold GB): $m_secs s/epoch, peak RSS $m_rss GiB, test AUC $m_auc; streaming/in-memory $(awk -v a="$s_secs" -v b="$m_secs" 'BEGIN {printf "%.2f", a / b}')x"
  else
    line+="; in memory: does not fit ($hold GB of $avail_gb GB available)"
  fi
  p_secs=- p_pss=-
  if [[ $have_peer == 1 ]]; then
    read -r p_secs p_pss < <(peer_run "$n")
    line+="; pytorch: $p_secs s/epoch, peak PSS $p_pss GiB"
  fi
  log "$line"
  rows+=("$n:$s_secs:$s_pss:$m_secs:$p_secs:$p_pss:$s_rss")
done

# Half precision in memory, at the smallest size: twice the bags in the same budget.
n=$(tr ' ' '\n' <<<"$SIZES" | sort -n | head -1)
rm -rf "$STORE/runs"
read -r h_secs h_rss _ h_reads h_hits _ h_auc < <(wsimil_run "f16-$n" "$STORE" "$COHORT/m$n.csv" "$BUDGET_GB" --bag-precision f16)
log "n=$n, bags in f16, budget $BUDGET_GB GB: $h_secs s/epoch, peak RSS $h_rss GiB, $h_reads reads + $h_hits from memory, test AUC $h_auc (f32: see n=$n above)"

# Features only in a bucket.
if [[ ${S3_SLIDES} -gt 0 ]] && start_s3; then
  trap stop_s3 EXIT
  STORE_FLAGS=(--s3-endpoint "$S3_ENDPOINT" --s3-path-style)
  "$WSIMIL_DEV" make-cohort --store s3://bench/train-scale "${STORE_FLAGS[@]}" --name syn --slides "$S3_SLIDES" \
    --patches "$PATCHES" --dim "$DIM" --manifest-out "$COHORT/s3-all.csv" >&2
  awk -F, 'NR == 1 {print $0 ",split"; next} {i = (NR - 2) % 10; print $0 "," (i < 7 ? "train" : (i == 7 ? "val" : "test"))}' \
    "$COHORT/s3-all.csv" >"$COHORT/s3-m.csv"
  read -r b_secs b_rss _ b_reads b_hits b_wait b_auc < <(wsimil_run "s3" s3://bench/train-scale "$COHORT/s3-m.csv" "$BUDGET_GB")
  log "n=$S3_SLIDES from S3 (SeaweedFS on loopback), budget $BUDGET_GB GB: $b_secs s/epoch, peak RSS $b_rss GiB, $b_reads reads + $b_hits from memory, waited $b_wait s, test AUC $b_auc"
  stop_s3
fi

python3 - "$have_peer" "${rows[@]}" <<'PY'
import sys
have_peer, rows = sys.argv[1] == "1", [r.split(":") for r in sys.argv[2:]]
pss = [float(r[2]) for r in rows]
flat = max(pss) / min(pss)
n, s, sp, m, p, pp, srss = rows[-1]
spread = f"wsimil peak PSS {min(pss):.2f}-{max(pss):.2f} GiB from {rows[0][0]} to {n} slides ({(flat - 1) * 100:.0f}% apart)"
if have_peer:
    print(f"train-scale: wsimil vs pytorch = {float(p) / float(s):.1f}x (seconds per epoch at {int(n):,} slides: "
          f"{s} vs {p}; peak RSS {srss} vs {pp} GiB (peer: PSS of its process tree); {spread})")
else:
    print(f"train-scale: wsimil {s} s/epoch at {int(n):,} slides, peak RSS {srss} GiB (no PyTorch peer: no ratio; {spread})")
PY
