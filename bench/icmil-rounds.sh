#!/usr/bin/env bash
# ICMIL rounds, measured: does letting the bag classifier teach the patch embedder buy anything, at
# the slide level and at the patch level?
#
# Cohorts where the question is real (round 0 below the ceiling): per seed, SLIDES semi-synthetic
# slides of real CMU tissue with small, faint planted lesions (radius 120-220 level-0 px, at most 2
# per positive slide, 70% opaque) stained by 3 "sites" (each shifting its slides' stain by up to
# ±25% per channel), embedded by ImageNet EfficientNet-Lite0 (generic, not trained on pathology).
# Each cohort's manifest carries the lesion masks, so every round reports the instance path's AUC
# over the patches and the attention's AUC within positive slides beside the slide AUC.
#
# For ABMIL (ICMIL's reference classifier) and TransMIL, 2-fold cross-validation, then 2 ICMIL
# rounds with the authors' recipe (`--icmil-method paper`: confidence min-maxed per batch over raw
# attention scores, β 6, only the student's view distilled into the embedder, Adam with weight decay,
# the next classifier from the same initialisation), as far as this 2-core CPU allows: one
# fine-tuning job per fold (as the authors' one process), the last 3 blocks trainable, 48 patches
# per training slide, batches of 32, 2 epochs, lr 1e-4 (the paper's 1e-5 over every patch of
# every slide for many epochs is a GPU's work). METHODS="paper first" adds wsimil's first recipe.
# Control: round 0 retrained with two other classifier seeds on the same folds and features; per
# figure, the noise is the spread (sd) of round 0 over those three seeds, averaged over cohorts, and
# a round's change counts only where it is larger than that.
# Wall time per round and stage from each run's report.
# Last line: `icmil-rounds: ... round 0 ... round 2 ...` per model. SEEDS (default "1 2 3") picks
# the cohorts, MODELS (default "abmil transmil") the classifiers, NEGATIVE_CLASS (e.g. normal; unset
# by default) the class whose training slides' patches ICMIL teaches outright, STAIN_JITTER (e.g.
# 0.25; unset by default) the student views' per-channel colour jitter, TOP_K (e.g. 4; unset by
# default) the patches of each other training slide the teacher ranks first, always drawn and taught
# their slide's class outright (--icmil-top-k), SITE_FOLDS=1 folds
# stratified by staining site as well as by label (the manifest's `site` column; other folds, so
# round 0 differs too).
set -euo pipefail
cd "$(dirname "$0")/.."
export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
source bench/lib.sh
wsimil_bins
SEEDS=${SEEDS:-1 2 3}
MODELS=${MODELS:-abmil transmil}
METHODS=${METHODS:-paper}
SLIDES=${SLIDES:-40}
NEGATIVE_CLASS=${NEGATIVE_CLASS:-}
STAIN_JITTER=${STAIN_JITTER:-}
TOP_K=${TOP_K:-}
icmil_extra=()
[[ -n $NEGATIVE_CLASS ]] && icmil_extra+=(--icmil-negative-class "$NEGATIVE_CLASS")
[[ -n $STAIN_JITTER ]] && icmil_extra+=(--icmil-stain-jitter "$STAIN_JITTER")
[[ -n $TOP_K ]] && icmil_extra+=(--icmil-top-k "$TOP_K")
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-icmil.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
rows=()
for seed in $SEEDS; do
  dir="$work/seed-$seed"
  small_lesion_cohort "$dir/cohort" "$SLIDES" "$seed"
  for model in $MODELS; do
    common=(--tissue-preset biopsy --folds 2 --model "$model" --landmarks 64 --epochs 30 --patience 8 --seed 0)
    label=$model
    [[ -n $NEGATIVE_CLASS ]] && label="$label (negative class: $NEGATIVE_CLASS)"
    [[ -n $STAIN_JITTER ]] && label="$label (stain jitter: $STAIN_JITTER)"
    [[ -n $TOP_K ]] && label="$label (top-k: $TOP_K)"
    [[ ${SITE_FOLDS:-0} == 1 ]] && label="$label (site folds)"
    for method in $METHODS; do
      "$WSIMIL" run --manifest "$dir/cohort/manifest.csv" --store "$dir/store" "${common[@]}" --run "$model-$method" \
        --icmil-rounds 2 --icmil-method "$method" --icmil-shards 1 --icmil-epochs 2 --icmil-lr 1e-4 \
        --icmil-patches-per-slide 48 --icmil-batch-size 32 --icmil-trainable-blocks 3 "${icmil_extra[@]}" \
        >"$dir/$model-$method.log" 2>&1
      grep -E '^  round [0-9]:' "$dir/$model-$method.log" | sed "s/^/icmil-rounds: seed $seed $model $method:/" >&2
    done
    for ts in 101 202; do
      "$WSIMIL" run --manifest "$dir/cohort/manifest.csv" --store "$dir/store" "${common[@]}" --run "$model-control-$ts" \
        --train-seed "$ts" >"$dir/$model-control-$ts.log" 2>&1
    done
    rows+=("$(python3 - "$dir" "$model" "$METHODS" "$label" <<'PY'
import json, re, sys
d, model, methods, label = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4]
def rounds(run):
    out = []
    for r in range(3):
        try:
            m = json.load(open(f"{d}/store/runs/{run}/round-{r}/metrics.json"))
        except FileNotFoundError:
            break
        i = m.get("instance") or {}
        out.append({"auc": m["pooled"]["auc"], "inst": i.get("instance_auc"), "att": i.get("attention_auc")})
    return out
