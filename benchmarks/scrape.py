"""What scraping model-server metrics costs the endpoint picker.

(a) Parser CPU per page on ``fixtures/vllm_metrics.txt`` (a 56 KB vLLM page): our targeted
    ``epp.datalayer.parse_metrics`` against a full parse with prometheus_client's
    ``text_string_to_metric_families`` (what a naive implementation would do).
(b) A ``MetricsScraper`` over N endpoints (default 64) at 100 ms for a few seconds, the
    fixture page served from N ports by a separate process (so the figures are the
    picker's alone): process CPU per scrape, scrapes/s achieved, and the lateness of a
    10 ms asyncio ticker (what every request on the picker's event loop would feel),
    against the same ticker on an idle loop. Once plain (the scraper's default,
    ``Accept-Encoding: identity``) and once gzip-compressed (``accept_gzip=True``; a
    prometheus_client endpoint compresses when asked). On uvloop (what ``epp`` runs on)
    and on the default asyncio loop.
(c) The picker's own ``/metrics`` with N endpoints in the pool: a real ``App`` (uvloop)
    over the same N fixture pods, each with a KV-event address (so the per-endpoint
    KV-event series exist; nothing publishes), the series that routed traffic creates
    filled in through ``EppMetrics`` (a primary pick of every endpoint, three models,
    twelve plugin timings). The pods are scraped during a 1 s warm-up, so every endpoint
    has metrics, and then no more: the ticker sees ``/metrics`` alone ((b) measures what
    scraping the pods costs). Another process GETs ``/metrics`` every second and back to
    back while the 10 ms ticker runs.
    Before: collect on the loop and ``generate_latest`` in a thread (the handler until
    now, served from the same registry on a second port); after: the app's own handler
    (:func:`epp.observability.exposition.render_latest`, on the loop in 0.5 ms slices);
    then the same once the start-up heap is frozen (:func:`epp.runner.settle_heap`, what
    ``epp`` does after start-up), which takes full garbage collections off the loop.

Run: ``.venv/bin/python benchmarks/scrape.py [--endpoints 64] [--seconds 5]``
(``--only-app`` runs (c) alone).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from epp.config import EppSettings
from epp.datalayer import MetricsScraper, parse_metrics
from epp.datastore import Endpoint, EndpointPool
from epp.devtools.procs import free_port_pair
from epp.observability.exposition import family_lines
from epp.runner import App, build_app, settle_heap

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "vllm_metrics.txt"
TICK_S = 0.010
INTERVAL_S = 0.1
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,  # what the epp command runs on
    "asyncio": asyncio.new_event_loop,
}


def per_call_us(call: Callable[[], object], budget_s: float = 1.0) -> float:
    """CPU µs per call: the median of 5 timed batches."""
    call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(budget_s / 5 / once))
    samples = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(number):
            call()
        samples.append((time.process_time() - start) / number * 1e6)
    return statistics.median(samples)


def parser_costs(page: bytes) -> tuple[float, float]:
    ours = per_call_us(lambda: parse_metrics(page))
    naive = per_call_us(lambda: list(text_string_to_metric_families(page.decode())))
    return ours, naive


# --- the pod side: one process, N ports, the fixture page -------------------------------


def serve(count: int, compress: bool) -> None:
    """Child process: serve the fixture on ``count`` loopback ports; print them; run until
    stdin closes."""
    plain = FIXTURE.read_bytes()
    packed = gzip.compress(plain, 6)

    async def metrics(request: web.Request) -> web.Response:
        if compress and "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=packed, headers={
                "Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                "Content-Encoding": "gzip"})
        return web.Response(body=plain, headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ports = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
            await web.SockSite(runner, sock).start()
        print(" ".join(map(str, ports)), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # parent closes stdin to stop us
        await runner.cleanup()

    asyncio.run(main())


# --- the picker side ----------------------------------------------------------------------


@dataclass
class LoopRun:
    seconds: float
    cpu_s: float
    scrapes: int
    failed: int
    lag_p99_ms: float
    lag_max_ms: float


async def ticker(stop: asyncio.Event, lateness: list[float]) -> None:
    # perf_counter, not loop.time(): uvloop's loop clock has 1 ms resolution.
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(TICK_S)
        lateness.append(time.perf_counter() - start - TICK_S)


async def ticked(seconds: float) -> tuple[float, float, float, float]:
    """Run the ticker for ``seconds``: (wall s, this process's CPU s, lateness p99 ms,
    lateness max ms)."""
    stop = asyncio.Event()
    lateness: list[float] = []
    cpu0, wall0 = time.process_time(), time.monotonic()
    tick = asyncio.create_task(ticker(stop, lateness))
    await asyncio.sleep(seconds)
    stop.set()
    await tick
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    lateness.sort()
    p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
    return wall, cpu, p99 * 1e3, lateness[-1] * 1e3


async def measure(ports: list[int] | None, seconds: float, accept_gzip: bool = False) -> LoopRun:
    """Run the ticker for ``seconds``, scraping ``ports`` meanwhile (None: idle loop)."""
    pool = EndpointPool()
    scraper = None
    if ports is not None:
        pool.replace_all(Endpoint(name=f"pod-{i}", address=f"127.0.0.1:{port}")
                         for i, port in enumerate(ports))
        scraper = MetricsScraper(pool, interval_s=INTERVAL_S, accept_gzip=accept_gzip)
        await scraper.start()
        await asyncio.sleep(2 * INTERVAL_S)  # warm-up: connections open, phases spread
    before_ok = scraper.stats.succeeded if scraper else 0
    before_failed = scraper.stats.failed if scraper else 0
    wall, cpu, p99_ms, max_ms = await ticked(seconds)
    scrapes = (scraper.stats.succeeded - before_ok) if scraper else 0
    failed = (scraper.stats.failed - before_failed) if scraper else 0
    if scraper is not None:
        await scraper.stop()
    return LoopRun(wall, cpu, scrapes, failed, p99_ms, max_ms)


async def scrape_run(endpoints: int, seconds: float, compress: bool) -> LoopRun:
    argv = [sys.executable, __file__, "--serve", str(endpoints)] + (["--gzip"] if compress else [])
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as pods:
        assert pods.stdout is not None and pods.stdin is not None
        line = await asyncio.get_running_loop().run_in_executor(None, pods.stdout.readline)
        ports = [int(p) for p in line.split()]
        try:
            return await measure(ports, seconds, accept_gzip=compress)
        finally:
            pods.stdin.close()
            pods.wait(timeout=10)


# --- (c) the picker's own /metrics ---------------------------------------------------


def scrape_client(url: str, interval: float) -> None:
    """Child process: GET ``url`` every ``interval`` s (0: back to back) until stdin
    closes; print the count and the mean seconds per GET."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    count, spent = 0, 0.0
    while not stop.is_set():
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()
        spent += time.perf_counter() - start
        count += 1
        if interval:
            stop.wait(interval)
    print(count, spent / max(count, 1), flush=True)


