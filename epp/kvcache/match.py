"""The prefix match: computed once per request by a producer, read by scorers, the
P/D decider, metrics and the accuracy check."""

from __future__ import annotations

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
    keys: tuple[int, ...] = ()  # the request's block keys (kept by approximate matches)

    def of(self, endpoint: str) -> EndpointMatch:
        """The match of one endpoint (empty when unknown)."""
        return self.matches.get(endpoint, _NO_MATCH)

    def cached_tokens(self, endpoint: str) -> int:
        """Prompt tokens the endpoint should not need to prefill."""
        return min(self.of(endpoint).blocks * self.block_size, self.prompt_tokens)

    def uncached_tokens(self, endpoint: str) -> int:
        """Prompt tokens the endpoint would have to prefill."""
        return self.prompt_tokens - self.cached_tokens(endpoint)

    def predicted_engine_cached(self, endpoint: str) -> int:
        """What vLLM should report as ``cached_tokens``: whole blocks, and never the
        whole prompt (the last token is always recomputed to produce logits)."""
        if self.prompt_tokens == 0:
            return 0
        limit = (self.prompt_tokens - 1) // self.block_size * self.block_size
        return min(self.of(endpoint).blocks * self.block_size, limit)
