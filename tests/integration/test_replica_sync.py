"""Replica sync: EPP replicas share pending picks and in-flight load over a real NATS
server (``nats-server`` from the test extra), in front of real epp-sim pods that publish
KV events. The replicas are two ``build_app()`` EPPs in this process, driven through
their directors as the ext_proc layer drives them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from epp.config import ConfigError, EppSettings
from epp.cli import parse_args, settings_from_args
from epp.datastore.metrics import EndpointLoad
from epp.devtools.stack import LocalStack, StackPorts
from epp.kvcache.index import BlockIndex
from epp.replicasync import wire
from epp.replicasync.peers import ENTRY_BYTES, PICK_KEY_BYTES, PeerTable
from epp.requestcontrol import director as director_module
from epp.requestcontrol.director import RequestHandle
from epp.runner import App, build_app
from epp.scheduling.plugins.inflight import inflight_tokens
from tests.integration.httputil import metric_samples, post, request
from epp.devtools.nats import NatsServer
from tests.integration.test_prometheus import _need as need

pytestmark = pytest.mark.integration

SIMS = 3


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Three epp-sim pods with KV events and a slow prefill (2,000 tokens/s: a ~2,000-token
    prompt's BlockStored events come ~1 s after it is sent), and their endpoints file.
    One token per byte: the pods start at once, and tokens are what the EPP renders."""
    s = LocalStack(tmp_path_factory.mktemp("sync-sims"), StackPorts.free(SIMS, kv_events=True),
                   sim_args=["--tokenizer", "bytes", "--prefill-tokens-per-s", "2000"])
    try:
        s.start_sims()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def patient_prefix_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about what happens after a precise match, not about its 100 ms
    budget: on a busy test machine a render call to a pod may take longer."""
    monkeypatch.setattr(director_module, "PREFIX_DEADLINE_S", 5.0)


def settings(sims: LocalStack, sync_url: str | None, **extra: Any) -> EppSettings:
    return EppSettings(endpoints_file=str(sims.endpoints_file), bind_address="127.0.0.1",
                       grpc_port=0, health_port=0, metrics_port=0, secure_serving=False,
                       kv_events=True, enable_explain=True, replica_sync_url=sync_url,
                       shutdown_grace_s=1.0, **extra)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replicas(*all_settings: EppSettings) -> AsyncIterator[list[App]]:
    """Started apps, ready to route: every endpoint listed and scraped (so every replica
    keys blocks with the engines' block size), every sync connected."""
    apps: list[App] = []
    try:
        for s in all_settings:
            app = build_app(s)
            apps.append(app)
            await app.start()
        for app in apps:
            pool = app.pool
            await eventually(lambda: len(pool.snapshot()) == SIMS and all(
                e.state.metrics.scraped_at for e in pool.snapshot()), "pods scraped")
            sync = app.replica_sync
            if sync is not None:
                await eventually(lambda: sync is not None and sync.connected,
                                 "NATS connected")
        yield apps
    finally:
        for app in reversed(apps):
            await app.stop()


def system_prompt(group: int) -> str:
    """About 2,300 characters (tokens, one a byte) of a prefix private to ``group``."""
    facts = " ".join(f"Fact {i} of tenant {group} is {i * 7 + group}." for i in range(80))
    return f"You are the assistant of tenant {group}. {facts}"


def chat(group: int, question: str) -> bytes:
    return json.dumps({"model": "qwen3", "max_tokens": 2, "messages": [
        {"role": "system", "content": system_prompt(group)},
        {"role": "user", "content": question}]}).encode()


HEADERS = {":path": "/v1/chat/completions", ":method": "POST",
           "content-type": "application/json"}


async def route(app: App, body: bytes) -> RequestHandle:
    async with asyncio.timeout(5):  # routing never waits on NATS
        return await app.director.route(HEADERS, body, None)


async def serve(handle: RequestHandle, body: bytes) -> None:
    """What Envoy does with a routed request: send it to the destination, stream the
    answer back through the handle, end the stream."""
    reply = await asyncio.to_thread(post, f"http://{handle.destination}/v1/chat/completions",
                                    body)
    handle.on_served_endpoint(handle.destination)
    handle.on_response_headers(reply.status, {"content-type": "application/json"})
    handle.on_response_body(reply.body, True)
    handle.on_done(True)


def end(handle: RequestHandle, status: int = 200) -> None:
    """End a routed request without sending it anywhere (``status`` 0: no answer)."""
    if status:
        handle.on_response_headers(status, {"content-type": "application/json"})
        handle.on_response_body(b"{}", True)
    handle.on_done(status != 0)


def metrics(app: App) -> dict[str, float]:
    return metric_samples(app.metrics_port)


async def scrape(app: App) -> dict[str, float]:
    return await asyncio.to_thread(metrics, app)


def pod(app: App, handle: RequestHandle) -> str:
    return handle.endpoints[0].name


@contextlib.asynccontextmanager
async def fake_peer(url: str) -> AsyncIterator[Callable[[bytes], Awaitable[None]]]:
    """A bare NATS client publishing on the default subject: a peer replica (or anything
    else that can publish there)."""
    nc = NatsClient()
    await nc.connect(url)

    async def publish(payload: bytes) -> None:
        await nc.publish("epp.default.routing", payload)
        await nc.flush()

    try:
        yield publish
    finally:
        await nc.close()


# -- the wire format and the peer table ------------------------------------------------

def test_messages_round_trip_compactly() -> None:
    keys = [0, 1, 2**64 - 1, 0x0123456789ABCDEF] * 64  # 256 blocks: a 4k-token prompt
    data = wire.route("r1", 2**63 + 5, "pod-0", keys, 1.25, 3000)
    assert len(data) < 256 * 8 + 64  # keys packed as 8 bytes each, little else
    m = wire.decode(data)
    assert isinstance(m, wire.Route)
    assert (m.replica, m.request, m.endpoint, m.ttl_s, m.uncached) == (
        "r1", 2**63 + 5, "pod-0", 1.25, 3000)
    assert wire.unpack_keys(m.keys) == keys
    assert wire.decode(wire.done("r1", 7, True)) == wire.Done(1, wire.KIND_DONE, "r1", 7, True)
    assert wire.decode(wire.prefilled("r1", 7)) == wire.Prefilled(1, wire.KIND_PREFILLED,
                                                                  "r1", 7)
    assert wire.decode(wire.presence("r1", wire.KIND_BYE)).kind == wire.KIND_BYE
    # Out-of-range values are clamped when sending, and a longer pick is cut to its prefix.
    m = wire.decode(wire.route("r", 1, "p", list(range(wire.MAX_KEYS + 5)), math.inf, -3))
    assert isinstance(m, wire.Route)
    assert (m.ttl_s, m.uncached, len(m.keys)) == (0.0, 0, wire.MAX_KEYS * 8)
    # Fields appended later within a version are ignored by this decoder.
    longer = msgspec.msgpack.encode([1, wire.KIND_DONE, "r", 1, False, "a later field"])
    assert isinstance(wire.decode(longer), wire.Done)
    # ... and a message from before ``cold`` was appended decodes with it false.
    cold = wire.decode(wire.route("r", 1, "p", [], 1.0, 10, cold=True))
    assert isinstance(cold, wire.Route) and cold.cold
    older = wire.decode(msgspec.msgpack.encode([1, wire.KIND_ROUTE, "r", 1, "p", b"", 1.0, 10]))
    assert isinstance(older, wire.Route) and not older.cold


BAD_MESSAGES = [
    (b"", "malformed"),
    (b"garbage", "malformed"),
    (b"\xc1", "malformed"),
    (msgspec.msgpack.encode({"v": 1}), "malformed"),
    (msgspec.msgpack.encode([2, wire.KIND_ROUTE, "r", 1, "sim-0", b"", 1.0, 5]), "version"),
    (msgspec.msgpack.encode([1, 99, "r"]), "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_ROUTE, "r", 1, "sim-0", b"\x00" * 7, 1.0, 5]),
     "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_ROUTE, "r", 1, "sim-0", b"", math.nan, 5]),
     "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_ROUTE, "r", 1, "sim-0", b"", 1e9, 5]), "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_ROUTE, "r", 1, "sim-0", b"", 1.0, -5]), "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_ROUTE, "r", 1, "x" * 1000, b"", 1.0, 5]),
     "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_DONE, "", 1, False]), "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_DONE, "r", "one", False]), "malformed"),
    (msgspec.msgpack.encode([1, wire.KIND_ROUTE, "r", 1]), "malformed"),
    (b"\x00" * (wire.MAX_MESSAGE_BYTES + 1), "oversized"),
]


