"""Load scorers, from scraped model-server metrics plus the EPP's own dispatches.

Stale metrics (older than ``metrics_stale_after_s``) score 0: a pod whose numbers we
cannot trust must not look idle and attract traffic, yet it stays a candidate, so a pool
whose scrapes all lag still serves (every pod ties and the picker spreads the load).
Queue lengths add the requests this EPP routed since the last scrape, which the scrape
cannot show yet: without that, a burst between two scrapes would all go to the pod that
looked emptiest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.scheduling.registry import NoParams, PluginDeps, PluginParams
from epp.scheduling.types import SchedulingContext


def _pending_queue(e: Endpoint) -> int:
    return e.state.metrics.waiting + e.state.load.since_scrape


def _pending_running(e: Endpoint) -> int:
    return e.state.metrics.running + e.state.load.since_scrape


def min_max_scores(values: Sequence[float | None]) -> list[float]:
    """(max - v) / (max - min) over known values; all equal -> 1.0; unknown -> 0.0."""
    known = [v for v in values if v is not None]
    if not known:
        return [0.0] * len(values)
    lo, hi = min(known), max(known)
    if hi == lo:
        return [0.0 if v is None else 1.0 for v in values]
    span = hi - lo
    return [0.0 if v is None else (hi - v) / span for v in values]


class FreshnessAware:
    """Shared construction for scorers that read scraped metrics."""

    type_name = ""
    Params: type[PluginParams] = NoParams

    def __init__(self, name: str, stale_after_s: float) -> None:
        self.name = name
        self.stale_after_s = stale_after_s

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, deps.metrics_stale_after_s)

    def fresh(self, ctx: SchedulingContext, e: Endpoint) -> bool:
        return not e.metrics_stale(ctx.now, self.stale_after_s)


class QueueScorer(FreshnessAware):
    """Shorter waiting queue scores higher: ``(max - q) / (max - min)`` over candidates."""

    type_name = "queue-scorer"

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        return min_max_scores([
            float(_pending_queue(e)) if self.fresh(ctx, e) else None for e in endpoints])


class RunningRequestsSizeScorer(FreshnessAware):
    """Fewer running requests scores higher: min-max normalised like the queue scorer."""

    type_name = "running-requests-size-scorer"

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        return min_max_scores([
            float(_pending_running(e)) if self.fresh(ctx, e) else None for e in endpoints])


class KVCacheUtilizationScorer(FreshnessAware):
    """Free KV cache scores higher: ``1 - usage``."""

    type_name = "kv-cache-utilization-scorer"

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0 - e.state.metrics.kv_cache_usage if self.fresh(ctx, e) else 0.0
                for e in endpoints]


class LoadAwareParams(PluginParams):
    """``threshold``: queue length at which the score reaches 0."""

    threshold: int = 128


class LoadAwareScorer(FreshnessAware):
    """llm-d's load-aware scorer: 0.5 for an empty queue, falling linearly to 0 at
    ``threshold`` waiting requests."""

    type_name = "load-aware-scorer"
    Params = LoadAwareParams

    def __init__(self, name: str, stale_after_s: float, threshold: int) -> None:
        super().__init__(name, stale_after_s)
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, deps.metrics_stale_after_s, params.threshold)

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        out = []
        t = self.threshold
        for e in endpoints:
            if not self.fresh(ctx, e):
                out.append(0.0)
                continue
            q = min(_pending_queue(e), t)
            out.append(0.5 * (1.0 - q / t))
        return out
