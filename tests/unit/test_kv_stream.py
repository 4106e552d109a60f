"""Sequence accounting of one KV-event stream (``epp.kvcache.stream``), fed directly:
live messages by call, replays from an in-memory engine buffer."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import msgspec
import pytest
from prometheus_client.core import Metric

from epp.kvcache.event_settings import KVEventsSettings
from epp.kvcache.stream import MAX_CREDIBLE_GAP, EventStream, KVEventStats
from epp.kvcache.types import ApplyResult, KVEventBatch
from epp.observability.collectors import KVEventsCollector

UNDECODABLE = b"\xc1 not msgpack"


def payload(ts: float) -> bytes:
    return msgspec.msgpack.encode([ts, [["BlockStored", [int(ts)], None, [1] * 16, 16,
                                         None, "GPU", None]], 0])


class Sink:
    """Records deliveries (by ``ts``) and clears, in order."""

    def __init__(self) -> None:
        self.log: list[float | str] = []
        self.missing_parent_on: set[float] = set()

    def apply_batch(self, endpoint: str, batch: KVEventBatch) -> ApplyResult:
        self.log.append(batch.ts)
        return ApplyResult(stored=1, missing_parent=int(batch.ts in self.missing_parent_on))

    def clear_endpoint(self, endpoint: str) -> None:
        self.log.append("clear")


class Engine:
    """A publisher's replay buffer: every batch it published, by sequence."""

    def __init__(self) -> None:
        self.buffer: dict[int, bytes] = {}
        self.requests: list[int] = []

    def publish(self, seq: int, data: bytes) -> bytes:
        self.buffer[seq] = data
        return data

    async def fetch(self, start: int) -> AsyncGenerator[tuple[int, bytes], None]:
        self.requests.append(start)
        for seq in sorted(self.buffer):
            if seq >= start:
                yield seq, self.buffer[seq]


def make(engine: Engine | None, **settings: Any) -> tuple[EventStream, Sink]:
    sink = Sink()
    fetch = engine.fetch if engine is not None else None
    return EventStream("pod-a", sink, KVEventStats(), KVEventsSettings(**settings),
                       fetch), sink


def scrape(stats: KVEventStats) -> dict[str, Metric]:
    collector = KVEventsCollector(lambda: {"pod-a": stats}, lambda: 0)
    return {m.name: m for m in collector.collect()}


def failure(stats: KVEventStats, reason: str) -> float:
    family = scrape(stats)["epp_kv_event_failures"]
    (value,) = [s.value for s in family.samples if s.labels["reason"] == reason]
    return value


@pytest.mark.asyncio
@pytest.mark.parametrize("replay", [True, False], ids=["replay", "no-replay"])
async def test_a_huge_sequence_jump_is_a_reset_not_lost_batches(replay: bool) -> None:
    # A publisher that sent 2**63 after 5 once made epp_kv_events_lost reach 9.2e18.
    engine = Engine() if replay else None
    stream, sink = make(engine)
    for seq in range(6):
        await stream.on_live(seq, engine.publish(seq, payload(seq)) if engine else payload(seq))
    jump = 2**63
    if engine is not None:
        engine.publish(jump, payload(jump))
    await stream.on_live(jump, payload(jump))
    stats = stream.stats
    assert (stats.lost, stats.gaps, stats.sequence_jumps) == (0, 0, 1)
    assert sink.log[:7] == [0, 1, 2, 3, 4, 5, "clear"]  # the old view is not trusted
    assert sink.log[-1] == jump
    if engine is not None:  # resynced from what the engine still buffers
        assert sink.log[7:-1] == [0, 1, 2, 3, 4, 5]
    # After the reset the stream is followed as usual: a real gap still counts.
    await stream.on_live(jump + 3, payload(jump + 3))  # jump+1, jump+2 never published
    assert (stats.lost, stats.gaps, stats.sequence_jumps) == (2, 1, 1)
    assert failure(stats, "lost") == 2 and failure(stats, "sequence_jump") == 1


@pytest.mark.asyncio
async def test_the_largest_credible_gap_is_still_a_gap() -> None:
    stream, sink = make(None)
    await stream.on_live(0, payload(0))
    await stream.on_live(MAX_CREDIBLE_GAP + 1, payload(1))
    await stream.on_live(2 * MAX_CREDIBLE_GAP + 3, payload(2))  # one past the bound
    assert (stream.stats.lost, stream.stats.gaps) == (MAX_CREDIBLE_GAP, 1)
    assert stream.stats.sequence_jumps == 1
    assert sink.log == [0, 1, "clear", 2]


