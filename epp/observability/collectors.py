"""Metrics read at scrape time from live state (no cost on the request path)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.datastore import Endpoint


class _Stats(Protocol):
    received: int
    applied: int
    decode_errors: int
    gaps: int
    lost: int
    replays: int
    restarts: int
    unknown_events: int
    dropped: int
    bad_replay_frames: int
    unknown_topics: int
    missing_parent: int
    subscriber_restarts: int

    def failure_counts(self) -> Mapping[str, int]: ...


class PoolCollector(Collector):
    """GIE's pool gauges plus per-endpoint freshness, from the datastore."""

    def __init__(self, pool_name: str, snapshot: Callable[[], tuple[Endpoint, ...]],
                 stale_after_s: float) -> None:
        self._name = pool_name
        self._snapshot = snapshot
        self._stale = stale_after_s

    def collect(self) -> Iterator[Metric]:
        endpoints = self._snapshot()
        now = time.monotonic()
        stale_flags = [e.metrics_stale(now, self._stale) for e in endpoints]
        fresh = [e for e, s in zip(endpoints, stale_flags, strict=True) if not s]
        kv = GaugeMetricFamily("inference_pool_average_kv_cache_utilization",
                               "Mean KV-cache utilisation over endpoints with fresh metrics.",
                               labels=["name"])
        queue = GaugeMetricFamily("inference_pool_average_queue_size",
                                  "Mean waiting requests over endpoints with fresh metrics.",
                                  labels=["name"])
        if fresh:
            kv.add_metric([self._name], sum(e.state.metrics.kv_cache_usage for e in fresh)
                          / len(fresh))
            queue.add_metric([self._name], sum(e.state.metrics.waiting for e in fresh)
                             / len(fresh))
        yield kv
        yield queue
        stale = GaugeMetricFamily("epp_endpoint_metrics_stale",
                                  "1 when an endpoint's scraped metrics are too old to trust.",
                                  labels=["endpoint"])
        inflight = GaugeMetricFamily("epp_endpoint_inflight_requests",
                                     "Requests this EPP replica has in flight per endpoint.",
                                     labels=["endpoint"])
        for e, is_stale in zip(endpoints, stale_flags, strict=True):
            stale.add_metric([e.name], 1.0 if is_stale else 0.0)
            inflight.add_metric([e.name], e.state.load.requests)
        yield stale
        yield inflight


_KV_COUNTERS = (
    ("received", "epp_kv_events_received", "KV-event batches received live."),
    ("applied", "epp_kv_events_applied", "KV-event batches applied to the index (live or "
     "replayed)."),
    ("gaps", "epp_kv_event_gaps", "Sequence gaps seen on the live stream."),
    ("lost", "epp_kv_events_lost", "Batches in gaps that no replay recovered."),
    ("replays", "epp_kv_event_replays", "Replay requests sent to the engine."),
    ("restarts", "epp_kv_event_engine_restarts", "Sequence resets (engine restarts)."),
    ("unknown_events", "epp_kv_events_unknown", "Events of unknown types, skipped."),
    ("missing_parent", "epp_kv_events_missing_parent",
     "Batches with blocks whose parent was never seen (resolved by replay)."),
    ("subscriber_restarts", "epp_kv_event_subscriber_restarts",
     "KV-event receive loops restarted after a refused address or a crash."),
)


class KVEventsCollector(Collector):
    """Per-endpoint KV-event counters, failures by reason, and the index size.

    Series follow the stats mapping: an endpoint that leaves the pool (and so the
    mapping) leaves the output at the next scrape.
    """

    def __init__(self, stats: Callable[[], Mapping[str, Any]],
                 index_blocks: Callable[[], int]) -> None:
        self._stats = stats
        self._blocks = index_blocks

    def collect(self) -> Iterator[Metric]:
        stats: Mapping[str, _Stats] = self._stats()
        for attr, name, doc in _KV_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["endpoint"])
            for endpoint, s in stats.items():
                family.add_metric([endpoint], getattr(s, attr))
            yield family
        dropped = CounterMetricFamily(
            "epp_kv_events_dropped", "Messages dropped: undecodable payloads, wrong frames, "
            "bad sequences, unknown topics.", labels=["endpoint"])
        for endpoint, s in stats.items():
            dropped.add_metric([endpoint], s.decode_errors + s.dropped + s.bad_replay_frames
                               + s.unknown_topics)
        yield dropped
        failures = CounterMetricFamily(
            "epp_kv_event_failures", "KV-event failures by reason (decode_error, "
            "unknown_event, bad_frame, bad_replay_frame, unknown_topic, gap, lost, "
            "replay_timeout, sequence_jump, sink_error, connect_error, crash).",
            labels=["endpoint", "reason"])
        for endpoint, s in stats.items():
            for reason, count in s.failure_counts().items():
                failures.add_metric([endpoint, reason], count)
        yield failures
        yield GaugeMetricFamily("epp_kv_index_blocks", "Distinct blocks in the KV index.",
                                value=self._blocks())


class _IndexState(Protocol):
    @property
    def pending_entries(self) -> int: ...

    pending_added: int
    pending_confirmed: int
    pending_expired: int
    pending_dropped: int
    corrected_blocks: int


class _FeedbackCounts(Protocol):
    evicted_corrections: int
    lost_store_signals: int
    resyncs_requested: int


class KVIndexCollector(Collector):
    """The block index's pending tier and the corrections responses made to it."""

    def __init__(self, index: _IndexState, feedback: _FeedbackCounts) -> None:
        self._index = index
        self._feedback = feedback

    def collect(self) -> Iterator[Metric]:
        index, fb = self._index, self._feedback
        yield GaugeMetricFamily(
            "epp_kv_index_pending_blocks", "(block, endpoint) entries routed but not yet "
            "confirmed by the engine's events.", value=index.pending_entries)
        pending = CounterMetricFamily(
            "epp_kv_index_pending", "Pending (block, endpoint) entries by what became of "
            "them: added at routing, confirmed by the engine, expired, dropped (request "
            "failed, block removed or cleared, bound reached).", labels=["outcome"])
        for outcome, value in (("added", index.pending_added),
                               ("confirmed", index.pending_confirmed),
                               ("expired", index.pending_expired),
                               ("dropped", index.pending_dropped)):
            pending.add_metric([outcome], value)
        yield pending
        yield CounterMetricFamily(
            "epp_kv_index_corrected_blocks", "Blocks dropped from an endpoint because its "
            "reported cached tokens showed it no longer held them.",
            value=index.corrected_blocks)
        corrections = CounterMetricFamily(
            "epp_kv_index_corrections", "Responses that corrected the index: evicted "
            "(the engine held less than credited: keys dropped), lost_store (it held more "
            "than the events and pending picks explain).", labels=["kind"])
        corrections.add_metric(["evicted"], fb.evicted_corrections)
        corrections.add_metric(["lost_store"], fb.lost_store_signals)
        yield corrections
        yield CounterMetricFamily(
            "epp_kv_index_resyncs_requested", "Event replays requested because a response "
            "showed blocks the index never heard of.", value=fb.resyncs_requested)