class _Families:
    """Families already collected, in the shape ``generate_latest`` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


async def start_thread_renderer(app: App) -> tuple[web.AppRunner, int]:
    """The handler before: collect on the loop, ``generate_latest`` in a thread."""
    registry = app.metrics.registry

    async def handler(request: web.Request) -> web.Response:
        families = list(registry.collect())
        body = await asyncio.to_thread(generate_latest, _Families(families))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    server = web.Application()
    server.router.add_get("/metrics", handler)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])


async def picker_app(ports: list[int], work: Path) -> App:
    """A started app whose pool is the fixture pods, with traffic series filled in."""
    endpoints = [{"name": f"pod-{i}", "address": f"127.0.0.1:{port}",
                  "kvEvents": f"tcp://127.0.0.1:{free_port_pair()}"}
                 for i, port in enumerate(ports)]
    path = work / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"endpoints": endpoints}))
    app = build_app(EppSettings(endpoints_file=str(path), bind_address="127.0.0.1",
                                grpc_port=0, health_port=0, metrics_port=0,
                                secure_serving=False))
    await app.start()
    m = app.metrics
    for e in endpoints:
        m.pick(str(e["name"]))
    for model in ("qwen3", "llama-3-8b", "lora-sql"):
        m.confirm_model(model)
        series = m.model(model)
        series.requests.inc()
        series.duration.observe(0.4)
        series.input_tokens.observe(1000)
        series.output_tokens.observe(100)
    for point in ("filter", "score", "pick"):
        for plugin in ("a", "b", "c", "d"):
            m.observe_plugin(point, plugin, plugin, 1e-4)
    m.scheduler_e2e.observe(5e-4)
    await asyncio.sleep(1.0)  # scrapes of the pods, subscribers connecting
    await app.scraper.stop()  # from here on the loop's only work is /metrics
    return app


async def metrics_lag(url: str | None, interval: float, seconds: float
                      ) -> tuple[LoopRun, int, float]:
    """The ticker for ``seconds`` while another process GETs ``url`` (None: nobody
    does); with the GETs made and their mean seconds."""
    client = None
    if url is not None:
        client = subprocess.Popen([sys.executable, __file__, "--scrape-client", url,
                                   "--interval", str(interval)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(0.5)
    wall, cpu, p99_ms, max_ms = await ticked(seconds)
    count, mean = 0, 0.0
    if client is not None:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.close()
        out = await asyncio.get_running_loop().run_in_executor(None, client.stdout.read)
        client.wait(timeout=20)
        count, mean = int(out.split()[0]), float(out.split()[1])
    return LoopRun(wall, cpu, count, 0, p99_ms, max_ms), count, mean


async def app_metrics_runs(endpoints: int, seconds: float
                           ) -> tuple[dict[str, float], list[tuple[str, LoopRun, float]]]:
    argv = [sys.executable, __file__, "--serve", str(endpoints)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as pods, \
            tempfile.TemporaryDirectory() as work:
        assert pods.stdout is not None and pods.stdin is not None
        line = await asyncio.get_running_loop().run_in_executor(None, pods.stdout.readline)
        app = await picker_app([int(p) for p in line.split()], Path(work))
        before, before_port = await start_thread_renderer(app)
        try:
            registry = app.metrics.registry
            page = generate_latest(registry)
            start = time.process_time()
            for _ in range(10):
                generate_latest(registry)
            whole_ms = (time.process_time() - start) * 100
            start = time.process_time()
            for _ in range(10):  # render_latest's work without its yields to the loop
                "".join(line for family in registry.collect() for line in family_lines(family))
            sliced_ms = (time.process_time() - start) * 100
            info = {"bytes": len(page), "samples": sum(len(f.samples) for f in registry.collect()),
                    "generate_ms": whole_ms, "render_ms": sliced_ms}
            after_url = f"http://127.0.0.1:{app.metrics_port}/metrics"
            before_url = f"http://127.0.0.1:{before_port}/metrics"
            rows: list[tuple[str, LoopRun, float]] = []
            for name, url, interval in (
                    ("no /metrics scrape", None, 0.0),
                    ("before: thread render, every 1 s", before_url, 1.0),
                    ("after: sliced on the loop, every 1 s", after_url, 1.0),
                    ("before: thread render, back to back", before_url, 0.0),
                    ("after: sliced on the loop, back to back", after_url, 0.0),
                    ("settle_heap()", None, 0.0),  # irreversible: the frozen rows come last
                    ("after, heap frozen: every 1 s", after_url, 1.0),
                    ("after, heap frozen: back to back", after_url, 0.0)):
                if url is None and rows:
                    settle_heap()
                    continue
                run, count, mean = await metrics_lag(url, interval, seconds)
                rows.append((name, run, mean * 1e3 if count else 0.0))
            return info, rows
        finally:
            await before.cleanup()
            await app.stop()
            pods.stdin.close()
            pods.wait(timeout=10)


def print_app_runs(endpoints: int, seconds: float, info: dict[str, float],
                   rows: list[tuple[str, LoopRun, float]]) -> None:
    print(f"The picker's /metrics with {endpoints} endpoints ({info['samples']:.0f} samples, "
          f"{info['bytes'] / 1e3:.0f} KB): generate_latest {info['generate_ms']:.1f} ms CPU, "
          f"render_latest {info['render_ms']:.1f} ms CPU per page. Ticker every "
          f"{TICK_S * 1e3:.0f} ms for {seconds:g} s per row (uvloop):")
    print()
    print("| run | /metrics GETs | ms per GET | CPU % of a core | loop lag p99 ms "
          "| loop lag max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run, mean_ms in rows:
        print(f"| {name} | {run.scrapes} | {mean_ms:.1f} | "
              f"{run.cpu_s / run.seconds * 100:.1f} | {run.lag_p99_ms:.2f} | "
              f"{run.lag_max_ms:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only-app", action="store_true",
                        help="only (c): the picker's own /metrics")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gzip", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scrape-client", help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.gzip)
        return
    if args.scrape_client:
        scrape_client(args.scrape_client, args.interval)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        info, app_rows = runner.run(app_metrics_runs(args.endpoints, args.seconds))
    if args.only_app:
        print_app_runs(args.endpoints, args.seconds, info, app_rows)
        return

    page = FIXTURE.read_bytes()
    ours, naive = parser_costs(page)
    runs: list[tuple[str, LoopRun]] = []
    for loop_name, factory in LOOPS.items():
        with asyncio.Runner(loop_factory=factory) as runner:
            runs.append((f"{loop_name}: idle loop (ticker only)",
                         runner.run(measure(None, args.seconds))))
            runs.append((f"{loop_name}: scraping, plain pages",
                         runner.run(scrape_run(args.endpoints, args.seconds, compress=False))))
            runs.append((f"{loop_name}: scraping, gzip pages (accept_gzip)",
                         runner.run(scrape_run(args.endpoints, args.seconds, compress=True))))

    print(f"# Scrape cost ({platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, page {len(page):,} B, gzip {len(gzip.compress(page, 6)):,} B)")
    print()
    print("| parser | µs per page | vs naive |")
    print("|---|---:|---:|")
    print(f"| `epp.datalayer.parse_metrics` | {ours:.1f} | {naive / ours:.0f}x faster |")
    print(f"| prometheus_client `text_string_to_metric_families` (full) | {naive:.0f} | 1x |")
    print()
    print(f"{args.endpoints} endpoints every {INTERVAL_S * 1e3:.0f} ms for {args.seconds:g} s "
          f"(pods in another process); ticker every {TICK_S * 1e3:.0f} ms:")
    print()
    print("| run | scrapes/s | failed | CPU µs per scrape | CPU % of a core "
          "| loop lag p99 ms | loop lag max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, result in runs:
        per_scrape = f"{result.cpu_s / result.scrapes * 1e6:.0f}" if result.scrapes else "-"
        print(f"| {name} | {result.scrapes / result.seconds:.0f} | {result.failed} | {per_scrape} "
              f"| {result.cpu_s / result.seconds * 100:.1f} | {result.lag_p99_ms:.2f} "
              f"| {result.lag_max_ms:.2f} |")
    print()
    print_app_runs(args.endpoints, args.seconds, info, app_rows)


if __name__ == "__main__":
    main()
