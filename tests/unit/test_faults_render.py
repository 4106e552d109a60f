"""A wedged pod must not stall routing: render calls spread over pods by health and
latency with a hedge, and the director bounds the whole prefix step."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio
from aiohttp import web

from epp.api.openai import LLMRequest, parse_request
from epp.datastore import Endpoint, EndpointPool
from epp.kvcache.index import EndpointMatch
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.kvcache.tokens import RenderPromptTokenizer
from epp.observability.metrics import EppMetrics
from epp.requestcontrol import director as director_module
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.types import ProfileResult, SchedulingContext, SchedulingResult

PATH = "/v1/completions"
BODY = json.dumps({"model": "m", "prompt": "hello world", "max_tokens": 1}).encode()
TOKENS = [1, 2, 3, 4]


class RenderPod:
    """A pod's render endpoint: answers, hangs, or fails, and counts what it saw."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.hits = 0
        self.abandoned = 0  # calls the client gave up on while this pod hung
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(PATH + "/render", self._render)
        # handler_cancellation: a client that gives up cancels the handler, so the pod
        # can count abandoned calls.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _render(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.mode == "hang":
            try:
                await self._release.wait()
            except asyncio.CancelledError:  # aiohttp cancels the handler on disconnect
                self.abandoned += 1
                raise
        if self.mode == "fail":
            return web.Response(status=500)
        return web.json_response({"prompt_token_ids": TOKENS})


@pytest_asyncio.fixture
async def make_pods() -> AsyncIterator[object]:
    started: list[RenderPod] = []

    async def make(*modes: str) -> list[RenderPod]:
        for mode in modes:
            pod = RenderPod(mode)
            await pod.start()
            started.append(pod)
        return started[-len(modes):]

    yield make
    for pod in started:
        await pod.close()


def endpoints(pods: Sequence[RenderPod]) -> list[Endpoint]:
    # Names sort in the order given: the old code asked the first two by name.
    return [Endpoint(f"pod-{i}", p.address) for i, p in enumerate(pods)]


def request() -> LLMRequest:
    return parse_request(PATH, BODY)


@pytest.mark.asyncio
async def test_a_hung_first_pod_is_hedged_then_passed_over(make_pods: object) -> None:
    hung, a, b = await make_pods("hang", "ok", "ok")  # type: ignore[operator]
    cands = endpoints([hung, a, b])
    tok = RenderPromptTokenizer(seed=1)
    try:
        for _ in range(30):
            # Before the fix each call waited 2 s on the first pod by name.
            assert await asyncio.wait_for(tok.tokens(request(), cands), 1.0) == TOKENS
    finally:
        await tok.close()
    # Asked at most until its first hedge loss ranked it last, never once per request.
    assert 1 <= hung.hits <= 2, hung.hits
    assert tok.stats.hedge_wins == hung.hits and tok.stats.hedges >= hung.hits
    await asyncio.sleep(0.05)
    assert hung.abandoned == hung.hits  # the losing call was cancelled, not left hanging
    assert a.hits + b.hits == 30


@pytest.mark.asyncio
async def test_calls_spread_over_healthy_pods_not_name_order(make_pods: object) -> None:
    pods = await make_pods("ok", "ok", "ok", "ok")  # type: ignore[operator]
    cands = endpoints(pods)
    tok = RenderPromptTokenizer(seed=2)
    try:
        for _ in range(80):
            await tok.tokens(request(), cands)
    finally:
        await tok.close()
    hits = [p.hits for p in pods]
    assert all(h > 0 for h in hits), hits  # the old code sent all 80 to the first pod
    assert max(hits) < 60, hits


@pytest.mark.asyncio
async def test_unreachable_pods_are_skipped_and_failures_fail_over(make_pods: object) -> None:
    failing, dead, ok = await make_pods("fail", "ok", "ok")  # type: ignore[operator]
    cands = endpoints([failing, dead, ok])
    cands[1].state.report_unreachable("cannot connect: Connection refused")
    tok = RenderPromptTokenizer(seed=3)
    try:
        for _ in range(20):
            assert await tok.tokens(request(), cands) == TOKENS
    finally:
        await tok.close()
    assert dead.hits == 0
    assert tok.stats.skipped_unreachable == 20
    assert 1 <= failing.hits <= 2  # a 500 fails over at once, then ranks the pod last
    assert ok.hits == 20


@pytest.mark.asyncio
async def test_a_refused_render_marks_the_pod_unreachable(make_pods: object) -> None:
    ok, gone = await make_pods("ok", "ok")  # type: ignore[operator]
    cands = endpoints([gone, ok])
    await gone.close()
    tok = RenderPromptTokenizer(seed=4)
    try:
        for _ in range(5):
            assert await tok.tokens(request(), cands) == TOKENS
    finally:
        await tok.close()
    assert cands[0].state.unreachable is not None


