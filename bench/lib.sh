# Shared by the benchmarks: build the wsimil binary once and find a PyTorch for the peer side.
# shellcheck shell=bash

# Build `wsimil` and `wsimil-dev` (the benchmarks' own commands) in one cargo invocation (debug
# profile: what the tests and the demo use) and set WSIMIL and WSIMIL_DEV to their paths.
wsimil_bins() {
  local dir
  # WSIMIL_BIN_DIR: binaries built (and copied) earlier, so a long bench runs on a frozen build while
  # the tree is edited and rebuilt beside it.
  if [[ -n ${WSIMIL_BIN_DIR:-} ]]; then
    WSIMIL=$WSIMIL_BIN_DIR/wsimil
    WSIMIL_DEV=$WSIMIL_BIN_DIR/wsimil-dev
    [[ -x $WSIMIL && -x $WSIMIL_DEV ]] || { echo "WSIMIL_BIN_DIR=$WSIMIL_BIN_DIR lacks wsimil or wsimil-dev" >&2; return 1; }
    return 0
  fi
  cargo build -q -p wsimil-coordinator --bin wsimil -p wsimil-dev --bin wsimil-dev
  dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
  WSIMIL=$dir/wsimil
  WSIMIL_DEV=$dir/wsimil-dev
}

# small_lesion_cohort DIR SLIDES SEED: the ICMIL benches' cohort (bench/icmil-rounds.sh's header
# says why these settings): small faint lesions, at most 2 per positive slide, 3 staining sites.
# SITE_FOLDS=1: the manifest names each slide's site, so the folds are stratified by it.
small_lesion_cohort() {
  local site_column=()
  [[ ${SITE_FOLDS:-0} == 1 ]] && site_column=(--site-column)
  "$WSIMIL" demo-cohort --out "$1" --slides "$2" --seed "$3" --radius 120,220 --max-regions 2 --opacity 0.7 \
    --sites 3 "${site_column[@]}" >/dev/null
}

# The peers at their best: Debian 12's OpenBLAS (0.3.21; PyTorch's matmuls go through it) does not
# recognise recent Xeons and falls back to SSE3 "Prescott" kernels, 5-7x slower. wsimil picks the
# kernels from the CPU's features itself (common::models::blas::prepare_env); give the peers the
# same, by the same rule (scripts/blas-env.sh, checked against the loader's by a test).
source scripts/blas-env.sh

# Prefix that pins a command to one core (empty where taskset is missing).
ONE_CORE=""
command -v taskset >/dev/null && ONE_CORE="taskset -c 0"

# Print a python that imports every module named in "$@", or nothing: PyTorch as users install it
# first (PyPI's current wheel, the venv of scripts/dev/pypi-torch-env.sh), then Debian's PyTorch
# (scripts/dev/torch-env.sh), then the system's python3.
torch_python() {
  local mods
  mods=$(IFS=,; echo "$*")
  local tools="${WSIMIL_TOOLS:-$HOME/.cache/wsimil/tools}"
  for p in "$tools/pypi-torch-venv/bin/python" "$tools/torch-venv/bin/python" python3; do
    if "$p" -c "import $mods" 2>/dev/null; then echo "$p"; return; fi
  done
}

# Start SeaweedFS's S3 server (`weed mini`, from scripts/fetch-tools.sh) on free loopback ports with
# the benchmarks' credentials; sets S3_ENDPOINT and exports AWS_*. The caller's EXIT trap should
# call stop_s3. Fails (returns 1) where the tool cannot be fetched.
start_s3() {
  local bin ports dir
  bin=$(./scripts/fetch-tools.sh 2>/dev/null) || return 1
  [[ -x $bin/weed ]] || return 1
  dir=$(mktemp -d "${TMPDIR:-/tmp}/wsimil-bench-s3.XXXXXX")
  # Seven free ports in 20000-29999 whose +10000 (weed's gRPC ports) are free too.
  ports=$(python3 - <<'PY'
import random, socket
def free(p):
    try:
        with socket.socket() as s: s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
out = []
while len(out) < 7:
    p = random.randint(20000, 29999)
    if p not in out and free(p) and free(p + 10000): out.append(p)
print(" ".join(map(str, out)))
PY
)
  read -r -a P <<<"$ports"
  export AWS_ACCESS_KEY_ID=wsimil-bench AWS_SECRET_ACCESS_KEY=wsimil-bench-secret AWS_REGION=us-east-1
  "$bin/weed" mini -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -webdav=false \
    -admin.ui=false -master.port="${P[0]}" -volume.port="${P[1]}" -filer.port="${P[2]}" -s3.port="${P[3]}" \
    -admin.port="${P[4]}" -s3.port.iceberg="${P[5]}" -debug.port="${P[6]}" >"$dir/weed.log" 2>&1 &
  S3_PID=$!
  S3_DIR=$dir
  S3_ENDPOINT="http://127.0.0.1:${P[3]}"
  for _ in $(seq 300); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', ${P[3]}), 1)" 2>/dev/null; then return 0; fi
    kill -0 "$S3_PID" 2>/dev/null || break
    sleep 0.2
  done
  echo "weed mini did not start: $(tail -3 "$dir/weed.log")" >&2
  stop_s3
  return 1
}

stop_s3() {
  [[ -n ${S3_PID:-} ]] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
  [[ -n ${S3_DIR:-} ]] && rm -rf "$S3_DIR"
  S3_PID=""
  S3_DIR=""
}
