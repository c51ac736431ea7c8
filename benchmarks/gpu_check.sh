#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (GUIDE §6), at most ~8 minutes on an H200:
#   1. build pifi_fast._C for sm_90 (no PyPI there: --no-deps, the machine's own torch),
#   2. run every `gpu`-marked test and the kernel tests on CUDA (each Triton kernel against its
#      twin in fp32/fp16/bf16, the 2x rule; the fused layer against the Hugging Face layer per
#      attention backend, padded and dense; RMSNorm and SwiGLU beyond 2^31 elements), then the
#      CPU suite's fast equivalence tests on that torch,
#   3. run the quick benchmark suite (pifi-fast bench --quick),
# writing logs, JSON and plots under $OUT. Each step runs even if an earlier one failed, and
# the exit code says whether all passed.
# Dry run on a CPU machine: GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh (tiny sizes,
# no CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
status=0
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/steps.log"; }

step "environment"
{ nvidia-smi || true; $PY -c "import torch, triton, transformers; print(torch.__version__, \
torch.version.cuda, triton.__version__, transformers.__version__)"; } > "$OUT/environment.txt" 2>&1

step "build the extension"
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  echo "dry run: build skipped" > "$OUT/build.log"
else
  $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
    || { status=1; echo "BUILD FAILED (see build.log)" | tee -a "$OUT/steps.log"; }
fi
$PY -c "import pifi_fast; from pifi_fast import _ext; print('extension', _ext.HAS_EXTENSION, \
'cuda kernels', _ext.EXTENSION_WITH_CUDA)" | tee -a "$OUT/steps.log"

$PY -m pifi_fast.cli info 2>&1 | tee -a "$OUT/steps.log"

step "gpu tests"
# (one GEMM tile config in tests: autotuning every test shape would take minutes)
PIFI_FAST_GEMM_TUNE=0 $PY -m pytest -q -ra -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" \
  -m "gpu or kernels" tests > "$OUT/gpu_tests.log" 2>&1; rc=$?
[ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1
tail -3 "$OUT/gpu_tests.log" | tee -a "$OUT/steps.log"

step "equivalence tests on this torch"
$PY -m pytest -q -ra -p no:cacheprovider tests/test_model_equivalence.py tests/test_extension.py \
  tests/test_fused_layer.py -m "not slow and not gpu" > "$OUT/equivalence_tests.log" 2>&1 \
  || status=1
tail -3 "$OUT/equivalence_tests.log" | tee -a "$OUT/steps.log"

step "quick benchmark"
SIZES=--quick
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && SIZES="--sizes tiny"
# time-boxed so the whole check fits its call: cases not started by then are marked skipped
$PY -m pifi_fast.cli bench $SIZES --time-budget "${BENCH_BUDGET_S:-270}" --out "$OUT/bench" \
  > "$OUT/bench.log" 2>&1 || status=1
tail -5 "$OUT/bench.log" | tee -a "$OUT/steps.log"
# the fused-layer targets, read off this run
[ -f "$OUT/bench/results.md" ] && sed -n '/## Targets/,$p' "$OUT/bench/results.md" \
  | tee -a "$OUT/steps.log"
step "done, status $status"
exit $status
