"""What routing and responses teach the block index, as request hooks of the precise
prefix cache:

- **pending picks** (pre-request): the chosen endpoint will store the request's blocks
  by the end of its prefill, so they enter the index as pending there for about that
  long, and sibling requests follow them before the engine's events could;
- **failed requests** (response complete): a request that got no response, or an error,
  takes its pending blocks back;
- **routing history** (pre-request): where each prompt's text went, for the fallback
  match used when a request's tokens do not come in time (see
  :data:`FALLBACK_MAX_BLOCKS`);
- **corrections** (response complete): the engine's ``cached_tokens`` shows what it
  really held. Fewer than the index credited means the index kept blocks the engine
  had evicted (a lost ``BlockRemoved``): those keys are dropped for that endpoint. More
  than even the pending picks explain means a ``BlockStored`` was lost: the endpoint's
  event stream is asked for a full replay (rate-limited by the stream).

The hooks take the scheduling context and result duck-typed: this package sits below
scheduling and does not import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from epp.datastore import EndpointState
from epp.kvcache.index import BlockIndex, PendingPick
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.kvcache.producer import ApproximateProducer

log = logging.getLogger(__name__)

# Cycle-state keys: the pending pick a request made, and the endpoint that served it
# (set by the director before response-complete hooks run).
PENDING_PICK_KEY = "kv-pending-pick"
SERVED_ENDPOINT_KEY = "served-endpoint"

# Pending TTL = factor x the expected time to the end of the request's prefill (the
# endpoint's outstanding prefill tokens and this request's, at its learned prefill rate)
# + slack for the engine's event to arrive, within [min, max]. Until a rate is learned
# (a few streamed responses), DEFAULT_PENDING_TTL_S: what llm-d, Dynamo and SGLang's
# gateway use as their fixed TTL.
PENDING_TTL_FACTOR = 1.5
PENDING_TTL_SLACK_S = 0.25
MIN_PENDING_TTL_S = 0.5
MAX_PENDING_TTL_S = 30.0
DEFAULT_PENDING_TTL_S = 2.0
# The fallback match hashes at most this many 64-character blocks of a prompt's text
# (~4k characters, ~1k tokens): enough to tell tenants' system prompts and
# conversations apart, at a few tens of microseconds per request.
FALLBACK_MAX_BLOCKS = 64
FALLBACK_NAME = "precise-fallback-match"


def fallback_producer() -> ApproximateProducer:
    """The routing-history match a precise prefix cache falls back to when a request's
    tokens miss the prefix deadline (a slow or unreachable tokenizer source)."""
    return ApproximateProducer(max_blocks=FALLBACK_MAX_BLOCKS, name=FALLBACK_NAME,
                               fallback_only=True)


def endpoint_pending_ttl(state: EndpointState, uncached_tokens: int) -> float:
    """:func:`pending_ttl` of a request with ``uncached_tokens`` sent to the endpoint with
    ``state``: behind its outstanding prefill, at its learned rate."""
    return pending_ttl(state.load.outstanding_prefill, uncached_tokens,
                       state.prefill.tokens_per_s())


def pending_ttl(outstanding_tokens: int, uncached_tokens: int,
                tokens_per_s: float | None) -> float:
    """How long a pick stays pending: the prefill it waits for, with margin."""
    if not tokens_per_s or tokens_per_s <= 0:
        return DEFAULT_PENDING_TTL_S
    expected = (max(0, outstanding_tokens) + max(0, uncached_tokens)) / tokens_per_s
    return min(MAX_PENDING_TTL_S,
               max(MIN_PENDING_TTL_S, PENDING_TTL_FACTOR * expected + PENDING_TTL_SLACK_S))


@dataclass(slots=True)
class FeedbackCounts:
    """Corrections made (exported as metrics)."""

    evicted_corrections: int = 0  # responses that showed the index credited evicted blocks
    lost_store_signals: int = 0  # responses that showed more than the index knew
    resyncs_requested: int = 0  # of those, replays the event stream agreed to run


class IndexFeedback:
    """Pre-request and response-complete hook of the precise prefix cache."""

    name = "kv-index-feedback"

    def __init__(self, index: BlockIndex, *, pending: bool = True,
                 resync: Callable[[str], bool] | None = None,
                 fallback: ApproximateProducer | None = None) -> None:
        self.index = index
        self.pending = pending
        self._resync = resync
        self.fallback = fallback
        self.counts = FeedbackCounts()

    def pre_request(self, ctx: Any, result: Any, headers: Any) -> None:
        """Record where the prompt's text went (for the fallback match); enter the
        request's blocks as pending on the endpoint it goes to."""
        if self.fallback is not None and result.endpoints and ctx.request is not None \
                and ctx.request.prompt is not None:
            self.fallback.history.record(result.endpoints[0].name,
                                         self.fallback.keys(ctx.request))
        if not self.pending:
            return
        match = _precise(ctx.cycle)
        if match is None or not match.keys or not result.endpoints:
            return
        if _disaggregated(result):
            return  # the decode pod receives KV from the prefill pod, not by prefilling
        primary = result.endpoints[0]
        ttl = endpoint_pending_ttl(primary.state, match.uncached_tokens(primary.name))
        ctx.cycle[PENDING_PICK_KEY] = self.index.add_pending(primary.name, match.keys, ttl)

    def response_complete(self, ctx: Any, result: Any, status: int, usage: Any) -> None:
        """Take back a failed request's pending blocks; correct the index from usage."""
        cycle: dict[str, Any] = ctx.cycle
        pick: PendingPick | None = cycle.get(PENDING_PICK_KEY)
        served: str | None = cycle.get(SERVED_ENDPOINT_KEY)
        if pick is not None and pick.keys and (status == 0 or status >= 400
                                               or served != pick.endpoint):
            # No prefill happened there (no answer, an error, or another endpoint served).
            self.index.drop_pending(pick)
        if status != 200 or usage is None or served is None:
            return
        engine = getattr(usage, "cached_tokens", None)
        match = _precise(cycle)
        if engine is None or match is None or _disaggregated(result):
            return
        self.correct(match, served, engine)

    def correct(self, match: PrefixMatch, endpoint: str, engine_cached: int) -> None:
        """Compare the engine's ``cached_tokens`` with what the index predicted."""
        outcome = match.prediction_outcome(endpoint, engine_cached)
        if outcome == "over":
            # The engine held fewer blocks than credited: from the first block it lacked
            # to the last credited one, the index is wrong about this endpoint.
            bs = match.block_size
            first = max(0, engine_cached) // bs
            last = match.predicted_engine_cached(endpoint) // bs
            if self.index.forget(endpoint, match.keys[first:last]):
                self.counts.evicted_corrections += 1
        elif outcome == "under":
            self.counts.lost_store_signals += 1
            if self._resync is not None and self._resync(endpoint):
                self.counts.resyncs_requested += 1
                log.info("kv index: %s reported %d cached tokens, %d more than its events "
                         "account for; replaying its events", endpoint, engine_cached,
                         engine_cached - match.expected_engine_cached(endpoint))


def _precise(cycle: Mapping[str, Any]) -> PrefixMatch | None:
    match = cycle.get(PREFIX_MATCH_KEY)
    return match if isinstance(match, PrefixMatch) and match.precise else None


def _disaggregated(result: Any) -> bool:
    """Whether a profile other than the primary chose endpoints (a prefill pod)."""
    return any(r.endpoints for name, r in result.profiles.items() if name != result.primary)
