#!/usr/bin/env bash
# Embedding throughput on CPU, images/s at 224 px, for ResNet50-trunc (1024-d) and
# EfficientNet-Lite0 (1280-d): the model alone, wsimil (BatchNorm folded, as every run embeds)
# against PyTorch in inference mode (eval, no_grad), in one run, both on one core (wsimil is also
# timed on all cores); and wsimil end to end
# from a slide (read, decode, resize, normalise, embed) on all cores, against CLAM-style PyTorch
# (OpenSlide read_region + PIL resize in DataLoader workers feeding the model) on the same patches.
# Batch 16, best of 3 for the models alone.
#
# The PyTorch side is PyTorch as users install it (PyPI's wheel: scripts/dev/pypi-torch-env.sh;
# Debian's from scripts/dev/torch-env.sh when that is absent); without either it is skipped.
# Last line: `embed-cpu: wsimil vs pytorch = N.Nx (...)`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
source bench/lib.sh
wsimil_bins
BATCH=${BATCH:-16}
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-embed.XXXXXX")
trap 'rm -rf "$work"' EXIT
PY=$(torch_python torch)
[[ -z $PY ]] && echo "embed-cpu: PyTorch not found (scripts/dev/pypi-torch-env.sh installs it): peer skipped" >&2
PYSLIDE=$(torch_python torch openslide PIL)
[[ -n $PY && -z $PYSLIDE ]] && echo "embed-cpu: openslide-python or PIL not found: end-to-end peer skipped" >&2
# A 20x slide of real tissue, 4096 x 4096: ~250 patches of 256 px.
"$WSIMIL_DEV" make-slide --out "$work/slide.svs" --width 4096 --height 4096 --mpp 0.5
rows=()
for arch in resnet50-trunc efficientnet-lite0; do
  w1=$($ONE_CORE "$WSIMIL_DEV" bench-embed --embedder $arch --batch "$BATCH" | awk '{print $3}')
  wa=$("$WSIMIL_DEV" bench-embed --embedder $arch --batch "$BATCH" | awk '{print $3}')
  read -r n e2e < <("$WSIMIL_DEV" bench-embed --embedder $arch --batch "$BATCH" --slide "$work/slide.svs" \
    --coords-out "$work/coords.csv" | awk '{print $3, $4}')
  line="$arch: wsimil $w1 img/s on 1 core, $wa on $(nproc) cores, end to end from a slide $e2e patches/s ($n patches)"
  p1=""; pe=""
  if [[ -n $PY ]]; then
    p1=$($ONE_CORE "$PY" bench/py/embed.py --arch $arch --batch "$BATCH" | awk '{print $3}')
    line+="; pytorch $p1 img/s on 1 core"
    if [[ -n $PYSLIDE ]]; then
      pe=$("$PYSLIDE" bench/py/embed_slide.py --arch $arch --batch "$BATCH" --slide "$work/slide.svs" \
        --coords "$work/coords.csv" | awk '{print $4}')
      line+=", end to end $pe patches/s"
    fi
  fi
  echo "embed-cpu: $line" >&2
  rows+=("$arch:$w1:${p1:-0}:$wa:$e2e:${pe:-0}")
done
# The same pipeline with no network: what the reading side alone delivers on these cores.
read -r _ dec < <("$WSIMIL_DEV" bench-embed --embedder resnet50-trunc --batch 64 --slide "$work/slide.svs" --decode-only | awk '{print $3, $4}')
echo "embed-cpu: decode ceiling (read, decode, resize, normalise; no network) $dec patches/s on $(nproc) cores" >&2
python3 - "${PY:+$($PY -c 'import torch; print(torch.__version__)')}" "$dec" "${rows[@]}" <<'PY'
import sys
ver, dec, rows = sys.argv[1], float(sys.argv[2]), [r.split(":") for r in sys.argv[3:]]
if ver:
    ratios = [float(w) / float(p) for _, w, p, _, _, _ in rows]
    geo = (ratios[0] * ratios[1]) ** 0.5
    parts = "; ".join(f"{a} {float(w):.1f} vs {float(p):.1f} img/s ({float(w)/float(p):.2f}x)" for a, w, p, _, _, _ in rows)
    e2e = ", ".join(f"{a} {float(e):.1f}" + (f" vs {float(pe):.1f} ({float(e)/float(pe):.2f}x)" if float(pe) else "")
                    for a, _, _, _, e, pe in rows)
    print(f"embed-cpu: wsimil vs pytorch {ver} = {geo:.1f}x (one core, model alone: {parts}; end to end from a slide on all cores, patches/s: {e2e}; decode ceiling {dec:.0f})")
else:
    parts = "; ".join(f"{a} {float(w):.1f} img/s on one core, {float(e):.1f} patches/s end to end" for a, w, _, _, e, _ in rows)
    print(f"embed-cpu: wsimil {parts}; decode ceiling {dec:.0f} patches/s (PyTorch not installed: no ratio)")
PY
