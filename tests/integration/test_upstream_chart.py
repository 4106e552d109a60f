"""The EPP process started the way the llm-d-router chart starts it (its arguments, its
environment, its config file) against an in-test Kubernetes API server, behind Envoy:
it routes, answers the chart's health probes, logs JSON, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.devtools.procs import Process, python_module
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post
from tests.k8sfake.server import FakeKubeServer, make_pod, make_pool

pytestmark = pytest.mark.integration
NS = "inference"
POOL = "llm-pool"
LABELS = {"app": "vllm"}
CONFIG = Path(__file__).parents[1] / "unit" / "fixtures" / "llm-d-router-default-plugins.yaml"
COMPLETION = {"model": "qwen3", "prompt": "hello", "max_tokens": 1}
# How long a wait for a state change may take before the test gives up (not a measure).
WAIT_S = 20.0


def health(port: int, service: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def until_health(port: int, service: str, status: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while await asyncio.to_thread(health, port, service) != status:
        assert time.monotonic() < deadline, f"{service} never became {status}"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_the_charts_arguments_run_route_probe_and_drain(tmp_path: Path) -> None:
    kube = FakeKubeServer()
    await kube.start()
    stack = LocalStack(tmp_path, StackPorts.free(1), envoy_concurrency=1)
    try:
        await asyncio.to_thread(stack.start_sims)
        sim_port = stack.ports.sims[0]
        kube.apply("inferencepools", make_pool(POOL, LABELS, [sim_port], namespace=NS))
        kube.apply("pods", make_pod("vllm-0", "127.0.0.1", LABELS, namespace=NS))
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        p = stack.ports
        chart_args = [  # as rendered by the chart (the namespace comes from $NAMESPACE)
            "--pool-name", POOL, "--pool-group", "inference.networking.k8s.io",
            "--zap-encoder", "json", "--config-file", str(CONFIG),
            "--ha-enable-leader-election", "--grpc-health-port", str(p.epp_health),
            "--drain-timeout=60s", "--tracing=false", "--metrics-endpoint-auth=false",
        ]
        local_args = ["--kubeconfig", str(kubeconfig), "--bind-address", "127.0.0.1",
                      "--grpc-port", str(p.epp_grpc), "--metrics-port", str(p.epp_metrics)]
        epp = Process("epp", python_module("epp", *chart_args, *local_args), tmp_path,
                      env={"NAMESPACE": NS, "POD_NAMESPACE": "wrong"})
        stack.epp = epp
        await asyncio.to_thread(epp.wait_for_http,
                                f"http://127.0.0.1:{p.epp_metrics}/metrics")
        await asyncio.to_thread(stack.start_envoy)
        for service in ("liveness", "readiness", "inference-extension",
                        "envoy.service.ext_proc.v3.ExternalProcessor"):
            await until_health(p.epp_health, service, "SERVING")
        reply = await asyncio.to_thread(post, stack.url + "/v1/completions", COMPLETION,
                                        {"x-request-id": "chart-req-1"})
        assert reply.status == 200, reply.body
        # Routed to the pod found in $NAMESPACE ($POD_NAMESPACE names an empty one).
        assert reply.headers["x-sim-endpoint"] == f"127.0.0.1:{sim_port}"

        # SIGTERM: every probe but liveness fails, yet streams are still routed.
        epp.proc.send_signal(signal.SIGTERM)
        await until_health(p.epp_health, "readiness", "NOT_SERVING")
        await until_health(p.epp_health, "inference-extension", "NOT_SERVING")
        assert await asyncio.to_thread(health, p.epp_health, "liveness") == "SERVING"
        reply = await asyncio.to_thread(post, stack.url + "/v1/completions", COMPLETION)
        assert reply.status == 200, reply.body
        assert epp.alive()
        # A second signal ends the drain; the exit is clean.
        assert await asyncio.to_thread(stack.stop_epp) == 0

        lines = epp.log_path.read_text().splitlines()
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
        messages = [str(r["msg"]) for r in records]
        assert any(m.startswith("--ha-enable-leader-election=true accepted and ignored")
                   for m in messages)
        assert any(m.startswith("draining for 60.0s") for m in messages)
    finally:
        await asyncio.to_thread(stack.stop)
        await kube.stop()