@pytest.mark.asyncio
async def test_every_pod_hung_is_bounded_by_the_caller(make_pods: object) -> None:
    pods = await make_pods("hang", "hang")  # type: ignore[operator]
    tok = RenderPromptTokenizer(seed=5)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tok.tokens(request(), endpoints(pods)), 0.1)
        await asyncio.sleep(0.05)
        assert [p.abandoned for p in pods] == [1, 1]  # both calls cancelled
        # Both stalled past the hedge delay: both sit out a cooldown.
        now = time.monotonic()
        assert [tok.rank(e, now) for e in endpoints(pods)] == [3, 3]
    finally:
        await tok.close()


# --- the director's prefix deadline -----------------------------------------------------


class First:
    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        return SchedulingResult({"default": ProfileResult([candidates[0]])}, "default")


class Hangs:
    name = "precise-prefix-match"

    def __init__(self) -> None:
        self.cancelled = 0

    async def produce(self, request: LLMRequest | None, candidates: Sequence[Endpoint]
                      ) -> PrefixMatch | None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return None


class Raises:
    name = "precise-prefix-match"

    async def produce(self, request: LLMRequest | None, candidates: Sequence[Endpoint]
                      ) -> PrefixMatch | None:
        raise RuntimeError("index exploded")


class NoTokens:
    name = "precise-prefix-match"

    async def produce(self, request: LLMRequest | None, candidates: Sequence[Endpoint]
                      ) -> PrefixMatch | None:
        return None


class Approximate:
    name = "approximate-prefix-match"

    async def produce(self, request: LLMRequest | None, candidates: Sequence[Endpoint]
                      ) -> PrefixMatch | None:
        return PrefixMatch(False, 3, 16, 1, {candidates[0].name: EndpointMatch(1, 1)})


def make_director(*producers: object) -> tuple[Director, EppMetrics]:
    pool = EndpointPool()
    pool.upsert(Endpoint("a", "10.0.0.1:8000"))
    metrics = EppMetrics()
    return Director(pool, First(), Admission({}, SaturationDetector(5, 0.8, 0.5)), metrics,
                    producers=producers), metrics  # type: ignore[arg-type]


def degraded(metrics: EppMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("epp_prefix_match_degraded_total",
                                              {"reason": reason})
    return 0.0 if value is None else value


@pytest.mark.asyncio
async def test_a_hung_prefix_step_is_cut_at_the_deadline_and_falls_back(
        caplog: pytest.LogCaptureFixture) -> None:
    hangs = Hangs()
    director, metrics = make_director(hangs, Approximate())
    headers = {":path": PATH, "x-request-id": "req-42"}
    with caplog.at_level(logging.WARNING, logger=director_module.__name__):
        # Before the fix this never returned.
        handle = await asyncio.wait_for(director.route(headers, BODY, None), 2.0)
    assert hangs.cancelled == 1
    assert handle.ctx.cycle[PREFIX_MATCH_KEY].precise is False  # the approximate match
    assert handle.ctx.cycle[director_module.PREFIX_DEGRADED_KEY] == {
        "reason": "deadline", "fallback": "approximate"}
    assert degraded(metrics, "deadline") == 1
    assert "req-42" in caplog.text and "deadline" in caplog.text
    handle.on_done(False)
    explained = await asyncio.wait_for(director.explain(headers, BODY), 2.0)
    assert explained["prefix_degraded"] == {"reason": "deadline", "fallback": "approximate"}
    assert degraded(metrics, "deadline") == 1  # explain counts nothing


@pytest.mark.asyncio
@pytest.mark.parametrize("producer, reason", [(Raises(), "error"),
                                              (NoTokens(), "unavailable")])
async def test_a_failed_precise_producer_is_counted_not_fatal(producer: object,
                                                              reason: str) -> None:
    director, metrics = make_director(producer)
    handle = await director.route({":path": PATH}, BODY, None)
    assert handle.destination == "10.0.0.1:8000"
    assert handle.ctx.cycle[director_module.PREFIX_DEGRADED_KEY] == {
        "reason": reason, "fallback": "none"}
    assert degraded(metrics, reason) == 1
    handle.on_done(False)


@pytest.mark.asyncio
async def test_requests_without_a_prompt_are_not_degraded() -> None:
    director, metrics = make_director(NoTokens())
    handle = await director.route({":path": "/v1/models"}, None, None)
    assert director_module.PREFIX_DEGRADED_KEY not in handle.ctx.cycle
    assert sum(degraded(metrics, r) for r in ("deadline", "error", "unavailable")) == 0
    handle.on_done(False)

