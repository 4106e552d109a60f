"""One ``/metrics`` page from the pages of ``epp --workers N``, reading like one picker's.

Each worker renders its own page (prometheus_client's text format, labels sorted). The
supervisor parses them into families and merges sample by sample, by the family's type:

| family | merged as |
|---|---|
| counter, histogram, summary (every ``_total``, ``_bucket``, ``_count``, ``_sum``) | sum |
| gauges of what each worker holds on its own (:data:`SUMMED_GAUGES`: in-flight requests, pending index entries, peer entries) | sum |
| gauges of a worker's own health (:data:`LOWEST_GAUGES`: index prediction accuracy, NATS connected) | lowest: an alert fires when any worker degrades |
| ``X_created`` (when a counter or histogram series was created) | earliest |
| every other gauge: pool-wide state each worker observes for itself (pool size, average queue and KV utilisation, staleness, index blocks, peers) | highest |

Restarted workers start again from zero, so the sums carry over what exited workers had
counted (:meth:`Carry.add`): a summed counter never goes backwards, which Prometheus
would read as a reset. Merging is pure (no I/O) and runs off the supervisor's loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

# Gauges that count what each worker holds by itself: the pool's totals are their sums.
SUMMED_GAUGES = frozenset({
    "epp_endpoint_inflight_requests",  # requests each worker routed and still tracks
    "epp_kv_index_pending_blocks",  # each worker's own pending picks
    "epp_replica_sync_peer_entries",  # each worker's peer table
    "epp_replica_sync_peer_entries_bytes",
})
# Gauges of a worker's own health, where the worst worker is what an alert should see.
LOWEST_GAUGES = frozenset({
    "epp_kv_index_prediction_accuracy",
    "epp_replica_sync_connected",
})
# Family types whose samples only grow (a restart aside): summed and carried over.
MONOTONIC_TYPES = frozenset({"counter", "histogram", "summary"})
# Series carried over from exited workers, at most. A page holds a few thousand series
# (64 endpoints: ~2,000); carried series only grow by pods that left between a worker's
# start and its exit, so this is room for years of restarts, and a bound on a
# pathological churn: past it, new series are not carried (counted in CarryStats).
MAX_CARRIED_SERIES = 100_000

SUM, LOWEST, HIGHEST, EARLIEST = "sum", "lowest", "highest", "earliest"


class PageError(ValueError):
    """A worker's page is not in the Prometheus text format."""


@dataclass(slots=True)
class Family:
    """One metric family of a page: its TYPE line's name and type, its HELP text (as
    written, escaped) and its samples, keyed by ``name{labels}`` as written, in page
    order."""

    name: str
    kind: str = "untyped"
    help: str | None = None
    samples: dict[str, float] = field(default_factory=dict)


Page = dict[str, Family]


def parse_page(text: str) -> Page:
    """The families of a text-format page (``# HELP``/``# TYPE`` and sample lines;
    timestamps are dropped). Raises :class:`PageError` on a malformed sample line."""
    page: Page = {}
    current: Family | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue  # a comment
            name = parts[2]
            if current is None or current.name != name:
                current = page.get(name)
                if current is None:
                    current = page[name] = Family(name)
            if parts[1] == "HELP":
                current.help = parts[3] if len(parts) > 3 else ""
            else:
                current.kind = parts[3].strip() if len(parts) > 3 else "untyped"
            continue
        key, value = _split_sample(line)
        if current is None:  # samples before any TYPE line: an untyped family
            base = key.partition("{")[0]
            current = page.setdefault(base, Family(base))
        current.samples[key] = value
    return page


def _split_sample(line: str) -> tuple[str, float]:
    # Label values may hold spaces and braces; the last '}' ends the label set.
    end = line.rfind("}")
    if end >= 0:
        key, rest = line[:end + 1], line[end + 1:].split()
    else:
        key, _, tail = line.partition(" ")
        rest = tail.split()
    if not rest or not key:
        raise PageError(f"not a sample line: {line[:200]!r}")
    try:
        return key, float(rest[0])  # float() reads Go's +Inf, -Inf and NaN too
    except ValueError:
        raise PageError(f"not a sample value: {line[:200]!r}") from None


