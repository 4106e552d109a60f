"""Replica sync: EPP replicas behind one gateway tell each other what they routed, over
a NATS subject, so each one's index and load see the others' decisions.

Every replica subscribes to every engine's KV events, so *confirmed* cache state is the
same everywhere. What is replica-local is what routing decided and the engines have not
confirmed yet: pending picks and in-flight prefill load. This hook shares exactly that:

- after the precise prefix cache's own pre-request hook entered a request's blocks as
  pending on the chosen endpoint, it publishes the pick (endpoint, block keys, TTL) and
  the request's uncached prompt tokens; at response completion, whether it failed;
- from a peer's route message it enters the same pending blocks in the local index and
  counts the tokens as the endpoint's peer in-flight load (``EndpointLoad.peer_*``)
  until the peer's completion message or the TTL, whichever first; a failed completion
  drops those pending blocks again.

Delivery is NATS core (at most once): a lost message costs at most one TTL of stale
state. Publishing never blocks a request: messages go to a bounded outbox that a
supervised task sends, and while NATS is unreachable they are dropped and counted.

The hooks take the scheduling context and result duck-typed: this package sits beside
the data layer and does not import scheduling. The NATS client is imported only when
a sync starts (``pip install 'epp[sync]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.datastore import Endpoint
from epp.kvcache.feedback import PENDING_PICK_KEY, SERVED_ENDPOINT_KEY, endpoint_pending_ttl
from epp.kvcache.index import BlockIndex, PendingPick
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.replicasync import wire
from epp.replicasync.peers import DEFAULT_MAX_PEER_BYTES, DEFAULT_MAX_PEER_ENTRIES, PeerTable
from epp.replicasync.settings import redact
from epp.supervise import FailureCounter, LogLimiter, supervised

log = logging.getLogger(__name__)

# Cycle-state key: (request key, endpoint) of a request whose route was published.
SYNC_REQUEST_KEY = "replica-sync-request"
# The supervised connection task's kind in the background-failure count.
SYNC_TASK = "replica-sync"

# Outgoing messages waiting for the sender: a few seconds of a busy replica's traffic
# (~1,000 routes/s, two messages each); past either bound, new ones are dropped.
OUTBOX_MAX_MESSAGES = 8192
OUTBOX_MAX_BYTES = 8 * 1024 * 1024
# A publish hands bytes to the client's buffer; one that takes longer than this means a
# wedged connection: the message is dropped and the sender goes on.
PUBLISH_TIMEOUT_S = 1.0
# Heartbeats: peers count a replica as present while they heard from it within
# PEER_ALIVE_S (three beats, so one lost beat does not flap the gauge).
HEARTBEAT_S = 5.0
PEER_ALIVE_S = 3 * HEARTBEAT_S
# Peers remembered (for the gauge and log lines), most recently heard kept.
MAX_PEERS = 256
# NATS client options. Reconnect forever, a second apart: a restarted NATS server is
# back in use within ~1 s. Pings every 10 s, two unanswered = dead: a half-open TCP
# connection (a node gone without a FIN) is noticed within ~30 s.
RECONNECT_WAIT_S = 1.0
CONNECT_TIMEOUT_S = 2.0
PING_INTERVAL_S = 10.0
MAX_OUTSTANDING_PINGS = 2
# The client's own outgoing buffer, and how long a full one may wait for the socket.
CLIENT_PENDING_BYTES = 2 * 1024 * 1024
FLUSH_TIMEOUT_S = 1.0
# Incoming messages the client may queue for us before dropping (slow consumer): a
# couple of seconds of a busy fleet's routes, at most 32 MiB.
SUB_PENDING_MSGS = 20_000
SUB_PENDING_BYTES = 32 * 1024 * 1024
# Stopping: at most this long to send the last completions and the farewell.
STOP_TIMEOUT_S = 2.0
# Timers fire on the loop's clock; a hair late so the entries they are for have expired.
_TIMER_SLACK_S = 0.001

_SENT_KINDS = tuple(wire.KIND_NAMES.values())
# Why a message was dropped: outgoing (disconnected, queue_full, publish_error, error),
# incoming (unknown_endpoint, slow_consumer, apply_error).
DROP_REASONS = ("disconnected", "queue_full", "publish_error", "error", "unknown_endpoint",
                "slow_consumer", "apply_error")
DECODE_REASONS = ("malformed", "oversized", "version")


class ReplicaSyncError(Exception):
    """Replica sync cannot run (the NATS client is missing) or its connection closed."""


@dataclass(slots=True)
class SyncStats:
    """Counters of one replica sync (exported as metrics)."""

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SENT_KINDS, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SENT_KINDS, 0))
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    decode_errors: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DECODE_REASONS, 0))
    disconnects: int = 0
    reconnects: int = 0


class _Outbox:
    """Encoded messages waiting for the sender, bounded by count and bytes."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._items: deque[tuple[str, bytes]] = deque()
        self._bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, kind: str, payload: bytes) -> bool:
        if (len(self._items) >= self._max_messages
                or self._bytes + len(payload) > self._max_bytes):
            return False
        self._items.append((kind, payload))
        self._bytes += len(payload)
        self.ready.set()
        return True

    def pop(self) -> tuple[str, bytes]:
        kind, payload = self._items.popleft()
        self._bytes -= len(payload)
        return kind, payload

    def clear(self) -> int:
        count = len(self._items)
        self._items.clear()
        self._bytes = 0
        return count


