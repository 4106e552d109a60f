"""``--metrics-endpoint-auth``: the metrics port checks bearer tokens with TokenReview and
SubjectAccessReview against the in-test Kubernetes API server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from epp.discovery.kubernetes import load_api_client
from epp.observability.metrics_auth import MetricsAuthenticator
from tests.k8sfake.server import FakeKubeServer

PROMETHEUS_USER = "system:serviceaccount:monitoring:prometheus"
PROMETHEUS: dict[str, Any] = {"username": PROMETHEUS_USER, "uid": "u1",
                              "groups": ["system:serviceaccounts"], "extra": {"scope": ["a"]}}
STRANGER: dict[str, Any] = {"username": "system:serviceaccount:default:stranger", "uid": "u2"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Served:
    """A metrics app behind the authenticator, the fake API server, and a client."""

    def __init__(self, kube: FakeKubeServer, auth: MetricsAuthenticator, url: str,
                 session: aiohttp.ClientSession, clock: Clock) -> None:
        self.kube, self.auth, self.url, self.session, self.clock = (
            kube, auth, url, session, clock)

    async def get(self, token: str | None, path: str = "/metrics") -> int:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.get(self.url + path, headers=headers) as response:
            await response.read()
            return response.status


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    kube = FakeKubeServer()
    await kube.start()
    kube.tokens = {"good": PROMETHEUS, "no-rights": STRANGER}
    kube.access = {PROMETHEUS_USER: {("get", "/metrics")}}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{kube.url}"}}}}]
users: [{{name: epp, user: {{token: epp-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: epp}}}}]
current-context: fake
""")
    clock = Clock()
    auth = MetricsAuthenticator(lambda: load_api_client(str(kubeconfig)), clock=clock)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="epp_up 1\n")

    app = web.Application(middlewares=[auth.middleware])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/other", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with aiohttp.ClientSession() as session:
        yield Served(kube, auth, url, session, clock)
    await runner.cleanup()
    await auth.close()
    await kube.stop()


@pytest.mark.asyncio
async def test_tokens_are_reviewed_and_authorised(served: Served) -> None:
    assert await served.get("good") == 200
    token_review, access_review = served.kube.reviews
    assert token_review["kind"] == "TokenReview" and token_review["spec"]["token"] == "good"
    spec = access_review["spec"]
    assert access_review["kind"] == "SubjectAccessReview"
    assert spec["nonResourceAttributes"] == {"path": "/metrics", "verb": "get"}
    assert (spec["user"], spec["uid"], spec["groups"], spec["extra"]) == (
        PROMETHEUS_USER, "u1", ["system:serviceaccounts"], {"scope": ["a"]})
    assert await served.get(None) == 401  # no token: the API is not even asked
    assert await served.get("") == 401
    assert await served.get("forged") == 401  # TokenReview says unauthenticated
    assert await served.get("no-rights") == 403  # known user, no RBAC for /metrics
    assert await served.get("good", "/other") == 403  # the permission is per path


@pytest.mark.asyncio
async def test_a_non_bearer_scheme_is_refused(served: Served) -> None:
    async with served.session.get(served.url + "/metrics",
                                  headers={"Authorization": "Basic Z29vZA=="}) as response:
        assert response.status == 401
    assert served.kube.reviews == []


@pytest.mark.asyncio
async def test_verdicts_are_cached_briefly(served: Served) -> None:
    assert await served.get("good") == 200
    assert await served.get("forged") == 401
    asked = served.auth.reviews
    for _ in range(3):
        assert await served.get("good") == 200
        assert await served.get("forged") == 401
    assert served.auth.reviews == asked  # answered from the cache
    served.kube.access = {}  # RBAC revoked ...
    assert await served.get("good") == 200  # ... seen only once the verdict expires
    served.clock.now += 61
    assert await served.get("good") == 403
    assert served.auth.reviews == asked + 1


@pytest.mark.asyncio
async def test_an_api_server_failure_is_500_and_not_cached(served: Served) -> None:
    await served.kube.stop()
    assert await served.get("good") == 500
    await served.kube.start()  # a new port: the client still points at the old one
    assert await served.get("good") == 500
    assert served.auth.reviews == 2  # asked again each time


@pytest.mark.asyncio
async def test_the_cache_is_bounded(served: Served) -> None:
    served.auth._max = 3
    for i in range(10):
        assert await served.get(f"random-{i}") == 401
    assert len(served.auth._verdicts) == 3
