"""Per-endpoint load state: what the model server reports, and what the EPP itself sent."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

# Prefill-rate samples kept per endpoint, and the fewest before the rate is trusted.
PREFILL_SAMPLES = 64
PREFILL_MIN_SAMPLES = 4
# Responses whose uncached prompt is shorter than this say more about scheduling jitter
# than about prefill speed, so they are not samples.
PREFILL_MIN_TOKENS = 32


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
    only), from routing until the response ends. Reacts before the next scrape does.

    ``prefill_tokens`` is the part of it still to be prefilled: the uncached prompt
    tokens of requests routed here whose first response byte has not come back yet.
    Divided by the endpoint's prefill rate it is how long a new request would wait
    for its first token.

    ``peer_requests`` and ``peer_prefill_tokens`` are what other EPP replicas routed
    here (shared with ``--replica-sync-url``): their requests and uncached prompt tokens
    until the peer reports the request complete or the prefill estimate it sent (its
    pending TTL) passes, whichever comes first. The fields above stay this replica's own.
    """

    requests: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    # Requests routed here since the last scrape landed: load the scrape cannot show yet.
    since_scrape: int = 0
    peer_requests: int = 0
    peer_prefill_tokens: int = 0

    def add(self, tokens: int, uncached: int = 0) -> None:
        self.requests += 1
        self.prompt_tokens += tokens
        self.prefill_tokens += uncached
        self.since_scrape += 1

    @property
    def outstanding_prefill(self) -> int:
        """Uncached prompt tokens routed here and not yet prefilled: this replica's and,
        with replica sync, the other replicas'."""
        return self.prefill_tokens + self.peer_prefill_tokens

    def prefilled(self, uncached: int) -> None:
        """A request's first response bytes arrived: its prefill is done."""
        self.prefill_tokens = max(0, self.prefill_tokens - uncached)

    def release(self, tokens: int, uncached: int = 0) -> None:
        """The request ended; ``uncached``: its prefill tokens still counted here (0 once
        :meth:`prefilled` took them off)."""
        self.requests = max(0, self.requests - 1)
        self.prompt_tokens = max(0, self.prompt_tokens - tokens)
        self.prefill_tokens = max(0, self.prefill_tokens - uncached)

    def withdraw(self, tokens: int, uncached: int = 0) -> None:
        """A request counted here was served elsewhere: as if it had never been added."""
        self.release(tokens, uncached)
        self.since_scrape = max(0, self.since_scrape - 1)

    def add_peer(self, uncached: int) -> None:
        """Another replica routed a request here with ``uncached`` tokens to prefill."""
        self.peer_requests += 1
        self.peer_prefill_tokens += uncached

    def peer_prefilled(self, uncached: int) -> None:
        """That request's first bytes came: its prefill is done."""
        self.peer_prefill_tokens = max(0, self.peer_prefill_tokens - uncached)

    def release_peer(self, uncached: int) -> None:
        """That request completed, or its prefill estimate passed."""
        self.peer_requests = max(0, self.peer_requests - 1)
        self.peer_prefill_tokens = max(0, self.peer_prefill_tokens - uncached)


class PrefillRate:
    """An endpoint's prefill throughput (prompt tokens per second) learned from its own
    responses: each streamed response is a sample of ``(prompt_tokens - cached_tokens) /
    time to first token``. A time to first token also holds time spent queued behind
    other requests, so a sample under load understates the engine's speed; the estimate
    is the 90th percentile of the last ``PREFILL_SAMPLES`` samples, which follows the
    least-queued requests (what a peak throughput means) without trusting one outlier.
    """

    __slots__ = ("_samples", "_cached")

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=PREFILL_SAMPLES)
        self._cached: float | None = None

    def observe(self, uncached_tokens: int, ttft_s: float) -> None:
        """One response: ``uncached_tokens`` prefilled before the first token, which came
        ``ttft_s`` seconds after routing."""
        if uncached_tokens < PREFILL_MIN_TOKENS or not 0 < ttft_s < 3600:
            return
        self._samples.append(uncached_tokens / ttft_s)
        self._cached = None

    @property
    def samples(self) -> int:
        """How many samples the estimate rests on."""
        return len(self._samples)

    def tokens_per_s(self) -> float | None:
        """The estimate, or None until ``PREFILL_MIN_SAMPLES`` samples arrived."""
        if len(self._samples) < PREFILL_MIN_SAMPLES:
            return None
        if self._cached is None:
            ordered = sorted(self._samples)
            self._cached = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        return self._cached


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
    prefill: PrefillRate = field(default_factory=PrefillRate)
    # time.monotonic() of the last request no pod held any of that another EPP replica
    # placed here (replica sync; 0.0: none): no-hit-lru-scorer counts it as its own.
    peer_cold_pick_at: float = 0.0
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
