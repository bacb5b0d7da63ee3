#!/usr/bin/env bash
# Patch embedding at 224 px on a GPU, in one run, for ResNet50-trunc and for ViT-L/16 (UNI's
# architecture, the pathology foundation models' size class): wsimil's CUDA build (bf16, batch size
# tuned on the device) against PyTorch on the same GPU (bf16; channels-last and cudnn.benchmark for
# the CNN, bench/py/embed.py; timm's ViT with scaled_dot_product_attention, bench/py/embed_vit.py),
# model alone; wsimil end to end from a slide (read, decode, resize on CPU threads, normalise and
# embed on the GPU) as a fraction of its model-alone rate, beside the decode ceiling; both as a
# fraction of the GPU's dense bf16 peak; the ViT against the 4,200 patches/s a GPU needs for 1,000
# TCGA slides in an hour (docs/gpu.md). Then the TransMIL training step on the GPU (N = 16,000 and
# 50,000) against the official code when TRANSMIL_REPO and nystrom-attention are there, and the
# largest bag one step fits in, each side.
#
# Here (no GPU): builds the CUDA binary (scripts/build-cuda.sh) and says so. On the GPU machine,
# which cannot reach a registry, carry the kit of scripts/dev/gpu-kit.sh (the binary, the tissue,
# Lite0's weights, the wheels and the official TransMIL code; 43 MB) and run
#   WSIMIL_KIT=target/gpu-kit bench/embed-gpu.sh
# or name the parts: WSIMIL_BIN=path/to/wsimil-dev.gz, and either a slide (SLIDE) or a folder holding
# cmu_small_region.svs (WSIMIL_DATA, 2 MB: a 16384² slide of its tissue is made there).
# The CUDA libraries come from the machine's PyTorch (docs/gpu.md). `check-device` runs
# first (the GPU's kernels against the CPU's); the decode ceiling (the same pipeline with no network:
# what the CPU threads can feed the GPU) is reported beside end to end.
# Last line: `embed-gpu: wsimil vs pytorch = N.Nx (...)`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
if ! nvidia-smi -L >/dev/null 2>&1; then
  bin=$(./scripts/build-cuda.sh --dev)
  echo "embed-gpu: built $bin; on a GPU machine run WSIMIL_KIT=target/gpu-kit bench/embed-gpu.sh with the kit of scripts/dev/gpu-kit.sh carried" >&2
  echo "embed-gpu: no GPU on this machine: nothing measured"
  exit 0
