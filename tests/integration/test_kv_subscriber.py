"""KV-event subscribers against a fake vLLM publisher on real loopback ZMQ sockets.

The fake engine publishes on an XPUB (a PUB that also reports subscriptions, so tests
wait for the subscriber instead of sleeping) and serves replays from a ROUTER, as
``vllm/distributed/kv_events.py`` does. ``publish(..., send=False)`` keeps a batch in
the replay buffer without sending it: a lost message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from epp.datastore import Endpoint, EndpointPool
from epp.kvcache import stream as stream_module
from epp.kvcache.event_settings import KVEventsSettings
from epp.kvcache.events import decode_batch
from epp.kvcache.index import BlockIndex
from epp.kvcache.keys import chain_keys
from epp.kvcache.manager import UNMATCHED, KVEventsManager
from epp.kvcache.stream import EventStream, KVEventStats
from epp.kvcache.subscriber import KVEventSubscriber
from epp.kvcache.types import ApplyResult, EventSink, KVEventBatch
from epp.observability.collectors import KVEventsCollector

pytestmark = pytest.mark.integration

END = b"\xff" * 8
TIMEOUT = 5.0
MODEL = "m"


def payload(ts: float) -> bytes:
    """One BlockStored batch; ``ts`` doubles as the batch's identity in the sink log."""
    return msgspec.msgpack.encode([ts, [["BlockStored", [int(ts)], None, [1] * 16, 16,
                                         None, "GPU", None]], 0])


class RecordingSink:
    """Records deliveries and clears per endpoint, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float | str]] = []
        self.missing_parent_on: set[float] = set()

    def apply_batch(self, endpoint: str, batch: KVEventBatch) -> ApplyResult:
        self.log.append((endpoint, batch.ts))
        return ApplyResult(stored=len(batch.events),
                           missing_parent=int(batch.ts in self.missing_parent_on))

    def clear_endpoint(self, endpoint: str) -> None:
        self.log.append((endpoint, "clear"))

    def of(self, endpoint: str) -> list[float | str]:
        return [what for name, what in self.log if name == endpoint]


class FakeEngine:
    """A vLLM KV-event publisher: XPUB + ROUTER replay buffer."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: str, *, pub_port: int | None = None,
                 replay: bool = True, connect: str | None = None,
                 replay_with_topic: bool = False, buffer_steps: int = 10_000,
                 verbose: bool = False) -> None:
        self.topic = topic.encode()
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.buffer_steps = buffer_steps
        self.replay_requests: list[int] = []
        self.replay_with_topic = replay_with_topic
        self.subscriptions: asyncio.Queue[bytes] = asyncio.Queue()
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.linger = 0
        # Report repeated subscriptions too: a connecting PUB keeps its pipe across a
        # reconnect, so a re-created SUB's subscription is otherwise filtered out.
        self.pub.setsockopt(zmq.XPUB_VERBOSE, int(verbose))
        self.router: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        try:
            if connect is not None:
                self.pub.connect(connect)
            else:
                self.pub.bind(f"tcp://127.0.0.1:{pub_port or '*'}")
            if replay:
                self.router = ctx.socket(zmq.ROUTER)
                self.router.linger = 0
                self.router.bind(f"tcp://127.0.0.1:{self.port + 1}")
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_subs()))
        if self.router is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._serve_replay()))

    @property
    def port(self) -> int:
        return int(self.pub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def wait_subscribed(self) -> None:
        while True:
            msg = await asyncio.wait_for(self.subscriptions.get(), TIMEOUT)
            if msg[:1] == b"\x01":
                return

    async def wait_unsubscribed(self) -> None:
        while True:
            msg = await asyncio.wait_for(self.subscriptions.get(), TIMEOUT)
            if msg[:1] == b"\x00":
                return

    async def publish(self, ts: float, *, send: bool = True, raw: bytes | None = None) -> int:
        seq = self.seq
        self.seq += 1
        data = payload(ts) if raw is None else raw
        self.buffer = [*self.buffer, (seq, data)][-self.buffer_steps:]
        if send:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), data])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    def restart(self) -> None:
        self.seq = 0
        self.buffer = []

    async def _watch_subs(self) -> None:
        while True:
            await self.subscriptions.put(await self.pub.recv())

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            ident, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.replay_requests.append(first)
            for seq, data in self.buffer:
                if seq >= first:
                    head = [ident, b""] + ([self.topic] if self.replay_with_topic else [])
                    await self.router.send_multipart([*head, seq.to_bytes(8, "big"), data])
            await self.router.send_multipart([ident, b"", END, b""])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.pub.close(linger=0)
        if self.router is not None:
            self.router.close(linger=0)


