"""Tests of epp.datalayer: the vLLM metrics parser and the per-endpoint scraper."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from epp.datalayer import MetricsParseError, MetricsScraper, parse_metrics
from epp.datastore import Endpoint, EndpointPool, ServerMetrics

FIXTURE = Path(__file__).resolve().parents[2] / "benchmarks" / "fixtures" / "vllm_metrics.txt"
LABELS = '{engine="0",model_name="m"}'


def page(waiting: float = 1, running: float = 2, usage: float = 0.5, extra: str = "") -> bytes:
    """A minimal vLLM-shaped page."""
    return (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{LABELS} {running}\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{LABELS} {waiting}\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{LABELS} {usage}\n" + extra
    ).encode()


# --- parser -------------------------------------------------------------------------------


def test_parses_a_realistic_vllm_page() -> None:
    raw = FIXTURE.read_bytes()
    assert len(raw) > 30_000 and raw.count(b"_bucket{") > 200  # tens of KB, mostly buckets
    metrics = parse_metrics(raw, scraped_at=12.5)
    assert metrics == ServerMetrics(
        waiting=3,
        running=7,
        kv_cache_usage=0.4213362068965517,  # printed with repr(), so it reads back exactly
        running_loras=frozenset({"sql-lora", "chat-lora"}),  # the newer of two series
        waiting_loras=frozenset({"summarize-lora"}),
        max_lora=4,
        block_size=16,
        num_gpu_blocks=29127,
        scraped_at=12.5,
    )


def test_falls_back_to_gpu_cache_usage_perc() -> None:
    raw = FIXTURE.read_bytes().replace(b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")
    assert parse_metrics(raw).kv_cache_usage == pytest.approx(0.4213362068965517)
    both = page(usage=0.25, extra=f"vllm:gpu_cache_usage_perc{LABELS} 0.75\n")
    assert parse_metrics(both).kv_cache_usage == 0.25  # the current name wins


def test_data_parallel_engines_sum_queues_and_average_usage() -> None:
    lines = []
    ranks = [(1, 4, 0.2, 1000), (5, 6, 0.6, 1000)]
    for engine, (waiting, running, usage, blocks) in enumerate(ranks):
        labels = f'{{engine="{engine}",model_name="m"}}'
        lines += [
            f"vllm:num_requests_waiting{labels} {waiting}.0",
            f"vllm:num_requests_running{labels} {running}.0",
            f"vllm:kv_cache_usage_perc{labels} {usage}",
            f'vllm:cache_config_info{{block_size="16",engine="{engine}",'
            f'num_gpu_blocks="{blocks}"}} 1.0',
        ]
    # Group each family's lines together, as the exposition format requires.
    lines.sort(key=lambda line: line.split("{")[0])
    metrics = parse_metrics(("\n".join(lines) + "\n").encode())
    assert (metrics.waiting, metrics.running) == (6, 10)
    assert metrics.kv_cache_usage == pytest.approx(0.4)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (16, 2000)


@pytest.mark.parametrize("newest_first", [True, False])
def test_lora_info_takes_the_series_with_the_largest_timestamp(newest_first: bool) -> None:
    series = [
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",'
        'waiting_lora_adapters="x"} 1.7e+09',
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",'
        'waiting_lora_adapters=""} 1.700000001e+09',
    ]
    if newest_first:
        series.reverse()
    metrics = parse_metrics(page(extra="\n".join(series) + "\n"))
    assert metrics.running_loras == {"a", "b"} and metrics.waiting_loras == frozenset()
    assert metrics.max_lora == 2


def test_optional_series_absent_and_escaped_labels() -> None:
    metrics = parse_metrics(page())
    assert (metrics.running_loras, metrics.max_lora, metrics.block_size) == (frozenset(), 0, None)
    escaped = (
        'vllm:lora_requests_info{max_lora="1",running_lora_adapters="we\\"ird\\\\,b",'
        'waiting_lora_adapters=""} 5\n'
        'vllm:cache_config_info{block_size="32",num_gpu_blocks="None"} 1\n'
    )
    metrics = parse_metrics(page(extra=escaped))
    assert metrics.running_loras == {'we"ird\\', "b"}
    assert (metrics.block_size, metrics.num_gpu_blocks) == (32, None)


def test_tolerates_format_variations() -> None:
    # No labels, a trailing timestamp, CRLF endings, the first sample on the page's first
    # line, and longer names sharing a prefix before and after the real series.
    raw = (
        b"vllm:num_requests_waiting 4 1700000000000\r\n"
        b'vllm:num_requests_running_total{engine="0"} 99\r\n'
        b"vllm:num_requests_running 2\r\n"
        b"vllm:num_requests_waiting_by_reason 77\r\n"
        b"vllm:kv_cache_usage_perc 1.0000000001\r\n"
    )
    metrics = parse_metrics(raw)
    assert (metrics.waiting, metrics.running, metrics.kv_cache_usage) == (4, 2, 1.0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "no vllm:num_requests_waiting"),
        (b"<html><body>502 Bad Gateway</body></html>", "no vllm:num_requests_waiting"),
        (b"\x00\xff\xfe" * 1000, "no vllm:num_requests_waiting"),
        (page().replace(b"vllm:num_requests_running{", b"vllm:num_requests_runnin{"),
         "no vllm:num_requests_running"),
        (page().replace(b"kv_cache_usage_perc", b"other"), "no vllm:kv_cache_usage_perc"),
        (b"# HELP vllm:num_requests_waiting only help\n", "no vllm:num_requests_waiting"),
        (page(waiting="abc"), "bad value 'abc'"),  # type: ignore[arg-type]
        (page(waiting=float("nan")), "count >= 0"),
        (page(running=-1), "count >= 0"),
        (page(usage=1.5), r"fraction in \[0, 1\]"),
        (page(usage=float("nan")), "fraction"),
        (page().replace(b'model_name="m"} 1', b'model_name="m" 1'), "unterminated label set"),
        (page().replace(b"} 1", b"} 1 2 3"), "expected 'value"),
        (page(extra="vllm:lora_requests_info{max_lora=4} 1\n"), "bad label set"),
        (page(extra='vllm:lora_requests_info{running_lora_adapters="a"} 1\n'),
         "missing label 'max_lora'"),
        (page(extra='vllm:cache_config_info{block_size="sixteen"} 1\n'), "not a count"),
        (page(extra='vllm:cache_config_info{engine="0",block_size="16"} 1\n'
                    'vllm:cache_config_info{engine="1",block_size="32"} 1\n'), "disagree"),
        (page() + b'vllm:lora_requests_info{max_lora="1"} \xff\n', "not UTF-8"),
    ],
)
def test_malformed_pages_raise_a_clear_error(raw: bytes, message: str) -> None:
    with pytest.raises(MetricsParseError, match=message):
        parse_metrics(raw)


# --- scraper against real HTTP servers ----------------------------------------------------


class FakePod:
    """One HTTP server on a free loopback port serving a settable /metrics page."""

    def __init__(self) -> None:
        self.page = page(waiting=3, running=1, usage=0.25)
        self.status = 200
        self.hang = False
        self.chunked = False  # stream the page without a Content-Length
        self.hits = 0
        self.hit_times: list[float] = []
        self._release = asyncio.Event()  # ends hanging handlers at teardown
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.hit_times.append(time.monotonic())
        if self.hang:
            await self._release.wait()
        if self.chunked:
            response = web.StreamResponse(status=self.status)
            response.enable_chunked_encoding()
            await response.prepare(request)
            for offset in range(0, len(self.page), 256):
                await response.write(self.page[offset:offset + 256])
            await response.write_eof()
            return response
        return web.Response(body=self.page, status=self.status, content_type="text/plain")


PodFactory = Callable[[int], Awaitable[list[FakePod]]]


@pytest_asyncio.fixture
async def pods() -> AsyncIterator[PodFactory]:
    """``await pods(n)`` starts n fake pods; all are closed after the test."""
    started: list[FakePod] = []

    async def make(count: int) -> list[FakePod]:
        new = [FakePod() for _ in range(count)]
        for pod in new:
            await pod.start()
            started.append(pod)
        return new

    yield make
    for pod in started:
        await pod.close()


def pool_of(*pods: FakePod) -> EndpointPool:
    pool = EndpointPool()
    pool.replace_all(Endpoint(name=f"pod-{pod.port}", address=pod.address) for pod in pods)
    return pool


def endpoint(pool: EndpointPool, pod: FakePod) -> Endpoint:
    found = pool.get(f"pod-{pod.port}")
    assert found is not None
    return found


async def eventually(
    condition: Callable[[], bool],
    timeout: float = 3.0,
    message: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time {message()}")
        await asyncio.sleep(0.005)


def scrape_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape ") and not t.done()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.asyncio
async def test_scraper_picks_up_values_and_follows_changes(pods: PodFactory) -> None:
    (pod,) = await pods(1)
    pool = pool_of(pod)
    ep = endpoint(pool, pod)
    async with MetricsScraper(pool, interval_s=0.02) as scraper:
        assert scraper.is_stale(ep)  # never scraped yet
        await eventually(lambda: ep.state.metrics.scraped_at > 0)
        before = time.monotonic()
        metrics = ep.state.metrics
        assert (metrics.waiting, metrics.running, metrics.kv_cache_usage) == (3, 1, 0.25)
        assert ep.state.scrape_error is None and not scraper.is_stale(ep)
        pod.page = FIXTURE.read_bytes()
        await eventually(lambda: ep.state.metrics.running == 7, message=lambda: ep.state)
        assert ep.state.metrics.scraped_at >= before and ep.state.metrics.block_size == 16
        assert scraper.stats.succeeded >= 2 and scraper.stats.failed == 0
    assert not scrape_tasks()


@pytest.mark.asyncio
async def test_http_error_and_bad_page_keep_old_metrics(
    pods: PodFactory, caplog: pytest.LogCaptureFixture
) -> None:
    (pod,) = await pods(1)
    pool = pool_of(pod)
    ep = endpoint(pool, pod)
    caplog.set_level(logging.INFO, logger="epp.datalayer.scraper")
    async with MetricsScraper(pool, interval_s=0.01, stale_after_s=0.1) as scraper:
        await eventually(lambda: ep.state.metrics.scraped_at > 0)
        good = ep.state.metrics
        pod.status = 500
        await eventually(lambda: ep.state.scrape_error is not None)
        assert ep.state.scrape_error == "HTTP 500 Internal Server Error"
        hits = pod.hits
        await eventually(lambda: pod.hits >= hits + 10)  # many failed polls ...
        assert ep.state.metrics is good  # ... keep the last good metrics,
        await eventually(lambda: scraper.is_stale(ep))  # which age into staleness
        pod.status, pod.page = 200, b"<html>not metrics</html>"
        await eventually(lambda: (ep.state.scrape_error or "").startswith("bad metrics page"))
        assert "vllm:num_requests_waiting" in (ep.state.scrape_error or "")
        pod.page = page(waiting=8)
        await eventually(lambda: ep.state.scrape_error is None and ep.state.metrics.waiting == 8)
        assert not scraper.is_stale(ep)
    messages = [r.getMessage() for r in caplog.records]
    # One warning when the endpoint started failing (not one per 10 ms poll), one recovery.
    assert len([m for m in messages if "unavailable" in m]) == 1, messages
    assert len([m for m in messages if "recovered" in m]) == 1, messages


@pytest.mark.asyncio
async def test_hanging_endpoint_times_out_without_blocking_others(pods: PodFactory) -> None:
    hanging, healthy = await pods(2)
    hanging.hang = True
    pool = pool_of(hanging, healthy)
    async with MetricsScraper(pool, interval_s=0.02, timeout_s=0.5):
        start = time.monotonic()
        await eventually(lambda: hanging.hits == 1 and healthy.hits >= 8)
        # Healthy polls went on while the hanging scrape was still pending.
        assert endpoint(pool, hanging).state.scrape_error is None
        assert endpoint(pool, healthy).state.scrape_error is None
        await eventually(lambda: endpoint(pool, hanging).state.scrape_error is not None)
        assert time.monotonic() - start >= 0.45
        assert endpoint(pool, hanging).state.scrape_error == "timed out after 0.5 s"
        assert endpoint(pool, hanging).state.metrics.scraped_at == 0.0
        hanging.hang = False
        await eventually(lambda: endpoint(pool, hanging).state.metrics.waiting == 3)


@pytest.mark.asyncio
async def test_connection_refused() -> None:
    pool = EndpointPool()
    pool.upsert(Endpoint(name="gone", address=f"127.0.0.1:{free_port()}"))
    ep = pool.get("gone")
    assert ep is not None
    async with MetricsScraper(pool, interval_s=0.02):
        await eventually(lambda: ep.state.scrape_error is not None)
        assert ep.state.scrape_error == "cannot connect: Connection refused"


@pytest.mark.asyncio
async def test_endpoints_come_and_go(pods: PodFactory) -> None:
    first, second = await pods(2)
    pool = pool_of(first)
    async with MetricsScraper(pool, interval_s=0.01) as scraper:
        await eventually(lambda: first.hits >= 2)
        assert scraper.polled_endpoints == {f"pod-{first.port}"}
        pool.upsert(Endpoint(name=f"pod-{second.port}", address=second.address))  # added
        await eventually(lambda: endpoint(pool, second).state.metrics.scraped_at > 0)
        assert len(scrape_tasks()) == 2
        pool.remove(f"pod-{first.port}")  # removed: its task stops
        assert scraper.polled_endpoints == {f"pod-{second.port}"}
        await eventually(lambda: len(scrape_tasks()) == 1)
        hits = first.hits
        await asyncio.sleep(0.1)
        assert first.hits == hits
        # Same name, new address: a different server, so a new poller and fresh state.
        pool.upsert(Endpoint(name=f"pod-{second.port}", address=first.address))
        moved = pool.get(f"pod-{second.port}")
        assert moved is not None
        await eventually(lambda: first.hits > hits and moved.state.metrics.scraped_at > 0)
        await eventually(lambda: len(scrape_tasks()) == 1)
    assert not scrape_tasks()


@pytest.mark.asyncio
async def test_first_polls_are_spread_over_the_interval(pods: PodFactory) -> None:
    fleet = await pods(16)
    pool = pool_of(*fleet)
    async with MetricsScraper(pool, interval_s=0.2):
        await eventually(lambda: all(pod.hits for pod in fleet))
    firsts = sorted(pod.hit_times[0] for pod in fleet)
    # 16 uniform draws over 200 ms span less than 50 ms with probability ~1e-8.
    assert firsts[-1] - firsts[0] > 0.05


@pytest.mark.asyncio
async def test_start_twice_and_stop_idempotent() -> None:
    scraper = MetricsScraper(EndpointPool())
    await scraper.start()
    with pytest.raises(RuntimeError):
        await scraper.start()
    await scraper.stop()
    await scraper.stop()
    with pytest.raises(ValueError):
        MetricsScraper(EndpointPool(), interval_s=0)


@pytest.mark.asyncio
async def test_oversized_page_is_refused(
    pods: PodFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("epp.datalayer.scraper.MAX_PAGE_BYTES", 1000)
    sized, chunked, small = await pods(3)
    sized.page = chunked.page = page(extra="# padding\n" * 200)
    chunked.chunked = small.chunked = True
    pool = pool_of(sized, chunked, small)
    async with MetricsScraper(pool, interval_s=0.02):
        ep = endpoint(pool, small)  # a chunked page within the limit reads fine
        await eventually(lambda: ep.state.metrics.waiting == 3)
        states = [endpoint(pool, pod).state for pod in (sized, chunked)]
        await eventually(lambda: all(state.scrape_error for state in states))
        assert all("exceeds 1000" in (state.scrape_error or "") for state in states)
