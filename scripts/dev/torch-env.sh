#!/usr/bin/env bash
# PyTorch on this machine, for the dev parity scripts and the benchmarks' PyTorch side (never needed
# by the build or the tests): Debian's python3-torch (CPU), python3-openslide and PIL (the end-to-end
# embedding peer), and a venv beside it with
# nystrom-attention 0.0.9 / einops 0.3.0, the versions the official TransMIL code pins.
# Prints the venv's python.
set -euo pipefail
VENV="${WSIMIL_TOOLS:-$HOME/.cache/wsimil/tools}/torch-venv"
if ! /usr/bin/python3 -c 'import torch, openslide, PIL' 2>/dev/null; then
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y --no-install-recommends python3-torch python3-numpy python3-openslide python3-pil >&2
fi
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import nystrom_attention' 2>/dev/null; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV" >&2
  "$VENV/bin/pip" install -q --no-deps nystrom-attention==0.0.9 einops==0.3.0 >&2
fi
echo "$VENV/bin/python"
