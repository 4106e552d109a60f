"""``--grpc-max-recv-msg-size`` bounds one ext_proc message on both transports."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.config import EppSettings
from epp.devtools import fake_envoy as fe
from epp.runner import build_app

pytestmark = pytest.mark.integration
LIMIT = 64 * 1024


async def first_reply(port: int, body: bytes) -> str:
    """Send headers and the whole body as one message; the kind of the first answer."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        call = stub.Process(iter([fe.request_headers(), fe.request_body(body)]), timeout=10)
        async for reply in call:
            return str(reply.WhichOneof("response"))
    return ""


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["h2", "grpc"])
@pytest.mark.parametrize("limit", [LIMIT, 0])
async def test_a_message_over_the_limit_is_refused(transport: str, limit: int,
                                                   tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: [{name: a, address: '127.0.0.1:1'}]\n")
    app = build_app(EppSettings(endpoints_file=str(endpoints), bind_address="127.0.0.1",
                                grpc_port=0, health_port=0, metrics_port=0,
                                secure_serving=False, extproc_server=transport,
                                grpc_max_recv_msg_bytes=limit))
    await app.start()
    try:
        small = json.dumps({"model": "m", "prompt": "x" * (LIMIT // 2)}).encode()
        large = json.dumps({"model": "m", "prompt": "x" * (LIMIT * 2)}).encode()
        assert await first_reply(app.grpc_port, small) == "request_headers"
        if limit:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await first_reply(app.grpc_port, large)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:  # each transport's own, larger limit
            assert await first_reply(app.grpc_port, large) == "request_headers"
    finally:
        await app.stop()
