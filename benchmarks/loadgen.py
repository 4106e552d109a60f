"""A closed-loop HTTP POST load generator (asyncio + aiohttp), and the result type the
benchmarks share.

``overhead.py`` prefers ``wrk``: on a small box a Python client saturates a core long
before Envoy does, so numbers from this generator are a lower bound on what the proxy
can do. It is the fallback when ``wrk`` is not installed, and handy on its own::

    python benchmarks/loadgen.py http://127.0.0.1:8081/v1/completions \\
        --body-file bodies.jsonl --concurrency 16 --duration 5

Each of N workers keeps one keep-alive connection and sends the next request as soon
as the previous answer is fully read; bodies are cycled round-robin from a list.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp


@dataclass(frozen=True)
class LoadResult:
    """What one measured window produced, whichever generator ran it."""

    generator: str
    requests: int  # completed requests (any status)
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int  # completed with a status outside 2xx (wrk: outside 2xx/3xx)
    socket_errors: int  # connect/read/write errors and timeouts

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        """Non-2xx answers plus transport errors."""
        return self.non_2xx + self.socket_errors


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _worker(session: aiohttp.ClientSession, url: str, bodies: Sequence[bytes],
                  start_index: int, deadline: float, latencies: list[float],
                  counts: dict[str, int]) -> None:
    """Send requests back to back until ``deadline``; record latency (s) and outcome."""
    i = start_index
    headers = {"Content-Type": "application/json"}
    while True:
        t0 = time.perf_counter()
        if t0 >= deadline:
            return
        body = bodies[i % len(bodies)]
        i += 1
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError):
            counts["socket_errors"] += 1
            continue
        latencies.append(time.perf_counter() - t0)
        if not 200 <= status < 300:
            counts["non_2xx"] += 1


async def run_closed_loop(url: str, bodies: Sequence[bytes], concurrency: int,
                          duration_s: float, timeout_s: float = 10.0) -> LoadResult:
    """Run ``concurrency`` workers against ``url`` for ``duration_s`` seconds."""
    if not bodies:
        raise ValueError("no request bodies")
    latencies: list[float] = []
    counts = {"non_2xx": 0, "socket_errors": 0}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        deadline = start + duration_s
        await asyncio.gather(*(
            _worker(session, url, bodies, w * 7, deadline, latencies, counts)
            for w in range(concurrency)
        ))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return LoadResult(
        generator="python-aiohttp",
        requests=len(latencies),
        duration_s=elapsed,
        p50_ms=percentile(ordered, 50) * 1e3,
        p90_ms=percentile(ordered, 90) * 1e3,
        p99_ms=percentile(ordered, 99) * 1e3,
        non_2xx=counts["non_2xx"],
        socket_errors=counts["socket_errors"],
    )


def read_bodies(path: Path) -> list[bytes]:
    """Request bodies from a file, one per line (JSON bodies never contain newlines)."""
    return [line for line in path.read_bytes().splitlines() if line]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: one window of load, printed as a single summary line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--body-file", type=Path, required=True, help="one JSON body per line")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="seconds")
    args = p.parse_args(argv)
    result = asyncio.run(run_closed_loop(args.url, read_bodies(args.body_file),
                                         args.concurrency, args.duration))
    print(f"{result.requests} requests in {result.duration_s:.2f}s: {result.rps:.0f} req/s, "
          f"p50 {result.p50_ms:.3f} ms, p90 {result.p90_ms:.3f} ms, "
          f"p99 {result.p99_ms:.3f} ms, errors {result.errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
