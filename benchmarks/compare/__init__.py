"""Routers compared on one simulated fleet: ours (Envoy + EPP; the headline is the
built-in default with KV events, plus any config file given with ``--epp-config``, each
as one or more replicas, with ``--replica-sync`` also sharing routing over NATS), Envoy
round-robin, vllm-router, sglang-router and an oracle, on the same workloads
(``benchmarks.workloads``). ``python -m benchmarks.compare``; see benchmarks/README.md.

Modules: ``options`` (the command line), ``plan`` (fleet, workloads, rates), ``fleet``
(the pods and the oracle), ``routers`` (launchers), ``replica_sync`` (the synced rows'
NATS server), ``client`` (the open-loop load generator), ``metrics`` (figures, CPU
accounting, the routers' /metrics), ``run`` (the loop over routers and cells),
``inference_perf`` (the shared-prefix workload through inference-perf), ``goals`` (this
round's goals), ``report`` (markdown) and ``plots`` (PNGs, run with the peers' venv).
"""
