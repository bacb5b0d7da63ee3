#!/usr/bin/env bash
# The demo, measured: runs scripts/demo.sh into a fresh folder and reports the out-of-fold AUC of
# the semi-synthetic cohort and the wall time (including the build, if one is needed).
# Last line: `demo: AUC <auc> (accuracy <acc>, balanced accuracy <bacc>), wall <seconds> s`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-demo.XXXXXX")
trap 'rm -rf "$out"' EXIT
start=$(date +%s.%N)
DEMO_DIR="$out" ./scripts/demo.sh "$@" >&2
wall=$(python3 -c "import time; print(f'{time.time() - $start:.0f}')")
python3 - "$out" "$wall" <<'PY'
import glob, json, sys
out, wall = sys.argv[1], sys.argv[2]
(metrics,) = glob.glob(f"{out}/store/runs/*/round-0/metrics.json")
m = json.load(open(metrics))["pooled"]
print(f"demo: AUC {m['auc']:.3f} (accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}), wall {wall} s")
PY
