"""gRPC health (``grpc.health.v1``) with the services the upstream picker's probes ask for.

| service | SERVING when |
|---|---|
| ``liveness`` | from start-up, also while draining (a probe must not restart a draining pod) |
| ``readiness``, ext_proc's name, ``""`` | the pool has synced once, has endpoints, not draining |
| ``inference-extension`` | the pool has synced once, not draining |

The llm-d-router chart probes ``inference-extension`` for both liveness and readiness when
it runs one replica, so that service must not depend on the pool having endpoints: an
empty pool would otherwise get the picker restarted in a loop. It matches what the
upstream picker answers there (synced, not draining). ``readiness`` additionally needs
endpoints: a replica with nothing to route to should not receive streams.
After :meth:`HealthReporter.shutting_down` every service reports NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
INFERENCE_EXTENSION = "inference-extension"
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
OVERALL = ""  # the server as a whole, for clients that name no service
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Owns the health servicer; statuses follow the pool (synced, has endpoints) and
    draining. Inputs are callable from sync code (pool listeners); changes are applied
    in order on the event loop."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self._synced = False
        self._has_endpoints = False
        self._draining = False
        self._stopped = False
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        """Whether ``readiness`` reports SERVING."""
        return self._synced and self._has_endpoints and not self._draining

    async def start(self) -> None:
        """Alive from the start; not ready until the pool says so."""
        await self._apply()

    def set_pool_state(self, *, synced: bool, has_endpoints: bool) -> None:
        """The pool changed: record whether it has synced and holds endpoints."""
        if (synced, has_endpoints) == (self._synced, self._has_endpoints):
            return
        self._synced, self._has_endpoints = synced, has_endpoints
        self._schedule()

    async def settled(self) -> None:
        """Wait until every status change asked for so far has been applied."""
        while self._tasks:
            await asyncio.gather(*self._tasks)

    async def start_draining(self) -> None:
        """Shutdown has begun: every service but ``liveness`` reports NOT_SERVING, so the
        Service stops sending streams while the ext_proc server still accepts them."""
        self._draining = True
        await self._apply()

    async def shutting_down(self) -> None:
        """Every service reports NOT_SERVING from now on."""
        self._stopped = True
        await self.servicer.enter_graceful_shutdown()

    def _schedule(self) -> None:
        task = asyncio.get_running_loop().create_task(self._apply())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self) -> None:
        async with self._lock:  # two quick changes must not land out of order
            if self._stopped:
                return
            live = self._synced and not self._draining
            ready = self.ready
            statuses = {
                LIVENESS: SERVING,
                INFERENCE_EXTENSION: SERVING if live else NOT_SERVING,
                READINESS: SERVING if ready else NOT_SERVING,
                EXT_PROC: SERVING if ready else NOT_SERVING,
                OVERALL: SERVING if ready else NOT_SERVING,
            }
            for service, status in statuses.items():
                await self.servicer.set(service, status)
            log.info("health: readiness %s, inference-extension %s%s",
                     "SERVING" if ready else "NOT_SERVING",
                     "SERVING" if live else "NOT_SERVING",
                     " (draining)" if self._draining else "")
