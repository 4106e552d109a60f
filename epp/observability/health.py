"""gRPC health (``grpc.health.v1``): liveness, readiness and the ext_proc service."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Owns the health servicer; readiness follows the pool (ready = has endpoints)."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self._ready: bool | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Alive from the start; not ready until told so."""
        await self.servicer.set(LIVENESS, SERVING)
        await self._apply(False)

    def set_ready(self, ready: bool) -> None:
        """Callable from sync code (pool listeners): schedules the status change."""
        if ready == self._ready:
            return
        self._ready = ready
        task = asyncio.get_running_loop().create_task(self._apply(ready))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, ready: bool) -> None:
        self._ready = ready
        status = SERVING if ready else NOT_SERVING
        await self.servicer.set(READINESS, status)
        await self.servicer.set(EXT_PROC, status)
        await self.servicer.set("", status)
        log.info("readiness: %s", "SERVING" if ready else "NOT_SERVING")

    async def shutting_down(self) -> None:
        """Every service reports NOT_SERVING from now on."""
        await self.servicer.enter_graceful_shutdown()
