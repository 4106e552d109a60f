"""Transport invariants, frame by frame, on both ext_proc transports (the lean h2 server
and grpc.aio): one stream's fault stays in that stream, a reset at any phase settles the
request once, bursts over the stream limit are refused per stream, and a peer that stops
reading cannot make the EPP buffer without bound."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import h2.errors
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint, EndpointPool
from epp.devtools import fake_envoy as fe
from epp.extproc import certs, h2server
from epp.extproc.h2server import H2ExtProcServer
from epp.extproc.server import ExtProcServicer, add_to_server
from epp.kvcache.match import PrefixMatch
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.types import ProfileResult, SchedulingResult
from tests.h2client import H2Client, frame

BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()


class First:
    def schedule(self, ctx: Any, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        return SchedulingResult({"p": ProfileResult([candidates[0]])}, "p")


class Gate:
    """A data producer that holds routing until released (a slow tokenizer)."""

    name = "gate"

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.closed = False

    async def produce(self, request: LLMRequest | None,
                      candidates: Sequence[Endpoint]) -> PrefixMatch | None:
        if self.closed:
            return None
        self.entered.set()
        await self.release.wait()
        return None


@dataclass
class Rig:
    port: int
    endpoint: Endpoint
    metrics: EppMetrics
    gate: Gate
    kind: str
    h2: H2ExtProcServer | None
    tls: ssl.SSLContext | None = None  # the client side, when the server serves TLS

    def aborted(self) -> float:
        return self.metrics.registry.get_sample_value(
            "inference_objective_request_error_total",
            {"model_name": "m", "target_model_name": "m", "error_code": "stream_aborted"}
        ) or 0.0


async def start_rig(kind: str, gated: bool = False, **h2_options: Any
                    ) -> tuple[Rig, Any]:
    pool = EndpointPool()
    endpoint = Endpoint("a", "10.0.0.1:8000")
    pool.upsert(endpoint)
    metrics = EppMetrics()
    metrics.serve_models({"m"})
    gate = Gate()
    if not gated:
        gate.closed = True
    director = Director(pool, First(), Admission({}, SaturationDetector(5, 0.8, 0.5)),
                        metrics, producers=[gate])
    if kind in ("h2", "h2-tls"):
        client_tls = None
        if kind == "h2-tls":
            cert = certs.generate_self_signed(["localhost"], [])
            h2_options["ssl_context"] = certs.server_context(cert)
            client_tls = ssl.create_default_context(cadata=cert.chain_pem.decode())
            client_tls.set_alpn_protocols(["h2"])
        server = H2ExtProcServer(director, **h2_options)
        port = await server.start("127.0.0.1", 0)
        return Rig(port, endpoint, metrics, gate, kind, server, client_tls), server.stop
    aio = grpc.aio.server()
    add_to_server(ExtProcServicer(director), aio)
    port = aio.add_insecure_port("127.0.0.1:0")
    await aio.start()
    return Rig(port, endpoint, metrics, gate, kind, None), aio.stop


# Every fault on each transport; the h2 server also over TLS (its own TLS layer sits
# between the socket and the HTTP/2 state machine, flow control included).
@pytest_asyncio.fixture(params=["h2", "h2-tls", "grpc"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    r, stop = await start_rig(request.param)
    yield r
    await stop(0.5)


@pytest_asyncio.fixture(params=["h2", "h2-tls", "grpc"])
async def gated(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    r, stop = await start_rig(request.param, gated=True)
    yield r
    r.gate.release.set()
    await stop(0.5)


async def client(r: Rig, **kw: Any) -> H2Client:
    c = H2Client(**kw)
    await c.connect(r.port, tls=r.tls)
    return c


def full_exchange(c: H2Client, sid: int) -> None:
    c.send(sid, fe.request_headers(), fe.request_body(BODY), fe.response_headers(),
           fe.response_body(b'{"ok": 1}', True), end_stream=True)


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def finish(c: H2Client, sid: int) -> None:
    """Send the response side of a routed stream and check it completes."""
    c.send(sid, fe.response_headers(), fe.response_body(b"{}", True), end_stream=True)
    c.flush()
    assert_completed(await c.wait(sid))


async def assert_serves(c: H2Client) -> None:
    """The connection still serves a whole new exchange."""
    sid = c.open()
    full_exchange(c, sid)
    c.flush()
    assert_completed(await c.wait(sid))


def assert_completed(result: Any) -> None:
    assert result.reset is None and result.grpc_status == b"0", (result.reset, result.trailers)
    assert result.kinds() == ["request_headers", "request_body", "response_headers",
                              "response_body"]


@pytest.mark.asyncio
async def test_coalesced_headers_and_reset_leave_other_streams_alone(rig: Rig) -> None:
    c = await client(rig)
    try:
        bystander = c.open()
        c.send(bystander, fe.request_headers(), fe.request_body(BODY))
        c.flush()
        await until(lambda: len(c.results[bystander].data) > 0)
        # Many clients abort: each stream's HEADERS and RST_STREAM in one write.
        for _ in range(50):
            sid = c.open()
            c.reset(sid)
        c.flush()
        # ... and streams that end at once (HEADERS + END_STREAM).
        ended = [c.open(end_stream=True) for _ in range(5)]
        c.flush()
        await finish(c, bystander)
        for sid in ended:
            result = await c.wait(sid)
            assert result.reset is not None or result.grpc_status == b"0"
        assert not c.closed.is_set()
        # The connection still serves new requests.
        await assert_serves(c)
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_undecodable_message_fails_only_its_stream(rig: Rig) -> None:
    c = await client(rig)
    try:
        good = c.open()
        c.send(good, fe.request_headers(), fe.request_body(BODY))
        bad = c.open()
        c.send(bad, b"\xff\xff\xff\xff not a protobuf")
        c.flush()
        result = await c.wait(bad)
        assert result.reset is not None or result.grpc_status not in (None, b"0")
        await finish(c, good)
        assert not c.closed.is_set()
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_out_of_order_messages_fail_the_stream_not_the_connection(rig: Rig) -> None:
    c = await client(rig)
    try:
        good = c.open()
        c.send(good, fe.request_headers(), fe.request_body(BODY))
        bad = c.open()
        # Request headers twice: a proxy bug, answered with a gRPC error on that stream.
        c.send(bad, fe.request_headers(), fe.request_headers())
        c.flush()
        result = await c.wait(bad)
        assert result.grpc_status == b"3" or result.reset is not None
        await finish(c, good)
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_a_thousand_streams_before_settings_all_succeed(rig: Rig) -> None:
    c = H2Client()
    await c.connect(rig.port, send_preface=False, tls=rig.tls)
    try:
        # Envoy opens streams before it has read the server's SETTINGS: the preface and
        # 1,000 HEADERS go out in one write; their messages follow as windows allow.
        sids = [c.open() for _ in range(1000)]
        c.flush()
        payload = b"".join(frame(m) for m in (
            fe.request_headers(), fe.request_body(BODY), fe.response_headers(),
            fe.response_body(b'{"ok": 1}', True)))
        for sid in sids:
            await until(lambda: c.conn.local_flow_control_window(sid) >= len(payload))
            c.send_bytes(sid, payload, end_stream=True)
            c.flush()
        results = await asyncio.gather(*(c.wait(s, timeout=60) for s in sids))
        for result in results:
            assert_completed(result)
        assert rig.endpoint.state.load.requests == 0
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_streams_over_the_limit_are_refused_one_by_one() -> None:
    r, stop = await start_rig("h2", gated=True, max_concurrent_streams=5)
    c = await client(r)
    try:
        sids = [c.open() for _ in range(7)]
        for sid in sids:
            c.send(sid, fe.request_headers(), fe.request_body(BODY))
        c.flush()
        refused = [await c.wait(s) for s in sids[5:]]
        assert [x.reset for x in refused] == [h2.errors.ErrorCodes.REFUSED_STREAM] * 2
        r.gate.release.set()
        for sid in sids[:5]:
            c.send(sid, fe.response_headers(), fe.response_body(b"{}", True),
                   end_stream=True)
        c.flush()
        for sid in sids[:5]:
            assert_completed(await c.wait(sid))
        assert not c.closed.is_set()
    finally:
        await c.close()
        await stop(0.5)


@pytest.mark.asyncio
async def test_reset_while_routing_releases_the_load_once(gated: Rig) -> None:
    c = await client(gated)
    try:
        sid = c.open()
        c.send(sid, fe.request_headers(), fe.request_body(BODY))
        c.flush()
        await asyncio.wait_for(gated.gate.entered.wait(), 5)
        c.reset(sid)
        c.flush()
        await asyncio.sleep(0.1)  # the reset reaches the server while routing waits
        gated.gate.release.set()
        await asyncio.sleep(0.1)
        assert gated.endpoint.state.load.requests == 0
        assert gated.endpoint.state.load.prompt_tokens == 0
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_connection_loss_while_routing_releases_the_load(gated: Rig) -> None:
    c = await client(gated)
    sid = c.open()
    c.send(sid, fe.request_headers(), fe.request_body(BODY))
    c.flush()
    await asyncio.wait_for(gated.gate.entered.wait(), 5)
    await c.close()
    await asyncio.sleep(0.1)
    gated.gate.release.set()
    await asyncio.sleep(0.1)
    assert gated.endpoint.state.load.requests == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("phase", ["headers", "body", "routed", "response"])
async def test_reset_at_any_phase_settles_exactly_once(rig: Rig, phase: str) -> None:
    c = await client(rig)
    try:
        sid = c.open()
        if phase != "headers":
            c.send(sid, fe.request_headers())
        if phase in ("routed", "response"):
            c.send(sid, fe.request_body(BODY))
        if phase == "body":
            c.send(sid, fe.request_body(BODY[:5], end_of_stream=False))
        if phase == "response":
            c.send(sid, fe.response_headers(), fe.response_body(b"{", False))
        c.flush()
        if phase in ("routed", "response"):
            await until(lambda: len(c.results[sid].data) > 0)
        await asyncio.sleep(0.05)
        c.reset(sid)
        c.flush()
        await until(lambda: rig.endpoint.state.load.requests == 0)
        await asyncio.sleep(0.05)
        assert rig.aborted() == (1.0 if phase in ("routed", "response") else 0.0)
        assert rig.endpoint.state.load.requests == 0
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_peer_goaway_lets_open_streams_finish(rig: Rig) -> None:
    c = await client(rig)
    try:
        sid = c.open()
        c.send(sid, fe.request_headers(), fe.request_body(BODY))
        c.flush()
        await until(lambda: len(c.results[sid].data) > 0)
        c.conn.close_connection()  # GOAWAY from the proxy (e.g. its cluster drains)
        c.conn.state_machine.state = c.conn.state_machine.state.CLIENT_OPEN
        c.flush()
        await asyncio.sleep(0.05)
        await finish(c, sid)
    finally:
        await c.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["h2", "h2-tls"])
async def test_a_peer_that_stops_reading_cannot_grow_the_buffer(kind: str) -> None:
    r, stop = await start_rig(kind)
    assert r.h2 is not None
    # The proxy grants 64 KiB per stream and never more on this one.
    c = H2Client(window=65_535)
    await c.connect(r.port, tls=r.tls)
    try:
        sid = c.open()
        c.no_ack.add(sid)
        c.send(sid, fe.request_headers(), fe.request_body(BODY), fe.response_headers())
        c.flush()
        await until(lambda: len(c.results[sid].data) > 0)
        chunk = fe.response_body(b"x" * 60_000, False)
        sent = 0
        # Keep sending echoed chunks while the server grants window; it must stop.
        for _ in range(400):
            window = c.conn.local_flow_control_window(sid)
            if window < 70_000:
                break
            c.send(sid, chunk)
            c.flush()
            sent += 60_000
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        conn = next(iter(r.h2.connections))
        bound = h2server.STREAM_SEND_BUFFER + h2server.STREAM_WINDOW + 120_000
        assert conn.held_bytes <= bound
        assert c.conn.local_flow_control_window(sid) < 70_000  # the server stopped granting
        assert sent < 24 * 1024 * 1024  # it stopped us long before 24 MiB
        # Another stream on the same connection is unaffected.
        await assert_serves(c)
    finally:
        await c.close()
        await stop(0.5)


@pytest.mark.asyncio
async def test_partial_messages_count_against_the_connection_cap() -> None:
    r, stop = await start_rig("h2", connection_buffer=1024 * 1024)
    c = await client(r)
    try:
        sids = []
        for _ in range(4):
            sid = c.open()
            c.send(sid, fe.request_headers())
            c.flush()
            # A message announced as 8 MiB, of which 400 KB arrive and the rest never.
            await c.write(sid, b"\x00" + (8 * 1024 * 1024).to_bytes(4, "big") + b"x" * 400_000)
            sids.append(sid)
        refused = [await c.wait(s) for s in sids[2:]]
        for result in refused:
            assert result.kinds() == ["immediate_response"]
            assert result.messages()[0].immediate_response.status.code == 429
        assert r.h2 is not None
        conn = next(iter(r.h2.connections))
        assert conn.held_bytes <= 1024 * 1024
        await assert_serves(c)
    finally:
        await c.close()
        await stop(0.5)


@pytest.mark.asyncio
async def test_rapid_reset_flood_leaves_nothing_behind(rig: Rig) -> None:
    c = await client(rig)
    try:
        bystander = c.open()
        c.send(bystander, fe.request_headers(), fe.request_body(BODY))
        c.flush()
        await until(lambda: len(c.results[bystander].data) > 0)
        for _ in range(20):  # 2,000 streams opened and cancelled at once (CVE-2023-44487)
            for _ in range(100):
                sid = c.open()
                c.send(sid, fe.request_headers(), fe.request_body(BODY))
                c.reset(sid)
            c.flush()
            await asyncio.sleep(0)
        await finish(c, bystander)
        await until(lambda: rig.endpoint.state.load.requests == 0)
        if rig.h2 is not None:
            await until(lambda: rig.h2 is not None and rig.h2.active_streams == 0)
    finally:
        await c.close()


OPS = st.lists(st.tuples(st.integers(0, 4), st.sampled_from(
    ["headers", "body", "half_body", "response", "end", "reset", "garbage", "huge_prefix"])),
    min_size=1, max_size=25)


@pytest.mark.asyncio
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_any_interleaving_of_stream_faults_spares_the_bystander(ops: Any) -> None:
    r, stop = await start_rig("h2")
    c = await client(r)
    try:
        bystander = c.open()
        c.send(bystander, fe.request_headers(), fe.request_body(BODY))
        sids = [c.open() for _ in range(5)]
        gone: set[int] = set()
        for index, op in ops:
            sid = sids[index]
            if sid in gone:
                continue
            if op == "headers":
                c.send(sid, fe.request_headers())
            elif op == "body":
                c.send(sid, fe.request_body(BODY))
            elif op == "half_body":
                c.send(sid, fe.request_body(BODY[:7], end_of_stream=False))
            elif op == "response":
                c.send(sid, fe.response_headers(), fe.response_body(b"{}", True))
            elif op == "garbage":
                c.send(sid, b"\x08\x96\x01\xff\xff")
            elif op == "huge_prefix":
                c.send_bytes(sid, b"\x00\xff\xff\xff\xff")
            elif op in ("end", "reset"):
                c.reset(sid) if op == "reset" else c.conn.end_stream(sid)
                gone.add(sid)
        c.flush()
        await finish(c, bystander)
        assert not c.closed.is_set()
        for sid in sids:  # close whatever is still open; nothing may hang or leak
            if sid not in gone:
                c.reset(sid)
        c.flush()
        await until(lambda: r.endpoint.state.load.requests == 0)
        await until(lambda: r.h2 is not None and r.h2.active_streams == 0)
    finally:
        await c.close()
        await stop(0.5)
