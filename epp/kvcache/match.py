"""The prefix match: computed once per request by a producer, read by scorers, the
P/D decider, metrics and the accuracy check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.kvcache.index import EndpointMatch

# The key under which producers store the match in the scheduling context's cycle state.
PREFIX_MATCH_KEY = "prefix-match"

_NO_MATCH = EndpointMatch(0, 0)


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of one request's prompt each candidate already holds.

    ``precise`` matches come from engine KV events over exact tokens; approximate ones
    from routing history over character blocks (token counts are then estimates).
    """

    precise: bool
    prompt_tokens: int
    block_size: int
    total_blocks: int
    matches: dict[str, EndpointMatch] = field(default_factory=dict)
    # The request's block keys (approximate: to record routing; precise: pending picks and
    # corrections of the index).
    keys: Sequence[int] = ()

    def of(self, endpoint: str) -> EndpointMatch:
        """The match of one endpoint (empty when unknown)."""
        return self.matches.get(endpoint, _NO_MATCH)

    def cached_tokens(self, endpoint: str) -> int:
        """Prompt tokens the endpoint should not need to prefill: what it holds, and what
        requests routed there before this one will have stored (pending blocks)."""
        return min(self.of(endpoint).expected_blocks * self.block_size, self.prompt_tokens)

    def uncached_tokens(self, endpoint: str) -> int:
        """Prompt tokens the endpoint would have to prefill."""
        return self.prompt_tokens - self.cached_tokens(endpoint)

    def _engine_limit(self) -> int:
        # Whole blocks, and never the whole prompt (the last token is always recomputed
        # to produce logits).
        return (self.prompt_tokens - 1) // self.block_size * self.block_size

    def predicted_engine_cached(self, endpoint: str) -> int:
        """What vLLM should report as ``cached_tokens`` from what the engine confirmed
        holding (pending blocks never count)."""
        if self.prompt_tokens == 0:
            return 0
        return min(self.of(endpoint).blocks * self.block_size, self._engine_limit())

    def expected_engine_cached(self, endpoint: str) -> int:
        """The same, if every pending block the endpoint was credited gets stored first."""
        if self.prompt_tokens == 0:
            return 0
        return min(self.of(endpoint).expected_blocks * self.block_size, self._engine_limit())

    def prediction_error(self, endpoint: str, engine_cached: int) -> int:
        """The engine's ``cached_tokens`` minus the nearest predicted value, between what
        the engine confirmed holding and that plus the pending blocks: pending blocks
        never count as held, but an engine that holds them is what they predicted."""
        confirmed = self.predicted_engine_cached(endpoint)
        expected = self.expected_engine_cached(endpoint)
        return engine_cached - min(max(engine_cached, confirmed), expected)

    def prediction_outcome(self, endpoint: str, engine_cached: int) -> str:
        """``over`` (the index credited a block or more the engine did not hold),
        ``under`` (the engine held a block or more that neither its events nor the
        pending picks account for), ``pending`` (more than confirmed, as the pending
        picks predicted) or ``exact``."""
        error = self.prediction_error(endpoint, engine_cached)
        if error <= -self.block_size:
            return "over"
        if error >= self.block_size:
            return "under"
        if engine_cached - self.predicted_engine_cached(endpoint) >= self.block_size:
            return "pending"
        return "exact"
