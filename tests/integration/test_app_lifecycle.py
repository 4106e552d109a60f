"""The EPP process and app lifecycle: health, readiness, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.config import EppSettings
from epp.devtools.stack import LocalStack, StackPorts
from epp.runner import build_app
from tests.integration.httputil import post

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _channel(port: int, tls_root: bytes | None) -> grpc.aio.Channel:
    if tls_root is None:
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=tls_root),
        options=[("grpc.ssl_target_name_override", "localhost")])


async def _status(port: int, service: str, tls_root: bytes | None = None) -> int:
    async with _channel(port, tls_root) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)


@pytest.mark.asyncio
async def test_ready_only_while_the_pool_has_endpoints(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    app = build_app(EppSettings(endpoints_file=str(endpoints), bind_address="127.0.0.1",
                                grpc_port=0, health_port=0, metrics_port=0,
                                endpoints_reload_s=0.05))
    await app.start()
    try:
        assert await _status(app.health_port, "liveness") == SERVING
        for service in ("readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert await _status(app.health_port, service) == NOT_SERVING
        time.sleep(0.01)  # a distinct mtime for the edit below
        endpoints.write_text("endpoints: [{name: a, address: '127.0.0.1:1'}]\n")
        deadline = time.monotonic() + 5
        while await _status(app.health_port, "readiness") != SERVING:
            assert time.monotonic() < deadline, "never became ready"
            await asyncio.sleep(0.05)
        # The ext_proc port (TLS by default; the health port above is cleartext) serves
        # only ext_proc: other methods get a clean UNIMPLEMENTED.
        assert app.tls is not None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _status(app.grpc_port, "readiness", app.tls.certificate.chain_pem)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        endpoints.write_text("endpoints: []\n")
        deadline = time.monotonic() + 5
        while await _status(app.health_port, "readiness") != NOT_SERVING:
            assert time.monotonic() < deadline, "still ready with an empty pool"
            await asyncio.sleep(0.05)
    finally:
        await app.stop()


def test_sigterm_lets_an_in_flight_stream_finish(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, StackPorts.free(1), envoy_concurrency=1,
                       sim_args=["--itl-ms", "50"],
                       epp_args=["--shutdown-grace-seconds", "10"])
    stack.start()
    try:
        result: dict[str, object] = {}

        def stream() -> None:
            body = {"model": "qwen3", "prompt": "x", "max_tokens": 30, "stream": True}
            result["reply"] = post(stack.url + "/v1/completions", body)

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.4)  # the stream is now flowing through the EPP
        assert stack.epp is not None
        started = time.monotonic()
        assert stack.stop_epp() == 0
        t.join(10)
        reply = result["reply"]
        assert reply.status == 200  # type: ignore[attr-defined]
        events = reply.body.decode().strip().split("\n\n")  # type: ignore[attr-defined]
        assert events[-1] == "data: [DONE]"
        assert len([e for e in events[:-1] if json.loads(e[6:])["choices"]]) == 30
        # The EPP waited for the stream (~1.5 s in all), not for the whole grace period.
        assert time.monotonic() - started < 8
    finally:
        stack.stop()


SESSION_CONFIG = """\
plugins:
- type: session-affinity-scorer
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: session-affinity-scorer, weight: 10}
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: max-score-picker}
"""


@pytest.mark.asyncio
async def test_plugins_with_per_endpoint_state_forget_pods_that_leave(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: [{name: a, address: '127.0.0.1:1'}, "
                         "{name: b, address: '127.0.0.1:2'}]\n")
    config = tmp_path / "config.yaml"
    config.write_text(SESSION_CONFIG)
    app = build_app(EppSettings(endpoints_file=str(endpoints), config_file=str(config),
                                bind_address="127.0.0.1", grpc_port=0, health_port=0,
                                metrics_port=0, endpoints_reload_s=0.05))
    await app.start()
    try:
        session = app.picker_config.plugins["session-affinity-scorer"]
        body = json.dumps({"model": "m", "prompt": "hi"}).encode()
        handle = await app.director.route({":path": "/v1/completions", "x-session-id": "s1"},
                                          body, None)
        handle.on_done(True)
        assert len(session.table) == 1
        time.sleep(0.01)  # a distinct mtime for the edit below
        kept = "b" if handle.endpoints[0].name == "a" else "a"
        port = 2 if kept == "b" else 1
        endpoints.write_text(f"endpoints: [{{name: {kept}, address: '127.0.0.1:{port}'}}]\n")
        deadline = time.monotonic() + 5
        while len(session.table):
            assert time.monotonic() < deadline, "the departed pod's session was kept"
            await asyncio.sleep(0.05)
    finally:
        await app.stop()
