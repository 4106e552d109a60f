"""The gRPC health services the upstream chart's probes ask for, through a real gRPC
health client: liveness, readiness, inference-extension and ext_proc's name, across start,
pool sync, an empty pool, draining and stop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.observability.health import (
    EXT_PROC,
    INFERENCE_EXTENSION,
    LIVENESS,
    OVERALL,
    READINESS,
    HealthReporter,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = (LIVENESS, READINESS, INFERENCE_EXTENSION, EXT_PROC, OVERALL)


class Probe:
    """A health client on a real gRPC channel to a real server."""

    def __init__(self, stub: health_pb2_grpc.HealthStub) -> None:
        self.stub = stub

    async def statuses(self) -> dict[str, str]:
        out = {}
        for service in SERVICES:
            reply = await self.stub.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=5)
            out[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return out


def expect(live: str, ready: str, extension: str) -> dict[str, str]:
    return {LIVENESS: live, READINESS: ready, INFERENCE_EXTENSION: extension,
            EXT_PROC: ready, OVERALL: ready}


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[HealthReporter, Probe]]:
    health = HealthReporter()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health, Probe(health_pb2_grpc.HealthStub(channel))
    await server.stop(None)


@pytest.mark.asyncio
async def test_statuses_follow_sync_endpoints_and_draining(
        served: tuple[HealthReporter, Probe]) -> None:
    health, probe = served
    # Start-up: alive, nothing else until the pool has synced.
    assert await probe.statuses() == expect("SERVING", "NOT_SERVING", "NOT_SERVING")
    # Synced but empty: inference-extension (the chart's single-replica liveness probe)
    # serves, readiness does not.
    health.set_pool_state(synced=True, has_endpoints=False)
    await health.settled()
    assert await probe.statuses() == expect("SERVING", "NOT_SERVING", "SERVING")
    health.set_pool_state(synced=True, has_endpoints=True)
    await health.settled()
    assert await probe.statuses() == expect("SERVING", "SERVING", "SERVING")
    assert health.ready
    # Draining: everything but liveness goes NOT_SERVING, so kubelet does not restart us.
    await health.start_draining()
    assert await probe.statuses() == expect("SERVING", "NOT_SERVING", "NOT_SERVING")
    health.set_pool_state(synced=True, has_endpoints=False)  # a late pool change
    health.set_pool_state(synced=True, has_endpoints=True)
    await health.settled()
    assert await probe.statuses() == expect("SERVING", "NOT_SERVING", "NOT_SERVING")
    await health.shutting_down()
    assert await probe.statuses() == expect("NOT_SERVING", "NOT_SERVING", "NOT_SERVING")


@pytest.mark.asyncio
async def test_quick_changes_land_in_order(served: tuple[HealthReporter, Probe]) -> None:
    health, probe = served
    for has in (True, False, True, False, True):
        health.set_pool_state(synced=True, has_endpoints=has)
    await health.settled()
    assert await probe.statuses() == expect("SERVING", "SERVING", "SERVING")


@pytest.mark.asyncio
async def test_an_unknown_service_is_not_found(served: tuple[HealthReporter, Probe]) -> None:
    _, probe = served
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await probe.stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
