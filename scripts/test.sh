#!/usr/bin/env bash
# The whole test suite on a fresh machine: install what the tests need (libopenslide, the real
# data), then build and run every test of the workspace in one cargo invocation.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
export WSIMIL_DATA=${WSIMIL_DATA:-$(./scripts/fetch-data.sh)}
cargo fmt --all -- --check
cargo test --workspace --no-fail-fast "$@"