fi
if [[ -n ${WSIMIL_KIT:-} ]]; then
  WSIMIL_BIN=${WSIMIL_BIN:-$WSIMIL_KIT/wsimil-dev.gz}
  export WSIMIL_DATA=${WSIMIL_DATA:-$WSIMIL_KIT/data}
  [[ -d $WSIMIL_KIT/transmil ]] && TRANSMIL_REPO=${TRANSMIL_REPO:-$(cd "$WSIMIL_KIT/transmil" && pwd)}
  # Pure-Python wheels import straight from their zip files.
  for whl in "$WSIMIL_KIT"/wheels/*.whl; do
    [[ -f $whl ]] && PYTHONPATH="$(cd "$(dirname "$whl")" && pwd)/$(basename "$whl")${PYTHONPATH:+:$PYTHONPATH}"
  done
  export PYTHONPATH
fi
WSIMIL=${WSIMIL_BIN:-$(./scripts/build-cuda.sh --dev)}
work=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [[ $WSIMIL == *.gz ]]; then  # the carryable copy from scripts/build-cuda.sh
  gunzip -c "$WSIMIL" >"$work/wsimil-dev" && chmod +x "$work/wsimil-dev" && WSIMIL="$work/wsimil-dev"
fi
PY=$(torch_python torch)
# cuBLAS, cuRAND, NVRTC and cudart for CUDA 13 from PyTorch's wheels, when the system has none.
if [[ -n $PY ]]; then
  libs=$("$PY" - <<'PY'
import os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
dirs = sorted({r for r, _, fs in os.walk(os.path.join(site, "nvidia")) for f in fs if f.startswith(("libcublas", "libcurand", "libnvrtc", "libcudart"))})
print(":".join(dirs))
PY
)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ldd "$WSIMIL" | grep -q 'not found'; then
  ldd "$WSIMIL" | grep 'not found' >&2
  echo "embed-gpu: the CUDA binary's libraries are missing (see above; docs/gpu.md)" >&2
  exit 1
fi
if [[ -z ${SLIDE:-} ]]; then
  export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
  SLIDE="$work/slide.svs"
  # 20x, 16384 x 16384 of real tissue: ~4,000 patches of 256 px.
  "$WSIMIL" make-slide --out "$SLIDE" --width 16384 --height 16384 --mpp 0.5
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
# First the device's kernels against the CPU's (bf16, as the embedding runs): figures from a device
# that fails them would mean nothing.
checks="device checks passed"
"$WSIMIL" check-device --device cuda >&2 || checks="DEVICE CHECKS FAILED (above)"
# Dense bf16 tensor-core peak (TFLOPS) of the GPUs we meet, from NVIDIA's data sheets.
case "$gpu" in
  *H100*PCIe*) peak=756 ;;
  *H100* | *H200* | *GH200*) peak=989 ;;
  *A100*) peak=312 ;;
  *L40S*) peak=362 ;;
  *) peak=0 ;;
esac
ARCH=resnet50-trunc
read -r w batch < <("$WSIMIL" bench-embed --embedder $ARCH --device cuda --embed-batch auto --iters 5 | awk '{print $3, $5}')
read -r n e2e < <("$WSIMIL" bench-embed --embedder $ARCH --device cuda --embed-batch "$batch" --slide "$SLIDE" | awk '{print $3, $4}')
read -r _ dec < <("$WSIMIL" bench-embed --embedder $ARCH --device cuda --embed-batch "$batch" --slide "$SLIDE" --decode-only | awk '{print $3, $4}')
echo "embed-gpu: $gpu; wsimil model alone $w img/s (batch $batch), end to end $e2e patches/s ($n patches), decode ceiling $dec patches/s on $(nproc) CPUs" >&2
p=0; macs=0; ver=""
if [[ -n $PY ]]; then
  read -r p macs < <("$PY" bench/py/embed.py --arch $ARCH --device cuda --dtype bf16 --batch "$batch" --iters 5 | awk '{print $3, $4}')
  ver=$("$PY" -c 'import torch; print(torch.__version__)')
  echo "embed-gpu: pytorch $ver model alone $p img/s (batch $batch)" >&2
else
  echo "embed-gpu: PyTorch not found: peer skipped" >&2
fi
# ViT-L/16 (UNI's architecture, random weights), bf16.
VIT=vit:vit_large_patch16_224@imagenet
read -r vw vbatch < <("$WSIMIL" bench-embed --embedder $VIT --device cuda --embed-batch auto --iters 5 | awk '{print $3, $5}')
read -r vn ve2e < <("$WSIMIL" bench-embed --embedder $VIT --device cuda --embed-batch "$vbatch" --slide "$SLIDE" | awk '{print $3, $4}')
echo "embed-gpu: $gpu; ViT-L/16 wsimil model alone $vw img/s (batch $vbatch), end to end $ve2e patches/s ($vn patches)" >&2
vp=0; vgf=0
if [[ -n $PY ]]; then
  read -r vp vgf < <("$PY" bench/py/embed_vit.py model --name vit_large_patch16_224 --device cuda --dtype bf16 --batch "$vbatch" --iters 5 | awk '{print $3, $4}')
  echo "embed-gpu: ViT-L/16 pytorch $ver (SDPA) model alone $vp img/s (batch $vbatch)" >&2
fi
tm=""
have_tm_peer=0
if [[ -n $PY && -n ${TRANSMIL_REPO:-} ]] && "$PY" -c 'import nystrom_attention' 2>/dev/null; then
  have_tm_peer=1
else
  echo "embed-gpu: official TransMIL (TRANSMIL_REPO + nystrom-attention) not found: TransMIL peer skipped" >&2
fi
for nn in 16000 50000; do
  ws=$("$WSIMIL" bench-transmil --device cuda --n $nn --steps 5 | awk '{print $3}')
  if [[ $have_tm_peer == 1 ]]; then
    ps=$("$PY" bench/py/transmil_step.py --transmil "$TRANSMIL_REPO" --device cuda --n $nn --steps 5 | awk '{print $3}')
    tm+="; transmil step N=$nn: $ws vs $ps s"
  else
    tm+="; transmil step N=$nn: wsimil $ws s"
  fi
done
# The largest bag a training step fits in on this GPU, each side: doubling from 100,000 until a
# step fails (out of memory) or takes over 120 s.
largest() {
  local ok=0 nn
  for nn in 100000 200000 400000 800000 1600000; do
    if timeout 120 "$@" --n $nn --steps 1 >/dev/null 2>&1; then ok=$nn; else break; fi
  done
  echo $ok
}
lw=$(largest "$WSIMIL" bench-transmil --device cuda)
tm+="; largest N one step fits: wsimil $lw"
if [[ $have_tm_peer == 1 ]]; then
  lp=$(largest "$PY" bench/py/transmil_step.py --transmil "$TRANSMIL_REPO" --device cuda)
  tm+=" vs pytorch $lp"
fi
echo "embed-gpu: TransMIL${tm}" >&2
python3 - "$gpu" "$peak" "$w" "$p" "$e2e" "$macs" "$batch" "$ver" "$tm" "$dec" "$(nproc)" "$checks" \
  "$vw" "$vp" "$ve2e" "$vbatch" <<'PY'
import sys
gpu, peak, w, p, e2e, macs, batch, ver, tm, dec, cpus, checks, vw, vp, ve2e, vbatch = sys.argv[1:]
peak, w, p, e2e, macs, dec = float(peak), float(w), float(p), float(e2e), float(macs), float(dec)
vw, vp, ve2e = float(vw), float(vp), float(ve2e)
VIT_GFLOP = 123.11  # ViT-L/16 at 224 px (bench/py/embed_vit.py's count)
frac = lambda r, flop: f"{100 * r * flop / (peak * 1e12):.1f}% of bf16 peak" if peak and flop else "peak unknown"
detail = (f"{gpu}, bf16 224 px; resnet50-trunc, batch {batch}: model alone {w:.0f} vs {p:.0f} img/s "
          f"({frac(w, 2 * macs)} vs {frac(p, 2 * macs)}), end to end from a slide {e2e:.0f} patches/s = "
          f"{100 * e2e / w:.0f}% of model alone; ViT-L/16 (UNI), batch {vbatch}: model alone {vw:.0f} vs {vp:.0f} img/s "
          f"({frac(vw, VIT_GFLOP * 1e9)} vs {frac(vp, VIT_GFLOP * 1e9)}), end to end {ve2e:.0f} patches/s "
          f"({100 * ve2e / 4200:.0f}% of the 4,200 patches/s for 1,000 TCGA slides in an hour); "
          f"decode ceiling on {cpus} CPUs {dec:.0f} patches/s{tm}; {checks}")
if p and vp:
    geo = ((w / p) * (vw / vp)) ** 0.5
    print(f"embed-gpu: wsimil vs pytorch {ver} = {geo:.1f}x (geometric mean of the two models alone; {detail})")
else:
    print(f"embed-gpu: wsimil {detail} (no PyTorch peer: no ratio)")
PY
