"""Supervised background tasks: a metrics poller, a Kubernetes watch loop, the
endpoints-file watcher and the KV index resize loop each die once of an injected bug,
are restarted, keep working (a scrape lands, a watch event is applied, a file edit is
picked up, the index follows the fleet) and the failure is counted in
``epp_background_task_failures_total{task}``. Retried watch failures (410, a cut
connection, an error status) are counted in ``epp_discovery_watch_errors_total``.

Real sockets throughout: aiohttp servers for scrapes, the in-test Kubernetes API server
for watches. Waits are conditions with deadlines, never fixed sleeps."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio.client import ApiClient, Configuration

from epp.config import EppSettings
from epp.datalayer.scraper import MetricsScraper
from epp.datastore import Endpoint, EndpointPool, ServerMetrics
from epp.devtools.procs import free_port
from epp.discovery.k8s_watch import Reflector
from epp.discovery.kubernetes import KubernetesDiscovery
from epp.kvcache.service import KVCacheService
from epp.kvcache.settings import KVCacheSettings
from epp.observability.metrics import EppMetrics
from epp.runner import build_app
from tests.integration.httputil import request
from tests.k8sfake import FakeKubeServer, make_objective, make_pod, make_pool
from tests.unit.test_datalayer import FakePod, page

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

# Generous for a shared 2-core machine; the first restart comes after ~0.5 s of backoff.
DEADLINE_S = 10.0
FAILURES = "epp_background_task_failures_total"
WATCH_ERRORS = "epp_discovery_watch_errors_total"
NS = "default"
POOL = "vllm-pool"
APP = {"app": "vllm"}
FAST_RETRY: dict[str, Any] = {"backoff_initial_s": 0.02, "backoff_max_s": 0.2}


async def eventually(predicate: Callable[[], bool], what: str,
                     timeout: float = DEADLINE_S) -> None:
    """Wait until ``predicate()`` holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def failures(metrics: EppMetrics, task: str) -> float:
    return metrics.registry.get_sample_value(FAILURES, {"task": task}) or 0.0


def watch_errors(metrics: EppMetrics, resource: str, reason: str) -> float:
    return metrics.registry.get_sample_value(
        WATCH_ERRORS, {"resource": resource, "reason": reason}) or 0.0


