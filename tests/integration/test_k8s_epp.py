"""The EPP process on Kubernetes discovery (an in-test API server), through Envoy."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from epp.devtools.procs import Process, free_port, python_module
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post
from tests.k8sfake.server import FakeKubeServer, make_pod, make_pool

pytestmark = pytest.mark.integration
NS = "inference"
POOL = "llm-pool"
LABELS = {"app": "vllm"}
COMPLETION = {"model": "qwen3", "prompt": "hello", "max_tokens": 1}


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[FakeKubeServer]:
    server = FakeKubeServer()
    await server.start()
    yield server
    await server.stop()


def _served(url: str, n: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        reply = post(url + "/v1/completions", COMPLETION)
        assert reply.status == 200, reply.body
        out[reply.headers["x-sim-endpoint"]] += 1
    return out


@pytest.mark.asyncio
async def test_epp_routes_to_inferencepool_pods_and_follows_deletions(
        kube: FakeKubeServer, tmp_path: Path) -> None:
    port = free_port()
    # Two "pods" on distinct loopback IPs, same target port, as in a cluster.
    sims = [Process(f"pod-{i}", python_module("epp.sim", "--host", f"127.0.0.{i + 2}",
                                              "--port", str(port), "--tokenizer", "bytes"),
                    tmp_path) for i in range(2)]
    stack = LocalStack(tmp_path, StackPorts.free(0), envoy_concurrency=1)
    try:
        for sim in sims:
            await asyncio.to_thread(sim.wait_for_log, "listening")
        kube.apply("inferencepools", make_pool(POOL, LABELS, [port], namespace=NS))
        for i in range(2):
            kube.apply("pods", make_pod(f"vllm-{i}", f"127.0.0.{i + 2}", LABELS, namespace=NS))
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        await asyncio.to_thread(stack.start_epp, (), [
            "--pool-name", POOL, "--pool-namespace", NS, "--kubeconfig", str(kubeconfig)])
        await asyncio.to_thread(stack.start_envoy)
        served = await asyncio.to_thread(_served, stack.url, 20)
        assert set(served) == {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}
        kube.delete("pods", "vllm-0", namespace=NS)
        await asyncio.sleep(0.5)  # the watch event reaches the EPP
        served = await asyncio.to_thread(_served, stack.url, 12)
        assert served == Counter({f"127.0.0.3:{port}": 12})
    finally:
        await asyncio.to_thread(stack.stop)
        for sim in sims:
            sim.stop()
