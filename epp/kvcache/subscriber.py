"""One endpoint's KV-event subscription: a SUB connected to the engine's PUB
(``endpoint.kv_events`` or ``tcp://<ip>:5557``) and, to recover missed batches, a DEALER
that asks the engine's replay ROUTER (publisher port + 1 by default).

The sequence logic lives in :mod:`epp.kvcache.stream`, the framing in
:mod:`epp.kvcache.wire`, the pool-following manager (and central mode) in
:mod:`epp.kvcache.manager`. The receive loop is supervised: a refused address or an
unexpected exception is logged with the endpoint's name, counted, and the loop starts
again with fresh sockets after a backoff; the sequence state survives, so the first
message after a restart replays what was missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

import zmq
import zmq.asyncio

from epp.datastore import Endpoint
from epp.kvcache.event_settings import KVEventsSettings
from epp.kvcache.stream import EventStream, KVEventStats, ReplayTimeout
from epp.supervise import Backoff, LogLimiter, supervise
from epp.kvcache.types import EventSink
from epp.kvcache.wire import (
    END_SEQ,
    SEQ_BYTES,
    TOPIC_PREFIX,
    live_messages,
    parse_replay,
    recv_frames,
    with_port,
    zmq_host,
)

log = logging.getLogger(__name__)

# KVEventsSettings and KVEventStats stay importable from here (benchmarks use them).
__all__ = ["KVEventStats", "KVEventSubscriber", "KVEventsSettings", "PublisherAddressError"]

_WILDCARDS = ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:")


class PublisherAddressError(Exception):
    """ZMQ refused the publisher (or replay) address: a mistyped ``kvEvents``."""


class KVEventSubscriber:
    """Follows one endpoint's KV-event publisher and feeds its batches to the sink."""

    def __init__(self, endpoint: Endpoint, sink: EventSink, *,
                 context: zmq.asyncio.Context,
                 settings: KVEventsSettings | None = None) -> None:
        self.settings = settings or KVEventsSettings()
        self.endpoint = endpoint
        self.stats = KVEventStats()
        self._ctx = context
        self._logs = LogLimiter(log)
        publisher = endpoint.kv_events or f"tcp://*:{self.settings.default_port}"
        # A publisher address copied from the engine's own config binds on all
        # interfaces; reach it at the endpoint's IP.
        for wildcard in _WILDCARDS:
            if publisher.startswith(wildcard):
                publisher = f"tcp://{zmq_host(endpoint.ip)}:{publisher[len(wildcard):]}"
        self.publisher = publisher
        offset = self.settings.replay_port_offset
        self.replay_address = None if offset is None else with_port(publisher, offset)
        self.topic = (f"{TOPIC_PREFIX}{endpoint.address}@".encode()
                      if self.settings.topic_filter else b"")
        self._ipv6 = "[" in publisher
        self.stream = EventStream(endpoint.name, sink, self.stats, self.settings,
                                  self._fetch_replay if self.replay_address else None)
        self._backoff = Backoff(self.settings.restart_backoff,
                                self.settings.restart_backoff_max)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether the supervised receive loop is alive (also while it backs off)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Connect and start receiving (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                supervise(self._run, self._backoff, self._on_failure),
                name=f"kv-events-{self.endpoint.name}")

    def cancel(self) -> None:
        """Stop delivering at once; after this call the sink hears nothing more."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        """Stop and wait until the sockets are closed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_failure(self, exc: Exception, delay: float) -> None:
        self.stats.subscriber_restarts += 1
        if isinstance(exc, PublisherAddressError):
            self.stats.connect_errors += 1
            self._logs.warning("connect", "kv events %s: cannot connect: %s; retrying in "
                               "%.1fs", self.endpoint.name, exc, delay)
            return
        self.stats.crashes += 1
        self._logs.warning("crash", "kv events %s: subscriber failed (%s); restarting in "
                           "%.1fs", self.endpoint.name, exc.__class__.__name__, delay,
                           exc_info=True)

    def _on_malformed(self, frames: int) -> None:
        self.stats.dropped += 1
        self._logs.warning("frames", "kv events %s: dropped malformed message (%d frames)",
                           self.endpoint.name, frames)

    async def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        try:
            sub.linger = 0
            sub.rcvhwm = self.settings.rcvhwm
            sub.ipv6 = self._ipv6
            sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            _connect(sub, self.publisher)
            log.info("kv events %s: subscribed to %s (replay %s)", self.endpoint.name,
                     self.publisher, self.replay_address or "off")
            async for _, seq, payload in live_messages(sub, self._on_malformed):
                await self.stream.on_live(seq, payload)
        except zmq.ContextTerminated:
            pass  # the manager is shutting down
        finally:
            sub.close(linger=0)

    async def _fetch_replay(self, start: int) -> AsyncGenerator[tuple[int, bytes], None]:
        assert self.replay_address is not None
        dealer = self._ctx.socket(zmq.DEALER)  # a fresh one: no stale replies
        try:
            dealer.linger = 0
            dealer.ipv6 = self._ipv6
            _connect(dealer, self.replay_address)
            await dealer.send_multipart([b"", start.to_bytes(SEQ_BYTES, "big")])
            timeout_ms = int(self.settings.replay_timeout * 1000)
            raw: zmq.Socket[bytes] = zmq.Socket.shadow(dealer.underlying)
            while True:
                frames = await recv_frames(dealer, raw, timeout_ms)
                if frames is None:
                    raise ReplayTimeout(self.replay_address)
                parsed = parse_replay(frames)
                if parsed is None:
                    self.stats.bad_replay_frames += 1
                    self._logs.warning("replay-frames", "kv events %s: malformed replay "
                                       "frame", self.endpoint.name)
                    continue
                if parsed[0] == END_SEQ:
                    return
                yield parsed
        finally:
            dealer.close(linger=0)


def _connect(sock: zmq.asyncio.Socket, address: str) -> None:
    """``sock.connect``, with a refused address as :class:`PublisherAddressError`
    (ZMQ resolves names later, in the background: only syntax is refused here)."""
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        raise PublisherAddressError(f"{address!r}: {exc.strerror}") from None