class ReplicaSync:
    """Pre-request and response-complete hook that shares routing with peer replicas;
    the runner starts and stops it (see the module docstring)."""

    name = "replica-sync"

    def __init__(self, *, servers: Sequence[str], subject: str,
                 endpoints: Callable[[str], Endpoint | None],
                 indexes: Sequence[BlockIndex] = (), replica_id: str | None = None,
                 on_task_failure: FailureCounter | None = None,
                 max_entries: int = DEFAULT_MAX_PEER_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_PEER_BYTES,
                 heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if importlib.util.find_spec("nats") is None:
            raise ReplicaSyncError("--replica-sync-url needs the NATS client: "
                                   "pip install 'epp[sync]'")
        self.servers = tuple(servers)
        self.subject = subject
        self.replica_id = replica_id or secrets.token_hex(8)
        self._endpoints = endpoints
        # Indexes whose pending picks are shared: every precise prefix cache with pending
        # picks on, each entering the same keys, as the local feedback hooks do.
        self._indexes = tuple(indexes)
        self._on_task_failure = on_task_failure
        self._clock = clock
        self._heartbeat_s = heartbeat_s
        self._random = random.Random(secrets.randbits(64))
        self._logs = LogLimiter(log)
        self.stats = SyncStats()
        self.table = PeerTable(max_entries=max_entries, max_bytes=max_bytes)
        self._peers: dict[str, float] = {}  # replica -> last heard (monotonic)
        self._outbox = _Outbox(OUTBOX_MAX_MESSAGES, OUTBOX_MAX_BYTES)
        self._nc: Any = None  # nats.aio.client.Client while a connection is up or coming
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._stopping = False
        self._beat_now = False  # a new peer appeared: tell it of this replica at once

    # -- state ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up now."""
        nc = self._nc
        return nc is not None and bool(nc.is_connected)

    def peers(self, now: float | None = None) -> int:
        """Replicas heard from within ``PEER_ALIVE_S``."""
        since = (self._clock() if now is None else now) - PEER_ALIVE_S
        return sum(1 for heard in self._peers.values() if heard >= since)

    # -- hooks (request path: never raise, never block) -------------------------------

    def pre_request(self, ctx: Any, result: Any, headers: Any) -> None:
        """Publish where the request goes, the blocks it will store there, and its load."""
        try:
            self._publish_route(ctx, result)
        except Exception:  # a sync fault must not fail the request
            self.stats.dropped["error"] += 1
            self._logs.warning("pre-request", "replica sync: cannot publish a route",
                               exc_info=True)

    def _publish_route(self, ctx: Any, result: Any) -> None:
        if not result.endpoints:
            return
        if not self.connected:
            self.stats.dropped["disconnected"] += 1
            return
        primary: Endpoint = result.endpoints[0]
        cycle = ctx.cycle
        match = cycle.get(PREFIX_MATCH_KEY)
        # The director counts the same number as this replica's own prefill load.
        if isinstance(match, PrefixMatch):
            uncached = match.uncached_tokens(primary.name)
        else:
            uncached = ctx.request.estimated_tokens() if ctx.request is not None else 0
        pick = cycle.get(PENDING_PICK_KEY)
        if isinstance(pick, PendingPick) and pick.endpoint == primary.name:
            keys: Sequence[int] = pick.keys
            ttl = pick.expires - self._clock()
        else:  # no pending pick (approximate match, picks off, P/D): the load alone
            keys = ()
            ttl = endpoint_pending_ttl(primary.state, uncached)
        # No pod held any of it: peers' no-hit-lru-scorer counts the placement.
        cold = not isinstance(match, PrefixMatch) or not any(
            m.expected_blocks > 0 for m in match.matches.values())
        request = self._random.getrandbits(64)
        payload = wire.route(self.replica_id, request, primary.name, keys, ttl, uncached,
                             cold)
        if self._enqueue("route", payload):
            cycle[SYNC_REQUEST_KEY] = (request, primary.name)

    def on_first_bytes(self, ctx: Any) -> None:
        """Publish that a request whose route was published has prefilled (its first
        response bytes came), as this replica's own load accounting does."""
        sent = ctx.cycle.get(SYNC_REQUEST_KEY)
        if sent is not None:
            self._queue_from_hook("prefilled", "a prefill",
                          lambda: wire.prefilled(self.replica_id, sent[0]))

    def response_complete(self, ctx: Any, result: Any, status: int, usage: Any) -> None:
        """Publish that a request whose route was published ended, and whether it failed
        (no answer, an error, or another endpoint served it: no prefill where routed)."""
        sent = ctx.cycle.get(SYNC_REQUEST_KEY)
        if sent is None:
            return
        request, endpoint = sent
        failed = status == 0 or status >= 400 or ctx.cycle.get(SERVED_ENDPOINT_KEY) != endpoint
        self._queue_from_hook("done", "a completion",
                      lambda: wire.done(self.replica_id, request, failed))

    def _queue_from_hook(self, kind: str, what: str, encode: Callable[[], bytes]) -> None:
        """Queue one message from a response hook: never raises, counts what it drops."""
        try:
            if not self.connected:
                self.stats.dropped["disconnected"] += 1
                return
            self._enqueue(kind, encode())
        except Exception:
            self.stats.dropped["error"] += 1
            self._logs.warning(kind, f"replica sync: cannot publish {what}", exc_info=True)

    def _enqueue(self, kind: str, payload: bytes) -> bool:
        if not self._outbox.put(kind, payload):
            self.stats.dropped["queue_full"] += 1
            self._logs.warning("queue_full", "replica sync: outbox full (%d messages); "
                               "dropping", len(self._outbox))
            return False
        return True

    # -- receiving --------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Apply one message from the subject (a peer's, or anything else published
        there: what does not decode is counted and ignored)."""
        try:
            message = wire.decode(data)
        except wire.DecodeFailure as exc:
            self.stats.decode_errors[exc.reason] += 1
            self._logs.warning(f"decode {exc.reason}", "replica sync: ignored a message on "
                               "%s (%s: %s)", self.subject, exc.reason, exc)
            return
        if message.replica == self.replica_id:
            return  # our own (the server does not echo them; a second connection might)
        now = self._clock()
        self._heard(message.replica, now)
        try:
            if isinstance(message, wire.Route):
                if not self._on_route(message, now):
                    return
            elif isinstance(message, wire.Done):
                self._on_done(message)
            elif isinstance(message, wire.Prefilled):
                self.table.prefilled((message.replica, message.request))
            elif message.kind == wire.KIND_BYE:
                self.table.forget_replica(message.replica)
                self._peers.pop(message.replica, None)
                log.info("replica sync: peer %s left", message.replica)
        except Exception:
            self.stats.dropped["apply_error"] += 1
            self._logs.warning("apply", "replica sync: cannot apply a peer's message",
                               exc_info=True)
            return
        self.stats.received[wire.KIND_NAMES[message.kind]] += 1
        self._arm()

    def _on_route(self, m: wire.Route, now: float) -> bool:
        endpoint = self._endpoints(m.endpoint)
        if endpoint is None:  # not (or no longer, or not yet) in this replica's pool
            self.stats.dropped["unknown_endpoint"] += 1
            return False
        if m.cold:
            endpoint.state.peer_cold_pick_at = now
        picks: tuple[PendingPick, ...] = ()
        if m.keys:
            keys = wire.unpack_keys(m.keys)
            picks = tuple(index.add_pending(endpoint.name, keys, m.ttl_s)
                          for index in self._indexes)
        self.table.add(m.replica, m.request, endpoint.name, endpoint.state.load, m.uncached,
                       picks, now + m.ttl_s)
        return True

    def _on_done(self, m: wire.Done) -> None:
        entry = self.table.pop((m.replica, m.request))
        if entry is not None and m.failed:
            # No prefill happened where the peer routed it: its blocks are not coming.
            for index, pick in zip(self._indexes, entry.picks):
                index.drop_pending(pick)

    def _heard(self, replica: str, now: float) -> None:
        peers = self._peers
        if peers.pop(replica, None) is None:
            log.info("replica sync: peer %s joined", replica)
            self._beat_now = True  # it may have missed our last heartbeat
            self._outbox.ready.set()
            if len(peers) >= MAX_PEERS:
                del peers[next(iter(peers))]  # the least recently heard
        peers[replica] = now  # re-inserted: the dict stays in order of last heard

    def _arm(self) -> None:
        """Have the soonest peer entry's expiry run when it is due."""
        due = self.table.next_expiry()
        if due is None or (self._timer is not None and self._timer_at <= due):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, due - self._clock()) + _TIMER_SLACK_S, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.table.expire(self._clock())
        self._arm()

    # -- the connection ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect and serve in the background (NATS being down delays nothing)."""
        log.info("replica sync: replica %s on subject %s via %s", self.replica_id,
                 self.subject, ", ".join(redact(s) for s in self.servers))
        self._task = asyncio.get_running_loop().create_task(supervised(
            self._run, task=SYNC_TASK, what=f"NATS connection on {self.subject}",
            logs=self._logs, count=self._on_task_failure), name="replica-sync")

    async def stop(self) -> None:
        """Send what is queued and a farewell (peers drop this replica's load at once),
        then close; bounded by ``STOP_TIMEOUT_S``."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    if nc.is_connected:
                        while self._outbox:
                            kind, payload = self._outbox.pop()
                            await self._publish(nc, kind, payload)
                        await self._publish(nc, "bye",
                                            wire.presence(self.replica_id, wire.KIND_BYE))
                        await nc.flush(timeout=STOP_TIMEOUT_S)
            except Exception as exc:  # stopping anyway; peers fall back on TTLs
                log.info("replica sync: farewell not sent (%s: %s)", type(exc).__name__, exc)
            await _close(nc)
        self._outbox.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.table.clear()

    async def _run(self) -> None:
        """One connection's life: connect (retrying forever), subscribe, send."""
        from nats.aio.client import Client

        nc = Client()
        self._nc = nc
        try:
            await nc.connect(
                servers=list(self.servers), name=f"epp-{self.replica_id}", no_echo=True,
                allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]
                connect_timeout=CONNECT_TIMEOUT_S,  # type: ignore[arg-type]
                ping_interval=PING_INTERVAL_S,  # type: ignore[arg-type]
                max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                pending_size=CLIENT_PENDING_BYTES, flush_timeout=FLUSH_TIMEOUT_S,
                error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected, closed_cb=self._on_closed)
            log.info("replica sync: connected to %s", _server_of(nc))
            await nc.subscribe(self.subject, cb=self._on_message,
                               pending_msgs_limit=SUB_PENDING_MSGS,
                               pending_bytes_limit=SUB_PENDING_BYTES)
            await self._send_loop(nc)
        except asyncio.CancelledError:
            raise  # stop() sends the farewell and closes
        except BaseException:
            self._nc = None
            await _close(nc)
            raise

    async def _send_loop(self, nc: Any) -> None:
        outbox = self._outbox
        beat = wire.presence(self.replica_id, wire.KIND_BEAT)
        next_beat = self._clock()  # at once: peers learn of a new replica
        while True:
            if nc.is_closed:
                raise ReplicaSyncError("the NATS connection closed")
            while outbox:
                kind, payload = outbox.pop()
                await self._publish(nc, kind, payload)
            if self._beat_now or self._clock() >= next_beat:
                self._beat_now = False
                if nc.is_connected:
                    await self._publish(nc, "beat", beat)
                next_beat = self._clock() + self._heartbeat_s
                self._forget_silent_peers()
            outbox.ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - self._clock())):
                    await outbox.ready.wait()

    async def _publish(self, nc: Any, kind: str, payload: bytes) -> None:
        if not nc.is_connected:
            self.stats.dropped["disconnected"] += 1
            return
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await nc.publish(self.subject, payload)
        except Exception as exc:  # nats errors, a timeout: this message is lost
            self.stats.dropped["publish_error"] += 1
            self._logs.warning(f"publish {type(exc).__name__}", "replica sync: publish "
                               "failed (%s: %s); message dropped", type(exc).__name__, exc)
            return
        self.stats.sent[kind] += 1

    def _forget_silent_peers(self) -> None:
        # Gone without a farewell: their entries expire on their own (TTLs); only the
        # names go, after ten times the presence window.
        cutoff = self._clock() - 10 * PEER_ALIVE_S
        for replica in [r for r, heard in self._peers.items() if heard < cutoff]:
            del self._peers[replica]

    async def _on_message(self, msg: Any) -> None:
        self.receive(msg.data)

    async def _on_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):
            self.stats.dropped["slow_consumer"] += 1
            key, what = "slow_consumer", "incoming messages dropped: this replica is behind"
        else:
            key, what = type(exc).__name__, f"{type(exc).__name__}: {exc}"
        self._logs.warning(f"nats {key}", "replica sync: %s", what)

    async def _on_disconnected(self) -> None:
        if self._stopping:
            return
        self.stats.disconnects += 1
        self._logs.warning("disconnected", "replica sync: disconnected from NATS; routing "
                           "goes on alone, reconnecting every %.0f s", RECONNECT_WAIT_S)

    async def _on_closed(self) -> None:
        self._outbox.ready.set()  # the send loop notices, ends, and is restarted

    async def _on_reconnected(self) -> None:
        self.stats.reconnects += 1
        log.info("replica sync: reconnected to %s", _server_of(self._nc))


def _server_of(nc: Any) -> str:
    url = getattr(nc, "connected_url", None)
    return redact(url.geturl()) if url is not None else "NATS"


async def _close(nc: Any) -> None:
    """Close a client, whatever state its connection is in, within ``STOP_TIMEOUT_S``."""
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await nc.close()
    except Exception as exc:
        log.debug("replica sync: close: %s: %s", type(exc).__name__, exc)
