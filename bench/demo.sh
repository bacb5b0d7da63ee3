#!/usr/bin/env bash
# The demo, measured: runs scripts/demo.sh into a fresh folder and reports the out-of-fold AUC of
# the semi-synthetic cohort and the wall time (including the build, if one is needed); then the
# external validation: the run's fold models applied (`wsimil predict`) to a second cohort made
# from the same tissue with another seed (other slides, other tumour regions), with its bootstrap
# 95% CI.
# Last line: `demo: AUC <auc> (accuracy <acc>, balanced accuracy <bacc>), wall <seconds> s; external
# validation AUC <auc> (95% CI <lo>–<hi>, <n> slides)`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-demo.XXXXXX")
trap 'rm -rf "$out"' EXIT
start=$(date +%s.%N)
DEMO_DIR="$out" ./scripts/demo.sh "$@" >&2
wall=$(python3 -c "import time; print(f'{time.time() - $start:.0f}')")
WSIMIL=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/wsimil
run=$(basename "$(dirname "$(ls "$out"/store/runs/*/plan.json | head -1)")")
"$WSIMIL" demo-cohort --out "$out/external" --slides 16 --seed 1 --id-prefix ext- >/dev/null
"$WSIMIL" predict --model "$run" --manifest "$out/external/manifest.csv" --store "$out/store" --name external >&2
python3 - "$out" "$wall" <<'PY'
import glob, json, sys
out, wall = sys.argv[1], sys.argv[2]
(metrics,) = glob.glob(f"{out}/store/runs/*/round-0/metrics.json")
m = json.load(open(metrics))["pooled"]
ext = json.load(open(f"{out}/store/applied/external/metrics.json"))
auc = ext["metrics"]["auc"]
print(f"demo: AUC {m['auc']:.3f} (accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}), wall {wall} s; "
      f"external validation AUC {auc['value']:.3f} (95% CI {auc['ci95'][0]:.3f}–{auc['ci95'][1]:.3f}, {ext['labelled']} slides)")
PY
