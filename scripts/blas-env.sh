# Sourced, not run: the OpenBLAS and thread settings wsimil's loader would set
# (common::models::blas::prepare_env, the same CPU-feature rule), exported where unset. Debian 12's
# OpenBLAS (0.3.21) does not recognise recent Xeons and falls back to SSE3 "Prescott" kernels, 5-7x
# slower; OPENBLAS_CORETYPE must be in the environment before the library loads. The test command
# exports them before the test binaries start, so that no test thread writes the environment
# (prepare_env writes only what is unset); the benchmarks give the peers the same kernels.
_blas_cpu_has() { for f in "$@"; do grep -qw "$f" /proc/cpuinfo 2>/dev/null || return 1; done; }
if [[ -z ${OPENBLAS_CORETYPE:-} ]]; then
  if _blas_cpu_has avx512f avx512bw avx512dq avx512vl fma; then
    export OPENBLAS_CORETYPE=SkylakeX
  elif _blas_cpu_has avx2 fma; then
    export OPENBLAS_CORETYPE=Haswell
  fi
fi
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
# The thread pools only where asked (the test command): a benchmark that pins wsimil to one core
# leaves them to wsimil, which reads its own CPU set.
if [[ -n ${BLAS_ENV_THREADS:-} ]]; then
  _blas_cores=$(nproc 2>/dev/null || echo 1)
  export CANDLE_NUM_THREADS=${CANDLE_NUM_THREADS:-$_blas_cores}
  export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$_blas_cores}
  unset _blas_cores
fi
