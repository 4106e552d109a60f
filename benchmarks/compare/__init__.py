"""Routers compared on one simulated fleet: ours (Envoy + EPP, four profiles), Envoy
round-robin, vllm-router, sglang-router and an oracle, on the same workloads
(``benchmarks.workloads``). ``python -m benchmarks.compare``; see benchmarks/README.md.

Modules: ``plan`` (fleet, workloads, rates), ``fleet`` (the pods and the oracle),
``routers`` (launchers), ``client`` (the open-loop load generator), ``metrics`` (figures
and CPU accounting), ``run`` (the loop over routers and cells), ``inference_perf`` (the
shared-prefix workload through inference-perf), ``report`` (markdown) and ``plots``
(PNGs, run with the peers' venv).
"""
