"""Scheduling-cycle latency (no prefix cache yet) for 8, 64 and 256 endpoints.

Runs the director's full decision path in-process: parse the body, admission
(saturation over the pool), the default profile (queue + KV-utilisation scorers,
max-score picker) with per-plugin timing, and in-flight accounting. Baseline in the same
run: a uniform random choice over the same candidates, i.e. what the scheduling
framework adds on top of "pick anything".

    .venv/bin/python benchmarks/scheduling.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from epp.config.picker_config import load_picker_config
from epp.datastore import Endpoint, EndpointPool, ServerMetrics
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director

BODY = json.dumps({"model": "qwen3", "messages": [
    {"role": "system", "content": "You are a helpful assistant. " * 20},
    {"role": "user", "content": "Summarise the plot of Hamlet in three sentences."}],
    "max_tokens": 64}).encode()
HEADERS = {":path": "/v1/chat/completions", ":method": "POST"}


def make_pool(n: int, rng: random.Random) -> EndpointPool:
    pool = EndpointPool()
    now = time.monotonic()
    eps = []
    for i in range(n):
        e = Endpoint(f"pod-{i}", f"10.{i // 250}.{i % 250}.1:8000")
        e.state.update_metrics(ServerMetrics(
            waiting=rng.randint(0, 8), running=rng.randint(0, 32),
            kv_cache_usage=rng.random(), scraped_at=now + 3600))  # fresh for the whole run
        eps.append(e)
    pool.replace_all(eps)
    return pool


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_director(n: int, requests: int) -> list[float]:
    rng = random.Random(n)
    metrics = EppMetrics()
    cfg = load_picker_config(timer=metrics.observe_plugin)
    pool = make_pool(n, rng)
    director = Director(pool, cfg.scheduler,
                        Admission({}, SaturationDetector(5, 0.8, 0.5)), metrics)
    samples = []
    clock = time.perf_counter
    for _ in range(requests):
        t0 = clock()
        handle = await director.route(HEADERS, BODY, None)
        samples.append(clock() - t0)
        handle.on_done(False)
    return samples


def measure_random(n: int, requests: int) -> list[float]:
    rng = random.Random(n)
    pool = make_pool(n, rng)
    samples = []
    clock = time.perf_counter
    for _ in range(requests):
        t0 = clock()
        json.loads(BODY)
        rng.choice(pool.snapshot())
        samples.append(clock() - t0)
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--sizes", default="8,64,256")
    args = p.parse_args()
    print("| endpoints | director p50 (µs) | p99 (µs) | mean (µs) | random-choice p50 (µs) "
          "| director / random (p50) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        asyncio.run(measure_director(n, 500))  # warm-up
        d = asyncio.run(measure_director(n, args.requests))
        r = measure_random(n, args.requests)
        d50, d99, r50 = percentile(d, 0.5), percentile(d, 0.99), percentile(r, 0.5)
        print(f"| {n} | {d50 * 1e6:.1f} | {d99 * 1e6:.1f} | {statistics.fmean(d) * 1e6:.1f} "
              f"| {r50 * 1e6:.1f} | {d50 / r50:.1f}x |")


if __name__ == "__main__":
    main()
