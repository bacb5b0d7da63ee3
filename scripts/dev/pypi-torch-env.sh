#!/usr/bin/env bash
# PyTorch as users install it, for the fixture makers and the benchmarks' peers (never needed by the
# build, the tests or CI): PyPI's current torch wheel (it pulls the CUDA libraries, ~3 GB, and runs
# on the CPU), torchvision, timm, transformers and safetensors (the ViT publishers' libraries),
# openslide-python with openslide-bin (the peers' slide reader), h5py (CLAM's feature files), and the official TransMIL code's
# pins of nystrom-attention (0.0.9) and einops (0.3.0), and einops-exts (CONCH v1.5's code in TRIDENT). A venv in the tools cache; prints its python.
#
# Versions are pinned to what the fixtures and figures were made with; PYPI_TORCH_LATEST=1 takes the
# newest of each instead.
set -euo pipefail
VENV="${WSIMIL_TOOLS:-$HOME/.cache/wsimil/tools}/pypi-torch-venv"
PKGS=(torch==2.15.0 torchvision==0.29.2 timm==1.0.31 transformers==5.24.0 safetensors==0.8.0
  pillow==13.0.0 numpy==2.4.6 openslide-python==1.4.7 openslide-bin==4.0.1.2 ftfy==6.3.1 regex==2026.11.19
  h5py==3.16.0)
if [[ -n ${PYPI_TORCH_LATEST:-} ]]; then PKGS=("${PKGS[@]%%==*}"); fi
if ! "$VENV/bin/python" -c 'import torch, timm, transformers, safetensors, openslide, nystrom_attention, h5py, einops_exts' 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "${PKGS[@]}" >&2
  "$VENV/bin/pip" install -q --no-deps nystrom-attention==0.0.9 einops==0.3.0 einops-exts==0.0.4 >&2
fi
echo "$VENV/bin/python"