@pytest.mark.parametrize(("data", "reason"), BAD_MESSAGES)
def test_unusable_messages_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(wire.DecodeFailure) as info:
        wire.decode(data)
    assert info.value.reason == reason


def test_the_peer_table_is_bounded_and_gives_back_what_it_counted() -> None:
    index = BlockIndex()
    loads = [EndpointLoad() for _ in range(3)]
    table = PeerTable(max_entries=4, max_bytes=10 * ENTRY_BYTES)
    for i in range(6):  # two over the entry bound: the soonest-expiring go
        table.add("peer", i, "e", loads[i % 3], 100, (), expires=10.0 + i)
    assert len(table) == 4 and table.evicted == 2
    assert sum(load.peer_prefill_tokens for load in loads) == 400
    assert sum(load.peer_requests for load in loads) == 4
    assert table.expire(now=1000.0) == 4
    assert len(table) == 0 and table.bytes == 0
    assert all(load.peer_prefill_tokens == 0 and load.peer_requests == 0 for load in loads)
    # Over the byte bound: an entry with many keys pushes out the soonest-expiring ones.
    table = PeerTable(max_entries=100, max_bytes=5000)
    for i in range(3):
        table.add("peer", i, "e", loads[0], 10, (), expires=10.0 + i)
    pick = index.add_pending("e", list(range(100)), 5.0)
    table.add("peer", 99, "e", loads[0], 1, (pick,), expires=100.0)
    assert table.bytes == 2 * ENTRY_BYTES + PICK_KEY_BYTES * 100 <= table.max_bytes
    assert len(table) == 2 and table.evicted == 2
    assert table.pop(("peer", 99)) is not None and table.pop(("peer", 2)) is not None
    assert table.bytes == 0 and loads[0].peer_prefill_tokens == 0
    # A repeated key replaces its entry (counted once); a farewell forgets a replica.
    table.add("a", 1, "e", loads[0], 10, (), 5.0)
    table.add("a", 1, "e", loads[0], 10, (), 6.0)
    table.add("b", 1, "e", loads[0], 20, (), 6.0)
    assert loads[0].peer_prefill_tokens == 30
    assert table.forget_replica("a") == 1
    assert loads[0].peer_prefill_tokens == 20 and loads[0].peer_requests == 1