@pytest.mark.asyncio
async def test_a_resync_after_drops_counts_nothing_twice() -> None:
    # A resync re-applies the engine's whole buffer; batches it had already counted as
    # dropped (undecodable) or missing parents used to be counted again every time.
    engine = Engine()
    stream, sink = make(engine, resync_interval=0.0)
    await stream.on_live(0, engine.publish(0, payload(0)))
    await stream.on_live(1, engine.publish(1, UNDECODABLE))
    await stream.on_live(2, engine.publish(2, payload(2)))
    engine.publish(3, payload(3))
    del engine.buffer[3]  # sent, lost, and gone from the engine's buffer too
    await stream.on_live(4, engine.publish(4, payload(4)))
    sink.missing_parent_on = {5.0}
    await stream.on_live(5, engine.publish(5, payload(5)))  # -> resync from 0
    await stream.on_live(6, engine.publish(6, payload(6)))
    stats = stream.stats
    assert sink.log == [0, 2, 4, 5, 0, 2, 4, 5, 6]
    assert engine.requests == [2, 0]  # the gap (from 2, which is compared), the resync
    assert (stats.decode_errors, stats.missing_parent, stats.lost) == (1, 1, 1)
    assert (stats.applied, stats.resyncs, stats.gaps) == (5, 1, 1)
    metrics = scrape(stats)
    assert metrics["epp_kv_events_dropped"].samples[0].value == 1
    assert failure(stats, "decode_error") == 1 and failure(stats, "lost") == 1


@pytest.mark.asyncio
async def test_a_restart_behind_a_longer_new_history_is_detected_by_replay() -> None:
    # The engine restarted and published more batches than we had seen before its next
    # live message reached us: the sequence only looks like a gap. Its copy of our last
    # batch differs, so the stream clears the endpoint instead of keeping old blocks.
    engine = Engine()
    stream, sink = make(engine)
    for seq in range(3):
        await stream.on_live(seq, engine.publish(seq, payload(seq)))
    engine.publish(3, payload(3))  # missed live: an ordinary gap, same history
    await stream.on_live(4, engine.publish(4, payload(4)))
    assert sink.log == [0, 1, 2, 3, 4]
    assert (stream.stats.gaps, stream.stats.restarts) == (1, 0)

    engine.buffer.clear()  # restart: a fresh buffer, numbering from 0 again
    for seq in range(8):
        engine.publish(seq, payload(100 + seq))
    await stream.on_live(8, engine.publish(8, payload(108)))
    assert sink.log[5:] == ["clear", *range(100, 109)]
    assert (stream.stats.restarts, stream.stats.lost, stream.stats.gaps) == (1, 0, 2)
    assert engine.requests == [2, 4, 0]  # each gap from our last batch; then from 0


class ClearFails(Sink):
    def clear_endpoint(self, endpoint: str) -> None:
        raise RuntimeError("index bug")


@pytest.mark.asyncio
async def test_a_sink_failing_to_clear_is_counted_not_raised() -> None:
    sink = ClearFails()
    stream = EventStream("pod-a", sink, KVEventStats(), KVEventsSettings(), None)
    await stream.on_live(5, payload(5))
    await stream.on_live(1, payload(1))  # engine restart: clear raises
    assert sink.log == [5, 1]
    assert (stream.stats.sink_errors, stream.stats.restarts) == (1, 1)
    assert failure(stream.stats, "sink_error") == 1


@pytest.mark.asyncio
async def test_a_resync_asked_from_outside_replays_once_per_interval() -> None:
    # A response showed cached blocks no event told of: the index asks for a replay.
    engine = Engine()
    stream, sink = make(engine, resync_interval=3600.0)
    await stream.on_live(0, engine.publish(0, payload(0)))
    assert stream.request_resync()
    assert not stream.request_resync()  # already due
    await stream.on_live(1, engine.publish(1, payload(1)))  # the replay runs here
    assert engine.requests == [0]  # the resync: the first message (seq 0) had no gap
    assert sink.log == [0, 1, 0, 1]
    assert stream.stats.resyncs == 1
    assert not stream.request_resync()  # within the interval


@pytest.mark.asyncio
async def test_a_resync_is_refused_without_a_replay_socket() -> None:
    stream, _ = make(None)
    await stream.on_live(0, payload(0))
    assert not stream.request_resync()
