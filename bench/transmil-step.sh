#!/usr/bin/env bash
# TransMIL training step (forward + backward + Lookahead(RAdam) update, paper configuration: 512
# wide, 8 heads, 256 landmarks, dropout on) for bags of N = 1,000 / 4,000 / 16,000 instances of
# 1024-d features, on CPU: wsimil against the official PyTorch code, in one run, both on one core
# (Debian's PyTorch CPU build runs one intra-op thread; wsimil is also timed on all cores).
# Peak memory (max RSS) of each process is reported beside its time.
#
# The PyTorch side needs PyTorch with nystrom-attention 0.0.9 (scripts/dev/torch-env.sh installs
# both) and a checkout of https://github.com/szc19990412/TransMIL in $TRANSMIL_REPO; without them it
# is skipped with a message. Last line: `transmil-step: wsimil vs pytorch = N.Nx (...)`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
wsimil_bins
STEPS=${STEPS:-3}
PY=$(torch_python torch nystrom_attention)
have_peer=1
if [[ -z $PY ]]; then
  have_peer=0; echo "transmil-step: PyTorch with nystrom-attention not found (scripts/dev/torch-env.sh): peer skipped" >&2
elif [[ -z ${TRANSMIL_REPO:-} || ! -f ${TRANSMIL_REPO:-/nonexistent}/models/TransMIL.py ]]; then
  have_peer=0; echo "transmil-step: set TRANSMIL_REPO to a checkout of the official TransMIL code: peer skipped" >&2
fi
# run CMD... -> "seconds maxrss_mib"
measure() {
  local out
  out=$( { /usr/bin/time -f 'RSS %M' "$@" ; } 2>&1 )
  local secs rss
  secs=$(echo "$out" | awk '$1=="transmil"{print $3}')
  rss=$(echo "$out" | awk '$1=="RSS"{printf "%.0f", $2/1024}')
  [[ -n $secs ]] || { echo "$out" >&2; return 1; }
  echo "$secs $rss"
}
summary=()
for n in 1000 4000 16000; do
  read -r w1 w1m < <(measure $ONE_CORE "$WSIMIL_DEV" bench-transmil --n "$n" --steps "$STEPS")
  read -r wa wam < <(measure "$WSIMIL_DEV" bench-transmil --n "$n" --steps "$STEPS")
  line="N=$n: wsimil $w1 s/step ($w1m MiB) on 1 core, $wa s/step on $(nproc) cores"
  if [[ $have_peer == 1 ]]; then
    read -r p1 p1m < <(measure $ONE_CORE "$PY" bench/py/transmil_step.py --transmil "$TRANSMIL_REPO" --n "$n" --steps "$STEPS")
    line+="; pytorch $p1 s/step ($p1m MiB) on 1 core"
    summary+=("$n:$w1:$p1:$w1m:$p1m")
  fi
  echo "transmil-step: $line" >&2
done
if [[ $have_peer == 1 ]]; then
  python3 - "$($PY -c 'import torch; print(torch.__version__)')" "${summary[@]}" <<'PY'
import sys
ver, rows = sys.argv[1], [r.split(":") for r in sys.argv[2:]]
parts = [f"N={n}: {float(p)/float(w):.2f}x ({float(w):.2f} vs {float(p):.2f} s, {wm} vs {pm} MiB)" for n, w, p, wm, pm in rows]
geo = 1.0
for n, w, p, _, _ in rows:
    geo *= float(p) / float(w)
geo **= 1 / len(rows)
print(f"transmil-step: wsimil vs pytorch {ver} = {geo:.1f}x (geometric mean, one core; " + "; ".join(parts) + ")")
PY
else
  echo "transmil-step: wsimil $w1 s/step at N=16000 on one core (no PyTorch peer: no ratio)"
fi
