"""``prefix-cache-affinity-filter``: llm-d's "sticky until saturated" gate.

Keeps only the endpoints that already hold most of the prompt (the sticky ones), so the
scorers after it spread load *within* the warm set instead of trading cache hits against
load point by point. Stickiness yields to saturation: when the best sticky endpoint's
estimated time to first token exceeds the best other endpoint's by more than
``maxTTFTPenaltyMs``, nothing is filtered.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from epp.datastore import Endpoint
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.scheduling.plugins.inflight import TTFTEstimator, inflight_tokens
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import SchedulingContext

log = logging.getLogger(__name__)

# llm-d's defaults (pkg/epp/framework/plugins/scheduling/filter/prefixcacheaffinity).
DEFAULT_AFFINITY_THRESHOLD = 0.80
# 18 s: raised upstream from 5 s so that stickiness breaks only under real saturation.
DEFAULT_MAX_TTFT_PENALTY_MS = 18000.0
TTFT_SOURCES = ("prefillThroughput", "latencyPredictor")


def prefix_share(match: PrefixMatch | None, e: Endpoint) -> float:
    """The share of the prompt ``e`` holds: cached tokens / prompt tokens (0 without a
    match). llm-d divides matched by total blocks; counting tokens also charges the
    partial last block, which no engine can hold."""
    if match is None or match.prompt_tokens <= 0:
        return 0.0
    return match.cached_tokens(e.name) / match.prompt_tokens


class PrefixCacheAffinityParams(PluginParams):
    """llm-d's parameters, with its names and defaults; ``peakPrefillThroughput`` unset
    means each endpoint's learned rate (llm-d's default is a fixed 15928 tokens/s)."""

    affinity_threshold: float = DEFAULT_AFFINITY_THRESHOLD
    exploration_probability: float = 0.0
    max_ttft_penalty_ms: float = msgspec.field(default=DEFAULT_MAX_TTFT_PENALTY_MS,
                                               name="maxTTFTPenaltyMs")
    ttft_source: str = "prefillThroughput"
    peak_prefill_throughput: float | None = None
    # llm-d's earlier in-flight-token gate (0: off), still written by published guides.
    max_tokens_in_flight_penalty: int = 0
    # Which producer's data to read. Here every consumer reads the request's one prefix
    # match and the director's in-flight accounting; the names are accepted as given.
    prefix_match_info_producer_name: str = ""
    latency_prediction_info_producer_name: str = ""
    in_flight_load_producer_name: str = ""


class PrefixCacheAffinityFilter:
    """Keep endpoints whose prefix share is at least ``affinityThreshold``.

    All candidates are kept when: there is at most one, the threshold is <= 0, none is
    sticky, the exploration draw (``explorationProbability``) says so, or a load gate
    breaks: the best sticky endpoint's estimated TTFT (see :class:`TTFTEstimator`) is
    more than ``maxTTFTPenaltyMs`` above the best non-sticky one's (0: never breaks), or
    its in-flight tokens are more than ``maxTokensInFlightPenalty`` above (0: off).
    """

    type_name = "prefix-cache-affinity-filter"
    Params = PrefixCacheAffinityParams

    def __init__(self, name: str, *, affinity_threshold: float = DEFAULT_AFFINITY_THRESHOLD,
                 exploration_probability: float = 0.0,
                 max_ttft_penalty_ms: float = DEFAULT_MAX_TTFT_PENALTY_MS,
                 peak_prefill_throughput: float | None = None,
                 max_tokens_in_flight_penalty: int = 0, seed: int | None = None) -> None:
        if affinity_threshold > 1.0:
            raise ValueError(f"affinityThreshold must be <= 1.0, got {affinity_threshold}")
        if not 0.0 <= exploration_probability <= 1.0:
            raise ValueError("explorationProbability must be in [0, 1], got "
                             f"{exploration_probability}")
        if max_ttft_penalty_ms < 0:
            raise ValueError(f"maxTTFTPenaltyMs must be >= 0, got {max_ttft_penalty_ms}")
        if max_tokens_in_flight_penalty < 0:
            raise ValueError("maxTokensInFlightPenalty must be >= 0, got "
                             f"{max_tokens_in_flight_penalty}")
        if peak_prefill_throughput is not None and peak_prefill_throughput < 0:
            raise ValueError("peakPrefillThroughput must be >= 0, got "
                             f"{peak_prefill_throughput}")
        if peak_prefill_throughput == 0 and max_ttft_penalty_ms > 0:
            raise ValueError("peakPrefillThroughput must be > 0 when ttftSource is "
                             "prefillThroughput (leave it out to use each endpoint's "
                             "learned prefill rate)")
        self.name = name
        self.threshold = affinity_threshold
        self.exploration = exploration_probability
        self.max_ttft_penalty_ms = max_ttft_penalty_ms
        self.max_tokens_penalty = max_tokens_in_flight_penalty
        self.ttft = TTFTEstimator(peak_prefill_throughput or None)
        self._rng = random.Random(seed)

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        p: PrefixCacheAffinityParams = params
        if p.ttft_source not in TTFT_SOURCES:
            raise ValueError(f"ttftSource must be {' or '.join(map(repr, TTFT_SOURCES))}, "
                             f"got {p.ttft_source!r}")
        if p.ttft_source == "latencyPredictor":
            raise ValueError("ttftSource: latencyPredictor is not implemented here (there is "
                             "no latency predictor); use prefillThroughput")
        return cls(name, affinity_threshold=p.affinity_threshold,
                   exploration_probability=p.exploration_probability,
                   max_ttft_penalty_ms=p.max_ttft_penalty_ms,
                   peak_prefill_throughput=p.peak_prefill_throughput,
                   max_tokens_in_flight_penalty=p.max_tokens_in_flight_penalty, seed=deps.seed)

    def filter(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        if len(endpoints) <= 1 or self.threshold <= 0:
            return list(endpoints)
        if self.exploration > 0 and self._rng.random() < self.exploration:
            return list(endpoints)
        match: PrefixMatch | None = ctx.cycle.get(PREFIX_MATCH_KEY)
        sticky: list[Endpoint] = []
        others: list[Endpoint] = []
        for e in endpoints:
            (sticky if prefix_share(match, e) >= self.threshold else others).append(e)
        if not sticky or not others:
            return list(endpoints)
        if self.max_ttft_penalty_ms > 0:
            ttft = self.ttft.ttft_ms(ctx, [*sticky, *others])
            best_sticky, best_other = min(ttft[:len(sticky)]), min(ttft[len(sticky):])
            if best_sticky - best_other > self.max_ttft_penalty_ms:
                log.debug("%s: sticky endpoints saturated (estimated TTFT %.0f ms against "
                          "%.0f ms); keeping all %d", self.name, best_sticky, best_other,
                          len(endpoints))
                return list(endpoints)
        if self.max_tokens_penalty > 0:
            gap = (min(map(inflight_tokens, sticky)) - min(map(inflight_tokens, others)))
            if gap > self.max_tokens_penalty:
                return list(endpoints)
        return sticky
