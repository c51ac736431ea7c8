#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (docs/development.md). At most GPU_CHECK_BUDGET_S
# seconds (default 510: 8.5 minutes, build included), a one-screen summary at the end, and at
# most 8 files in $OUT, none deeper than $OUT/file:
#   summary.txt            what passed, what failed, the fused-layer targets, the GEMM picks
#   logs.txt               every step's full log, one after the other
#   kernels.md/.json       the kernel compile report for sm_90a (what the tables promise)
#   autotuner_picks.json   the GEMM autotuner's pick per launch on this GPU vs the table
#   bench.json/.md         the quick benchmark suite, time-boxed
#   bench_speedup.png      its speed-up plot
# Steps, each time-boxed so the whole fits: wheels -> build (sm_90a) -> gpu + kernel tests ->
# compile report -> quick bench -> autotuner picks -> CPU equivalence tests on this torch.
# Every step runs even if an earlier one failed; the exit code says whether all passed.
# The bench measures first the rows its targets read (pifi-fast bench --time-budget).
#
# GPU_CHECK_FOCUS=step: issue 10's whole PiFi step instead (the W4 targets: train step, CUDA-graph
# inference, QA step), with these files in $OUT:
#   summary.txt, logs.txt  as above
#   bench.json/.md         the W4 rows of the quick suite (the targets' rows first)
#   breakdown.md/.json/.png  where a training step's time goes on this GPU
# Steps: wheels -> build -> the step's GPU tests (tests/test_gpu_step.py, the compiled /
# CUDA-graph model tests and FSDP's one-process bf16 step) -> W4 bench -> step breakdown; no compile report, autotuner or CPU tests.
#
#   bash benchmarks/gpu_check.sh --prepare   on the CPU machine: the Python 3.12 wheels the GPU
#                                            image lacks (liger-kernel) into .whl/ (git-ignored
#                                            via .git/info/exclude; pass carry=[".whl"])
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   the CPU dry run: no build, tiny bench,
#                                            tests/test_gpu_step.py run on the CPU
#   make test-gpu-image                      the tests these paths depend on, on the CPU under
#                                            the GPU image's torch / transformers / triton
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && PY=.venv/bin/python

WHEELS="liger-kernel==0.8.5"  # pure Python; the GPU image has torch, triton, transformers
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $WHEELS
  ls -la .whl
  exit $?
fi

BUDGET=${GPU_CHECK_BUDGET_S:-510}
START=$(date +%s)
DRY=${GPU_CHECK_DRY_RUN:-0}
FOCUS=${GPU_CHECK_FOCUS:-layer}
case "$FOCUS" in layer|step) ;; *) echo "GPU_CHECK_FOCUS must be layer or step, got $FOCUS"; exit 2;; esac
# the dry run runs the GPU test modules that allow it (CPU_DRY_RUN) on the CPU
[ "$DRY" = 1 ] && export PIFI_FAST_GPU_DRY_RUN=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/logs.txt"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
[ -d /usr/local/cuda ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
failed=()

elapsed() { echo $(( $(date +%s) - START )); }
# seconds a step may take: at most $1, and no more than leaves $2 seconds for the steps after it
cap() { local l=$(( BUDGET - $(elapsed) - $2 )); [ "$l" -lt "$1" ] && echo $(( l > 5 ? l : 5 )) || echo "$1"; }
say() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS COMMAND...: run it time-boxed, its output into logs.txt, one line of result
step() {
  local name=$1 secs=$2; shift 2
  local t0; t0=$(date +%s)
  { echo; echo "======== $name (limit ${secs}s, at $(elapsed)s) ========"; } >> "$LOG"
  timeout --kill-after=10 "$secs" "$@" > "$WORK/step.log" 2>&1
  local rc=$?
  cat "$WORK/step.log" >> "$LOG"
  local verdict="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT after ${secs}s"; fi
  if [ "$rc" -ne 0 ] && [ "$verdict" = ok ]; then verdict="FAILED (exit $rc)"; fi
  if [ "$verdict" != ok ]; then status=1; failed+=("$name"); fi
  say "$(printf '%-34s %-22s %4ss  %s' "$name" "$verdict" $(( $(date +%s) - t0 )) \
    "$(grep -E 'passed|failed|error|wrote|configurations' "$WORK/step.log" | tail -1 | cut -c1-90)")"
  return $rc
}

say "pifi_fast GPU check ($FOCUS), $(date -u +%FT%TZ), budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', DRY RUN on CPU')"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  $PY -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], \
'| torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, \
'| transformers', transformers.__version__)"; } 2>&1 | tee -a "$SUMMARY"