async def eventually(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest_asyncio.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


EngineFactory = Callable[..., FakeEngine]


@pytest_asyncio.fixture
async def engines(ctx: zmq.asyncio.Context) -> AsyncIterator[EngineFactory]:
    made: list[FakeEngine] = []

    def make(topic: str = f"kv@127.0.0.1:8000@{MODEL}", **kwargs: Any) -> FakeEngine:
        for _ in range(20):  # the replay port (pub + 1) may be taken: try another pair
            try:
                engine = FakeEngine(ctx, topic, **kwargs)
            except zmq.ZMQError:
                if kwargs.get("pub_port"):
                    raise
                continue
            made.append(engine)
            return engine
        raise RuntimeError("no free port pair")

    yield make
    for engine in made:
        await engine.close()


@pytest_asyncio.fixture
async def subscribers() -> AsyncIterator[list[KVEventSubscriber]]:
    started: list[KVEventSubscriber] = []
    yield started
    for sub in started:
        await sub.stop()


def endpoint_for(engine_port: int, name: str = "pod-a",
                 address: str = "127.0.0.1:8000") -> Endpoint:
    return Endpoint(name, address, model=MODEL, kv_events=f"tcp://127.0.0.1:{engine_port}")


def start_subscriber(ctx: zmq.asyncio.Context, started: list[KVEventSubscriber],
                     endpoint: Endpoint, sink: EventSink, **settings: Any
                     ) -> KVEventSubscriber:
    sub = KVEventSubscriber(endpoint, sink, context=ctx, settings=KVEventsSettings(**settings))
    started.append(sub)
    sub.start()
    return sub


async def subscribed(ctx: zmq.asyncio.Context, started: list[KVEventSubscriber],
                     engine: Any, sink: RecordingSink | None = None
                     ) -> tuple[RecordingSink, KVEventSubscriber]:
    """A subscriber to ``engine``, connected (the engine has seen its subscription)."""
    sink = sink if sink is not None else RecordingSink()
    sub = start_subscriber(ctx, started, endpoint_for(engine.port), sink)
    await engine.wait_subscribed()
    return sink, sub


# --- addresses (no traffic)


@pytest.mark.asyncio
async def test_addresses_and_topic(ctx: zmq.asyncio.Context) -> None:
    sink = RecordingSink()
    plain = KVEventSubscriber(Endpoint("p", "10.1.2.3:8000"), sink, context=ctx)
    assert plain.publisher == "tcp://10.1.2.3:5557"
    assert plain.replay_address == "tcp://10.1.2.3:5558"
    assert plain.topic == b"kv@10.1.2.3:8000@"
    wildcard = KVEventSubscriber(Endpoint("p", "10.1.2.3:8000", kv_events="tcp://*:5556"),
                                 sink, context=ctx)
    assert wildcard.publisher == "tcp://10.1.2.3:5556"
    assert wildcard.replay_address == "tcp://10.1.2.3:5557"
    custom = KVEventSubscriber(
        Endpoint("p", "10.1.2.3:8000", kv_events="tcp://10.9.9.9:7000"), sink, context=ctx,
        settings=KVEventsSettings(replay_port_offset=None, topic_filter=False))
    assert custom.publisher == "tcp://10.9.9.9:7000"
    assert custom.replay_address is None
    assert custom.topic == b""
    v6 = KVEventSubscriber(Endpoint("p", "[fd00::1]:8000"), sink, context=ctx,
                           settings=KVEventsSettings(default_port=6000, replay_port_offset=2))
    assert v6.publisher == "tcp://[fd00::1]:6000"
    assert v6.replay_address == "tcp://[fd00::1]:6002"
    assert sink.log == []


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="default_port"):
        KVEventsSettings(default_port=0)
    with pytest.raises(ValueError, match="replay_timeout"):
        KVEventsSettings(replay_timeout=0)
    with pytest.raises(ValueError, match="replay_port_offset"):
        KVEventsSettings(default_port=65535, replay_port_offset=1)