def merge_rule(family: Family, page: Mapping[str, Family]) -> str:
    """How ``family`` (of ``page``) is combined across workers (module docstring)."""
    if family.kind in MONOTONIC_TYPES or family.name in SUMMED_GAUGES:
        return SUM
    if family.name in LOWEST_GAUGES:
        return LOWEST
    if family.name.endswith("_created"):
        base = family.name[:-len("_created")]
        for owner in (page.get(base + "_total"), page.get(base)):
            if owner is not None and owner.kind in MONOTONIC_TYPES:
                return EARLIEST
    return HIGHEST


def merge_pages(pages: Sequence[Mapping[str, Family]],
                carried: Mapping[str, Family] | None = None) -> Page:
    """One page from the workers' pages plus what exited workers carried over. Families
    and samples keep the order in which they first appear."""
    merged: Page = {}
    rules: dict[str, str] = {}
    for page in pages:
        for name, family in page.items():
            into = merged.get(name)
            if into is None:
                into = merged[name] = Family(name, family.kind, family.help)
                rules[name] = merge_rule(family, page)
            _combine(into.samples, family.samples, rules[name])
    for name, family in (carried or {}).items():
        into = merged.get(name)
        if into is None:
            into = merged[name] = Family(name, family.kind, family.help)
        _combine(into.samples, family.samples, SUM)
    return merged


def _combine(into: dict[str, float], samples: Mapping[str, float], rule: str) -> None:
    if rule == SUM:
        for key, value in samples.items():
            into[key] = into.get(key, 0.0) + value
        return
    pick = max if rule == HIGHEST else min
    for key, value in samples.items():
        held = into.get(key)
        into[key] = value if held is None else pick(held, value)


def render_page(families: Iterable[Family]) -> str:
    """The text format of merged families."""
    out: list[str] = []
    for family in families:
        if family.help is not None:
            out.append(f"# HELP {family.name} {family.help}\n")
        out.append(f"# TYPE {family.name} {family.kind}\n")
        for key, value in family.samples.items():
            out.append(f"{key} {floatToGoString(value)}\n")
    return "".join(out)


@dataclass(slots=True)
class Carry:
    """What exited workers had counted: the monotonic families of their last pages,
    summed. Never mutated once made (:meth:`add` returns a new one), so a merge running
    in a thread can hold one while the supervisor makes the next."""

    families: dict[str, Family] = field(default_factory=dict)
    series: int = 0
    dropped: int = 0  # series not carried because of MAX_CARRIED_SERIES

    def add(self, page: Mapping[str, Family]) -> Carry:
        """This carry plus the monotonic families of ``page`` (an exited worker's)."""
        families = {name: Family(f.name, f.kind, f.help, dict(f.samples))
                    for name, f in self.families.items()}
        series, dropped = self.series, self.dropped
        for name, family in page.items():
            if family.kind not in MONOTONIC_TYPES:
                continue
            into = families.get(name)
            if into is None:
                into = families[name] = Family(name, family.kind, family.help)
            for key, value in family.samples.items():
                if key in into.samples:
                    into.samples[key] += value
                elif series < MAX_CARRIED_SERIES:
                    into.samples[key] = value
                    series += 1
                else:
                    dropped += 1
        return Carry(families, series, dropped)


def sample_total(page: Mapping[str, Family], family: str) -> float:
    """The sum of every sample of ``family`` in ``page`` (0 when absent)."""
    found = page.get(family)
    return sum(found.samples.values()) if found is not None else 0.0


__all__ = ["Carry", "Family", "LOWEST_GAUGES", "MAX_CARRIED_SERIES", "MONOTONIC_TYPES",
           "Page", "PageError", "SUMMED_GAUGES", "merge_pages", "merge_rule", "parse_page",
           "render_page", "sample_total"]
