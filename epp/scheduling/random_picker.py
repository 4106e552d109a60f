"""Uniform random choice among candidates (the pre-framework picker)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint


class RandomScheduler:
    """Picks ``count`` distinct endpoints uniformly at random (primary first)."""

    def __init__(self, count: int = 1, seed: int | None = None) -> None:
        if count < 1:
            raise ValueError("endpoint count must be at least 1")
        self._count = count
        self._rng = random.Random(seed)

    def schedule(
        self, request: LLMRequest | None, candidates: Sequence[Endpoint]
    ) -> Sequence[Endpoint]:
        """Return up to ``count`` endpoints in random order."""
        if len(candidates) <= 1 or self._count == 1:
            return (self._rng.choice(candidates),) if candidates else ()
        return self._rng.sample(list(candidates), min(self._count, len(candidates)))
