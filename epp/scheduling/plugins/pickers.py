"""Pickers: choose the destination (and fallbacks) from scored candidates."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import SchedulingContext


class PickerParams(PluginParams):
    """``maxNumOfEndpoints``: the destination plus fallbacks."""

    max_num_of_endpoints: int = 1


class _Picker:
    type_name = ""
    Params = PickerParams

    def __init__(self, name: str, count: int, seed: int | None) -> None:
        if count < 1:
            raise ValueError("maxNumOfEndpoints must be at least 1")
        self.name = name
        self.count = count
        self._rng = random.Random(seed)

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, params.max_num_of_endpoints, deps.seed)


class MaxScorePicker(_Picker):
    """Highest total score first; ties broken at random, so a burst of equally-scored
    requests spreads over the tied pods instead of piling onto the first."""

    type_name = "max-score-picker"

    def pick(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint],
             scores: Sequence[float]) -> list[Endpoint]:
        if self.count == 1:
            best = max(scores)
            tied = [e for e, s in zip(endpoints, scores) if s == best]
            return [tied[0] if len(tied) == 1 else self._rng.choice(tied)]
        rnd = self._rng.random
        order = sorted(range(len(endpoints)), key=lambda i: (-scores[i], rnd()))
        return [endpoints[i] for i in order[: self.count]]


class RandomPicker(_Picker):
    """Uniformly at random, ignoring scores."""

    type_name = "random-picker"

    def pick(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint],
             scores: Sequence[float]) -> list[Endpoint]:
        if self.count == 1:
            return [self._rng.choice(endpoints)]
        return self._rng.sample(list(endpoints), min(self.count, len(endpoints)))


class WeightedRandomPicker(_Picker):
    """At random with probability proportional to score (uniform when all are 0);
    several endpoints are drawn without replacement (Efraimidis-Spirakis keys)."""

    type_name = "weighted-random-picker"

    def pick(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint],
             scores: Sequence[float]) -> list[Endpoint]:
        rnd = self._rng.random
        if not any(s > 0 for s in scores):
            return RandomPicker.pick(self, ctx, endpoints, scores)  # type: ignore[arg-type]
        keys = [(rnd() ** (1.0 / s) if s > 0 else -1.0, i) for i, s in enumerate(scores)]
        keys.sort(reverse=True)
        return [endpoints[i] for k, i in keys[: self.count] if k >= 0]
