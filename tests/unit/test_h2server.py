"""The lean HTTP/2 ext_proc server, driven by a real gRPC client (grpc.aio)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.datastore import Endpoint, EndpointPool
from epp.devtools import fake_envoy as fe
from epp.extproc.h2server import H2ExtProcServer
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.types import ProfileResult, SchedulingResult


class First:
    def schedule(self, ctx, candidates, explain=False):  # type: ignore[no-untyped-def]
        return SchedulingResult({"p": ProfileResult([candidates[0]])}, "p")


def director() -> Director:
    pool = EndpointPool()
    pool.upsert(Endpoint("a", "10.0.0.1:8000"))
    return Director(pool, First(), Admission({}, SaturationDetector(5, 0.8, 0.5)), EppMetrics())


async def exchange(stub: pb_grpc.ExternalProcessorStub, body: bytes) -> list[object]:
    requests = [fe.request_headers(), *fe.request_body_chunks(body, 16_384),
                fe.response_headers(), fe.response_body(b'{"ok": true}', True)]
    call = stub.Process(iter(requests))
    return [r async for r in call]


@pytest.mark.asyncio
async def test_routes_large_bodies_and_concurrent_streams() -> None:
    server = H2ExtProcServer(director())
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            big = json.dumps({"model": "m", "prompt": "x" * 300_000}).encode()
            small = json.dumps({"model": "m", "prompt": "hi"}).encode()
            results = await asyncio.gather(*(exchange(stub, big if i % 2 else small)
                                             for i in range(8)))
        for i, responses in enumerate(results):
            kinds = [r.WhichOneof("response") for r in responses]  # type: ignore[attr-defined]
            assert kinds[0] == "request_headers"
            chunks = [r.request_body.response.body_mutation.streamed_response.body  # type: ignore[attr-defined]
                      for r in responses[1:-2]]
            assert b"".join(chunks) == (big if i % 2 else small)
            assert kinds[-2:] == ["response_headers", "response_body"]
        assert server.active_streams == 0
    finally:
        await server.stop(1.0)


@pytest.mark.asyncio
async def test_unknown_method_gets_unimplemented_and_bad_json_an_immediate_400() -> None:
    server = H2ExtProcServer(director())
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            bogus = channel.unary_unary("/some.Service/Method")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await bogus(b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            stub = pb_grpc.ExternalProcessorStub(channel)
            call = stub.Process(iter([fe.request_headers(), fe.request_body(b"{nope")]))
            responses = [r async for r in call]
        assert [r.WhichOneof("response") for r in responses] == ["immediate_response"]
        assert responses[0].immediate_response.status.code == 400
    finally:
        await server.stop(1.0)


@pytest.mark.asyncio
async def test_stop_lets_open_streams_finish_and_refuses_new_ones() -> None:
    server = H2ExtProcServer(director())
    port = await server.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        call = stub.Process()
        await call.write(fe.request_headers())
        await call.write(fe.request_body(json.dumps({"model": "m", "prompt": "x"}).encode()))
        first = await call.read()
        assert first.WhichOneof("response") == "request_headers"
        await call.read()  # the body chunk
        stopping = asyncio.create_task(server.stop(5.0))
        await asyncio.sleep(0.1)
        await call.write(fe.response_headers())
        assert (await call.read()).WhichOneof("response") == "response_headers"
        await call.write(fe.response_body(b"{}", True))
        assert (await call.read()).WhichOneof("response") == "response_body"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        late = stub.Process(iter([fe.request_headers(end_of_stream=True)]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in late]
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await stopping
