"""ZMQ subscribers for vLLM KV events: receive, order by sequence, replay what was
missed, and deliver decoded batches to an :class:`~epp.kvcache.types.EventSink`.

Two topologies:

* **per endpoint** (default): one SUB per endpoint connects to the engine's PUB
  (``endpoint.kv_events`` or ``tcp://<ip>:5557``) and, to recover missed batches, a
  DEALER asks the engine's replay ROUTER (publisher port + 1 by default).
* **central** (``bind=...``): the EPP binds one SUB and the engines connect their PUB
  to it (vLLM connects when its endpoint names a concrete host). The endpoint is taken
  from the topic ``kv@<ip>:<port>@<model>``. Replay is not available: an engine's
  replay ROUTER is found through its own address, which a connecting publisher does
  not tell us, so gaps are counted and logged, and restarts still clear the endpoint.

Sequence rules for one publisher (``_Stream``):

* the first message, or a gap, replays from the first missing sequence up to (not
  including) the live message in hand; live messages that arrive meanwhile wait in the
  SUB queue (``rcvhwm``) and are applied after it, so each batch is applied once;
* a sequence at or below the last one *received live* means the engine restarted (a
  PUB never repeats one): the endpoint is cleared, then replayed from 0;
* a replay that cannot fill a gap (buffer wrapped, no ROUTER) is given up and counted
  (``lost``), never retried in a loop; a ROUTER that times out is left alone for
  ``replay_backoff`` seconds, so a missing one costs one timeout, not one per gap;
* when the sink reports ``missing_parent``, everything the engine still buffers is
  re-applied (a resync), at most once per ``resync_interval`` and never when a replay
  from 0 already showed the engine's buffer has wrapped (replay could not help).

Not detected: an engine that restarts and publishes more batches than we had seen
before we hear from it again looks like a gap, not a restart, so its old blocks stay
until evicted or cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from epp.datastore import DEFAULT_KV_EVENTS_PORT, Endpoint, EndpointPool, parse_address
from epp.kvcache.events import KVEventDecodeError, decode_batch
from epp.kvcache.types import EventSink

log = logging.getLogger(__name__)

__all__ = ["KVEventStats", "KVEventSubscriber", "KVEventsManager", "KVEventsSettings"]

DEFAULT_PUB_PORT = DEFAULT_KV_EVENTS_PORT
DEFAULT_REPLAY_PORT_OFFSET = 1  # vLLM examples put the replay ROUTER on 5558
# Per reply frame. A live ROUTER answers within milliseconds (it is polled between
# publishes); vLLM's default config has no replay endpoint at all, so do not wait long.
DEFAULT_REPLAY_TIMEOUT_S = 2.0
# After a replay timed out, do not ask that engine again for this long: otherwise every
# gap would stall the subscriber for the full timeout.
DEFAULT_REPLAY_BACKOFF_S = 30.0
# A sink reporting missing parents triggers a full replay (vLLM keeps the last 10,000
# batches) at most this often: a full replay costs tens of ms of decode and apply, and
# missing parents that replay cannot cure (index evictions, a wrapped engine buffer)
# would otherwise loop.
DEFAULT_RESYNC_INTERVAL_S = 30.0
# The SUB queue holds live messages while a replay runs; vLLM's PUB uses the same HWM.
DEFAULT_RCVHWM = 100_000
LOG_INTERVAL_S = 10.0  # at most one warning per kind per subscriber per interval
# Longest stretch of ingest between yields to the event loop. A queued message is
# received without suspending, so a backlog (a burst, a 10,000-batch replay) would
# otherwise hold the loop, and every request waiting on it, until it drained.
INGEST_SLICE_S = 0.002

SEQ_BYTES = 8
END_OF_REPLAY = b"\xff" * SEQ_BYTES  # vLLM's end marker: seq -1 as signed 8 bytes
TOPIC_PREFIX = "kv@"


@dataclass(frozen=True, slots=True)
class KVEventsSettings:
    """How KV-event subscribers find publishers and recover what they missed."""

    default_port: int = DEFAULT_PUB_PORT
    replay_port_offset: int | None = DEFAULT_REPLAY_PORT_OFFSET  # None: no replay
    topic_filter: bool = True  # False: subscribe to everything (vLLM's default topic is "")
    bind: str | None = None  # central mode: bind one SUB here, e.g. "tcp://*:5557"
    replay_timeout: float = DEFAULT_REPLAY_TIMEOUT_S
    replay_backoff: float = DEFAULT_REPLAY_BACKOFF_S
    resync_interval: float = DEFAULT_RESYNC_INTERVAL_S
    rcvhwm: int = DEFAULT_RCVHWM

    def __post_init__(self) -> None:
        if not 0 < self.default_port < 65536:
            raise ValueError(f"default_port {self.default_port} must be 1-65535")
        if self.replay_port_offset is not None and not (
                0 < self.default_port + self.replay_port_offset < 65536):
            raise ValueError(f"replay_port_offset {self.replay_port_offset} leaves the "
                             "port range")
        for name in ("replay_timeout", "replay_backoff", "resync_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.replay_timeout == 0:
            raise ValueError("replay_timeout must be > 0")
        if self.rcvhwm < 0:
            raise ValueError("rcvhwm must be >= 0")


@dataclass(slots=True)
class KVEventStats:
    """Counters for one endpoint (plain ints, read by metrics)."""

    received: int = 0  # live messages with a well-formed sequence
    applied: int = 0  # batches delivered to the sink, live or replayed
    decode_errors: int = 0  # payloads that did not decode (their sequence still counts)
    gaps: int = 0  # sequence gaps seen on the live stream
    lost: int = 0  # batches in gaps that no replay recovered
    replays: int = 0  # replay requests sent
    replay_failures: int = 0  # replay requests that timed out
    restarts: int = 0  # sequence went backwards: the engine restarted
    unknown_events: int = 0  # events of unknown types, skipped
    dropped: int = 0  # unusable messages: wrong frame count, bad sequence, unknown topic
    missing_parent: int = 0  # batches the sink could not fully key by prefix
    errors: int = 0  # the sink raised, or another unexpected failure (logged)


class _LogLimiter:
    """At most one log line per key per interval, reporting how many were held back."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self._interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None if ``key`` logged recently (counted as held back), else the held count."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self._interval
        return self._held.pop(key, 0)

    def warning(self, key: str, msg: str, *args: object) -> None:
        held = self.allow(key)
        if held is None:
            return
        if held:
            msg += " (%d similar suppressed)"
            args = (*args, held)
        log.warning(msg, *args)


