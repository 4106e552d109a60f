"""InferenceObjective and InferenceModelRewrite in llm-d.ai/v1alpha2 and in the older
inference.networking.x-k8s.io group, through the real list/watch protocol (an in-test API
server): both groups are read, llm-d.ai wins a name clash, either CRD may be missing, and
a missing permission fails start-up naming the group."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio.client import ApiClient, Configuration

from epp.datastore import EndpointPool
from epp.datastore.model_rewrites import ModelRewrite, ModelRewrites
from epp.discovery.kubernetes import DiscoveryError, KubernetesDiscovery
from epp.requestcontrol.admission import Admission, SaturationDetector
from tests.k8sfake import FakeKubeServer, make_objective, make_pod, make_pool, make_rewrite

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

POOL = "vllm-pool"
APP = {"app": "vllm"}
NEW = ".llm-d.ai"  # the suffix that names the llm-d.ai group in the fake server


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeKubeServer]:
    s = FakeKubeServer()
    await s.start()
    s.apply("inferencepools", make_pool(POOL, APP, [8000]))
    s.apply("pods", make_pod("a", "10.0.0.1", APP))
    yield s
    await s.stop()


class Sinks:
    def __init__(self) -> None:
        self.admission = Admission({}, SaturationDetector(5, 0.8, 0.5))
        self.rewrites = ModelRewrites(random.Random(0))
        self.published: list[list[ModelRewrite]] = []

    def on_rewrites(self, rewrites: list[ModelRewrite]) -> None:
        self.published.append(rewrites)
        self.rewrites.replace(rewrites)

    def priority(self, name: str) -> int:
        return self.admission.priority({"x-llm-d-inference-objective": name})


async def start(server: FakeKubeServer, sinks: Sinks) -> KubernetesDiscovery:
    async def client() -> ApiClient:
        return ApiClient(Configuration(host=server.url))

    discovery = KubernetesDiscovery(EndpointPool(), namespace="default", pool_name=POOL,
                                    objectives_sink=sinks.admission.set_objectives,
                                    rewrites_sink=sinks.on_rewrites, api_client_factory=client,
                                    backoff_initial_s=0.02, backoff_max_s=0.2)
    await discovery.start()
    return discovery


async def eventually(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5.0):  # a hang guard; the watch event is what is awaited
        while not predicate():
            await asyncio.sleep(0.01)


def rewrite_to(target: str, model: str = "chat") -> list[dict[str, Any]]:
    return [{"matches": [{"model": {"value": model}}], "targets": [{"modelRewrite": target}]}]


async def test_objectives_from_both_groups_new_group_wins(server: FakeKubeServer) -> None:
    server.apply("inferenceobjectives", make_objective("chat", POOL, 1))
    server.apply("inferenceobjectives", make_objective("batch", POOL, -1))
    server.apply("inferenceobjectives" + NEW, make_objective("chat", POOL, 7))
    server.apply("inferenceobjectives" + NEW, make_objective("other-pool", "elsewhere", 9))
    sinks = Sinks()
    discovery = await start(server, sinks)
    try:
        assert [sinks.priority(n) for n in ("chat", "batch", "other-pool")] == [7, -1, 0]
        server.delete("inferenceobjectives" + NEW, "chat")  # the old group's value returns
        await eventually(lambda: sinks.priority("chat") == 1)
        server.apply("inferenceobjectives" + NEW, make_objective("new-only", POOL, 3))
        await eventually(lambda: sinks.priority("new-only") == 3)
    finally:
        await discovery.stop()


async def test_rewrites_from_both_groups_are_watched(server: FakeKubeServer) -> None:
    server.apply("inferencemodelrewrites", make_rewrite(
        "old", POOL, rewrite_to("old-target"), created="2026-01-01T00:00:00Z"))
    server.apply("inferencemodelrewrites" + NEW, make_rewrite(
        "newer", POOL, rewrite_to("newer-target"), created="2026-02-01T00:00:00Z"))
    server.apply("inferencemodelrewrites" + NEW, make_rewrite(
        "other-pool", "elsewhere", rewrite_to("nope", model="x")))
    sinks = Sinks()
    discovery = await start(server, sinks)
    try:
        # Two objects match "chat": the older one wins, whichever group it is in.
        assert sinks.rewrites.target("chat") == "old-target"
        assert sinks.rewrites.target("x") is None  # another pool's rewrite
        server.delete("inferencemodelrewrites", "old")
        await eventually(lambda: sinks.rewrites.target("chat") == "newer-target")

        def retarget(obj: dict[str, Any]) -> None:
            obj["spec"]["rules"][0]["targets"] = [{"modelRewrite": "patched"}]

        server.patch("inferencemodelrewrites" + NEW, "newer", retarget)
        await eventually(lambda: sinks.rewrites.target("chat") == "patched")
    finally:
        await discovery.stop()


@pytest.mark.parametrize("missing", ["inferenceobjectives", "inferenceobjectives" + NEW,
                                     "inferencemodelrewrites",
                                     "inferencemodelrewrites" + NEW])
async def test_either_group_may_be_missing(server: FakeKubeServer, missing: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    present = {"inferenceobjectives", "inferenceobjectives" + NEW} - {missing}
    for plural in present:
        server.apply(plural, make_objective("chat", POOL, 4))
    server.uninstall(missing)
    sinks = Sinks()
    with caplog.at_level(logging.WARNING, logger="epp.discovery"):
        discovery = await start(server, sinks)
    try:
        assert sinks.priority("chat") == 4
        group = "llm-d.ai" if missing.endswith(NEW) else "inference.networking.x-k8s.io"
        assert f"does not serve {missing.split('.')[0]}.{group}" in caplog.text
    finally:
        await discovery.stop()


@pytest.mark.parametrize("plural, qualified", [
    ("inferenceobjectives" + NEW, "inferenceobjectives.llm-d.ai"),
    ("inferencemodelrewrites", "inferencemodelrewrites.inference.networking.x-k8s.io"),
    ("inferencemodelrewrites" + NEW, "inferencemodelrewrites.llm-d.ai"),
])
async def test_forbidden_fails_start_naming_the_group(server: FakeKubeServer, plural: str,
                                                      qualified: str) -> None:
    server.forbid(plural, "list")
    with pytest.raises(DiscoveryError) as err:
        await start(server, Sinks())
    assert f"Forbidden: Kubernetes denied list on {qualified}" in str(err.value)
