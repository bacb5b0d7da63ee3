#!/usr/bin/env bash
# The whole test suite on a fresh machine: install what the tests need (libopenslide, OpenBLAS, the real
# data, nats-server and SeaweedFS for the distributed tests), then build and run every test of the
# workspace in one cargo invocation. The tests start their own servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
WSIMIL_TOOLS=$(dirname "$(./scripts/fetch-tools.sh)")
export WSIMIL_TOOLS
# Debian's chromium renders report.html in the browser test (headless).
if ! command -v chromium >/dev/null; then
  echo "test: installing chromium" >&2
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  }
fi
# Each stage says what it cost (CI's log shows where its time goes).
took() { echo "test: $1 took $((SECONDS - t0)) s" >&2; t0=$SECONDS; }
t0=$SECONDS
cargo fmt --all -- --check
# Lints of every crate and target, as a warning-free build requires (a check build: ~5 min on 2
# cores the first time, seconds after).
cargo clippy --workspace --all-targets -- -D warnings
took clippy
# The cuda feature must keep compiling: type-checked with CUDA 13 from PyPI (no GPU needed).
# WSIMIL_SKIP_CUDA_CHECK=1 skips it (local iterations).
[[ -n ${WSIMIL_SKIP_CUDA_CHECK:-} ]] || ./scripts/build-cuda.sh --check
took "the cuda type-check"
# OpenBLAS's kernels and the thread pools set as wsimil's loader would, before the test binaries
# start: no test thread then writes the environment.
BLAS_ENV_THREADS=1 source scripts/blas-env.sh
cargo test --workspace --no-fail-fast "$@"
took "building and running the tests"