# --- one subscriber


@pytest.mark.asyncio
async def test_live_batches_arrive_in_order(ctx: zmq.asyncio.Context, engines: EngineFactory,
                                            subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink, sub = await subscribed(ctx, subscribers, engine)
    for ts in range(10):
        await engine.publish(ts)
    await eventually(lambda: len(sink.log) == 10, "10 batches")
    assert sink.of("pod-a") == list(range(10))
    assert (sub.stats.received, sub.stats.applied, sub.stats.replays) == (10, 10, 0)
    assert engine.replay_requests == []


@pytest.mark.asyncio
@pytest.mark.parametrize("with_topic", [False, True], ids=["vllm", "vllm-topic-frame"])
async def test_gap_is_replayed_in_order_exactly_once(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber], with_topic: bool) -> None:
    engine = engines(replay_with_topic=with_topic)
    sink, sub = await subscribed(ctx, subscribers, engine)
    await engine.publish(0)
    await engine.publish(1)
    await engine.publish(2, send=False)
    await engine.publish(3, send=False)
    await engine.publish(4)
    await engine.publish(5)
    await eventually(lambda: len(sink.log) >= 6, "batches 0-5")
    await engine.publish(6)  # the stream goes on after the replay
    await eventually(lambda: len(sink.log) >= 7, "batch 6")
    assert sink.of("pod-a") == [0, 1, 2, 3, 4, 5, 6]
    assert engine.replay_requests == [1]  # from the last applied batch: it is compared
    assert (sub.stats.gaps, sub.stats.replays, sub.stats.lost) == (1, 1, 0)
    assert sub.stats.applied == 7