ReplayFetch = Callable[[int], AsyncGenerator[tuple[int, bytes], None]]


class _ReplayTimeout(Exception):
    """The replay ROUTER did not answer in time."""


class _Stream:
    """Sequence tracking and delivery for one publisher."""

    def __init__(self, name: str, sink: EventSink, stats: KVEventStats,
                 settings: KVEventsSettings, fetch: ReplayFetch | None,
                 logs: _LogLimiter) -> None:
        self.name = name
        self.stats = stats
        self._sink = sink
        self._settings = settings
        self._fetch = fetch
        self._logs = logs
        self.live_last: int | None = None  # last sequence received live
        self.applied_last: int | None = None  # last sequence applied (live or replayed)
        self._replay_blocked_until = -math.inf
        self._last_resync = -math.inf
        self._resync_due = False
        # A replay from 0 that began later than 0: the engine's buffer has wrapped, so
        # replays cannot supply missing parents until it restarts.
        self._history_lost = fetch is None
        self._slice_start = time.monotonic()

    async def on_live(self, seq: int, payload: bytes) -> None:
        stats = self.stats
        stats.received += 1
        if self.live_last is not None and seq <= self.live_last:
            stats.restarts += 1
            log.info("kv events %s: sequence went back from %d to %d (engine restart); "
                     "clearing", self.name, self.live_last, seq)
            self._sink.clear_endpoint(self.name)
            self.applied_last = None
            self._history_lost = self._fetch is None
        self.live_last = seq
        if self.applied_last is not None and seq <= self.applied_last:
            return  # already applied (defensive: replays stop short of live messages)
        expected = self._next_expected()
        if seq > expected:
            had_history = self.applied_last is not None
            if had_history:
                stats.gaps += 1
                self._logs.warning("gap", "kv events %s: gap, expected %d got %d",
                                   self.name, expected, seq)
            await self._replay(expected, until=seq, reapply=False)
            if had_history:
                stats.lost += seq - self._next_expected()
        self._apply(seq, payload, replayed=False)
        await self._yield_if_due()
        if self._resync_due:
            self._resync_due = False
            self._last_resync = time.monotonic()
            await self._replay(0, until=self._next_expected(), reapply=True)

    async def _yield_if_due(self) -> None:
        if time.monotonic() - self._slice_start >= INGEST_SLICE_S:
            await asyncio.sleep(0)
            self._slice_start = time.monotonic()

    def _next_expected(self) -> int:
        return 0 if self.applied_last is None else self.applied_last + 1

    async def _replay(self, start: int, *, until: int, reapply: bool) -> None:
        """Apply replayed batches with ``start <= seq < until``; later ones also arrive
        live (they are queued in the SUB), so the replay stops there.

        ``reapply`` re-delivers batches already applied: a resync. Re-applying a prefix
        of the stream in order leaves the index as it was, plus what it could not key
        the first time.
        """
        if self._fetch is None or time.monotonic() < self._replay_blocked_until:
            return
        self.stats.replays += 1
        first: int | None = None
        try:
            async with contextlib.aclosing(self._fetch(start)) as replayed:
                async for seq, payload in replayed:
                    if seq >= until:
                        break
                    if first is None:
                        first = seq
                    if reapply or self.applied_last is None or seq > self.applied_last:
                        self._apply(seq, payload, replayed=True)
                        await self._yield_if_due()
        except _ReplayTimeout:
            self.stats.replay_failures += 1
            self._replay_blocked_until = time.monotonic() + self._settings.replay_backoff
            self._logs.warning("replay", "kv events %s: no replay answer within %.1fs; "
                               "not asking again for %.0fs", self.name,
                               self._settings.replay_timeout, self._settings.replay_backoff)
            return
        if start == 0 and first != 0:
            self._history_lost = True

    def _apply(self, seq: int, payload: bytes, *, replayed: bool) -> None:
        stats = self.stats
        if self.applied_last is None or seq > self.applied_last:
            self.applied_last = seq  # also when undecodable: replay would not fix it
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as exc:
            stats.decode_errors += 1
            self._logs.warning("decode", "kv events %s: batch %d: %s", self.name, seq, exc)
            return
        stats.unknown_events += batch.unknown_events
        try:
            result = self._sink.apply_batch(self.name, batch)
        except Exception:  # a sink bug must not stop the stream
            stats.errors += 1
            if self._logs.allow("sink") is not None:
                log.exception("kv events %s: sink failed on batch %d", self.name, seq)
            return
        stats.applied += 1
        if result.missing_parent:
            stats.missing_parent += 1
            if (not replayed and not self._history_lost
                    and time.monotonic() - self._last_resync >= self._settings.resync_interval):
                self._resync_due = True


