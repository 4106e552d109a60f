"""epp-sim: an asyncio stand-in for one vLLM pod (OpenAI API, deterministic output).

Layers: ``config`` (settings), ``engine`` (request-processing and batch/queue model),
``timeline`` (prefill chunks on the accelerator and how they delay decode steps),
``kvcache`` (the prefix cache the engine keeps), ``prompts`` (tokenizers: prompt -> token
ids), ``parsing`` and ``formatting`` (OpenAI wire format), ``metrics`` (vLLM's
``/metrics`` page), ``kv_events`` (vLLM's ZMQ KV events), ``disagg`` (prefill/decode
disaggregation: llm-d's sidecar on decode pods, ``kv_transfer_params`` on prefill pods),
``cache_routes`` (render, reset and the benchmarks' prefix-lookup endpoints), ``server``
(aiohttp routes), ``cli`` and ``profiles`` (timings and capacities per GPU type, YAML).
"""

from epp.sim.config import SimConfig
from epp.sim.engine import Completion, Engine, GenerationRequest
from epp.sim.metrics import MetricsPage
from epp.sim.server import build_app, run

__all__ = [
    "Completion", "Engine", "GenerationRequest", "MetricsPage", "SimConfig", "build_app", "run",
]
