#!/usr/bin/env bash
# Install what wsimil needs on a fresh Debian/Ubuntu machine: the OpenSlide library (loaded at run
# time) and the real data of the demo and tests. Idempotent.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

if ! ldconfig -p 2>/dev/null | grep -q 'libopenslide\.so\.[01]'; then
  echo "setup: installing libopenslide" >&2
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q libopenslide0 >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q libopenslide0 >/dev/null
  }
fi

"$HERE/fetch-data.sh"
