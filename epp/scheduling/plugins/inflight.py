"""In-flight load: llm-d's ``inflight-load-producer``, and the numbers its consumers read.

llm-d's producer keeps two counters per endpoint: requests in flight (until the response
ends) and in-flight tokens, the *uncached* prompt tokens of each request routed there,
held until the first response chunk (prefill done). Its consumers (``token-load-scorer``,
the TTFT gate of ``prefix-cache-affinity-filter``) also read the tokens the request being
scheduled would add on each endpoint: its prompt minus what that endpoint has cached.

The director here keeps exactly those counters for every routed request, whether or not
the config names this plugin: ``EndpointLoad.prefill_tokens`` (uncached prompt tokens,
until the first response bytes) and ``EndpointLoad.requests``. So the plugin computes
nothing per request. What it is:

- the one definition of llm-d's quantities on top of that accounting
  (:func:`inflight_tokens`, :func:`inflight_requests`, :func:`request_tokens`,
  :class:`TTFTEstimator`), which ``token-load-scorer``, ``prefix-cache-affinity-filter``
  and the session-affinity plugins read;
- the config entry llm-d's guides list: accepted with llm-d's parameters and validated
  like llm-d validates them. A parameter that would change the numbers, which this
  accounting cannot honour, is refused by name instead of being ignored
  (``addEstimatedOutputTokens: true``).

Known differences: the tokens include other replicas' (``peer_prefill_tokens``) only
when replicas share their routing over NATS (``--replica-sync-url``); the request
counts stay this replica's own; ``syncCrossReplicaState`` has no effect (the sharing is
the EPP's, not the plugin's); and with P/D disaggregation only the primary (decode)
endpoint carries the request's load, where llm-d also counts the prefill pod until its
first chunk.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import SchedulingContext

# llm-d's default peak prefill throughput (tokens/s): calibrated upstream for Qwen3-32B on
# 2x H100 80 GB (TP=2), vLLM 0.19, as the prefill rate of one unloaded chunk of
# max_num_batched_tokens (8192) tokens. Used only where nothing better is known: no
# ``peakPrefillThroughput`` configured and no endpoint has a learned rate yet.
DEFAULT_PEAK_PREFILL_THROUGHPUT = 15928.0


def inflight_tokens(e: Endpoint) -> int:
    """llm-d's ``InFlightLoad.Tokens``: uncached prompt tokens routed to ``e`` whose
    prefill has not finished (``EndpointLoad.outstanding_prefill``). This EPP's own count
    until the response's first bytes, plus, with ``--replica-sync-url``, what the other
    EPP replicas routed there, each until that replica reports its first bytes or
    completion, or its prefill estimate (the pending TTL it sent) passes; without
    replica sync the peer part is 0."""
    return e.state.load.outstanding_prefill


def inflight_requests(e: Endpoint) -> int:
    """llm-d's ``InFlightLoad.Requests``: requests routed to ``e`` still in flight."""
    return e.state.load.requests


def request_tokens(ctx: SchedulingContext, e: Endpoint) -> int:
    """llm-d's ``UncachedRequestTokens``: what this request would add to ``e``'s in-flight
    tokens, its prompt minus the prefix ``e`` holds (the director counts the same number
    when the request is routed there). Without a prefix match: the whole prompt, as an
    estimate of about 4 characters a token."""
    match: PrefixMatch | None = ctx.cycle.get(PREFIX_MATCH_KEY)
    if match is not None:
        return match.uncached_tokens(e.name)
    return ctx.request.estimated_tokens() if ctx.request is not None else 0


class TTFTEstimator:
    """Estimated time to first token of a request on each endpoint, in milliseconds:

        (inflight_tokens(e) + request_tokens(ctx, e)) / rate(e) * 1000

    that is, the prefill work queued on the endpoint plus this request's own uncached
    prompt, at the endpoint's prefill rate. ``rate(e)`` is ``peak`` when configured (llm-d's
    ``peakPrefillThroughput``, one number for every endpoint); otherwise the endpoint's own
    rate learned from its streamed responses (``e.state.prefill.tokens_per_s()``). An
    endpoint without enough samples yet gets the median learned rate of the endpoints it
    is compared with (same pool, most likely the same hardware and model), and when none
    has one, :data:`DEFAULT_PEAK_PREFILL_THROUGHPUT`.

    llm-d's estimate counts in-flight tokens only; adding this request's uncached tokens
    is what lets an endpoint's cache hit count in its favour.
    """

    __slots__ = ("peak",)

    def __init__(self, peak: float | None) -> None:
        if peak is not None and not peak > 0:
            raise ValueError("peakPrefillThroughput must be > 0")
        self.peak = peak

    def rates(self, endpoints: Sequence[Endpoint]) -> list[float]:
        """The prefill rate (tokens/s) used for each endpoint."""
        if self.peak is not None:
            return [self.peak] * len(endpoints)
        learned = [e.state.prefill.tokens_per_s() for e in endpoints]
        known = [r for r in learned if r is not None and r > 0]
        fallback = statistics.median(known) if known else DEFAULT_PEAK_PREFILL_THROUGHPUT
        return [r if r is not None and r > 0 else fallback for r in learned]

    def ttft_ms(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        """The estimate for each endpoint, aligned with ``endpoints``."""
        return [(inflight_tokens(e) + request_tokens(ctx, e)) / rate * 1000.0
                for e, rate in zip(endpoints, self.rates(endpoints))]


class InflightLoadParams(PluginParams):
    """llm-d's parameters of ``inflight-load-producer``."""

    add_estimated_output_tokens: bool = False
    output_ratio: float | None = None
    max_estimated_output_tokens: int | None = None
    prefix_match_info_producer_name: str = ""
    sync_cross_replica_state: bool | None = None


class InflightLoadProducer:
    """``inflight-load-producer``: names the director's in-flight accounting in a config.

    Every llm-d parameter is accepted and checked as llm-d checks it. What each means here:
    ``addEstimatedOutputTokens`` must stay false (in-flight tokens are prompt tokens
    until prefill ends; output estimates are not counted, so ``true`` is refused rather
    than silently dropped); ``outputRatio`` and ``maxEstimatedOutputTokens`` only apply
    with it, and are validated; ``prefixMatchInfoProducerName`` names whose match
    discounts the cached prefix: here always the request's one prefix match (the
    precise one when there is one); ``syncCrossReplicaState`` has no effect, as in llm-d
    without a cross-replica syncer.
    """

    type_name = "inflight-load-producer"
    Params = InflightLoadParams
    config_only = True  # names the director's accounting; never placed in a profile

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        p: InflightLoadParams = params
        if p.output_ratio is not None and p.output_ratio < 0:
            raise ValueError(f"outputRatio must be non-negative, got {p.output_ratio}")
        if p.max_estimated_output_tokens is not None and p.max_estimated_output_tokens < 0:
            raise ValueError("maxEstimatedOutputTokens must be non-negative, got "
                             f"{p.max_estimated_output_tokens}")
        if p.add_estimated_output_tokens:
            raise ValueError(
                "addEstimatedOutputTokens: true is not supported here: in-flight tokens are "
                "the uncached prompt tokens of each request until its first response bytes "
                "(llm-d's default); estimated output tokens are not counted. Remove it")
        return cls(name)
