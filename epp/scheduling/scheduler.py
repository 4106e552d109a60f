"""The profile loop. The framework, not the plugins, measures each plugin call."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epp.datastore import Endpoint
from epp.scheduling.types import (
    Filter,
    Picker,
    ProfileHandler,
    ProfileResult,
    SchedulingContext,
    SchedulingResult,
    Scorer,
)

# (extension point, plugin type, plugin name, seconds) -> None
PluginTimer = Callable[[str, str, str, float], None]


def _no_timer(point: str, plugin_type: str, name: str, seconds: float) -> None:
    return None


class NoCandidatesError(Exception):
    """A profile's filters removed every candidate."""

    def __init__(self, profile: str, filter_name: str, message: str | None = None) -> None:
        super().__init__(message or
                         f"profile {profile!r}: filter {filter_name!r} removed every endpoint")
        self.profile = profile
        self.filter_name = filter_name

    @classmethod
    def from_result(cls, profile: str, error: str | None) -> NoCandidatesError:
        """Re-raise a failure recorded in a profile result."""
        return cls(profile, "", error or f"profile {profile!r} chose no endpoint")


@dataclass(slots=True)
class WeightedScorer:
    """A scorer and its weight in one profile."""

    scorer: Scorer
    weight: float


class SchedulerProfile:
    """filters in order -> weighted scorers (each clamped to [0, 1]) -> picker."""

    def __init__(self, name: str, filters: Sequence[Filter], scorers: Sequence[WeightedScorer],
                 picker: Picker) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    def run(self, ctx: SchedulingContext, candidates: Sequence[Endpoint], timer: PluginTimer,
            explain: bool = False) -> ProfileResult:
        """Run the profile; raises :class:`NoCandidatesError` when nothing survives."""
        clock = time.perf_counter
        endpoints: Sequence[Endpoint] = candidates
        for f in self.filters:
            t0 = clock()
            endpoints = f.filter(ctx, endpoints)
            timer("filter", f.type_name, f.name, clock() - t0)
            if not endpoints:
                raise NoCandidatesError(self.name, f.name)
        n = len(endpoints)
        totals = [0.0] * n
        plugin_scores: dict[str, dict[str, float]] = {}
        for ws in self.scorers:
            s = ws.scorer
            t0 = clock()
            raw = s.score(ctx, endpoints)
            timer("scorer", s.type_name, s.name, clock() - t0)
            w = ws.weight
            clamped = [0.0 if v < 0.0 else 1.0 if v > 1.0 else v for v in raw]
            for i in range(n):
                totals[i] += w * clamped[i]
            if explain:
                plugin_scores[s.name] = {e.name: v for e, v in zip(endpoints, clamped)}
        t0 = clock()
        picked = self.picker.pick(ctx, endpoints, totals)
        timer("picker", self.picker.type_name, self.picker.name, clock() - t0)
        return ProfileResult(
            endpoints=picked,
            plugin_scores=plugin_scores,
            candidates=n,
            scored=endpoints,
            totals=totals,
        )


class Scheduler:
    """Runs the profiles a handler asks for until it asks for none."""

    def __init__(self, profiles: dict[str, SchedulerProfile], handler: ProfileHandler,
                 timer: PluginTimer | None = None) -> None:
        problem = handler.validate_profiles(list(profiles))
        if problem is not None:
            raise ValueError(problem)
        self.profiles = profiles
        self.handler = handler
        self._timer = timer or _no_timer
        self._names = list(profiles)

    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        """One scheduling cycle; raises :class:`NoCandidatesError` if the primary
        profile cannot place the request."""
        results: dict[str, ProfileResult] = {}
        clock = time.perf_counter
        h = self.handler
        while True:
            t0 = clock()
            todo = h.pick_profiles(ctx, self._names, results)
            self._timer("profile_handler", h.type_name, h.name, clock() - t0)
            todo = [p for p in todo if p not in results]
            if not todo:
                break
            for name in todo:
                try:
                    results[name] = self.profiles[name].run(ctx, candidates, self._timer,
                                                            explain)
                except NoCandidatesError as exc:
                    # The handler decides what a failed profile means (e.g. P/D: no
                    # prefill pod -> decode locally); a failed primary fails the request.
                    results[name] = ProfileResult([], error=str(exc))
        primary = h.primary(ctx, results)
        if not results[primary].endpoints:
            raise NoCandidatesError.from_result(primary, results[primary].error)
        return SchedulingResult(results, primary)
