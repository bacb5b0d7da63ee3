#!/usr/bin/env bash
# Everything bench/embed-gpu.sh needs on a lent GPU machine, which reaches no registry and takes at
# most 64 MiB along (`carry`), in one folder: target/gpu-kit/
#   wsimil-dev.gz    the CUDA build of wsimil-dev (scripts/build-cuda.sh --dev: the benchmarks'
#                    commands and check-device), stripped and gzipped (~24 MB)
#   data/            cmu_small_region.svs (real tissue; embed-gpu.sh makes its test slide from it) and
#                    EfficientNet-Lite0's ImageNet weights (wsimil check-device runs Lite0 with them)
#   wheels/          nystrom-attention 0.0.9 and einops 0.3.0, the versions the official TransMIL
#                    code pins (pure-Python wheels, imported straight from the zip files)
#   transmil/        models/TransMIL.py and MyOptimizer/ of the official TransMIL code, when given
#                    its checkout (work tree or git directory); never committed here
# Then, on the GPU machine (tool `run`, carry ["target/gpu-kit"]):
#   WSIMIL_KIT=target/gpu-kit bench/embed-gpu.sh
# Usage: scripts/dev/gpu-kit.sh [TRANSMIL_CHECKOUT]. Prints the kit's folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=target/gpu-kit
rm -rf "$KIT" && mkdir -p "$KIT/data" "$KIT/wheels"
bin=$(./scripts/build-cuda.sh --dev)
cp "$(dirname "$(dirname "$bin")")/wsimil-dev.gz" "$KIT/wsimil-dev.gz"
data=$(./scripts/fetch-data.sh)
cp "$data/cmu_small_region.svs" "$data/efficientnet-lite0.safetensors" "$KIT/data/"
python3 -m pip download -q --no-deps --only-binary :all: nystrom-attention==0.0.9 einops==0.3.0 -d "$KIT/wheels" >&2
if [[ -n ${1:-} ]]; then
  mkdir -p "$KIT/transmil"
  if [[ -f $1/models/TransMIL.py ]]; then
    cp -r "$1/models" "$1/MyOptimizer" "$KIT/transmil/"
  else  # a bare clone, as the tool library's fetch leaves it
    git --git-dir="$1" archive HEAD models/TransMIL.py MyOptimizer | tar -x -C "$KIT/transmil"
  fi
  # models/__init__.py pulls in the Lightning wrapper; the reference loader reads TransMIL.py alone.
  rm -f "$KIT/transmil/models/__init__.py" "$KIT/transmil/models/model_interface.py"
  [[ -f $KIT/transmil/models/TransMIL.py ]] || { echo "gpu-kit: no models/TransMIL.py in $1" >&2; exit 1; }
else
  echo "gpu-kit: no TransMIL checkout given: the GPU run will skip the TransMIL peer" >&2
fi
size=$(du -sm "$KIT" | cut -f1)
echo "gpu-kit: $size MiB in $KIT (the GPU machine takes 64 MiB)" >&2
(( size < 64 )) || { echo "gpu-kit: too big to carry" >&2; exit 1; }
echo "$KIT"