def test_flags_and_settings() -> None:
    args = parse_args(["--endpoints-file", "e.yaml", "--replica-sync-url",
                       "nats://nats.epp:4222"])
    s = settings_from_args(args)
    assert s.replica_sync_url == "nats://nats.epp:4222"
    assert s.sync_subject == "epp.default.routing"
    assert EppSettings(endpoints_file="e", pool_name="pool-a", replica_sync_url="nats://n"
                       ).sync_subject == "epp.pool-a.routing"
    assert parse_args(["--endpoints-file", "e"]).replica_sync_url is None  # off by default
    bads: list[dict[str, Any]] = [
        {"replica_sync_url": "http://nats:4222"},
        {"replica_sync_url": "nats://"},
        {"replica_sync_url": "nats://n:4222", "replica_sync_subject": "epp.*.x"},
        {"replica_sync_url": "nats://n:4222", "replica_sync_subject": "a..b"},
        {"replica_sync_subject": "epp.x"}]
    for bad in bads:
        with pytest.raises(ConfigError):
            EppSettings(endpoints_file="e", **bad)


# -- replicas that agree ----------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_sibling_routed_by_the_other_replica_follows_the_first_pick(
        sims: LocalStack, nats: NatsServer) -> None:
    async with replicas(settings(sims, nats.url), settings(sims, nats.url)) as (a, b):
        sa, sb = a.replica_sync, b.replica_sync
        assert sa is not None and sb is not None
        await eventually(lambda: sa.peers() == 1 and sb.peers() == 1, "peers heard")
        first_body = chat(11, "First question?")
        first = await route(a, first_body)
        x = pod(a, first)
        uncached = first.prefill_tokens
        assert uncached > 1000
        await eventually(lambda: sb.stats.received["route"] == 1, "B heard A's route")
        # B's index holds A's pick as pending on x, and x carries A's load in B's view.
        b_index = b.kv_services[0].index
        assert b_index.pending_of(x) > 0
        bx = b.pool.get(x)
        assert bx is not None
        assert bx.state.load.peer_prefill_tokens == uncached
        assert bx.state.load.peer_requests == 1
        assert inflight_tokens(bx) == uncached  # what token-load and affinity read
        # A new prefix: a cold placement, which B's no-hit LRU counts as its own.
        assert bx.state.peer_cold_pick_at > 0
        assert all(e.state.peer_cold_pick_at == 0 for e in b.pool.snapshot() if e.name != x)
        assert all(e.state.load.peer_prefill_tokens == 0 for e in b.pool.snapshot()
                   if e.name != x)
        # A sibling (same prefix) that B would route now: x, for its pending prefix.
        sibling_body = chat(11, "A sibling question?")
        explained = await asyncio.to_thread(
            post, f"http://127.0.0.1:{b.metrics_port}/debug/explain", sibling_body)
        assert explained.status == 200
        plan = explained.json()
        assert plan["destination"] == bx.address
        assert plan["prefix_match"]["endpoints"][x]["cached_tokens"] > 1000
        assert plan["prefix_match"]["endpoints"][x]["blocks"] == 0  # nothing confirmed yet
        sibling = await route(b, sibling_body)
        assert pod(b, sibling) == x
        # A's request sends its first bytes: its prefill is done, in B's view too; the
        # request itself still counts until it completes.
        first.on_response_headers(200, {"content-type": "text/event-stream"})
        first.on_response_body(b"data: {}\n\n", False)
        await eventually(lambda: bx.state.load.peer_prefill_tokens == 0,
                         "A's first bytes reached B")
        assert bx.state.load.peer_requests == 1
        assert sb.stats.received["prefilled"] == 1
        # Both reach x before its first BlockStored could: x prefills the prefix once.
        await asyncio.gather(serve(first, first_body), serve(sibling, sibling_body))
        assert sibling.usage is not None and sibling.usage.prompt_tokens > 1000
        # A's completion releases its load in B's view; the engine's events confirm
        # the blocks in both indexes.
        await eventually(lambda: bx.state.load.peer_requests == 0, "A's done reached B")
        assert bx.state.load.peer_prefill_tokens == 0
        await eventually(lambda: b_index.pending_of(x) == 0 and b_index.blocks_of(x) > 0,
                         "B's pending blocks confirmed by x's events")
        assert b_index.pending_confirmed > 0
        m = await scrape(b)
        assert m["epp_replica_sync_messages_received_total{kind=\"route\"}"] == 1
        assert m["epp_replica_sync_messages_received_total{kind=\"done\"}"] == 1
        assert m["epp_replica_sync_connected"] == 1
        assert m["epp_replica_sync_peers"] == 1
        assert m[f"epp_endpoint_peer_inflight_tokens{{endpoint=\"{x}\"}}"] == 0