async def _recv(sock: zmq.asyncio.Socket, raw: zmq.Socket[bytes],
                timeout_ms: int | None = None) -> list[bytes] | None:
    """Next message; None after ``timeout_ms`` without one.

    Queued messages are taken through ``raw``, a blocking-API shadow of the same
    socket, with NOBLOCK: pyzmq's asyncio ``recv_multipart`` makes a Future per
    message and costs about 5x as much (28 vs 6 us per message, measured). Only an
    empty queue waits on the asyncio socket.
    """
    while True:
        try:
            return raw.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            if not await sock.poll(timeout_ms):  # POLLIN
                return None


def _parse_live(frames: list[bytes]) -> tuple[bytes, int, bytes] | None:
    """``[topic, seq, payload]`` -> its parts, or None when malformed."""
    if len(frames) != 3 or len(frames[1]) != SEQ_BYTES:
        return None
    return frames[0], int.from_bytes(frames[1], "big"), frames[2]


def _parse_replay(frames: list[bytes]) -> tuple[int, bytes] | None:
    """A ROUTER reply as a DEALER sees it: ``[b"", seq, payload]`` or, from newer vLLM,
    ``[b"", topic, seq, payload]``. The end marker has ``seq == END_OF_REPLAY``."""
    if frames and not frames[0]:
        frames = frames[1:]
    if len(frames) == 3:
        frames = frames[1:]
    if len(frames) != 2 or len(frames[0]) != SEQ_BYTES:
        return None
    return int.from_bytes(frames[0], "big"), frames[1]


_END_SEQ = int.from_bytes(END_OF_REPLAY, "big")


def _with_port(address: str, port_offset: int) -> str | None:
    """``tcp://host:port`` with the port moved by ``port_offset``; None if not tcp."""
    scheme, sep, rest = address.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isdigit():
        return None
    return f"{scheme}://{host}:{int(port) + port_offset}"


