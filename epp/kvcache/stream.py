"""Sequence tracking for one KV-event publisher: order batches by sequence, replay what
was missed, notice engine restarts, and deliver decoded batches to the sink.

Rules (``EventStream``):

* the first message, or a gap, replays from the first missing sequence up to (not
  including) the live message in hand; live messages that arrive meanwhile wait in the
  SUB queue (``rcvhwm``) and are applied after it, so each batch is applied once;
* a sequence at or below the last one *received live* means the engine restarted (a
  PUB never repeats one): the endpoint is cleared, then replayed from 0;
* a gap replay starts one batch early, at the last batch applied: if the engine's copy
  of it differs from ours, the engine restarted and published more batches than we had
  seen before we heard from it again; the endpoint is cleared and replayed from 0;
* a jump of more than ``MAX_CREDIBLE_GAP`` batches is not a gap (no replay buffer could
  fill it) but a publisher reset: counted as a ``sequence_jump``, cleared and resynced,
  never claimed as lost batches;
* a replay that cannot fill a gap (buffer wrapped, no ROUTER) is given up and counted
  (``lost``), never retried in a loop; a ROUTER that times out is left alone for
  ``replay_backoff`` seconds, so a missing one costs one timeout, not one per gap;
* when the sink reports ``missing_parent``, everything the engine still buffers is
  re-applied (a resync), at most once per ``resync_interval`` and never when a replay
  from 0 already showed the engine's buffer has wrapped (replay could not help). A
  re-applied batch is counted once: its decode errors, unknown events and missing
  parents were counted when it first arrived.

Not detected without replay (central mode, replay off): an engine that restarts and
publishes more batches than we had seen before we hear from it again looks like a gap,
so its old blocks stay until evicted or cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from epp.kvcache.event_settings import KVEventsSettings
from epp.kvcache.events import KVEventDecodeError, decode_batch
from epp.supervise import LogLimiter
from epp.kvcache.types import EventSink

log = logging.getLogger(__name__)

__all__ = ["FAILURE_REASONS", "MAX_CREDIBLE_GAP", "EventStream", "KVEventStats",
           "ReplayFetch", "ReplayTimeout"]

# Longest stretch of ingest between yields to the event loop. A queued message is
# received without suspending, so a backlog (a burst, a 10,000-batch replay) would
# otherwise hold the loop, and every request waiting on it, until it drained.
INGEST_SLICE_S = 0.002
# The largest forward jump of the sequence still treated as missed batches: vLLM's
# replay buffer (``buffer_steps``) holds 10,000 batches, so a longer gap could never be
# filled and the index's view of that engine is unknowable. A longer jump (a publisher
# that reset its numbering, e.g. 5 -> 2**63) is a reset: clear and resync, and count
# it once, instead of claiming up to 2**64 lost batches.
MAX_CREDIBLE_GAP = 10_000


@dataclass(slots=True)
class KVEventStats:
    """Counters for one endpoint (plain ints, read by metrics)."""

    received: int = 0  # live messages with a well-formed sequence
    applied: int = 0  # distinct batches delivered to the sink, live or replayed
    decode_errors: int = 0  # payloads that did not decode (their sequence still counts)
    gaps: int = 0  # sequence gaps seen on the live stream
    lost: int = 0  # batches in gaps that no replay recovered
    replays: int = 0  # replay requests sent
    replay_failures: int = 0  # replay requests that timed out
    restarts: int = 0  # the engine restarted (sequence went back, or history diverged)
    sequence_jumps: int = 0  # jumps beyond MAX_CREDIBLE_GAP: publisher resets
    resyncs: int = 0  # full re-applications after missing parents
    unknown_events: int = 0  # events of unknown types, skipped
    dropped: int = 0  # live messages with wrong frames or a bad sequence
    bad_replay_frames: int = 0  # replay replies that were not [seq, payload]
    unknown_topics: int = 0  # central mode: topics of no pool endpoint
    missing_parent: int = 0  # batches the sink could not fully key by prefix
    sink_errors: int = 0  # the sink raised on a batch or a clear
    connect_errors: int = 0  # the publisher address was refused by ZMQ
    crashes: int = 0  # the receive loop died of an unexpected exception
    subscriber_restarts: int = 0  # the receive loop was restarted (connect error, crash)

    def failure_counts(self) -> dict[str, int]:
        """Every failure mode by its metric ``reason`` label."""
        return {reason: getattr(self, attr) for attr, reason in FAILURE_REASONS}


# (KVEventStats attribute, ``reason`` label of epp_kv_event_failures_total)
FAILURE_REASONS = (
    ("decode_errors", "decode_error"),
    ("unknown_events", "unknown_event"),
    ("dropped", "bad_frame"),
    ("bad_replay_frames", "bad_replay_frame"),
    ("unknown_topics", "unknown_topic"),
    ("gaps", "gap"),
    ("lost", "lost"),
    ("replay_failures", "replay_timeout"),
    ("sequence_jumps", "sequence_jump"),
    ("sink_errors", "sink_error"),
    ("connect_errors", "connect_error"),
    ("crashes", "crash"),
)

ReplayFetch = Callable[[int], AsyncGenerator[tuple[int, bytes], None]]


class ReplayTimeout(Exception):
    """The replay ROUTER did not answer in time."""


class _Replay(enum.Enum):
    DONE = "done"
    UNAVAILABLE = "unavailable"  # no ROUTER, backing off, or it timed out
    DIVERGED = "diverged"  # the engine's copy of our last batch differs: it restarted


class EventStream:
    """Sequence tracking and delivery for one publisher."""

    def __init__(self, name: str, sink: EventSink, stats: KVEventStats,
                 settings: KVEventsSettings, fetch: ReplayFetch | None) -> None:
        self.name = name
        self.stats = stats
        self._sink = sink
        self._settings = settings
        self._fetch = fetch
        self._logs = LogLimiter(log)
        self.live_last: int | None = None  # last sequence received live
        self.applied_last: int | None = None  # last sequence applied (live or replayed)
        # The payload of ``applied_last``: a gap replay compares the engine's copy.
        self._last_payload: bytes | None = None
        self._replay_blocked_until = -math.inf
        self._last_resync = -math.inf
        self._resync_due = False
        # A replay from 0 that began later than 0: the engine's buffer has wrapped, so
        # replays cannot supply missing parents until it restarts.
        self._history_lost = fetch is None
        self._slice_start = time.monotonic()

    async def on_live(self, seq: int, payload: bytes) -> None:
        """One live message: detect restarts and gaps, replay, apply."""
        stats = self.stats
        stats.received += 1
        if self.live_last is not None and seq <= self.live_last:
            stats.restarts += 1
            log.info("kv events %s: sequence went back from %d to %d (engine restart); "
                     "clearing", self.name, self.live_last, seq)
            self._forget()
        self.live_last = seq
        if self.applied_last is not None and seq <= self.applied_last:
            return  # already applied (defensive: replays stop short of live messages)
        expected = self._next_expected()
        if seq > expected:
            if self.applied_last is None:  # first message: history, not a gap
                await self._replay(expected, until=seq, reapply=False)
            elif seq - expected > MAX_CREDIBLE_GAP:
                stats.sequence_jumps += 1
                self._logs.warning("jump", "kv events %s: sequence jumped from %d to %d, "
                                   "beyond any replay buffer: treating it as a publisher "
                                   "reset; clearing", self.name, expected - 1, seq)
                self._forget()
                await self._replay(0, until=seq, reapply=False)
            else:
                stats.gaps += 1
                self._logs.warning("gap", "kv events %s: gap, expected %d got %d",
                                   self.name, expected, seq)
                await self._fill_gap(seq)
        self._apply(seq, payload, replayed=False)
        await self._yield_if_due()
        if self._resync_due:
            self._resync_due = False
            self._last_resync = time.monotonic()
            stats.resyncs += 1
            await self._replay(0, until=self._next_expected(), reapply=True)

    def request_resync(self) -> bool:
        """Something outside the stream (a response showing blocks the index never heard
        of) suggests a lost batch: replay the engine's buffer from 0 at the next live
        message. Refused (False) within ``resync_interval`` of the last resync, when the
        engine's buffer is known to have wrapped, or without a replay socket."""
        if (self._fetch is None or self._history_lost or self._resync_due
                or time.monotonic() - self._last_resync < self._settings.resync_interval):
            return False
        self._resync_due = True
        return True

    async def _fill_gap(self, seq: int) -> None:
        """Replay up to ``seq``, starting at the last applied batch to check that the
        engine's history is still the one we applied."""
        assert self.applied_last is not None
        check = None if self._last_payload is None else (self.applied_last,
                                                         self._last_payload)
        start = self.applied_last if check is not None else self.applied_last + 1
        outcome = await self._replay(start, until=seq, reapply=False, check=check)
        if outcome is _Replay.DIVERGED:
            self.stats.restarts += 1
            log.info("kv events %s: the engine's batch %d differs from the one applied "
                     "(engine restart); clearing", self.name, start)
            self._forget()
            await self._replay(0, until=seq, reapply=False)
            return
        self.stats.lost += seq - self._next_expected()  # <= MAX_CREDIBLE_GAP

    async def _yield_if_due(self) -> None:
        if time.monotonic() - self._slice_start >= INGEST_SLICE_S:
            await asyncio.sleep(0)
            self._slice_start = time.monotonic()

    def _next_expected(self) -> int:
        return 0 if self.applied_last is None else self.applied_last + 1

    def _forget(self) -> None:
        """Start over: the sink forgets the endpoint, we forget its sequence."""
        try:
            self._sink.clear_endpoint(self.name)
        except Exception:  # a sink bug must not stop the stream: counted, logged
            self.stats.sink_errors += 1
            self._logs.warning("sink", "kv events %s: the index failed to clear it",
                               self.name, exc_info=True)
        self.applied_last = None
        self._last_payload = None
        self._history_lost = self._fetch is None

    async def _replay(self, start: int, *, until: int, reapply: bool,
                      check: tuple[int, bytes] | None = None) -> _Replay:
        """Apply replayed batches with ``start <= seq < until``; later ones also arrive
        live (they are queued in the SUB), so the replay stops there.

        ``reapply`` re-delivers batches already applied: a resync. Re-applying a prefix
        of the stream in order leaves the index as it was, plus what it could not key
        the first time. ``check`` is a (sequence, payload) we applied: the replayed copy
        must be the same bytes, or the engine's history is not ours (DIVERGED).
        """
        if self._fetch is None or time.monotonic() < self._replay_blocked_until:
            return _Replay.UNAVAILABLE
        self.stats.replays += 1
        first: int | None = None
        try:
            async with contextlib.aclosing(self._fetch(start)) as replayed:
                async for seq, payload in replayed:
                    if seq >= until:
                        break
                    if first is None:
                        first = seq
                    if check is not None and seq == check[0]:
                        if payload != check[1]:
                            return _Replay.DIVERGED
                        continue
                    if reapply or self.applied_last is None or seq > self.applied_last:
                        self._apply(seq, payload, replayed=True)
                        await self._yield_if_due()
        except ReplayTimeout:
            self.stats.replay_failures += 1
            self._replay_blocked_until = time.monotonic() + self._settings.replay_backoff
            self._logs.warning("replay", "kv events %s: no replay answer within %.1fs; "
                               "not asking again for %.0fs", self.name,
                               self._settings.replay_timeout, self._settings.replay_backoff)
            return _Replay.UNAVAILABLE
        if start == 0 and first != 0:
            self._history_lost = True
        return _Replay.DONE

    def _apply(self, seq: int, payload: bytes, *, replayed: bool) -> None:
        stats = self.stats
        # A batch re-delivered by a resync was counted when it first arrived.
        first_time = self.applied_last is None or seq > self.applied_last
        if first_time:
            self.applied_last = seq  # also when undecodable: replay would not fix it
            self._last_payload = payload
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as exc:
            if first_time:
                stats.decode_errors += 1
                self._logs.warning("decode", "kv events %s: batch %d: %s", self.name, seq,
                                   exc)
            return
        if first_time:
            stats.unknown_events += batch.unknown_events
        try:
            result = self._sink.apply_batch(self.name, batch)
        except Exception:  # a sink bug must not stop the stream: counted, logged
            stats.sink_errors += 1
            self._logs.warning("sink", "kv events %s: the index failed on batch %d",
                               self.name, seq, exc_info=True)
            return
        if not first_time:
            return
        stats.applied += 1
        if result.missing_parent:
            stats.missing_parent += 1
            if (not replayed and not self._history_lost
                    and time.monotonic() - self._last_resync >= self._settings.resync_interval):
                self._resync_due = True
