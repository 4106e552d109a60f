"""Kubernetes churn under load, through real Envoy: steady traffic while pods are added
to and deleted from the (in-test) API server and one pod goes not-ready and back.

Every request must succeed (a deleted pod's process keeps serving until its routes have
drained, as a pod does during its termination grace period, and is then killed), and a
pod that left the pool must get no request sent more than ``ROUTE_GRACE_S`` after the
event that removed it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from epp.devtools.procs import Process, free_port, python_module
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import request
from tests.integration.openloop import Load
from tests.k8sfake.server import FakeKubeServer, make_pod, make_pool

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
NS = "inference"
POOL = "llm-pool"
LABELS = {"app": "vllm"}
PODS = 4
# Requests per second: steady enough that every phase below sees tens of requests, light
# enough for a 2-core machine running Envoy, the EPP, four pods and this client.
RATE = 20.0
# A watch event reaches the EPP in one loopback write on an open stream and is applied to
# the pool in the same event-loop step; what remains is a request whose routing was
# already under way when the event came (milliseconds, but the EPP shares two cores with
# Envoy, four pods and the load generator). One second covers both with room to spare,
# and a missed event shows far beyond it: nothing would correct the pool before the
# next relist, minutes later (the watch timeout).
ROUTE_GRACE_S = 1.0
# Requests sent after the grace that must be answered before a phase counts as seen:
# two seconds of traffic, spread by the EPP over the 2-3 pods still in the pool.
AFTER_GRACE = int(2 * RATE)
DEADLINE_S = 60.0


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def served_by(load: Load, pod: str, since: float) -> bool:
    return any(r.pod == pod and r.sent >= since for r in load.answered())


def answered_after(load: Load, since: float) -> int:
    return sum(1 for r in load.answered() if r.sent >= since)


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[FakeKubeServer]:
    server = FakeKubeServer()
    await server.start()
    yield server
    await server.stop()


async def test_pods_come_and_go_under_load_without_failures_or_late_routes(
        kube: FakeKubeServer, tmp_path: Path) -> None:
    port = free_port()
    ips = [f"127.0.0.{i + 2}" for i in range(PODS)]  # one loopback IP per "pod"
    addr = [f"{ip}:{port}" for ip in ips]
    sims = [Process(f"pod-{i}", python_module("epp.sim", "--host", ips[i], "--port",
                                              str(port), "--tokenizer", "bytes"), tmp_path)
            for i in range(PODS)]
    stack = LocalStack(tmp_path, StackPorts.free(0), envoy_concurrency=1)
    load: Load | None = None
    # (pod address, removed at, back at or None): no request sent in between (after
    # the grace) may be served there.
    absences: list[tuple[str, float, float | None]] = []
    try:
        for sim in sims:
            await asyncio.to_thread(sim.wait_for_log, "listening")
        kube.apply("inferencepools", make_pool(POOL, LABELS, [port], namespace=NS))
        for i in (0, 1):
            kube.apply("pods", make_pod(f"vllm-{i}", ips[i], LABELS, namespace=NS))
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        await asyncio.to_thread(stack.start_epp, (), [
            "--pool-name", POOL, "--pool-namespace", NS, "--kubeconfig", str(kubeconfig)])
        await asyncio.to_thread(stack.start_envoy)
        traffic = load = Load(stack.url, RATE).start()
        start = time.monotonic()
        await eventually(lambda: served_by(traffic, addr[0], start), "traffic on pod 0")
        await eventually(lambda: served_by(traffic, addr[1], start), "traffic on pod 1")

        # A pod is added: it gets traffic.
        added = time.monotonic()
        kube.apply("pods", make_pod("vllm-2", ips[2], LABELS, namespace=NS))
        await eventually(lambda: served_by(traffic, addr[2], added), "traffic on the new pod 2")

        # A pod goes not-ready, then ready again.
        def readiness(ready: bool) -> Callable[[dict[str, Any]], None]:
            def change(pod: dict[str, Any]) -> None:
                pod["status"]["conditions"] = [{"type": "Ready", "status": str(ready)}]
            return change

        not_ready = time.monotonic()
        kube.patch("pods", "vllm-1", readiness(False), namespace=NS)
        await eventually(lambda: answered_after(traffic, not_ready + ROUTE_GRACE_S) >= AFTER_GRACE,
                         "traffic after pod 1 went not-ready")
        ready = time.monotonic()
        kube.patch("pods", "vllm-1", readiness(True), namespace=NS)
        absences.append((addr[1], not_ready, ready))
        await eventually(lambda: served_by(traffic, addr[1], ready), "traffic on pod 1 again")

        # One pod is added while another is deleted; the deleted one's process ends once
        # its routes have drained.
        deleted = time.monotonic()
        kube.apply("pods", make_pod("vllm-3", ips[3], LABELS, namespace=NS))
        kube.delete("pods", "vllm-0", namespace=NS)
        absences.append((addr[0], deleted, None))
        await eventually(lambda: served_by(traffic, addr[3], deleted), "traffic on the new pod 3")
        await eventually(lambda: answered_after(traffic, deleted + ROUTE_GRACE_S) >= AFTER_GRACE,
                         "traffic after pod 0 was deleted")
        await asyncio.to_thread(sims[0].stop)
        stopped = time.monotonic()
        await eventually(lambda: answered_after(traffic, stopped) >= AFTER_GRACE,
                         "traffic after pod 0 stopped")

        # Another deletion: the pool shrinks to two.
        deleted = time.monotonic()
        kube.delete("pods", "vllm-2", namespace=NS)
        absences.append((addr[2], deleted, None))
        await eventually(lambda: answered_after(traffic, deleted + ROUTE_GRACE_S) >= AFTER_GRACE,
                         "traffic after pod 2 was deleted")
        results = await asyncio.to_thread(traffic.stop)
        load = None
        page = (await asyncio.to_thread(
            request, f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics")).body.decode()
    finally:
        if load is not None:
            await asyncio.to_thread(load.stop)
        await asyncio.to_thread(stack.stop)
        for sim in sims:
            await asyncio.to_thread(sim.stop)

    failed = [(round(r.sent - start, 2), r.status, r.error) for r in results if r.status != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:10]}"
    for pod, removed, back in absences:
        late = [round(r.sent - removed, 2) for r in results
                if r.pod == pod and r.sent > removed + ROUTE_GRACE_S
                and (back is None or r.sent < back)]
        assert not late, f"{pod} served requests sent this long after it left: {late}"
    served = {r.pod for r in results}
    assert served == set(addr), served
    # Churn is not a failure: no background task died.
    assert "epp_background_task_failures_total{" not in page