def stage_secs(log):
    # Report lines: "  r1 finetune   2 planned, ... 12.3 s" (round 0's without the prefix).
    secs = {}
    for line in open(log):
        m = re.match(r"^\s+(?:r(\d+) )?(\w+)\s+\d+ planned.*?([\d.]+) s\s*$", line)
        if m:
            r = int(m.group(1) or 0)
            secs.setdefault(r, {})[m.group(2)] = float(m.group(3))
    return secs
row = {"model": label, "methods": {}, "control": [rounds(f"{model}-control-{t}")[0] for t in (101, 202)]}
for meth in methods:
    row["methods"][meth] = {"rounds": rounds(f"{model}-{meth}"), "secs": stage_secs(f"{d}/{model}-{meth}.log")}
print(json.dumps(row))
PY
)")
    echo "icmil-rounds: seed $seed: ${rows[-1]}" >&2
  done
done
wall=$(( $(date +%s) - start ))
python3 - "$wall" "$METHODS" "${rows[@]}" <<'PY'
import json, statistics as st, sys
wall, methods, rows = sys.argv[1], sys.argv[2].split(), [json.loads(r) for r in sys.argv[3:]]
sd = lambda v: st.stdev(v) if len(v) > 1 else 0.0
f = lambda v: "n/a" if v is None else f"{v:.3f}"
parts = []
for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model]
    figures = [("auc", "slide AUC"), ("inst", "instance AUC"), ("att", "attention AUC")]
    # Retraining noise, per figure: per cohort, the spread of round 0 over its three classifier
    # seeds (same folds, same features), averaged over the cohorts.
    noise = {}
    for key, _ in figures:
        spreads = [sd([v for v in [r["methods"][methods[0]]["rounds"][0][key]] + [c[key] for c in r["control"]]
                       if v is not None]) for r in mine]
        noise[key] = st.mean(spreads)
    for meth in methods:
        runs = [r["methods"][meth] for r in mine]
        last = min(len(x["rounds"]) for x in runs) - 1
        deltas = {}
        for key, name in figures:
            v0 = [x["rounds"][0][key] for x in runs]
            vl = [x["rounds"][last][key] for x in runs]
            if any(v is None for v in v0 + vl):
                continue
            d = deltas[key] = [b - a for a, b in zip(v0, vl)]
            print(f"  {model} {meth} {name}: " + "; ".join(
                " → ".join(f"{x['rounds'][r][key]:.3f}" for r in range(last + 1)) for x in runs), file=sys.stderr)
            parts.append(f"{model} {meth} {name} round 0 {st.mean(v0):.3f} → round {last} {st.mean(vl):.3f} "
                         f"(Δ {st.mean(d):+.3f}, noise {noise[key]:.3f}, above it in {sum(x > noise[key] for x in d)}/{len(d)})")
        if "auc" in deltas and "inst" in deltas:  # instance AUC only where the cohorts have truth
            both = sum(a > noise["auc"] and i > noise["inst"] for a, i in zip(deltas["auc"], deltas["inst"]))
            parts.append(f"{model} {meth} slide and instance AUC both above noise in {both}/{len(runs)}")
        secs = {}
        for x in runs:
            for r, stages in x["secs"].items():
                if int(r) > 0:
                    for k, v in stages.items():
                        secs[k] = secs.get(k, 0.0) + v / len(runs) / last
        print(f"  {model} {meth} seconds per ICMIL round and stage (mean): " +
              ", ".join(f"{k} {v:.0f}" for k, v in sorted(secs.items(), key=lambda kv: -kv[1])), file=sys.stderr)
print(f"icmil-rounds: {len(rows) // max(1, len(set(r['model'] for r in rows)))} cohorts, out-of-fold; " + "; ".join(parts) + f"; wall {wall} s")
PY
