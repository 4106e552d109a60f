"""A pod that dies leaves the candidate set: the health verdict in endpoint state, its
evidence (a refused scrape, the gateway's 503), fail-open, and /debug/explain."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Sequence

import pytest
from aiohttp import web

from epp.datalayer import MetricsScraper
from epp.datastore import Endpoint, EndpointPool, ServerMetrics
from epp.kvcache.index import EndpointMatch
from epp.kvcache.match import PrefixMatch
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.types import ProfileResult, SchedulingContext, SchedulingResult

COMPLETION = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 1}).encode()
HEADERS = {":path": "/v1/completions"}
PAGE = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0\n"


class PrefixFirst:
    """Scheduler stand-in for the precise default: the endpoint with the most cached
    blocks wins, whatever its load (the x6 prefix weight in the extreme)."""

    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        match = ctx.cycle.get("prefix-match")
        best = max(candidates, key=lambda e: match.of(e.name).blocks if match else 0)
        return SchedulingResult({"default": ProfileResult([best])}, "default")


class WarmOn:
    """A producer whose match says ``warm`` holds the whole prompt."""

    name = "precise-prefix-match"

    def __init__(self, warm: str) -> None:
        self.warm = warm

    async def produce(self, request: object, candidates: Sequence[Endpoint]) -> PrefixMatch:
        return PrefixMatch(True, 64, 16, 4, {self.warm: EndpointMatch(4, 4)})


def make_director(*names: str) -> tuple[Director, EndpointPool, EppMetrics]:
    pool = EndpointPool()
    pool.replace_all(Endpoint(n, f"10.0.0.{i + 1}:8000") for i, n in enumerate(names))
    metrics = EppMetrics()
    director = Director(pool, PrefixFirst(), Admission({}, SaturationDetector(5, 0.8, 0.5)),
                        metrics, producers=[WarmOn(names[0])])
    return director, pool, metrics


def sample(metrics: EppMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_routable_drops_unreachable_and_fails_open_when_all_are() -> None:
    pool = EndpointPool()
    pool.replace_all([Endpoint("a", "10.0.0.1:80"), Endpoint("b", "10.0.0.2:80")])
    a, b = pool.snapshot()
    assert pool.routable((a, b)) == ((a, b), False)
    assert a.state.report_unreachable("refused") is True
    assert a.state.report_unreachable("again") is False  # the first reason stays
    assert pool.routable((a, b)) == ((b,), False)
    b.state.report_unreachable("refused")
    assert pool.routable((a, b)) == ((a, b), True)  # fail open, not closed
    assert pool.fail_opens == 1


def test_a_listed_pod_gets_traffic_only_after_its_first_scrape() -> None:
    pool = EndpointPool()
    pool.replace_all([Endpoint("old", "10.0.0.1:80"), Endpoint("new", "10.0.0.2:80")])
    old, new = pool.get("old"), pool.get("new")
    assert old is not None and new is not None
    assert pool.routable((old, new)) == ((old, new), False)  # nothing scraped yet
    old.state.update_metrics(ServerMetrics(scraped_at=1.0))
    assert pool.routable((old, new)) == ((old,), False)  # "new" may not listen yet
    new.state.update_metrics(ServerMetrics(scraped_at=1.0))
    assert pool.routable((old, new)) == ((old, new), False)


@pytest.mark.asyncio
async def test_dead_warm_pod_leaves_the_candidates_and_returns_after_a_scrape() -> None:
    # The defect: the pod holding the prefix kept winning after it died, because a
    # failed scrape only zeroed its load score.
    director, pool, metrics = make_director("warm", "cold")
    warm, cold = pool.get("warm"), pool.get("cold")
    assert warm is not None and cold is not None
    handle = await director.route(HEADERS, COMPLETION, None)
    assert handle.endpoints[0] is warm
    # Envoy could not connect to it: its local reply reaches the response path as a 503.
    handle.on_response_headers(503, {"content-type": "text/plain"})
    handle.on_response_body(b"upstream connect error or disconnect/reset before headers",
                            True)
    handle.on_done(True)
    assert warm.state.unreachable is not None
    for _ in range(5):
        again = await director.route(HEADERS, COMPLETION, None)
        assert again.endpoints[0] is cold
        again.on_done(False)
    explained = await director.explain(HEADERS, COMPLETION)
    assert [c["name"] for c in explained["candidates"]] == ["cold"]
    assert set(explained["unreachable"]) == {"warm"}
    warm.state.update_metrics(warm.state.metrics)  # what a successful scrape does
    back = await director.route(HEADERS, COMPLETION, None)
    assert back.endpoints[0] is warm
    back.on_done(False)
    assert sample(metrics, "epp_unreachable_fail_open_total") == 0


@pytest.mark.asyncio
async def test_a_pods_own_success_or_client_error_is_not_evidence() -> None:
    director, pool, _ = make_director("warm", "cold")
    for status in (200, 400, 404, 429, 500, 0):
        handle = await director.route(HEADERS, COMPLETION, None)
        handle.on_response_headers(status, {})
        handle.on_done(status != 0)
    assert all(e.state.unreachable is None for e in pool.snapshot())


@pytest.mark.asyncio
async def test_all_unreachable_fails_open_and_counts() -> None:
    director, pool, metrics = make_director("warm", "cold")
    for e in pool.snapshot():
        e.state.report_unreachable("cannot connect: Connection refused")
    handle = await director.route(HEADERS, COMPLETION, None)
    assert handle.endpoints[0].name == "warm"  # scheduled over every candidate
    handle.on_done(False)
    assert sample(metrics, "epp_unreachable_fail_open_total") == 1


class MetricsPod:
    """An HTTP server with a vLLM-shaped /metrics, started on a chosen port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/plain")


@pytest.mark.asyncio
async def test_refused_scrape_marks_unreachable_until_a_scrape_succeeds() -> None:
    port = free_port()
    pod = MetricsPod(port)
    await pod.start()
    pool = EndpointPool()
    pool.upsert(Endpoint("pod", f"127.0.0.1:{port}"))
    ep = pool.snapshot()[0]
    try:
        async with MetricsScraper(pool, interval_s=0.01):
            await eventually(lambda: ep.state.metrics.scraped_at > 0)
            assert ep.state.unreachable is None
            await pod.stop()  # the pod dies: its port refuses connections
            await eventually(lambda: ep.state.unreachable is not None)
            assert "Connection refused" in (ep.state.unreachable or "")
            assert pool.routable((ep,)) == ((ep,), True)
            pod = MetricsPod(port)  # it comes back on the same address
            await pod.start()
            await eventually(lambda: ep.state.unreachable is None)
    finally:
        await pod.stop()


@pytest.mark.asyncio
async def test_a_hanging_scrape_is_not_evidence_of_death() -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=PAGE)

    app = web.Application()
    app.router.add_get("/metrics", hang)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = EndpointPool()
    pool.upsert(Endpoint("slow", f"127.0.0.1:{port}"))
    ep = pool.snapshot()[0]
    try:
        async with MetricsScraper(pool, interval_s=0.01, timeout_s=0.05):
            await eventually(lambda: ep.state.scrape_error is not None)
            assert "timed out" in (ep.state.scrape_error or "")
            assert ep.state.unreachable is None  # stale, still a candidate
    finally:
        release.set()
        await runner.cleanup()
