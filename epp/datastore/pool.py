"""The endpoint pool: written by discovery, read (as snapshots) by scheduling."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from epp.datastore.endpoint import Endpoint

log = logging.getLogger(__name__)

PoolListener = Callable[[tuple[Endpoint, ...]], None]


class EndpointPool:
    """Endpoints by name. Reads are lock-free snapshots (an immutable tuple rebuilt on
    change), so the request path never copies or locks the pool."""

    def __init__(self) -> None:
        self._by_name: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._listeners: list[PoolListener] = []
        self._synced = False
        self._failing_open = False  # every candidate unreachable (logged once per episode)
        self.fail_opens = 0  # scheduling cycles that fell back to unreachable endpoints

    def snapshot(self) -> tuple[Endpoint, ...]:
        """The current endpoints (do not mutate)."""
        return self._snapshot

    def get(self, name: str) -> Endpoint | None:
        """The endpoint called ``name``, if present."""
        return self._by_name.get(name)

    def routable(self, candidates: tuple[Endpoint, ...]) -> tuple[tuple[Endpoint, ...], bool]:
        """``candidates`` that are ready, and whether it failed open.

        Ready: not judged unreachable, and scraped successfully at least once, so a pod
        listed before its server listens gets no traffic (when no candidate has been
        scraped yet, e.g. at start-up, that second condition is dropped). When every
        candidate is unreachable all of them are returned: a guess beats refusing every
        request while, say, the scrape path is broken."""
        kept = candidates  # the usual case: nothing to drop, no copy
        if any(e.state.unreachable is not None or not e.state.metrics.scraped_at
               for e in candidates):
            kept = tuple(e for e in candidates
                         if e.state.unreachable is None and e.state.metrics.scraped_at)
            if not kept:
                kept = tuple(e for e in candidates if e.state.unreachable is None)
        if kept:
            if self._failing_open:
                self._failing_open = False
                log.info("endpoints are reachable again; routing only to reachable ones")
            return kept, False
        self.fail_opens += 1
        if not self._failing_open:
            self._failing_open = True
            log.warning("all %d candidate endpoints are unreachable (%s); routing to them "
                        "anyway instead of failing every request", len(candidates),
                        "; ".join(f"{e.name}: {e.state.unreachable}" for e in candidates[:4]))
        return candidates, True

    def __len__(self) -> int:
        return len(self._snapshot)

    @property
    def synced(self) -> bool:
        """True once discovery has completed its first full listing."""
        return self._synced

    def mark_synced(self) -> None:
        """Discovery calls this after its first complete sync."""
        self._synced = True
        self._notify()

    def add_listener(self, listener: PoolListener) -> None:
        """Call ``listener(snapshot)`` after every change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: PoolListener) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def upsert(self, endpoint: Endpoint) -> bool:
        """Add or replace an endpoint; returns whether anything changed."""
        current = self._by_name.get(endpoint.name)
        if current is not None and current.same_spec(endpoint):
            return False
        if current is not None and current.address == endpoint.address:
            endpoint.state = current.state  # same server, new labels: keep its load state
        self._by_name[endpoint.name] = endpoint
        self._rebuild()
        return True

    def remove(self, name: str) -> bool:
        """Remove an endpoint by name; returns whether it was present."""
        if self._by_name.pop(name, None) is None:
            return False
        self._rebuild()
        return True

    def replace_all(self, endpoints: Iterable[Endpoint]) -> bool:
        """Make the pool exactly ``endpoints`` in one step (no half-updated pool)."""
        wanted = {e.name: e for e in endpoints}
        if wanted.keys() == self._by_name.keys() and all(
            self._by_name[n].same_spec(e) for n, e in wanted.items()
        ):
            return False
        # Keep the existing objects for unchanged endpoints so state attached to them stays.
        merged: dict[str, Endpoint] = {}
        for name, new in wanted.items():
            current = self._by_name.get(name)
            if current is not None and current.same_spec(new):
                new = current
            elif current is not None and current.address == new.address:
                new.state = current.state
            merged[name] = new
        self._by_name = merged
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        self._snapshot = tuple(sorted(self._by_name.values(), key=lambda e: e.name))
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener(self._snapshot)
            except Exception:  # a broken listener must not break discovery
                log.exception("pool listener failed")