def _zmq_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


class KVEventSubscriber:
    """Follows one endpoint's KV-event publisher and feeds its batches to the sink."""

    def __init__(self, endpoint: Endpoint, sink: EventSink, *,
                 context: zmq.asyncio.Context,
                 settings: KVEventsSettings | None = None) -> None:
        self.settings = settings or KVEventsSettings()
        self.endpoint = endpoint
        self.stats = KVEventStats()
        self._ctx = context
        self._sink = sink
        self._logs = _LogLimiter()
        publisher = endpoint.kv_events or f"tcp://*:{self.settings.default_port}"
        # A publisher address copied from the engine's own config binds on all
        # interfaces; reach it at the endpoint's IP.
        for wildcard in ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:"):
            if publisher.startswith(wildcard):
                publisher = f"tcp://{_zmq_host(endpoint.ip)}:{publisher[len(wildcard):]}"
        self.publisher = publisher
        offset = self.settings.replay_port_offset
        self.replay_address = None if offset is None else _with_port(publisher, offset)
        self.topic = (f"{TOPIC_PREFIX}{endpoint.address}@".encode()
                      if self.settings.topic_filter else b"")
        self._ipv6 = "[" in publisher
        self._stream = _Stream(endpoint.name, sink, self.stats, self.settings,
                               self._fetch_replay if self.replay_address else None,
                               self._logs)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Connect and start receiving (needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"kv-events-{self.endpoint.name}")

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

    async def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        try:
            sub.linger = 0
            sub.rcvhwm = self.settings.rcvhwm
            sub.ipv6 = self._ipv6
            sub.setsockopt(zmq.SUBSCRIBE, self.topic)
            sub.connect(self.publisher)
            log.info("kv events %s: subscribed to %s (replay %s)", self.endpoint.name,
                     self.publisher, self.replay_address or "off")
            raw: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
            while True:
                frames = await _recv(sub, raw)
                assert frames is not None  # no timeout
                parsed = _parse_live(frames)
                if parsed is None:
                    self.stats.dropped += 1
                    self._logs.warning("frames", "kv events %s: dropped malformed message "
                                       "(%d frames)", self.endpoint.name, len(frames))
                    continue
                try:
                    await self._stream.on_live(parsed[1], parsed[2])
                except Exception:  # e.g. clear_endpoint raised: keep receiving
                    self.stats.errors += 1
                    if self._logs.allow("error") is not None:
                        log.exception("kv events %s: failed on batch %d", self.endpoint.name,
                                      parsed[1])
        except zmq.ContextTerminated:
            pass
        finally:
            sub.close(linger=0)

    async def _fetch_replay(self, start: int) -> AsyncGenerator[tuple[int, bytes], None]:
        assert self.replay_address is not None
        dealer = self._ctx.socket(zmq.DEALER)  # a fresh one: no stale replies
        try:
            dealer.linger = 0
            dealer.ipv6 = self._ipv6
            dealer.connect(self.replay_address)
            await dealer.send_multipart([b"", start.to_bytes(SEQ_BYTES, "big")])
            timeout_ms = int(self.settings.replay_timeout * 1000)
            raw: zmq.Socket[bytes] = zmq.Socket.shadow(dealer.underlying)
            while True:
                frames = await _recv(dealer, raw, timeout_ms)
                if frames is None:
                    raise _ReplayTimeout(self.replay_address)
                parsed = _parse_replay(frames)
                if parsed is None:
                    self.stats.dropped += 1
                    self._logs.warning("replay-frames", "kv events %s: malformed replay "
                                       "frame", self.endpoint.name)
                    continue
                if parsed[0] == _END_SEQ:
                    return
                yield parsed
        finally:
            dealer.close(linger=0)


@dataclass(frozen=True, slots=True)
class _Spec:
    """What a subscription depends on: a change means resubscribing."""

    publisher: str | None
    address: str


