"""InferenceModelRewrite through real Envoy: the EPP (on Kubernetes discovery, an in-test
API server) rewrites the body's model so a pod that only serves ``qwen3`` answers a
request for an alias, in duplex-streamed and in BUFFERED mode; the header rewrite and the
llm-d objective header work end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import Process, free_port, python_module, wait_for_http
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import Reply, post
from tests.k8sfake.server import (
    FakeKubeServer,
    make_objective,
    make_pod,
    make_pool,
    make_rewrite,
)

pytestmark = pytest.mark.integration
NS = "inference"
POOL = "llm-pool"
LABELS = {"app": "vllm"}
SERVED = "qwen3"  # the only model the pod serves (epp-sim's default name)


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[FakeKubeServer]:
    server = FakeKubeServer()
    await server.start()
    yield server
    await server.stop()


def _start_envoy(stack: LocalStack, body_mode: str) -> Process:
    p = stack.ports
    config = envoy_cfg.epp_config(p.envoy, p.epp_grpc, p.envoy_admin, stack.epp_tls)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    ext_proc = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    ext_proc["typed_config"]["processing_mode"]["request_body_mode"] = body_mode
    path = envoy_cfg.write_config(config, stack.work_dir / f"envoy-{body_mode}.yaml")
    proc = Process("envoy", [envoy_cfg.envoy_binary(), "-c", str(path), "--disable-hot-restart",
                             "--concurrency", "1", "--log-level", "warn"], stack.work_dir)
    wait_for_http(f"http://127.0.0.1:{p.envoy_admin}/ready", expect=b"LIVE")
    return proc


def _complete(url: str, model: str, headers: dict[str, str] | None = None) -> Reply:
    return post(url + "/v1/completions", {"model": model, "prompt": "hello", "max_tokens": 2},
                headers)


@pytest.mark.asyncio
@pytest.mark.parametrize("body_mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_rewritten_model_is_what_the_pod_serves(kube: FakeKubeServer, tmp_path: Path,
                                                      body_mode: str) -> None:
    port = free_port()
    sim = Process("pod", python_module("epp.sim", "--host", "127.0.0.2", "--port", str(port),
                                       "--tokenizer", "bytes"), tmp_path)
    stack = LocalStack(tmp_path, StackPorts.free(0), envoy_concurrency=1)
    envoy: Process | None = None
    try:
        await asyncio.to_thread(sim.wait_for_log, "listening")
        kube.apply("inferencepools", make_pool(POOL, LABELS, [port], namespace=NS))
        kube.apply("pods", make_pod("vllm-0", "127.0.0.2", LABELS, namespace=NS))
        # New group for the rewrite, old group for the objective: both are read.
        kube.apply("inferencemodelrewrites.llm-d.ai", make_rewrite(POOL, POOL, [
            {"matches": [{"model": {"value": "chat-alias"}}],
             "targets": [{"modelRewrite": SERVED}]}], namespace=NS))
        kube.apply("inferenceobjectives", make_objective("batch", POOL, -1, namespace=NS))
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        await asyncio.to_thread(stack.start_epp, (), [
            "--pool-name", POOL, "--pool-namespace", NS, "--kubeconfig", str(kubeconfig)])
        envoy = await asyncio.to_thread(_start_envoy, stack, body_mode)

        # Without a rewrite the pod refuses the alias, as vLLM does.
        unknown = await asyncio.to_thread(_complete, stack.url, "not-served")
        assert unknown.status == 404, unknown.body
        reply = await asyncio.to_thread(_complete, stack.url, "chat-alias")
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == SERVED
        for header in ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"):
            reply = await asyncio.to_thread(_complete, stack.url, "other-alias",
                                            {header: SERVED})
            assert reply.status == 200, (header, reply.body)
        # The llm-d objective header reaches admission (priority -1: sheddable, served
        # while the pod is idle) and is stripped like the rest.
        reply = await asyncio.to_thread(_complete, stack.url, "chat-alias",
                                        {"x-llm-d-inference-objective": "batch"})
        assert reply.status == 200, reply.body
    finally:
        if envoy is not None:
            envoy.stop()
        await asyncio.to_thread(stack.stop)
        sim.stop()
