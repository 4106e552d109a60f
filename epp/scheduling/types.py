"""The scheduling framework's vocabulary: context, results, and plugin Protocols.

A scheduling cycle runs profiles chosen by a ProfileHandler. Each profile filters the
candidates, sums weighted scores (each clamped to [0, 1]) and lets its Picker choose.
Plugins are plain classes with a ``type_name`` (the config ``type``) and a ``name``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint


@dataclass(slots=True)
class SchedulingContext:
    """Everything a plugin may read about one request.

    ``cycle`` is scratch space for data producers (e.g. a prefix match computed once
    and read by several scorers); keys are producer names.
    """

    request: LLMRequest | None
    headers: Mapping[str, str]
    now: float
    priority: int = 0
    cycle: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The requested model, or '' for requests without a body."""
        return self.request.model if self.request is not None else ""


@dataclass(slots=True)
class ProfileResult:
    """What one profile chose: endpoints (best first) and the final score of each
    candidate that survived the filters."""

    endpoints: list[Endpoint]
    plugin_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    candidates: int = 0
    error: str | None = None  # why the profile chose nothing
    # The candidates that survived the filters and their total scores, in the same order
    # (kept on every cycle: two list references).
    scored: Sequence[Endpoint] = ()
    totals: Sequence[float] = ()

    @property
    def scores(self) -> dict[str, float]:
        """Each scored candidate's total, by endpoint name."""
        return {e.name: v for e, v in zip(self.scored, self.totals)}


@dataclass(slots=True)
class SchedulingResult:
    """The outcome of a cycle: per-profile results and which profile is primary."""

    profiles: dict[str, ProfileResult]
    primary: str

    @property
    def endpoints(self) -> list[Endpoint]:
        """The primary profile's endpoints: the destination, then fallbacks."""
        return self.profiles[self.primary].endpoints


@dataclass(slots=True)
class HeaderChanges:
    """Request-header changes pre-request hooks ask for (applied by the gateway)."""

    set: dict[str, str] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


@runtime_checkable
class Filter(Protocol):
    """Removes candidates that must not serve the request."""

    type_name: str
    name: str

    def filter(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[Endpoint]: ...


@runtime_checkable
class Scorer(Protocol):
    """Scores candidates in [0, 1] (higher is better), aligned with ``endpoints``."""

    type_name: str
    name: str

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> Sequence[float]: ...


@runtime_checkable
class Picker(Protocol):
    """Chooses the destination (and fallbacks) from scored candidates."""

    type_name: str
    name: str

    def pick(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint],
             scores: Sequence[float]) -> list[Endpoint]: ...


@runtime_checkable
class ProfileHandler(Protocol):
    """Chooses which profiles run, and which result is primary."""

    type_name: str
    name: str

    def pick_profiles(self, ctx: SchedulingContext, profiles: Sequence[str],
                      results: Mapping[str, ProfileResult]) -> list[str]: ...

    def primary(self, ctx: SchedulingContext, results: Mapping[str, ProfileResult]) -> str: ...

    def validate_profiles(self, profiles: Sequence[str]) -> str | None: ...