@pytest.mark.asyncio
async def test_without_sync_the_other_replica_knows_nothing_of_the_pick(
        sims: LocalStack) -> None:
    async with replicas(settings(sims, None), settings(sims, None)) as (a, b):
        assert a.replica_sync is None and b.replica_sync is None
        first_body = chat(12, "First question?")
        first = await route(a, first_body)
        x = pod(a, first)
        assert a.kv_services[0].index.pending_of(x) > 0
        await asyncio.sleep(0.2)
        assert b.kv_services[0].index.pending_of(x) == 0
        bx = b.pool.get(x)
        assert bx is not None and inflight_tokens(bx) == 0
        plan = (await asyncio.to_thread(
            post, f"http://127.0.0.1:{b.metrics_port}/debug/explain",
            chat(12, "A sibling question?"))).json()
        assert plan["prefix_match"]["endpoints"][x]["cached_tokens"] == 0
        end(first)
        assert "epp_replica_sync_connected" not in await scrape(b)


@pytest.mark.asyncio
async def test_a_failed_request_takes_its_pending_blocks_back_on_the_peer(
        sims: LocalStack, nats: NatsServer) -> None:
    async with replicas(settings(sims, nats.url), settings(sims, nats.url)) as (a, b):
        sb = b.replica_sync
        assert sb is not None
        first = await route(a, chat(13, "Will fail?"))
        x = pod(a, first)
        await eventually(lambda: sb.stats.received["route"] == 1, "B heard the route")
        b_index = b.kv_services[0].index
        assert b_index.pending_of(x) > 0
        dropped = b_index.pending_dropped
        end(first, status=0)  # the stream ended without an answer
        await eventually(lambda: sb.stats.received["done"] == 1, "B heard the done")
        assert b_index.pending_of(x) == 0
        assert b_index.pending_dropped > dropped
        bx = b.pool.get(x)
        assert bx is not None and inflight_tokens(bx) == 0


