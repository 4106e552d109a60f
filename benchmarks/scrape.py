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

Run: ``.venv/bin/python benchmarks/scrape.py [--endpoints 64] [--seconds 5]``.
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer import MetricsScraper, parse_metrics
from epp.datastore import Endpoint, EndpointPool

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
    stop = asyncio.Event()
    lateness: list[float] = []
    before_ok = scraper.stats.succeeded if scraper else 0
    before_failed = scraper.stats.failed if scraper else 0
    cpu0, wall0 = time.process_time(), time.monotonic()
    tick = asyncio.create_task(ticker(stop, lateness))
    await asyncio.sleep(seconds)
    stop.set()
    await tick
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    scrapes = (scraper.stats.succeeded - before_ok) if scraper else 0
    failed = (scraper.stats.failed - before_failed) if scraper else 0
    if scraper is not None:
        await scraper.stop()
    lateness.sort()
    p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
    return LoopRun(wall, cpu, scrapes, failed, p99 * 1e3, lateness[-1] * 1e3)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gzip", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.gzip)
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


if __name__ == "__main__":
    main()
