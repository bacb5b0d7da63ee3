#!/usr/bin/env bash
# Install what wsimil needs on a fresh Debian/Ubuntu machine: the OpenSlide and OpenBLAS libraries
# (both loaded at run time; OpenBLAS for the CPU convolutions, see common/src/models/blas.rs) and the
# real data of the demo and tests. Idempotent.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

want=()
# Read once: `ldconfig -p | grep -q` under pipefail fails when grep stops reading early.
libs=$(ldconfig -p 2>/dev/null || true)
grep -q 'libopenslide\.so\.[01]' <<<"$libs" || want+=(libopenslide0)
grep -q 'libopenblas\.so\.0' <<<"$libs" || want+=(libopenblas0-pthread)
if ((${#want[@]})); then
  echo "setup: installing ${want[*]}" >&2
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q "${want[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q "${want[@]}" >/dev/null
  }
fi

"$HERE/fetch-data.sh"