# -- faults ---------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_routing_goes_on_while_nats_is_down_and_sync_resumes_after(
        sims: LocalStack, tmp_path: Path) -> None:
    server = NatsServer(tmp_path).start()
    try:
        async with replicas(settings(sims, server.url), settings(sims, server.url)) as (a, b):
            sa, sb = a.replica_sync, b.replica_sync
            assert sa is not None and sb is not None
            await asyncio.to_thread(server.kill)
            await eventually(lambda: not sa.connected and not sb.connected,
                             "the loss noticed", timeout=5)
            for i in range(10):
                started = time.monotonic()
                handle = await route(a, chat(14, f"Question {i} while NATS is down?"))
                end(handle)
                assert time.monotonic() - started < 1.0
            m = await scrape(a)
            assert m["epp_replica_sync_connected"] == 0
            assert m["epp_replica_sync_messages_dropped_total{reason=\"disconnected\"}"] == 10
            assert m["epp_replica_sync_disconnects_total"] >= 1
            assert sb.stats.received["route"] == 0
            await asyncio.to_thread(server.start)  # the same address, as a restarted pod
            await eventually(lambda: sa.connected and sb.connected, "reconnected",
                             timeout=15)
            handle = await route(a, chat(14, "And now?"))
            await eventually(lambda: sb.stats.received["route"] == 1,
                             "B heard A after the restart")
            end(handle)
            await eventually(lambda: sb.stats.received["done"] == 1, "and its completion")
            assert (await scrape(a))["epp_replica_sync_reconnects_total"] >= 1
            assert sa.stats.dropped["publish_error"] == 0
    finally:
        server.stop()


@pytest.mark.asyncio
async def test_a_closed_connection_is_restarted_by_its_supervisor(
        sims: LocalStack, nats: NatsServer) -> None:
    async with replicas(settings(sims, nats.url), settings(sims, nats.url)) as (a, b):
        sa, sb = a.replica_sync, b.replica_sync
        assert sa is not None and sb is not None
        await sa._nc.close()  # as if the client had given up
        await eventually(lambda: sa.connected, "a new connection", timeout=5)
        assert a.metrics.background_failures.labels("replica-sync")._value.get() == 1
        handle = await route(a, chat(18, "Back?"))
        await eventually(lambda: sb.stats.received["route"] == 1, "B heard A again")
        end(handle)


@pytest.mark.asyncio
async def test_replicas_start_and_route_with_nats_unreachable(sims: LocalStack) -> None:
    from epp.devtools.procs import free_port

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    async with contextlib.AsyncExitStack() as stack:
        app = build_app(settings(sims, url))
        stack.push_async_callback(app.stop)
        async with asyncio.timeout(10):
            await app.start()
        await eventually(lambda: len(app.pool.snapshot()) == SIMS, "pods listed")
        handle = await route(app, chat(15, "Anyone there?"))
        end(handle)
        assert app.replica_sync is not None and not app.replica_sync.connected
        assert app.replica_sync.stats.dropped["disconnected"] == 1
        async with asyncio.timeout(5):  # stopping does not wait for NATS either
            await app.stop()