class KVEventsManager:
    """Keeps KV-event subscriptions in step with the endpoint pool.

    Per-endpoint mode starts a :class:`KVEventSubscriber` per endpoint and stops it when
    the endpoint leaves (or its address changes); central mode (``bind=``) receives
    every engine on one bound SUB. Either way an endpoint that leaves is cleared from
    the sink, after its last delivery. Pool changes are handled synchronously in the
    pool's listener, so the pool must be changed from the event loop's thread.
    """

    def __init__(self, pool: EndpointPool, sink: EventSink, *,
                 default_port: int = DEFAULT_PUB_PORT,
                 replay_port_offset: int | None = DEFAULT_REPLAY_PORT_OFFSET,
                 topic_filter: bool = True, bind: str | None = None,
                 replay_timeout: float = DEFAULT_REPLAY_TIMEOUT_S,
                 replay_backoff: float = DEFAULT_REPLAY_BACKOFF_S,
                 resync_interval: float = DEFAULT_RESYNC_INTERVAL_S,
                 rcvhwm: int = DEFAULT_RCVHWM) -> None:
        self.settings = KVEventsSettings(
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
        self._by_address: dict[tuple[str, int], str] = {}  # (ip, port) -> endpoint name
        self._streams: dict[bytes, _Stream] = {}  # per topic
        self._central_stats: dict[str, KVEventStats] = {}
        self._logs = _LogLimiter()
        # central mode: messages no pool endpoint claims (malformed, or unknown topic)
        self.unmatched = 0
        self.bound_address: str | None = None  # central mode: as bound, port resolved

    def stats(self) -> dict[str, KVEventStats]:
        """Live counters per endpoint name."""
        if self.settings.bind is not None:
            return dict(self._central_stats)
        return {name: sub.stats for name, sub in self.subscribers.items()}

    async def start(self) -> None:
        """Subscribe to the pool's current endpoints and follow its changes."""
        if self._running:
            return
        self._ctx = zmq.asyncio.Context()
        self._running = True
        if self.settings.bind is not None:
            sub = self._ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.rcvhwm = self.settings.rcvhwm
            sub.ipv6 = "[" in self.settings.bind
            sub.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX.encode()
                           if self.settings.topic_filter else b"")
            try:
                sub.bind(self.settings.bind)
            except zmq.ZMQError:
                sub.close(linger=0)
                self._ctx.destroy(linger=0)
                self._ctx, self._running = None, False
                raise
            self.bound_address = sub.getsockopt_string(zmq.LAST_ENDPOINT)
            self._central_task = asyncio.get_running_loop().create_task(
                self._run_central(sub), name="kv-events-central")
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
        self._specs.clear()
        self._streams.clear()
        self._by_address.clear()
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
        central = self.settings.bind is not None
        return _Spec(None if central else endpoint.kv_events, endpoint.address)

    def _add(self, endpoint: Endpoint) -> None:
        assert self._ctx is not None
        self._specs[endpoint.name] = self._spec(endpoint)
        if self.settings.bind is not None:
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
        if self.settings.bind is not None:
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

    async def _run_central(self, sub: zmq.asyncio.Socket) -> None:
        try:
            raw: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
            while True:
                frames = await _recv(sub, raw)
                assert frames is not None  # no timeout
                parsed = _parse_live(frames)
                stream = None if parsed is None else self._stream_for(parsed[0])
                if parsed is None or stream is None:
                    self.unmatched += 1
                    self._logs.warning("central", "kv events: dropped a message with %s",
                                       "malformed frames" if parsed is None
                                       else f"topic {parsed[0][:80]!r} (no such endpoint)")
                    continue
                try:
                    await stream.on_live(parsed[1], parsed[2])
                except Exception:  # e.g. clear_endpoint raised: keep receiving
                    stream.stats.errors += 1
                    if self._logs.allow("error") is not None:
                        log.exception("kv events %s: failed on batch %d", stream.name,
                                      parsed[1])
        except zmq.ContextTerminated:
            pass
        finally:
            sub.close(linger=0)

    def _stream_for(self, topic: bytes) -> _Stream | None:
        stream = self._streams.get(topic)
        if stream is not None:
            return stream
        address = _topic_address(topic)
        name = None if address is None else self._by_address.get(address)
        if name is None:
            return None
        stream = _Stream(name, self._sink, self._central_stats[name], self.settings,
                         None, self._logs)
        self._streams[topic] = stream
        return stream


def _topic_address(topic: bytes) -> tuple[str, int] | None:
    """``kv@<ip>:<port>@<model>`` -> ``(ip, port)``, IPv6 with or without brackets."""
    try:
        text = topic.decode()
    except UnicodeDecodeError:
        return None
    if not text.startswith(TOPIC_PREFIX):
        return None
    try:
        return parse_address(text[len(TOPIC_PREFIX):].partition("@")[0])
    except ValueError:
        return None
