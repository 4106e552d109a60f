"""Keeps KV-event subscriptions in step with the endpoint pool.

Two topologies:

* **per endpoint** (default): one :class:`~epp.kvcache.subscriber.KVEventSubscriber`
  per endpoint, started when it joins, stopped when it leaves or its address changes.
* **central** (``bind=...``): the EPP binds one SUB and the engines connect their PUB
  to it (vLLM connects when its endpoint names a concrete host). The endpoint is taken
  from the topic ``kv@<ip>:<port>@<model>``. Replay is not available: an engine's
  replay ROUTER is found through its own address, which a connecting publisher does
  not tell us, so gaps are counted and logged, and restarts still clear the endpoint.
  Messages no endpoint claims are counted under the endpoint ``""``.

Either way an endpoint that leaves takes all its state with it (subscriber, sequence
tracker, counters and so metric series, index entries), after its last delivery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from epp.datastore import Endpoint, EndpointPool
from epp.kvcache.event_settings import (
    DEFAULT_PUB_PORT,
    DEFAULT_RCVHWM,
    DEFAULT_REPLAY_BACKOFF_S,
    DEFAULT_REPLAY_PORT_OFFSET,
    DEFAULT_REPLAY_TIMEOUT_S,
    DEFAULT_RESYNC_INTERVAL_S,
    KVEventsSettings,
)
from epp.kvcache.stream import EventStream, KVEventStats
from epp.kvcache.subscriber import KVEventSubscriber
from epp.supervise import Backoff, LogLimiter, supervise
from epp.kvcache.types import EventSink
from epp.kvcache.wire import TOPIC_PREFIX, live_messages, topic_address

log = logging.getLogger(__name__)

__all__ = ["UNMATCHED", "KVEventsManager"]

UNMATCHED = ""  # central mode: the stats key of messages no pool endpoint claims


@dataclass(frozen=True, slots=True)
class _Spec:
    """What a subscription depends on: a change means resubscribing."""

    publisher: str | None
    address: str


class KVEventsManager:
    """Keeps KV-event subscriptions in step with the endpoint pool.

    Pool changes are handled synchronously in the pool's listener, so the pool must be
    changed from the event loop's thread.
    """

    def __init__(self, pool: EndpointPool, sink: EventSink, *,
                 default_port: int = DEFAULT_PUB_PORT,
                 replay_port_offset: int | None = DEFAULT_REPLAY_PORT_OFFSET,
                 topic_filter: bool = True, bind: str | None = None,
                 replay_timeout: float = DEFAULT_REPLAY_TIMEOUT_S,
                 replay_backoff: float = DEFAULT_REPLAY_BACKOFF_S,
                 resync_interval: float = DEFAULT_RESYNC_INTERVAL_S,
                 rcvhwm: int = DEFAULT_RCVHWM,
                 settings: KVEventsSettings | None = None) -> None:
        self.settings = settings or KVEventsSettings(
            default_port=default_port, replay_port_offset=replay_port_offset,
            topic_filter=topic_filter, bind=bind, replay_timeout=replay_timeout,
            replay_backoff=replay_backoff, resync_interval=resync_interval, rcvhwm=rcvhwm)
        self._pool = pool
        self._sink = sink
        self._ctx: zmq.asyncio.Context | None = None
        self._running = False
        self._listening = False
        self._specs: dict[str, _Spec] = {}
        self.subscribers: dict[str, KVEventSubscriber] = {}  # per-endpoint mode
        self._stopping: set[asyncio.Task[None]] = set()  # subscribers of departed endpoints
        # central mode
        self._central_task: asyncio.Task[None] | None = None
        self._central_sub: zmq.asyncio.Socket | None = None  # bound, not yet in the loop
        self._by_address: dict[tuple[str, int], str] = {}  # (ip, port) -> endpoint name
        self._streams: dict[bytes, EventStream] = {}  # per topic
        self._central_stats: dict[str, KVEventStats] = {}
        self._unmatched = KVEventStats()
        self._logs = LogLimiter(log)
        self.bound_address: str | None = None  # central mode: as bound, port resolved

    @property
    def central(self) -> bool:
        """Whether this manager binds one SUB for every engine."""
        return self.settings.bind is not None

    @property
    def unmatched(self) -> int:
        """Central mode: messages no pool endpoint claims (malformed or unknown topic)."""
        return self._unmatched.dropped + self._unmatched.unknown_topics

    def stats(self) -> dict[str, KVEventStats]:
        """Live counters per endpoint name (central mode adds ``UNMATCHED``)."""
        if self.central:
            return {**self._central_stats, UNMATCHED: self._unmatched}
        return {name: sub.stats for name, sub in self.subscribers.items()}

    def request_resync(self, name: str) -> bool:
        """Ask an endpoint's event stream for a full replay (see
        :meth:`EventStream.request_resync`); False when it has none or refuses."""
        sub = self.subscribers.get(name)
        return sub.stream.request_resync() if sub is not None else False

    def tracked_endpoints(self) -> set[str]:
        """Every endpoint name this manager holds any state for."""
        return (set(self._specs) | set(self.subscribers) | set(self._central_stats)
                | set(self._by_address.values()) | {s.name for s in self._streams.values()})

    async def start(self) -> None:
        """Subscribe to the pool's current endpoints and follow its changes."""
        if self._running:
            return
        self._ctx = zmq.asyncio.Context()
        self._running = True
        if self.settings.bind is not None:
            try:
                self._central_sub = self._bind_central(self.settings.bind)
            except zmq.ZMQError:
                self._ctx.destroy(linger=0)
                self._ctx, self._running = None, False
                raise
            self.bound_address = self._central_sub.getsockopt_string(zmq.LAST_ENDPOINT)
            backoff = Backoff(self.settings.restart_backoff, self.settings.restart_backoff_max)
            self._central_task = asyncio.get_running_loop().create_task(
                supervise(self._run_central, backoff, self._on_central_failure),
                name="kv-events-central")
        if not self._listening:  # the pool has no remove_listener: register once
            self._pool.add_listener(self._on_pool_change)
            self._listening = True
        self._reconcile(self._pool.snapshot())

    async def stop(self) -> None:
        """Stop every subscription and close the ZMQ context."""
        if not self._running:
            return
        self._running = False
        if self._central_task is not None:
            self._central_task.cancel()
        await asyncio.gather(*(sub.stop() for sub in self.subscribers.values()),
                             *self._stopping,
                             *([self._central_task] if self._central_task else []),
                             return_exceptions=True)
        self.subscribers.clear()
        self._stopping.clear()
        self._central_task = None
        if self._central_sub is not None:
            self._central_sub.close(linger=0)
            self._central_sub = None
        self._specs.clear()
        self._streams.clear()
        self._by_address.clear()
        self._central_stats.clear()
        self.bound_address = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def _on_pool_change(self, snapshot: tuple[Endpoint, ...]) -> None:
        if self._running:
            self._reconcile(snapshot)

    def _reconcile(self, snapshot: Iterable[Endpoint]) -> None:
        wanted = {e.name: e for e in snapshot}
        for name in list(self._specs):
            endpoint = wanted.get(name)
            if endpoint is None or self._spec(endpoint) != self._specs[name]:
                self._drop(name)
        for name, endpoint in wanted.items():
            if name not in self._specs:
                self._add(endpoint)

    def _spec(self, endpoint: Endpoint) -> _Spec:
        return _Spec(None if self.central else endpoint.kv_events, endpoint.address)

    def _add(self, endpoint: Endpoint) -> None:
        assert self._ctx is not None
        self._specs[endpoint.name] = self._spec(endpoint)
        if self.central:
            self._by_address[(endpoint.ip, endpoint.port)] = endpoint.name
            self._central_stats[endpoint.name] = KVEventStats()
            return
        sub = KVEventSubscriber(endpoint, self._sink, context=self._ctx,
                                settings=self.settings)
        self.subscribers[endpoint.name] = sub
        sub.start()

    def _drop(self, name: str) -> None:
        """Forget an endpoint: no delivery for it after this returns, then clear it."""
        del self._specs[name]
        if self.central:
            self._by_address = {a: n for a, n in self._by_address.items() if n != name}
            self._streams = {t: s for t, s in self._streams.items() if s.name != name}
            self._central_stats.pop(name, None)
        else:
            sub = self.subscribers.pop(name)
            sub.cancel()  # now: the task runs no further delivery code once cancelled
            stopping = asyncio.get_running_loop().create_task(sub.stop())
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)
        self._sink.clear_endpoint(name)

    # -- central mode -----------------------------------------------------------------

    def _bind_central(self, address: str) -> zmq.asyncio.Socket:
        assert self._ctx is not None
        sub = self._ctx.socket(zmq.SUB)
        try:
            sub.linger = 0
            sub.rcvhwm = self.settings.rcvhwm
            sub.ipv6 = "[" in address
            sub.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX.encode()
                           if self.settings.topic_filter else b"")
            sub.bind(address)
        except zmq.ZMQError:
            sub.close(linger=0)
            raise
        return sub

    def _on_central_failure(self, exc: Exception, delay: float) -> None:
        self._unmatched.crashes += 1
        self._unmatched.subscriber_restarts += 1
        self._logs.warning("crash", "kv events (central %s): receive loop failed (%s); "
                           "restarting in %.1fs", self.bound_address,
                           exc.__class__.__name__, delay, exc_info=True)

    def _on_malformed(self, frames: int) -> None:
        self._unmatched.dropped += 1
        self._logs.warning("frames", "kv events: dropped a message with malformed frames "
                           "(%d)", frames)

    async def _run_central(self) -> None:
        sub, self._central_sub = self._central_sub, None
        if sub is None:  # after a failure: a fresh socket on the port bound at start
            assert self.bound_address is not None
            sub = self._bind_central(self.bound_address)
        try:
            async for topic, seq, payload in live_messages(sub, self._on_malformed):
                stream = self._stream_for(topic)
                if stream is None:
                    self._unmatched.unknown_topics += 1
                    self._logs.warning("topic", "kv events: dropped a message with topic "
                                       "%r (no such endpoint)", topic[:80])
                    continue
                await stream.on_live(seq, payload)
        except zmq.ContextTerminated:
            pass  # stopping
        finally:
            sub.close(linger=0)

    def _stream_for(self, topic: bytes) -> EventStream | None:
        stream = self._streams.get(topic)
        if stream is not None:
            return stream
        address = topic_address(topic)
        name = None if address is None else self._by_address.get(address)
        if name is None:
            return None
        stream = EventStream(name, self._sink, self._central_stats[name], self.settings,
                             None)
        self._streams[topic] = stream
        return stream