class Once:
    """Raises ``RuntimeError`` (an injected bug) the first time it is called."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, what: str) -> None:
        if not self.fired:
            self.fired = True
            raise RuntimeError(f"injected fault in {what}")


# --- metrics poller ---------------------------------------------------------------------


@pytest_asyncio.fixture
async def metrics_page() -> AsyncIterator[FakePod]:
    pod = FakePod()  # serves a vLLM page with waiting=3
    await pod.start()
    yield pod
    await pod.close()


async def test_a_poller_that_dies_is_restarted_scrapes_again_and_is_counted(
        metrics_page: FakePod, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    pool = EndpointPool()
    pool.replace_all([Endpoint(name="pod-a", address=metrics_page.address)])
    endpoint = pool.snapshot()[0]
    metrics = EppMetrics()
    scraper = MetricsScraper(pool, interval_s=0.02,
                             on_task_failure=metrics.count_background_failure)
    # The bug: the first scrape raises out of the poller (outside the scrape's own
    # handling of network and page errors), which ends its task.
    fault = Once()
    real_scrape = scraper._scrape

    async def flaky_scrape(url: str, state: Any) -> str | None:
        fault(f"scrape of {url}")
        return await real_scrape(url, state)

    monkeypatch.setattr(scraper, "_scrape", flaky_scrape)
    with caplog.at_level(logging.WARNING, logger="epp.datalayer.scraper"):
        async with scraper:
            await eventually(lambda: endpoint.state.metrics.waiting == 3,
                             "a scrape after the restart")
            assert fault.fired
            assert failures(metrics, "scraper") == 1
            assert scraper.polled_endpoints == {"pod-a"}
            metrics_page.page = page(waiting=7)  # and it keeps polling
            await eventually(lambda: endpoint.state.metrics.waiting == 7, "a later scrape")
    # Logged with the endpoint, without the endpoint in the metric's labels.
    assert any("pod-a" in r.getMessage() and "restarting" in r.getMessage()
               for r in caplog.records)
    assert failures(metrics, "pod-a") == 0


# --- endpoints-file watcher (through the runner's wiring) -------------------------------


async def test_the_endpoints_file_watcher_that_dies_is_restarted_and_picks_up_the_edit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import epp.discovery.static as static

    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: [{name: a, address: '127.0.0.1:1'}]\n")
    app = build_app(EppSettings(endpoints_file=str(endpoints), bind_address="127.0.0.1",
                                grpc_port=0, health_port=0, metrics_port=0,
                                endpoints_reload_s=0.02))
    await app.start()
    try:
        # The bug strikes after the watcher has seen the new mtime, before it applied it:
        # a restarted watcher that trusted that mtime would never load this edit.
        fault = Once()
        real_load = static.load_endpoints_file

        def flaky_load(path: Any) -> list[Endpoint]:
            fault(f"load of {path}")
            return real_load(path)

        monkeypatch.setattr(static, "load_endpoints_file", flaky_load)
        endpoints.write_text("endpoints: [{name: a, address: '127.0.0.1:1'},"
                             " {name: b, address: '127.0.0.1:2'}]\n")
        await eventually(lambda: {e.name for e in app.pool.snapshot()} == {"a", "b"},
                         "the edit after the restart")
        assert fault.fired
        endpoints.write_text("endpoints: [{name: c, address: '127.0.0.1:3'}]\n")
        await eventually(lambda: {e.name for e in app.pool.snapshot()} == {"c"},
                         "a later edit")
        page = (await asyncio.to_thread(
            request, f"http://127.0.0.1:{app.metrics_port}/metrics")).body.decode()
        assert f'{FAILURES}{{task="endpoints-file"}} 1.0' in page
    finally:
        await app.stop()


# --- KV index resize loop -----------------------------------------------------------------


async def test_the_index_resize_loop_that_dies_is_restarted_and_follows_the_fleet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool = EndpointPool()
    pool.replace_all([Endpoint(name="pod-a", address="127.0.0.1:1")])
    state = pool.snapshot()[0].state
    state.update_metrics(ServerMetrics(num_gpu_blocks=1000))
    metrics = EppMetrics()
    # Render mode loads no tokenizer; the KV-event port is free so nothing answers there.
    service = KVCacheService(KVCacheSettings(tokenizer_mode="render",
                                             kv_events_port=free_port()),
                             capacity_refresh_s=0.02,
                             on_task_failure=metrics.count_background_failure)
    await service.start(pool)
    try:
        await eventually(lambda: service.index.capacity_blocks == 2000, "the first resize")
        fault = Once()
        real_snapshot = pool.snapshot

        def flaky_snapshot() -> tuple[Endpoint, ...]:
            fault("pool snapshot")
            return real_snapshot()

        monkeypatch.setattr(pool, "snapshot", flaky_snapshot)
        await eventually(lambda: fault.fired, "the fault")
        state.update_metrics(ServerMetrics(num_gpu_blocks=3000))
        await eventually(lambda: service.index.capacity_blocks == 6000,
                         "a resize after the restart")
        assert failures(metrics, "kv-index-resize") == 1
    finally:
        await service.stop()


# --- Kubernetes watch loops ---------------------------------------------------------------


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[FakeKubeServer]:
    server = FakeKubeServer()
    await server.start()
    server.apply("inferencepools", make_pool(POOL, APP, [8000]))
    server.apply("pods", make_pod("a", "10.0.0.1", APP))
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def discovery(kube: FakeKubeServer
                    ) -> AsyncIterator[tuple[KubernetesDiscovery, EndpointPool, EppMetrics,
                                             list[dict[str, int]]]]:
    async def client() -> ApiClient:
        return ApiClient(Configuration(host=kube.url))

    pool = EndpointPool()
    metrics = EppMetrics()
    objectives: list[dict[str, int]] = []
    d = KubernetesDiscovery(pool, namespace=NS, pool_name=POOL,
                            objectives_sink=objectives.append, api_client_factory=client,
                            on_task_failure=metrics.count_background_failure,
                            on_watch_error=metrics.count_watch_error, **FAST_RETRY)
    await d.start()
    yield d, pool, metrics, objectives
    await d.stop()


def addresses(pool: EndpointPool) -> set[str]:
    return {e.address for e in pool.snapshot()}


def fail_first_event_of(monkeypatch: pytest.MonkeyPatch, plural: str) -> Once:
    """The next watch event of ``plural`` raises while being applied (a bug in the
    conversion or in a change handler), which ends that watch loop."""
    fault = Once()
    real_apply = Reflector._apply

    def flaky_apply(self: Reflector[Any], event: Any) -> None:
        if self.resource.plural == plural and event.get("type") != "BOOKMARK":
            fault(f"{plural} event")
        real_apply(self, event)

    monkeypatch.setattr(Reflector, "_apply", flaky_apply)
    return fault


async def test_a_pods_watch_that_dies_is_restarted_and_applies_later_events(
        kube: FakeKubeServer, discovery: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pool, metrics, _ = discovery
    fault = fail_first_event_of(monkeypatch, "pods")
    kube.apply("pods", make_pod("b", "10.0.0.2", APP))  # this event kills the loop
    await eventually(lambda: addresses(pool) == {"10.0.0.1:8000", "10.0.0.2:8000"},
                     "pod b after the restart (a relist)")
    assert fault.fired
    kube.apply("pods", make_pod("c", "10.0.0.3", APP))
    kube.delete("pods", "a")
    await eventually(lambda: addresses(pool) == {"10.0.0.2:8000", "10.0.0.3:8000"},
                     "later pod events")
    assert failures(metrics, "k8s-watch-pods") == 1
    assert failures(metrics, "k8s-watch-inferencepools") == 0


async def test_an_inferencepool_watch_that_dies_is_restarted_and_applies_later_events(
        kube: FakeKubeServer, discovery: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pool, metrics, _ = discovery
    fault = fail_first_event_of(monkeypatch, "inferencepools")
    kube.apply("inferencepools", make_pool(POOL, APP, [9000]))
    await eventually(lambda: addresses(pool) == {"10.0.0.1:9000"},
                     "the new target port after the restart")
    assert fault.fired
    kube.apply("inferencepools", make_pool(POOL, APP, [9100]))
    await eventually(lambda: addresses(pool) == {"10.0.0.1:9100"}, "a later pool change")
    assert failures(metrics, "k8s-watch-inferencepools") == 1


async def test_an_objectives_watch_that_dies_is_restarted_and_applies_later_events(
        kube: FakeKubeServer, discovery: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, metrics, objectives = discovery
    fault = fail_first_event_of(monkeypatch, "inferenceobjectives")
    kube.apply("inferenceobjectives", make_objective("chat", POOL, priority=5))
    await eventually(lambda: bool(objectives) and objectives[-1] == {"chat": 5},
                     "the objective after the restart")
    assert fault.fired
    kube.apply("inferenceobjectives", make_objective("batch", POOL, priority=-1))
    await eventually(lambda: objectives[-1] == {"chat": 5, "batch": -1},
                     "a later objective")
    assert failures(metrics, "k8s-watch-inferenceobjectives") == 1


async def test_retried_watch_failures_are_counted_by_resource_and_reason(
        kube: FakeKubeServer, discovery: Any) -> None:
    _, pool, metrics, _ = discovery
    # 410 Gone: the history the watch would resume from is gone; list again.
    kube.apply("inferencepools", make_pool(POOL, APP, [8000]))  # moves the version on
    kube.compact()
    kube.drop_watches()
    await eventually(lambda: watch_errors(metrics, "pods", "expired") >= 1, "a 410 counted")
    # A connection cut mid-stream, once the pods watch is open again after the relist.
    await eventually(lambda: kube.last("watch", "pods").resource_version
                     == str(kube.resource_version), "the pods watch reopened")
    kube.drop_watches(abrupt=True)
    await eventually(lambda: watch_errors(metrics, "pods", "connection") >= 1,
                     "a cut connection counted")
    # An error status when the watch is opened again.
    kube.fail("pods", "watch", 500)
    kube.drop_watches()
    await eventually(lambda: watch_errors(metrics, "pods", "http") >= 1, "a 500 counted")
    kube.apply("pods", make_pod("b", "10.0.0.2", APP))  # and the watch still works
    await eventually(lambda: addresses(pool) == {"10.0.0.1:8000", "10.0.0.2:8000"},
                     "a pod event after the errors")
    assert sum(failures(metrics, task) for task in (
        "k8s-watch-pods", "k8s-watch-inferencepools", "k8s-watch-inferenceobjectives")) == 0