@pytest.mark.asyncio
async def test_garbage_on_the_subject_is_counted_and_ignored(
        sims: LocalStack, nats: NatsServer) -> None:
    async with replicas(settings(sims, nats.url)) as (b,):
        sb = b.replica_sync
        assert sb is not None
        async with fake_peer(nats.url) as publish:
            for data, _ in BAD_MESSAGES:
                await publish(data)
            await eventually(lambda: sum(sb.stats.decode_errors.values()) == len(BAD_MESSAGES),
                             "every bad message counted")
            expected = {reason: sum(1 for _, r in BAD_MESSAGES if r == reason)
                        for reason in ("malformed", "oversized", "version")}
            assert sb.stats.decode_errors == expected
            # An endpoint this replica does not have: counted, nothing applied.
            await publish(wire.route("peer-x", 1, "no-such-pod", [1, 2, 3], 5.0, 100))
            # A message carrying this replica's own id (a second connection of its own,
            # a replay): ignored.
            await publish(wire.route(sb.replica_id, 3, "sim-1", [41], 5.0, 100))
            # ... and a good message after all that is applied.
            await publish(wire.route("peer-x", 2, "sim-0", [11, 12, 13], 5.0, 100,
                                     cold=True))
            await eventually(lambda: sb.stats.received["route"] == 1, f"the good one applied {sb.stats}")
        assert sb.stats.dropped["unknown_endpoint"] == 1
        assert b.kv_services[0].index.pending_of("sim-0") == 3
        assert b.kv_services[0].index.pending_of("sim-1") == 0
        # The peer's cold placement counts in this replica's no-hit LRU.
        pool = {e.name: e for e in b.pool.snapshot()}
        assert pool["sim-0"].state.peer_cold_pick_at > 0
        assert pool["sim-1"].state.peer_cold_pick_at == 0
        assert sb.peers() == 1  # peer-x; not itself
        assert "no-such-pod" not in b.kv_services[0].index.endpoints()
        handle = await route(b, chat(16, "Still routing?"))
        end(handle)
        m = await scrape(b)
        assert m["epp_replica_sync_decode_errors_total{reason=\"malformed\"}"] == \
            expected["malformed"]
        assert m["epp_replica_sync_decode_errors_total{reason=\"oversized\"}"] == 1
        assert m["epp_replica_sync_decode_errors_total{reason=\"version\"}"] == 1
        assert m["epp_replica_sync_messages_dropped_total{reason=\"unknown_endpoint\"}"] == 1
        assert b.metrics.background_failures.labels("replica-sync")._value.get() == 0


@pytest.mark.asyncio
async def test_a_peer_that_vanishes_leaves_nothing_behind(
        sims: LocalStack, nats: NatsServer) -> None:
    async with replicas(settings(sims, nats.url)) as (b,):
        sb = b.replica_sync
        assert sb is not None
        sim0 = b.pool.get("sim-0")
        sim1 = b.pool.get("sim-1")
        assert sim0 is not None and sim1 is not None
        index = b.kv_services[0].index
        async with fake_peer(nats.url) as publish:
            await publish(wire.presence("ghost", wire.KIND_BEAT))
            await publish(wire.route("ghost", 1, "sim-0", [21, 22], 0.6, 700))
            # A second peer routes, then stops cleanly: its farewell releases at once.
            await publish(wire.route("leaver", 1, "sim-1", [31], 30.0, 300))
            await eventually(lambda: sb.stats.received["route"] == 2, "routes applied")
            assert sim0.state.load.peer_prefill_tokens == 700
            assert sim1.state.load.peer_prefill_tokens == 300
            assert index.pending_of("sim-0") == 2
            assert sb.peers() == 2
            await publish(wire.presence("leaver", wire.KIND_BYE))
            await eventually(lambda: sim1.state.load.peer_prefill_tokens == 0, "farewell")
        # The ghost never completes: its load and pending blocks expire with its TTL.
        started = time.monotonic()
        await eventually(lambda: sim0.state.load.peer_prefill_tokens == 0, "expiry",
                         timeout=3)
        assert time.monotonic() - started < 2.0  # its 0.6 s TTL, not the 30 s bound
        assert sim0.state.load.peer_requests == 0 and len(sb.table) == 0
        assert sb.table.expired == 1
        index.match([21, 22], ["sim-0"])  # a lookup expires due pending entries
        assert index.pending_of("sim-0") == 0
        m = await scrape(b)
        assert m["epp_replica_sync_peer_entries"] == 0
        assert m["epp_replica_sync_peer_entries_ended_total{how=\"expired\"}"] == 1


def test_promtool_accepts_the_sync_metrics(sims: LocalStack, nats: NatsServer) -> None:
    promtool = need("promtool")

    async def page() -> bytes:
        async with replicas(settings(sims, nats.url)) as (app,):
            handle = await route(app, chat(17, "Metrics?"))
            end(handle)
            return await asyncio.to_thread(
                lambda: request(f"http://127.0.0.1:{app.metrics_port}/metrics").body)

    text = asyncio.run(page())
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    for name in ("epp_replica_sync_messages_sent_total", "epp_replica_sync_messages_received_total",
                 "epp_replica_sync_messages_dropped_total", "epp_replica_sync_decode_errors_total",
                 "epp_replica_sync_connected", "epp_replica_sync_peers",
                 "epp_endpoint_peer_inflight_tokens"):
        assert f"\n{name}" in text.decode(), name
