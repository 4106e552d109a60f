"""The simulated pod's ``/metrics`` page, in vLLM's names and Prometheus text format 0.0.4.

Only the series endpoint pickers read, plus a few of vLLM's counters. Labels follow vLLM:
``model_name`` (the first served name) and ``engine`` ("0": one engine per sim pod).
Series vLLM has no name for are ``epp_sim_*``: the pod's P/D role and its P/D counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from epp.sim.config import SimConfig
from epp.sim.disagg import PDStats
from epp.sim.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM keeps every label set of vllm:lora_requests_info it ever set (each with the time
# it was last current); the sim keeps the most recent few, enough to make readers pick
# the newest by value rather than by position.
LORA_SERIES_KEPT = 8

Clock = Callable[[], float]
# Writes one metric family: (name, help, samples as (extra labels, value)).
_Writer = Callable[[str, str, Iterable[tuple[str, float]]], None]


class MetricsPage:
    """Renders one engine's state as vLLM's ``/metrics`` page."""

    def __init__(self, config: SimConfig, engine: Engine, *, clock: Clock = time.time,
                 pd_stats: PDStats | None = None) -> None:
        self._engine = engine
        self._clock = clock
        self._pd_stats = pd_stats if pd_stats is not None else PDStats()
        self._role = config.role
        self._labels = _labels(model_name=config.default_model, engine="0")
        self._lora_enabled = bool(config.lora_names)
        self._max_loras = config.max_loras
        self._cache_config = _labels(
            block_size=str(config.block_size),
            cache_dtype="auto",
            enable_prefix_caching=str(config.enable_prefix_caching),
            engine="0",
            gpu_memory_utilization="0.9",
            num_cpu_blocks=str(config.cpu_offload_blocks or None),
            num_gpu_blocks=str(config.num_gpu_blocks),
            num_gpu_blocks_override="None",
        )
        # (running adapters, waiting adapters) -> when that set was last current
        self._lora_series: dict[tuple[str, str], float] = {}

    def render(self) -> bytes:
        """The page for the engine's state now."""
        stats = self._engine.stats
        out: list[str] = []
        gauge = self._family_writer(out, "gauge")
        counter = self._family_writer(out, "counter")
        # A request whose prefill has not started yet waits, as in vLLM's scheduler.
        queued = stats.queued_for_prefill
        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              [("", stats.running - queued)])
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              [("", stats.waiting + queued)])
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              [("", self._engine.kv_cache_usage)])
        counter("vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                [("", stats.prefix_cache_queries)])
        counter("vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                [("", stats.prefix_cache_hits)])
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                [("", stats.prompt_tokens_total)])
        counter("vllm:generation_tokens", "Number of generation tokens processed.",
                [("", stats.generation_tokens_total)])
        completed = stats.requests_finished - stats.requests_aborted
        counter("vllm:request_success", "Count of successfully processed requests.", [
            (',finished_reason="stop"', 0),
            (',finished_reason="length"', completed),  # the sim always hits max_tokens
            (',finished_reason="abort"', stats.requests_aborted),
        ])
        if self._lora_enabled:
            self._render_lora(out)
        self._render_pd(gauge, counter)
        out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n")
        out.append("# TYPE vllm:cache_config_info gauge\n")
        out.append(f"vllm:cache_config_info{{{self._cache_config}}} 1.0\n")
        return "".join(out).encode()

    def _family_writer(self, out: list[str], kind: str) -> _Writer:
        """A function writing one family; each sample is (extra labels, value)."""
        suffix = "_total" if kind == "counter" else ""

        def write(name: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            for extra, value in samples:
                out.append(f"{name}{suffix}{{{self._labels}{extra}}} {float(value)!r}\n")

        return write

    def _render_pd(self, gauge: _Writer, counter: _Writer) -> None:
        pd, stats = self._pd_stats, self._engine.stats
        gauge("epp_sim_info", "The simulated pod's P/D role (prefill, decode or both).",
              [(f',role="{self._role}"', 1)])
        counter("epp_sim_remote_prefills",
                "Prompts with x-prefiller-host-port, by who prefilled them in the end.", [
                    (',outcome="remote"', pd.remote_prefills),
                    (',outcome="fallback"', pd.prefill_fallbacks),
                ])
        counter("epp_sim_prefills_for_remote_decode",
                "Prefill requests answered with kv_transfer_params for a decode pod.",
                [("", pd.prefills_for_remote_decode)])
        counter("epp_sim_kv_transfer_tokens",
                "Prompt tokens whose KV came from a prefill pod instead of being computed.",
                [("", stats.kv_transfer_tokens)])

    def _render_lora(self, out: list[str]) -> None:
        running, waiting = self._engine.lora_adapters()
        key = (",".join(sorted(running)), ",".join(sorted(waiting)))
        latest = max(self._lora_series.values(), default=0.0)
        # Strictly increasing, so the current set is the unique largest value.
        self._lora_series.pop(key, None)
        self._lora_series[key] = max(self._clock(), latest + 1e-6)
        while len(self._lora_series) > LORA_SERIES_KEPT:
            del self._lora_series[next(iter(self._lora_series))]
        out.append("# HELP vllm:lora_requests_info Running stats on lora requests.\n")
        out.append("# TYPE vllm:lora_requests_info gauge\n")
        for (run, wait), stamp in self._lora_series.items():
            labels = _labels(max_lora=str(self._max_loras), running_lora_adapters=run,
                             waiting_lora_adapters=wait)
            out.append(f"vllm:lora_requests_info{{{labels}}} {stamp!r}\n")


def _labels(**labels: str) -> str:
    return ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
