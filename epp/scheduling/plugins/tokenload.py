"""``token-load-scorer``: llm-d's scorer of in-flight prefill work.

``score = 1 - min(1, tokens / queueThresholdTokens)`` (1.0 with no tokens), where
``tokens`` is the endpoint's in-flight tokens plus what this request would add there
(its prompt minus the prefix the endpoint holds); see :mod:`.inflight` for how both map
onto the director's per-endpoint accounting. Unlike the queue scorers it needs no
scrape: it reacts to every request this EPP routes, the moment it routes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.plugins.inflight import inflight_tokens, request_tokens
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import SchedulingContext

# llm-d's default: 128 requests of 32K tokens each (4 Mi tokens).
DEFAULT_QUEUE_THRESHOLD_TOKENS = 4_194_304


class TokenLoadParams(PluginParams):
    """llm-d's parameters. ``inFlightLoadProducerName`` is accepted as given: there is
    one in-flight account per endpoint here."""

    queue_threshold_tokens: int = DEFAULT_QUEUE_THRESHOLD_TOKENS
    in_flight_load_producer_name: str = ""


class TokenLoadScorer:
    """Fewer in-flight tokens (counting this request's uncached ones) scores higher,
    linearly from 1.0 at none to 0.0 at ``queueThresholdTokens`` and beyond."""

    type_name = "token-load-scorer"
    Params = TokenLoadParams

    def __init__(self, name: str,
                 queue_threshold_tokens: int = DEFAULT_QUEUE_THRESHOLD_TOKENS) -> None:
        if queue_threshold_tokens < 1:
            raise ValueError(f"queueThresholdTokens must be at least 1, got "
                             f"{queue_threshold_tokens}")
        self.name = name
        self.threshold = queue_threshold_tokens

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, params.queue_threshold_tokens)

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold
        out = []
        for e in endpoints:
            tokens = inflight_tokens(e) + request_tokens(ctx, e)
            out.append(1.0 if tokens <= 0 else 1.0 - min(tokens, t) / t)
        return out
