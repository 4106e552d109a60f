"""Admission: request priority from objectives, and shedding when the pool is saturated."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from epp.datastore import Endpoint
from epp.errors import UnschedulableError

log = logging.getLogger(__name__)

# llm-d-router's name first; GIE's older name is still honoured.
OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
OBJECTIVE_HEADER = OBJECTIVE_HEADERS[1]


class SaturationDetector:
    """GIE's detector: a pod's pressure is ``max(waiting / queue_threshold,
    kv_usage / kv_threshold)``, or 1.0 when its metrics are stale; the pool is saturated
    when the mean pressure reaches 1.0."""

    def __init__(self, queue_threshold: int, kv_threshold: float, stale_after_s: float) -> None:
        self.queue_threshold = queue_threshold
        self.kv_threshold = kv_threshold
        self.stale_after_s = stale_after_s

    def pressure(self, endpoint: Endpoint, now: float) -> float:
        """How full one endpoint is (1.0 = at the threshold)."""
        if endpoint.metrics_stale(now, self.stale_after_s):
            return 1.0
        m = endpoint.state.metrics
        waiting = m.waiting + endpoint.state.load.since_scrape
        return max(waiting / self.queue_threshold, m.kv_cache_usage / self.kv_threshold)

    def saturated(self, endpoints: Sequence[Endpoint], now: float) -> bool:
        """Whether the pool as a whole is at or past its thresholds."""
        if not endpoints:
            return True
        return sum(self.pressure(e, now) for e in endpoints) / len(endpoints) >= 1.0


class Admission:
    """Maps the objective header to a priority; sheds sheddable requests (priority < 0)
    when the pool is saturated. Critical and standard requests are never shed here."""

    def __init__(self, objectives: Mapping[str, int], detector: SaturationDetector) -> None:
        self._objectives = dict(objectives)
        self.detector = detector
        self._unknown_logged: set[str] = set()

    def set_objectives(self, objectives: Mapping[str, int]) -> None:
        """Replace the objective -> priority map (e.g. from InferenceObjective objects)."""
        self._objectives = dict(objectives)

    def priority(self, headers: Mapping[str, str]) -> int:
        """The request's priority; no header or an unknown objective -> 0. When both header
        names are present, the llm-d one wins."""
        name = next((v for v in map(headers.get, OBJECTIVE_HEADERS) if v), None)
        if not name:
            return 0
        priority = self._objectives.get(name)
        if priority is None:
            if name not in self._unknown_logged and len(self._unknown_logged) < 100:
                self._unknown_logged.add(name)
                log.warning("unknown inference objective %r: using priority 0", name)
            return 0
        return priority

    def admit(self, priority: int, candidates: Sequence[Endpoint], now: float) -> None:
        """Raise :class:`UnschedulableError` (429) to shed a sheddable request."""
        if priority < 0 and self.detector.saturated(candidates, now):
            raise UnschedulableError(
                f"the pool is saturated; sheddable request (priority {priority}) shed")