if ls .whl/*.whl > /dev/null 2>&1; then
  step "wheels (.whl)" 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "wheels: none in .whl/ (run --prepare and carry .whl): the Liger row will be skipped"
fi

if [ "$DRY" = 1 ]; then
  say "build: skipped in the dry run"
else
  step "build pifi_fast._C ($TORCH_CUDA_ARCH_LIST)" "$(cap 200 330)" \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi
$PY -m pifi_fast.cli info >> "$LOG" 2>&1
grep -E "compiled extension|CUDA device|attention backends|projections" "$LOG" | tail -6 | tee -a "$SUMMARY"

if [ "$FOCUS" = step ]; then
  # the paths the W4 rows time, checked against eager PiFi on this GPU before any speed counts
  step "step tests (gpu)" "$(cap 150 300)" env PIFI_FAST_GEMM_TUNE=0 \
    $PY -m pytest -q -ra -p no:cacheprovider tests/test_gpu_step.py \
    "tests/test_fused_layer.py::test_torch_compile_of_a_pifi_model_on_gpu" \
    "tests/test_fused_layer.py::test_cuda_graph_inference_replays_eager_outputs_on_gpu" \
    "tests/test_fsdp.py::test_a_sharded_model_steps_as_the_plain_one_in_one_process"

  SIZES=--quick
  [ "$DRY" = 1 ] && SIZES="--sizes tiny"
  BENCH_S=$(( $(cap 330 100) - 20 ))
  # (the epoch rows are a session of their own; the 8-bit rows run last, as time allows)
  step "W4 benchmark (${BENCH_S}s budget)" $(( BENCH_S + 60 )) \
    $PY -m pifi_fast.cli bench $SIZES --workloads W4 --time-budget "$BENCH_S" \
    --skip "sst2 epoch" --out "$WORK/bench"
  cp "$WORK/bench/results.json" "$OUT/bench.json" 2>/dev/null
  cp "$WORK/bench/results.md" "$OUT/bench.md" 2>/dev/null

  PAIRS="bert-base+llama-3.1-8b minilm+smollm2"
  [ "$DRY" = 1 ] && PAIRS=tiny
  # (building the BERT-base + 8B-shaped pair takes ~30 s of CPU; the timed steps are short)
  step "step breakdown" "$(cap 90 5)" \
    $PY -m pifi_fast.cli breakdown --pairs $PAIRS --out "$WORK/breakdown"
  cp "$WORK/breakdown/breakdown."{md,json,png} "$OUT/" 2>/dev/null
else
  # (one GEMM tile in tests, the table's first: autotuning every test shape would take minutes;
  # the whole step's GPU tests are the step focus's)
  step "gpu + kernel tests" "$(cap 200 260)" env PIFI_FAST_GEMM_TUNE=0 \
    $PY -m pytest -q -ra -p no:cacheprovider -m "(gpu or kernels) and not compile" tests \
    --ignore tests/test_gpu_step.py

  # sm_90a has 772 configurations (~400 CPU-seconds of Triton + ptxas: ~30 s on the GPU machine's
  # 16 cores); the CPU dry run compiles only the dequantizing GEMM's bf16 slice to prove the step
  KERNEL_SLICE=""
  [ "$DRY" = 1 ] && KERNEL_SLICE="--dtypes bf16 --only dq_gemm_fwd.int8"
  step "kernel compile report (sm_90a)" "$(cap 90 200)" \
    $PY -m pifi_fast.cli kernels --targets sm_90a $KERNEL_SLICE --out "$WORK/kernels"
  cp "$WORK/kernels/kernels.md" "$WORK/kernels/kernels.json" "$OUT/" 2>/dev/null

  SIZES=--quick
  [ "$DRY" = 1 ] && SIZES="--sizes tiny"
  BENCH_S=$(( $(cap 300 110) - 20 ))
  # (the one-epoch W4 rows take minutes each: a session of their own; a case still running at
  # the step's limit is stopped by timeout's SIGTERM and the rows measured so far are written)
  step "quick benchmark (${BENCH_S}s budget)" $(( BENCH_S + 60 )) \
    $PY -m pifi_fast.cli bench $SIZES --time-budget "$BENCH_S" --skip "sst2 epoch" \
    --out "$WORK/bench"
  cp "$WORK/bench/results.json" "$OUT/bench.json" 2>/dev/null
  cp "$WORK/bench/results.md" "$OUT/bench.md" 2>/dev/null
  cp "$WORK/bench/speedup_vs_tokens.png" "$OUT/bench_speedup.png" 2>/dev/null

  if [ "$DRY" = 1 ]; then
    say "autotuner picks: skipped in the dry run (needs a GPU)"
  else
    step "GEMM autotuner picks" "$(cap 90 60)" \
      $PY -m pifi_fast.cli kernels --tuned --out "$WORK/kernels"
    cp "$WORK/kernels/autotuner_picks.json" "$OUT/" 2>/dev/null
  fi

  XDIST=""
  $PY -c "import xdist" 2> /dev/null && XDIST="-n 8"
  step "CPU equivalence tests on this torch" "$(cap 150 5)" \
    $PY -m pytest -q -ra -p no:cacheprovider $XDIST tests/test_model_equivalence.py \
    tests/test_extension.py tests/test_fused_layer.py tests/test_mixed_precision.py \
    -m "not slow and not gpu"
fi

say ""
if [ -f "$OUT/bench.md" ]; then  # the targets tables: the fused layer's (layer), the step's
  FROM='## Targets'
  [ "$FOCUS" = step ] && FROM='## Targets of the whole step'
  sed -n "/$FROM/,\$p" "$OUT/bench.md" | grep -v '^$' | head -26 | tee -a "$SUMMARY"
fi
if [ -f "$OUT/breakdown.md" ]; then
  cat "$OUT/breakdown.md" | tee -a "$SUMMARY"
fi
if [ -f "$OUT/autotuner_picks.json" ]; then
  $PY - "$OUT/autotuner_picks.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
picks = json.load(open(sys.argv[1]))
same = sum(bool(p.get("same")) for p in picks if p.get("pick"))
print(f"GEMM autotuner: {same}/{sum(1 for p in picks if p.get('pick'))} picks equal the table's "
      "first tile")
for p in picks:
    if p.get("pick") and not p.get("same"):
        print(f"  {p['launch']} M={p['rows']}: picked {p['pick']} (table first: {p['table_first']})")
EOF
fi
say ""
say "files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
say "done in $(elapsed)s of ${BUDGET}s, status $status${failed:+ (failed: ${failed[*]})}"
rm -rf "$WORK"
exit $status
