#!/usr/bin/env bash
# A CUDA 13.0 toolkit for building wsimil's `cuda` feature on a machine with no GPU and no system
# CUDA: nvcc, cicc, the headers and the libraries candle links, all from NVIDIA's PyPI wheels, laid
# out as one CUDA root in a cache folder outside git. Idempotent.
#
#   scripts/cuda-toolkit.sh            # compiler + headers (enough for `cargo check --features cuda`)
#   scripts/cuda-toolkit.sh --libs     # also cuBLAS, cuRAND, NVRTC, cudart and a libcuda stub (to link)
#
# Prints a file of `export` lines to source before cargo (CUDA_ROOT, PATH, CUDA_COMPUTE_CAP, ...).
# The libcuda stub only satisfies the linker: the real driver is found at run time on the GPU
# machine (see docs/gpu.md).
set -euo pipefail
ROOT=${WSIMIL_CUDA:-${XDG_CACHE_HOME:-$HOME/.cache}/wsimil/cuda13}
PY=${PYTHON:-python3}
CAP=${CUDA_COMPUTE_CAP:-90}
LIBS=0
[[ "${1:-}" == "--libs" ]] && LIBS=1

COMPILER=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 "nvidia-cuda-cccl==13.0.*"
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88)
LINK=(nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.5.25)

install() {
  local pkg=$1 stamp
  stamp="$ROOT/.stamps/$(echo "$pkg" | tr -c 'A-Za-z0-9.=_-' _)"
  [[ -e "$stamp" ]] && return
  echo "cuda-toolkit: downloading $pkg" >&2
  local dl
  dl=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: "$pkg" -d "$dl" >&2
  for whl in "$dl"/*.whl; do
    (cd "$ROOT/wheels" && unzip -q -o "$whl" 'nvidia/*')
  done
  rm -rf "$dl"
  mkdir -p "$ROOT/.stamps" && touch "$stamp"
}

mkdir -p "$ROOT/wheels"
PKGS=("${COMPILER[@]}")
((LIBS)) && PKGS+=("${LINK[@]}")
for p in "${PKGS[@]}"; do install "$p"; done

CU="$ROOT/wheels/nvidia/cu13"
[[ -x "$CU/bin/nvcc" ]] || { echo "cuda-toolkit: no nvcc under $CU/bin after unpacking" >&2; exit 1; }
chmod +x "$CU"/bin/* "$CU"/nvvm/bin/* 2>/dev/null || true
# nvcc looks for cicc and libdevice under $CUDA_ROOT/nvvm; the wheels put them there already.
if ((LIBS)); then
  # Unversioned names for the linker, beside the versioned ones the wheels ship.
  for so in "$CU"/lib/lib*.so.[0-9]*; do
    base=${so##*/}
    link="$CU/lib/${base%%.so.*}.so"
    [[ -e "$link" ]] || ln -s "$base" "$link"
  done
  # No libcuda on PyPI: an empty shared object with the driver's soname, recorded as needed. The
  # libcuda.so.1 name lets build scripts (linked with the same flags) start here; never put this
  # folder on LD_LIBRARY_PATH on a GPU machine, it would hide the driver.
  if [[ ! -e "$CU/lib/stubs/libcuda.so.1" ]]; then
    mkdir -p "$CU/lib/stubs"
    echo "" | ${CC:-cc} -x c -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" -
    ln -sf libcuda.so "$CU/lib/stubs/libcuda.so.1"
  fi
fi

ENV="$ROOT/env.sh"
cat >"$ENV" <<EOF
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU"
export PATH="$CU/bin:$CU/nvvm/bin:\$PATH"
export CUDA_COMPUTE_CAP=$CAP
export LD_LIBRARY_PATH="$CU/lib:$CU/lib/stubs:\${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$CU/lib:$CU/lib/stubs:\${LIBRARY_PATH:-}"
EOF
echo "$ENV"
