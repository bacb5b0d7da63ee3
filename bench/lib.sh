# Shared by the benchmarks: build the wsimil binary once and find a PyTorch for the peer side.
# shellcheck shell=bash

# Build `wsimil` and `wsimil-dev` (the benchmarks' own commands) in one cargo invocation (debug
# profile: what the tests and the demo use) and set WSIMIL and WSIMIL_DEV to their paths.
wsimil_bins() {
  cargo build -q -p wsimil-coordinator --bin wsimil -p wsimil-dev --bin wsimil-dev
  local dir
  dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
  WSIMIL=$dir/wsimil
  WSIMIL_DEV=$dir/wsimil-dev
}

# The peers at their best: Debian 12's OpenBLAS (0.3.21; PyTorch's matmuls go through it) does not
# recognise recent Xeons and falls back to SSE3 "Prescott" kernels, 5-7x slower. wsimil picks the
# kernels from the CPU's features itself (common::models::blas::prepare_env: the same rule as here);
# give the peers the same.
cpu_has() { for f in "$@"; do grep -qw "$f" /proc/cpuinfo 2>/dev/null || return 1; done; }
if [[ -z ${OPENBLAS_CORETYPE:-} ]]; then
  if cpu_has avx512f avx512bw avx512dq avx512vl; then
    export OPENBLAS_CORETYPE=SkylakeX
  elif cpu_has avx2 fma; then
    export OPENBLAS_CORETYPE=Haswell
  fi
fi

# Prefix that pins a command to one core (empty where taskset is missing).
ONE_CORE=""
command -v taskset >/dev/null && ONE_CORE="taskset -c 0"

# Print a python that imports every module named in "$@" (the torch venv of scripts/dev/torch-env.sh
# first), or nothing.
torch_python() {
  local mods
  mods=$(IFS=,; echo "$*")
  for p in "${WSIMIL_TOOLS:-$HOME/.cache/wsimil/tools}/torch-venv/bin/python" python3; do
    if "$p" -c "import $mods" 2>/dev/null; then echo "$p"; return; fi
  done
}
