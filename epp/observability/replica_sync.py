"""Metrics of replica sync (``--replica-sync-url``), read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.datastore import Endpoint


class _Stats(Protocol):
    @property
    def sent(self) -> Mapping[str, int]: ...
    @property
    def received(self) -> Mapping[str, int]: ...
    @property
    def dropped(self) -> Mapping[str, int]: ...
    @property
    def decode_errors(self) -> Mapping[str, int]: ...
    @property
    def disconnects(self) -> int: ...
    @property
    def reconnects(self) -> int: ...


class _Table(Protocol):
    @property
    def expired(self) -> int: ...
    @property
    def evicted(self) -> int: ...
    @property
    def bytes(self) -> int: ...

    def __len__(self) -> int: ...


class _Sync(Protocol):
    @property
    def stats(self) -> _Stats: ...
    @property
    def table(self) -> _Table: ...
    @property
    def connected(self) -> bool: ...

    def peers(self, now: float | None = None) -> int: ...


class ReplicaSyncCollector(Collector):
    """Messages, the connection, peers, and the peer load per endpoint."""

    def __init__(self, sync: _Sync, snapshot: Callable[[], tuple[Endpoint, ...]]) -> None:
        self._sync = sync
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        sync = self._sync
        stats = sync.stats
        for name, doc, label, counts in (
                ("epp_replica_sync_messages_sent", "Messages published to the other "
                 "replicas, by kind (route, done, beat, bye).", "kind", stats.sent),
                ("epp_replica_sync_messages_received", "Messages from other replicas "
                 "applied, by kind (route, done, beat, bye).", "kind", stats.received),
                ("epp_replica_sync_messages_dropped", "Messages dropped: outgoing while "
                 "disconnected, outbox full, publish failed or errored; incoming naming an "
                 "endpoint this replica does not have, lost as a slow consumer, or not "
                 "applicable.", "reason", stats.dropped),
                ("epp_replica_sync_decode_errors", "Messages on the subject that were "
                 "ignored: malformed, oversized, or of another wire version.", "reason",
                 stats.decode_errors)):
            family = CounterMetricFamily(name, doc, labels=[label])
            for value, count in counts.items():
                family.add_metric([value], count)
            yield family
        yield GaugeMetricFamily("epp_replica_sync_connected", "1 while the NATS connection "
                                "is up.", value=1.0 if sync.connected else 0.0)
        yield CounterMetricFamily("epp_replica_sync_disconnects", "Times the NATS "
                                  "connection was lost.", value=stats.disconnects)
        yield CounterMetricFamily("epp_replica_sync_reconnects", "Times the NATS "
                                  "connection was re-established.", value=stats.reconnects)
        yield GaugeMetricFamily("epp_replica_sync_peers", "Other replicas heard from "
                                "recently (they send a heartbeat every few seconds).",
                                value=sync.peers())
        table = sync.table
        yield GaugeMetricFamily("epp_replica_sync_peer_entries", "Requests of other "
                                "replicas counted as peer load now.", value=len(table))
        yield GaugeMetricFamily("epp_replica_sync_peer_entries_bytes", "Estimated memory "
                                "of those entries.", value=table.bytes)
        ended = CounterMetricFamily("epp_replica_sync_peer_entries_ended", "Peer entries "
                                    "that ended other than by a completion message: "
                                    "expired (their TTL passed), evicted (a bound was "
                                    "reached).", labels=["how"])
        ended.add_metric(["expired"], table.expired)
        ended.add_metric(["evicted"], table.evicted)
        yield ended
        requests = GaugeMetricFamily("epp_endpoint_peer_inflight_requests", "Requests "
                                     "other replicas routed to the endpoint, until they "
                                     "complete or their prefill estimate passes.",
                                     labels=["endpoint"])
        tokens = GaugeMetricFamily("epp_endpoint_peer_inflight_tokens", "Uncached prompt "
                                   "tokens of those requests.", labels=["endpoint"])
        for e in self._snapshot():
            requests.add_metric([e.name], e.state.load.peer_requests)
            tokens.add_metric([e.name], e.state.load.peer_prefill_tokens)
        yield requests
        yield tokens
