"""Per-endpoint load state: what the model server reports, and what the EPP itself sent."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ServerMetrics:
    """One scrape of a model server's ``/metrics`` (vLLM names in comments).

    Immutable: the datalayer swaps in a new object per scrape, so a scheduling cycle
    never sees half an update.
    """

    waiting: int = 0  # vllm:num_requests_waiting
    running: int = 0  # vllm:num_requests_running
    kv_cache_usage: float = 0.0  # vllm:kv_cache_usage_perc (0..1; older gpu_cache_usage_perc)
    running_loras: frozenset[str] = frozenset()  # vllm:lora_requests_info running_lora_adapters
    waiting_loras: frozenset[str] = frozenset()  # ... waiting_lora_adapters
    max_lora: int = 0  # ... max_lora
    block_size: int | None = None  # vllm:cache_config_info block_size
    num_gpu_blocks: int | None = None  # vllm:cache_config_info num_gpu_blocks
    scraped_at: float = 0.0  # time.monotonic() of the scrape; 0.0 = never scraped


@dataclass(slots=True)
class EndpointLoad:
    """Requests and prompt tokens the EPP has in flight on an endpoint (this replica
    only), from routing until the response ends. Reacts before the next scrape does."""

    requests: int = 0
    prompt_tokens: int = 0
    # Requests routed here since the last scrape landed: load the scrape cannot show yet.
    since_scrape: int = 0

    def add(self, tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += tokens
        self.since_scrape += 1

    def release(self, tokens: int) -> None:
        self.requests = max(0, self.requests - 1)
        self.prompt_tokens = max(0, self.prompt_tokens - tokens)

    def withdraw(self, tokens: int) -> None:
        """A request counted here was served elsewhere: as if it had never been added."""
        self.release(tokens)
        self.since_scrape = max(0, self.since_scrape - 1)


@dataclass(slots=True)
class EndpointState:
    """Mutable state attached to an endpoint; survives discovery re-listing it.

    ``unreachable`` is the health verdict scheduling reads: a reason while there is
    evidence the server is gone (its port refuses connections, or the gateway could not
    reach it), ``None`` otherwise. Only a successful scrape clears it, so a pod that died
    stays out until it answers again, and a false alarm lasts one scrape interval.
    """

    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    load: EndpointLoad = field(default_factory=EndpointLoad)
    scrape_error: str | None = None
    unreachable: str | None = None
    unreachable_since: float = 0.0  # time.monotonic() of the first evidence

    def update_metrics(self, metrics: ServerMetrics) -> None:
        """A fresh scrape: it now reflects what was routed before it, and the server
        answered, so it is reachable."""
        self.metrics = metrics
        self.load.since_scrape = 0
        self.scrape_error = None
        self.unreachable = None

    def report_unreachable(self, reason: str, now: float | None = None) -> bool:
        """Evidence that the server is gone; returns whether this changed the verdict."""
        if self.unreachable is not None:
            return False
        self.unreachable = reason
        self.unreachable_since = time.monotonic() if now is None else now
        return True
