"""The app's metrics port with ``--metrics-endpoint-auth`` on and off, reviews answered by
the in-test Kubernetes API server."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from epp.config import EppSettings
from epp.runner import build_app
from tests.k8sfake.server import FakeKubeServer

pytestmark = pytest.mark.integration
PROMETHEUS = "system:serviceaccount:monitoring:prometheus"


async def status(port: int, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/metrics", headers=headers) as response:
        await response.read()
        return response.status


@pytest.mark.asyncio
@pytest.mark.parametrize("auth", [True, False])
async def test_metrics_port_checks_tokens_only_when_asked(auth: bool, tmp_path: Path) -> None:
    kube = FakeKubeServer()
    await kube.start()
    kube.tokens = {"good": {"username": PROMETHEUS}, "stranger": {"username": "bob"}}
    kube.access = {PROMETHEUS: {("get", "/metrics")}}
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: [{name: a, address: '127.0.0.1:1'}]\n")
    app = build_app(EppSettings(endpoints_file=str(endpoints), bind_address="127.0.0.1",
                                grpc_port=0, health_port=0, metrics_port=0,
                                secure_serving=False, kubeconfig=str(kubeconfig),
                                metrics_endpoint_auth=auth))
    await app.start()
    try:
        got = [await status(app.metrics_port, t) for t in (None, "forged", "stranger", "good")]
        assert got == ([401, 401, 403, 200] if auth else [200, 200, 200, 200])
        assert bool(kube.reviews) is auth
    finally:
        await app.stop()
        await kube.stop()
