#!/usr/bin/env bash
# The `cuda` build of wsimil, on a machine with or without a GPU: CUDA 13.0 comes from PyPI
# (scripts/cuda-toolkit.sh), candle's kernels are compiled by nvcc for CUDA_COMPUTE_CAP (default 90:
# H100/H200).
#
#   scripts/build-cuda.sh           # release binary in target/cuda/release/wsimil (prints its path)
#                                   # and a stripped, gzipped copy to carry: target/cuda/wsimil.gz
#   scripts/build-cuda.sh --dev     # the same for wsimil-dev (benchmarks; it has check-device too):
#                                   # what the GPU kit carries (scripts/dev/gpu-kit.sh)
#   scripts/build-cuda.sh --check   # type-check every target with the cuda feature (what CI runs)
#
# The binary links cuBLAS, cuRAND, NVRTC and cudart by soname and the driver (libcuda.so.1) through
# a stub: on the GPU machine they come from its driver and its PyTorch (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --check)
    # shellcheck disable=SC1090
    source "$(./scripts/cuda-toolkit.sh)"
    # Same target folder as the tests: build-script outputs (ring, zstd) are shared.
    cargo check -q --workspace --all-targets --features wsimil-coordinator/cuda,wsimil-dev/cuda
    echo "build-cuda: the cuda feature type-checks (kernels compiled for sm_$CUDA_COMPUTE_CAP)" >&2
    ;;
  "" | --dev)
    if [[ ${1:-} == --dev ]]; then pkg=wsimil-dev; else pkg=wsimil-coordinator; fi
    bin=${pkg/-coordinator/}
    # shellcheck disable=SC1090
    source "$(./scripts/cuda-toolkit.sh --libs)"
    # The driver's symbols resolve at run time on the GPU machine; --no-as-needed keeps the stub's
    # soname (libcuda.so.1) recorded.
    export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,--no-as-needed -C link-arg=-lcuda -C link-arg=-Wl,--as-needed -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files"
    CARGO_TARGET_DIR=target/cuda cargo build -q --release -p "$pkg" --bin "$bin" --features cuda
    # The binary is ~95 MB (candle's kernels are inside); stripped and gzipped it is ~24 MB, small
    # enough to carry to a machine that cannot build (bench/embed-gpu.sh unpacks it).
    strip -o "target/cuda/$bin" "target/cuda/release/$bin"
    gzip -f -9 "target/cuda/$bin"
    echo "build-cuda: carryable copy in $PWD/target/cuda/$bin.gz" >&2
    echo "$PWD/target/cuda/release/$bin"
    ;;
  *)
    echo "usage: scripts/build-cuda.sh [--dev|--check]" >&2
    exit 2
    ;;
esac
