#!/usr/bin/env bash
# TransMIL training step (forward + backward + Lookahead(RAdam) update, paper configuration: 512
# wide, 8 heads, 256 landmarks, dropout on) for bags of N = 1,000 / 4,000 / 16,000 / 50,000
# instances of 1024-d features (TCGA slides at 20x), on CPU: wsimil against the official PyTorch
# code on PyTorch as users install it (PyPI's current wheel, its own MKL/oneDNN kernels), in one
# run, on one core and on all cores each. Peak memory (max RSS) of each process beside its time;
# wsimil's live heap peak too (what its data needs, without what the allocator keeps).
#
# The peer needs scripts/dev/pypi-torch-env.sh (PyPI torch with the official code's pinned
# nystrom-attention 0.0.9) and a checkout of https://github.com/szc19990412/TransMIL in
# $TRANSMIL_REPO; without them it is skipped with a message. NS and STEPS override the bag sizes
# and the timed steps (after one warm-up step).
# Last line: `transmil-step: wsimil vs pytorch V = N.Nx (geometric mean ...; memory ...)`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
wsimil_bins
STEPS=${STEPS:-3}
NS=${NS:-1000 4000 16000 50000}
PY=$(torch_python torch nystrom_attention)
have_peer=1
if [[ -z $PY ]]; then
  have_peer=0; echo "transmil-step: PyTorch with nystrom-attention not found (scripts/dev/pypi-torch-env.sh): peer skipped" >&2
elif [[ -z ${TRANSMIL_REPO:-} || ! -f ${TRANSMIL_REPO:-/nonexistent}/models/TransMIL.py ]]; then
  have_peer=0; echo "transmil-step: set TRANSMIL_REPO to a checkout of the official TransMIL code: peer skipped" >&2
fi
# measure CMD... -> "seconds maxrss_mib" (and, for wsimil, its live heap peak in MiB third).
measure() {
  local out
  out=$( { /usr/bin/time -f 'RSS %M' "$@" ; } 2>&1 )
  local secs rss heap
  secs=$(echo "$out" | awk '$1=="transmil"{print $3}')
  heap=$(echo "$out" | awk '$1=="transmil"{print $4}')
  rss=$(echo "$out" | awk '$1=="RSS"{printf "%.0f", $2/1024}')
  [[ -n $secs ]] || { echo "$out" >&2; return 1; }
  echo "$secs $rss $heap"
}
summary=()
for n in $NS; do
  read -r w1 w1m w1h < <(measure $ONE_CORE "$WSIMIL_DEV" bench-transmil --n "$n" --steps "$STEPS")
  read -r wa wam _ < <(measure "$WSIMIL_DEV" bench-transmil --n "$n" --steps "$STEPS")
  line="N=$n: wsimil $w1 s/step ($w1m MiB, heap $w1h MiB) on 1 core, $wa s/step ($wam MiB) on $(nproc) cores"
  if [[ $have_peer == 1 ]]; then
    peer=("$PY" bench/py/transmil_step.py --transmil "$TRANSMIL_REPO" --n "$n" --steps "$STEPS")
    read -r p1 p1m _ < <(measure $ONE_CORE "${peer[@]}")
    read -r pa pam _ < <(measure "${peer[@]}")
    line+="; pytorch $p1 s/step ($p1m MiB) on 1 core, $pa s/step ($pam MiB) on $(nproc) cores"
    summary+=("$n:$w1:$p1:$wa:$pa:$w1m:$p1m:$wam:$pam")
  fi
  echo "transmil-step: $line" >&2
done
if [[ $have_peer == 1 ]]; then
  python3 - "$($PY -c 'import torch; print(torch.__version__.split("+")[0])')" "$(nproc)" "${summary[@]}" <<'PY'
import math, sys
ver, cores, rows = sys.argv[1], sys.argv[2], [r.split(":") for r in sys.argv[3:]]
ratios, mems, parts = [], [], []
for n, w1, p1, wa, pa, w1m, p1m, wam, pam in rows:
    s1, sa = float(p1) / float(w1), float(pa) / float(wa)
    m1, ma = float(w1m) / float(p1m), float(wam) / float(pam)
    ratios += [s1, sa]
    mems += [m1, ma]
    parts.append(f"N={n}: 1 core {s1:.2f}x ({float(w1):.2f} vs {float(p1):.2f} s, {w1m} vs {p1m} MiB), "
                 f"{cores} cores {sa:.2f}x ({float(wa):.2f} vs {float(pa):.2f} s, {wam} vs {pam} MiB)")
geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
print(f"transmil-step: wsimil vs pytorch {ver} = {geo:.1f}x (geometric mean over 1 and {cores} cores; "
      f"peak memory wsimil/pytorch at most {max(mems):.2f}x; " + "; ".join(parts) + ")")
PY
else
  echo "transmil-step: wsimil $w1 s/step at N=$n on one core (no PyTorch peer: no ratio)"
fi