@pytest.mark.asyncio
async def test_first_message_replays_history_from_zero(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    for ts in range(3):  # published before anyone listened
        await engine.publish(ts)
    sink, sub = await subscribed(ctx, subscribers, engine)
    await engine.publish(3)
    await eventually(lambda: len(sink.log) >= 4, "history and batch 3")
    await engine.publish(4)
    await eventually(lambda: len(sink.log) >= 5, "batch 4")
    assert sink.of("pod-a") == [0, 1, 2, 3, 4]
    assert engine.replay_requests == [0]
    assert sub.stats.gaps == 0  # missing history is not a gap


@pytest.mark.asyncio
async def test_sequence_going_back_clears_then_replays(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink, sub = await subscribed(ctx, subscribers, engine)
    for ts in range(3):
        await engine.publish(ts)
    await eventually(lambda: len(sink.log) == 3, "batches 0-2")
    engine.restart()
    await engine.publish(100, send=False)  # new engine's seq 0, missed
    await engine.publish(101)  # seq 1 <= 2: a restart
    await eventually(lambda: len(sink.log) >= 6, "clear and the new engine's batches")
    await engine.publish(102)
    await eventually(lambda: len(sink.log) >= 7, "batch 102")
    assert sink.of("pod-a") == [0, 1, 2, "clear", 100, 101, 102]
    assert engine.replay_requests == [0]
    assert (sub.stats.restarts, sub.stats.gaps) == (1, 0)


@pytest.mark.asyncio
async def test_missing_parent_triggers_one_resync_per_interval(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink = RecordingSink()
    sink.missing_parent_on = {2.0, 4.0}
    sub = start_subscriber(ctx, subscribers, endpoint_for(engine.port), sink,
                           resync_interval=60.0)
    await engine.wait_subscribed()
    for ts in range(3):
        await engine.publish(ts)
    await eventually(lambda: len(sink.log) >= 6, "resync of 0-2")
    for ts in (3, 4, 5):  # 4 misses a parent again: within the interval, no replay
        await engine.publish(ts)
    await eventually(lambda: len(sink.log) >= 9, "batches 3-5")
    assert sink.of("pod-a") == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert engine.replay_requests == [0]
    assert sub.stats.missing_parent == 2  # live 2 and 4; the resync's 2 is not recounted
    assert (sub.stats.replays, sub.stats.resyncs, sub.stats.applied) == (1, 1, 6)


@pytest.mark.asyncio
async def test_missing_parent_no_resync_when_engine_history_is_gone(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines(buffer_steps=2)  # the engine's replay buffer has wrapped
    for ts in range(5):
        await engine.publish(ts)
    sink = RecordingSink()
    sink.missing_parent_on = {5.0, 6.0}
    sub = start_subscriber(ctx, subscribers, endpoint_for(engine.port), sink,
                           resync_interval=0.0)
    await engine.wait_subscribed()
    await engine.publish(5)  # first message: the replay from 0 finds only 4 (and 5)
    await eventually(lambda: len(sink.log) >= 2, "batches 4-5")
    await engine.publish(6)
    await engine.publish(7)
    await eventually(lambda: len(sink.log) >= 4, "batches 6-7")
    assert sink.of("pod-a") == [4, 5, 6, 7]
    assert engine.replay_requests == [0]
    assert sub.stats.missing_parent == 2


@pytest.mark.asyncio
async def test_garbage_is_counted_and_the_loop_continues(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink, sub = await subscribed(ctx, subscribers, engine)
    await engine.publish(0)
    await engine.send_raw([engine.topic, b"\x00\x01", payload(9)])  # short sequence
    await engine.send_raw([engine.topic, (1).to_bytes(8, "big")])  # two frames
    await engine.send_raw([engine.topic, (1).to_bytes(8, "big"), payload(9), b"x"])  # four
    await engine.publish(0, raw=b"\xc1 not msgpack")  # seq 1: undecodable
    await engine.publish(0, raw=msgspec.msgpack.encode([0.0, [["BlockStored"]]]))  # seq 2
    await engine.publish(3)
    await eventually(lambda: len(sink.log) >= 2, "batch 3")
    assert sink.of("pod-a") == [0, 3]
    assert (sub.stats.dropped, sub.stats.decode_errors) == (3, 2)
    assert (sub.stats.gaps, sub.stats.replays) == (0, 0)  # bad payloads still count
    assert sub.running


class FailingSink(RecordingSink):
    def apply_batch(self, endpoint: str, batch: KVEventBatch) -> ApplyResult:
        if batch.ts == 1.0:
            raise RuntimeError("index bug")
        return super().apply_batch(endpoint, batch)


@pytest.mark.asyncio
async def test_a_failing_sink_is_counted_and_the_loop_continues(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink, sub = await subscribed(ctx, subscribers, engine, FailingSink())
    for ts in range(3):
        await engine.publish(ts)
    await eventually(lambda: len(sink.log) == 2, "batches 0 and 2")
    assert sink.of("pod-a") == [0, 2]
    assert (sub.stats.sink_errors, sub.stats.applied, sub.stats.replays) == (1, 2, 0)
    assert (sub.stats.crashes, sub.stats.subscriber_restarts) == (0, 0)


@pytest.mark.asyncio
async def test_a_long_replay_yields_to_the_event_loop() -> None:
    # A replay whose batches are all queued already never suspends on its own; the
    # stream must still let other tasks (request scheduling) run while it applies.
    batches = 3000

    async def fetch(start: int) -> AsyncGenerator[tuple[int, bytes], None]:
        for seq in range(start, batches):
            yield seq, payload(seq)

    sink = RecordingSink()
    stream = EventStream("pod-a", sink, KVEventStats(), KVEventsSettings(), fetch)
    seen: list[int] = []
    done = False

    async def ticker() -> None:
        while not done:
            seen.append(len(sink.log))
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await stream.on_live(batches, payload(batches))  # first message: replay 0..2999
    done = True
    await task
    assert sink.of("pod-a") == list(range(batches + 1))
    assert any(0 < n < batches for n in seen), "the replay never yielded"


@pytest.mark.asyncio
async def test_unknown_events_are_counted(ctx: zmq.asyncio.Context, engines: EngineFactory,
                                          subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink, sub = await subscribed(ctx, subscribers, engine)
    await engine.publish(0, raw=msgspec.msgpack.encode(
        [7.0, [["Future", 1], ["AllBlocksCleared"], ["Future", 2]], 0]))
    await eventually(lambda: len(sink.log) == 1, "batch")
    assert sink.of("pod-a") == [7.0]
    assert sub.stats.unknown_events == 2


@pytest.mark.asyncio
async def test_missing_replay_router_does_not_hang(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines(replay=False)
    for ts in range(5):
        await engine.publish(ts, send=False)
    sink = RecordingSink()
    sub = start_subscriber(ctx, subscribers, endpoint_for(engine.port), sink,
                           replay_timeout=0.2, replay_backoff=60.0)
    await engine.wait_subscribed()
    started = time.monotonic()
    await engine.publish(5)  # replay from 0 times out; 5 is applied anyway
    await eventually(lambda: len(sink.log) == 1, "batch 5", timeout=2.0)
    await engine.publish(6, send=False)
    await engine.publish(7)  # a gap: within the backoff, no second 0.2 s wait
    await eventually(lambda: len(sink.log) == 2, "batch 7", timeout=2.0)
    assert time.monotonic() - started < 1.5
    assert sink.of("pod-a") == [5, 7]
    assert (sub.stats.replays, sub.stats.replay_failures) == (1, 1)
    assert (sub.stats.gaps, sub.stats.lost) == (1, 1)


@pytest.mark.asyncio
async def test_replay_disabled_counts_gaps(ctx: zmq.asyncio.Context, engines: EngineFactory,
                                           subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink = RecordingSink()
    sub = start_subscriber(ctx, subscribers, endpoint_for(engine.port), sink,
                           replay_port_offset=None)
    await engine.wait_subscribed()
    await engine.publish(0)
    await engine.publish(1, send=False)
    await engine.publish(2)
    await eventually(lambda: len(sink.log) == 2, "batches 0 and 2")
    assert sink.of("pod-a") == [0, 2]
    assert (sub.stats.gaps, sub.stats.lost, sub.stats.replays) == (1, 1, 0)
    assert engine.replay_requests == []


@pytest.mark.asyncio
async def test_publisher_that_starts_after_the_subscriber(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    probe = engines()  # find a free port pair, then free it again
    port = probe.port
    await probe.close()
    sink = RecordingSink()
    start_subscriber(ctx, subscribers, endpoint_for(port), sink)
    engine = None
    deadline = time.monotonic() + TIMEOUT
    while engine is None:  # ZMQ closes sockets in the background: the port frees soon
        try:
            engine = engines(pub_port=port)
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)
    await engine.wait_subscribed()  # ZMQ reconnected
    await engine.publish(0)
    await engine.publish(1)
    await eventually(lambda: len(sink.log) == 2, "batches 0-1")
    assert sink.of("pod-a") == [0, 1]


@pytest.mark.asyncio
async def test_topic_filter_ignores_other_publishers_topics(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    engine = engines()
    sink, sub = await subscribed(ctx, subscribers, engine)
    await engine.send_raw([b"kv@127.0.0.1:9999@m", (0).to_bytes(8, "big"), payload(50)])
    await engine.publish(0)
    await eventually(lambda: len(sink.log) == 1, "batch 0")
    assert sink.of("pod-a") == [0]
    assert sub.stats.received == 1


# --- the manager


@pytest_asyncio.fixture
async def managers() -> AsyncIterator[list[KVEventsManager]]:
    made: list[KVEventsManager] = []
    yield made
    for manager in made:
        await manager.stop()


@pytest.mark.asyncio
async def test_manager_follows_the_pool(engines: EngineFactory,
                                        managers: list[KVEventsManager]) -> None:
    engine = engines()
    pool = EndpointPool()
    sink = RecordingSink()
    manager = KVEventsManager(pool, sink)
    managers.append(manager)
    await manager.start()
    assert manager.subscribers == {}

    pool.upsert(endpoint_for(engine.port))  # added -> subscriber started
    sub = manager.subscribers["pod-a"]
    await engine.wait_subscribed()
    await engine.publish(0)
    await eventually(lambda: len(sink.log) == 1, "batch 0")
    assert manager.stats()["pod-a"].applied == 1

    pool.remove("pod-a")  # removed -> cleared, subscriber stopped
    assert sink.log[-1] == ("pod-a", "clear")
    assert manager.subscribers == {}
    await engine.wait_unsubscribed()
    await eventually(lambda: not sub.running, "subscriber stopped")
    assert sink.of("pod-a") == [0, "clear"]


@pytest.mark.asyncio
async def test_manager_resubscribes_when_the_publisher_changes(
        engines: EngineFactory, managers: list[KVEventsManager]) -> None:
    first, second = engines(), engines()
    pool = EndpointPool()
    pool.upsert(endpoint_for(first.port))
    sink = RecordingSink()
    manager = KVEventsManager(pool, sink)
    managers.append(manager)
    await manager.start()  # endpoints already in the pool are picked up
    await first.wait_subscribed()
    await first.publish(0)
    await eventually(lambda: len(sink.log) == 1, "batch from the first publisher")

    pool.upsert(endpoint_for(second.port))  # same name, new publisher
    await second.wait_subscribed()
    await second.publish(10)
    await eventually(lambda: len(sink.log) == 3, "batch from the second publisher")
    assert sink.of("pod-a") == [0, "clear", 10]


@pytest.mark.asyncio
async def test_manager_stop_is_clean_and_final(engines: EngineFactory,
                                               managers: list[KVEventsManager]) -> None:
    engine = engines()
    pool = EndpointPool()
    pool.upsert(endpoint_for(engine.port))
    sink = RecordingSink()
    manager = KVEventsManager(pool, sink)
    await manager.start()
    await engine.wait_subscribed()
    sub = manager.subscribers["pod-a"]
    await manager.stop()
    assert not sub.running
    pool.upsert(endpoint_for(engine.port, name="pod-b"))  # ignored once stopped
    assert manager.subscribers == {}
    await manager.stop()  # idempotent


@pytest.mark.asyncio
async def test_central_bind_maps_topics_to_endpoints(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        managers: list[KVEventsManager]) -> None:
    pool = EndpointPool()
    pool.upsert(Endpoint("pod-1", "10.0.0.1:8000", model=MODEL))
    pool.upsert(Endpoint("pod-2", "10.0.0.2:8000", model=MODEL))
    sink = RecordingSink()
    manager = KVEventsManager(pool, sink, bind="tcp://127.0.0.1:*")
    managers.append(manager)
    await manager.start()
    bind = manager.bound_address
    assert bind is not None and not bind.endswith(":*")
    one = engines("kv@10.0.0.1:8000@m", connect=bind, replay=False)
    two = engines("kv@10.0.0.2:8000@m", connect=bind, replay=False)
    stranger = engines("kv@10.0.0.9:8000@m", connect=bind, replay=False)
    for engine in (one, two, stranger):
        await engine.wait_subscribed()

    await one.publish(0)
    await one.publish(1)
    await two.publish(0)
    await stranger.publish(0)
    await eventually(lambda: len(sink.log) == 3 and manager.unmatched == 1, "3 batches")
    assert sink.of("pod-1") == [0, 1]
    assert sink.of("pod-2") == [0]

    one.restart()  # per-topic sequence: a restart clears only pod-1
    await one.publish(100)
    await two.publish(1, send=False)
    await two.publish(2)  # a gap: counted, no replay in central mode
    await eventually(lambda: len(sink.log) == 6, "restart and gap")
    assert sink.of("pod-1") == [0, 1, "clear", 100]
    assert sink.of("pod-2") == [0, 2]
    stats = manager.stats()
    assert (stats["pod-1"].restarts, stats["pod-2"].gaps, stats["pod-2"].lost) == (1, 1, 1)
    assert stats["pod-2"].replays == 0

    pool.remove("pod-2")  # leaves: cleared; its messages are now unmatched
    assert sink.log[-1] == ("pod-2", "clear")
    await two.publish(3)
    await eventually(lambda: manager.unmatched == 2, "pod-2 message unmatched")
    assert "pod-2" not in manager.stats()


@pytest.mark.asyncio
async def test_stop_during_a_replay_closes_everything(
        ctx: zmq.asyncio.Context, engines: EngineFactory) -> None:
    engine = engines(replay=False)  # the replay request waits for its timeout
    await engine.publish(0, send=False)
    sink = RecordingSink()
    sub = KVEventSubscriber(endpoint_for(engine.port), sink, context=ctx,
                            settings=KVEventsSettings(replay_timeout=30.0))
    sub.start()
    await engine.wait_subscribed()
    await engine.publish(1)
    await eventually(lambda: sub.stats.replays == 1, "replay started")
    await asyncio.wait_for(sub.stop(), 2.0)
    assert not sub.running
    assert sink.log == []


# --- supervision: a receive loop that dies is logged, counted and restarted

FAST_RESTART: dict[str, Any] = {"restart_backoff": 0.01, "restart_backoff_max": 0.05}


def fail_once_on(monkeypatch: pytest.MonkeyPatch, ts: float) -> list[float]:
    """Make decoding raise an unexpected error (a decoder bug) once, on batch ``ts``."""
    failed: list[float] = []

    def faulty(data: bytes) -> KVEventBatch:
        batch = decode_batch(data)
        if batch.ts == ts and not failed:
            failed.append(ts)
            raise RuntimeError("decoder bug")
        return batch

    monkeypatch.setattr(stream_module, "decode_batch", faulty)
    return failed


@pytest.mark.asyncio
async def test_a_crashed_subscriber_is_restarted_and_keeps_ingesting(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    failed = fail_once_on(monkeypatch, 1.0)
    engine = engines()
    sink = RecordingSink()
    sub = start_subscriber(ctx, subscribers, endpoint_for(engine.port), sink, **FAST_RESTART)
    await engine.wait_subscribed()
    await engine.publish(0)
    await engine.publish(1)  # the loop dies on this one
    await eventually(lambda: sub.stats.subscriber_restarts == 1, "a restart")
    assert failed == [1.0]
    await engine.wait_subscribed()  # a fresh SUB
    await engine.publish(2)
    await engine.publish(3)
    await eventually(lambda: sink.of("pod-a")[-1:] == [3], "batches after the restart")
    assert sink.of("pod-a") == [0, 2, 3]
    assert sub.running
    assert (sub.stats.crashes, sub.stats.connect_errors) == (1, 0)
    assert sub.stats.failure_counts()["crash"] == 1
    crashes = [r for r in caplog.records if "subscriber failed" in r.getMessage()]
    assert len(crashes) == 1 and "pod-a" in crashes[0].getMessage()
    assert crashes[0].exc_info is not None  # the traceback, once


@pytest.mark.asyncio
async def test_a_refused_publisher_address_is_logged_counted_and_retried(
        ctx: zmq.asyncio.Context, subscribers: list[KVEventSubscriber],
        caplog: pytest.LogCaptureFixture) -> None:
    # A mistyped kvEvents address used to end the endpoint's task without a log line.
    endpoint = Endpoint("pod-typo", "127.0.0.1:8000", kv_events="127.0.0.1:5557")
    sub = start_subscriber(ctx, subscribers, endpoint, RecordingSink(), **FAST_RESTART)
    await eventually(lambda: sub.stats.connect_errors >= 3, "retries")
    assert sub.running  # backing off, not dead
    assert sub.stats.crashes == 0
    assert sub.stats.subscriber_restarts == sub.stats.connect_errors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pod-typo" in m and "cannot connect" in m and "'127.0.0.1:5557'" in m
               for m in warnings)
    metrics = {m.name: m for m in KVEventsCollector(lambda: {"pod-typo": sub.stats},
                                                    lambda: 0).collect()}
    by_reason = {s.labels["reason"]: s.value for s in metrics["epp_kv_event_failures"].samples}
    assert by_reason["connect_error"] >= 3
    restarts = metrics["epp_kv_event_subscriber_restarts"].samples
    assert restarts[0].labels == {"endpoint": "pod-typo"} and restarts[0].value >= 3


@pytest.mark.asyncio
async def test_a_crashed_central_loop_rebinds_the_same_port(
        engines: EngineFactory, managers: list[KVEventsManager],
        monkeypatch: pytest.MonkeyPatch) -> None:
    fail_once_on(monkeypatch, 1.0)
    pool = EndpointPool()
    pool.upsert(Endpoint("pod-1", "10.0.0.1:8000", model=MODEL))
    sink = RecordingSink()
    manager = KVEventsManager(pool, sink, settings=KVEventsSettings(
        bind="tcp://127.0.0.1:*", **FAST_RESTART))
    managers.append(manager)
    await manager.start()
    bound = manager.bound_address
    assert bound is not None
    engine = engines("kv@10.0.0.1:8000@m", connect=bound, replay=False, verbose=True)
    await engine.wait_subscribed()
    await engine.publish(0)
    await engine.publish(1)  # the loop dies on this one
    await eventually(lambda: manager.stats()[UNMATCHED].subscriber_restarts == 1, "restart")
    await engine.wait_subscribed()  # the publisher reconnected to the rebound SUB
    await engine.publish(2)
    await eventually(lambda: sink.of("pod-1")[-1:] == [2], "batch after the restart")
    assert sink.of("pod-1") == [0, 2]
    assert manager.bound_address == bound
    assert manager.stats()[UNMATCHED].crashes == 1


# --- engine restarts against a real index


def blocks_payload(ts: float, hashes: list[int], tokens: list[int]) -> bytes:
    """One BlockStored of len(hashes) 16-token blocks, chained from the root."""
    return msgspec.msgpack.encode([ts, [["BlockStored", hashes, None, tokens, 16, None,
                                         "GPU", None]], 0])


@pytest.mark.asyncio
async def test_engine_restart_leaves_none_of_the_old_blocks(
        ctx: zmq.asyncio.Context, engines: EngineFactory,
        subscribers: list[KVEventSubscriber]) -> None:
    # The restarted engine (sequence from 0, fresh cache, fresh replay buffer) published
    # more batches than we had seen from the old one before its next live message
    # reached us, so the sequence alone looks like a gap. After the replay the index
    # must hold the new engine's blocks and none of the old engine's.
    engine = engines()
    index = BlockIndex(model=MODEL)
    sub = start_subscriber(ctx, subscribers, endpoint_for(engine.port), index)
    await engine.wait_subscribed()

    def prompt(i: int) -> list[int]:
        return [1000 * i + t for t in range(32)]  # two blocks

    old = [prompt(i) for i in range(3)]
    for i, tokens in enumerate(old):
        await engine.publish(i, raw=blocks_payload(i, [10 * i + 1, 10 * i + 2], tokens))
    await eventually(lambda: index.blocks_of("pod-a") == 6, "the old engine's blocks")

    engine.restart()
    new = [prompt(100 + i) for i in range(6)]
    for i, tokens in enumerate(new):  # published while we were not listening
        await engine.publish(i, raw=blocks_payload(i, [500 + 10 * i + 1, 500 + 10 * i + 2],
                                                   tokens), send=False)
    last = prompt(200)
    await engine.publish(6, raw=blocks_payload(6, [901, 902], last))
    await eventually(lambda: sub.stats.received == 4 and sub.stats.applied >= 7,
                     "the new engine's history")

    def held(tokens: list[int]) -> int:
        return index.match(chain_keys(tokens, 16, index.root(None)), ["pod-a"])["pod-a"].blocks

    assert [held(tokens) for tokens in old] == [0, 0, 0]
    assert [held(tokens) for tokens in [*new, last]] == [2] * 7
    assert index.blocks_of("pod-a") == 14
    assert (sub.stats.restarts, sub.stats.lost) == (1, 0)
    assert engine.replay_requests == [2, 0]


# --- an endpoint that leaves takes all its state


@pytest.mark.asyncio
@pytest.mark.parametrize("central", [False, True], ids=["per-endpoint", "central"])
async def test_an_endpoint_that_leaves_takes_all_its_state(
        engines: EngineFactory, managers: list[KVEventsManager], central: bool) -> None:
    pool = EndpointPool()
    index = BlockIndex(model=MODEL)
    manager = KVEventsManager(pool, index, bind="tcp://127.0.0.1:*" if central else None)
    managers.append(manager)
    await manager.start()
    collector = KVEventsCollector(manager.stats, index.__len__)
    names = ("pod-1", "pod-2")
    for n, name in enumerate(names, start=1):
        topic = f"kv@10.0.0.{n}:8000@m"
        if central:
            assert manager.bound_address is not None
            pool.upsert(Endpoint(name, f"10.0.0.{n}:8000", model=MODEL))
            engine = engines(topic, connect=manager.bound_address, replay=False)
        else:
            engine = engines(topic, replay=False)
            pool.upsert(Endpoint(name, f"10.0.0.{n}:8000", model=MODEL,
                                 kv_events=engine.address))
        await engine.wait_subscribed()
        await engine.publish(0, raw=blocks_payload(0, [n], list(range(16 * n, 16 * n + 16))))
    await eventually(lambda: all(index.blocks_of(name) == 1 for name in names),
                     "both pods' blocks")

    def series() -> set[str]:
        return {s.labels["endpoint"] for m in collector.collect() for s in m.samples
                if "endpoint" in s.labels}

    assert {"pod-1", "pod-2"} <= series()
    pool.remove("pod-2")
    assert manager.tracked_endpoints() == {"pod-1"}
    assert "pod-2" not in manager.stats() and "pod-2" not in series()
    assert index.endpoints() == ["pod-1"] and index.blocks_of("pod-2") == 0
    assert len(index) == 1
