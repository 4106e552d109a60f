"""Precise prefix-cache scheduling latency, and index memory per entry.

For prompts of 1k, 8k, 32k and 128k tokens (real Qwen3.6 tokenizer, chat requests
whose long system prompt is shared by a tenant) and 8, 64 and 96 endpoints, each
endpoint holding the prefixes of several tenants in the block index, this times the
director's whole decision: parse -> tokenize (segment cache) -> block keys -> index
lookup over all endpoints -> scorers -> pick.

Two cases per cell:
- warm: the tenant's system prompt was seen before (its tokens come from the segment
  cache; only the new user turn is tokenized) — the common case for shared prefixes;
- cold: a never-seen system prompt of the same length (full tokenization).

Then the index alone: ``BlockIndex.match`` for a prompt of 375 blocks (6,000 tokens) over
4 and 64 endpoints, with and without pending entries, and a pending pick (add and drop);
and the index's memory per (block, endpoint) entry, measured with tracemalloc.

``--baseline-ref REF`` also loads ``epp/kvcache/index.py`` as of git revision ``REF`` and
times it beside the current one, alternating request by request (lookup by lookup), so
both see the same machine: the tables gain old columns and new/old ratios.

    .venv/bin/python benchmarks/prefix_scheduling.py [--requests 200] [--quick]
        [--baseline-ref REF]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kv_ingest import load_index_module  # noqa: E402
from epp.config.picker_config import load_picker_config  # noqa: E402
from epp.datastore import Endpoint, EndpointPool, ServerMetrics  # noqa: E402
from epp.kvcache import index as current_index  # noqa: E402
from epp.kvcache.keys import chain_keys  # noqa: E402
from epp.kvcache.producer import PreciseProducer  # noqa: E402
from epp.kvcache.service import KVCacheService, load_local_tokenizer  # noqa: E402
from epp.kvcache.types import BlockStored, KVEventBatch  # noqa: E402
from epp.observability.metrics import EppMetrics  # noqa: E402
from epp.requestcontrol.admission import Admission, SaturationDetector  # noqa: E402
from epp.requestcontrol.director import Director  # noqa: E402

CONFIG = """
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: precise-prefix-cache-scorer
  parameters: {tokenizer: {mode: local, source: qwen3.6}, blockSize: 16,
               maxPrefixBlocks: 16384}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer, weight: 2}, {pluginRef: kv-cache-utilization-scorer,
             weight: 2}, {pluginRef: precise-prefix-cache-scorer, weight: 3},
            {pluginRef: max-score-picker}]
"""
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()
HEADERS = {":path": "/v1/chat/completions", ":method": "POST"}


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    # Each word plus its space is one Qwen token; a number every 8 words keeps it varied.
    out = []
    for i in range(tokens):
        out.append(str(rng.randint(0, 9)) if i % 8 == 7 else rng.choice(WORDS))
    return " ".join(out)


def body(system: str, question: str) -> bytes:
    return json.dumps({"model": "qwen3", "max_tokens": 16, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]}).encode()


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run_cell(tokens: int, n_endpoints: int, requests: int, tokenizer: object,
                   indexes: dict[str, ModuleType]) -> dict[str, tuple[list[float], list[float]]]:
    """Warm and cold decision times per index module, request by request in turn."""
    rng = random.Random(tokens * 1000 + n_endpoints)
    metrics = EppMetrics()
    cfg = load_picker_config(CONFIG, timer=metrics.observe_plugin)
    scorer = cfg.plugins["precise-prefix-cache-scorer"]
    settings = scorer.kv_settings
    service = KVCacheService(settings)
    service.tokenizer = tokenizer  # share one loaded tokenizer across cells
    pool = EndpointPool()
    eps = [Endpoint(f"pod-{i}", f"10.1.{i // 200}.{i % 200 + 1}:8000") for i in range(n_endpoints)]
    for e in eps:
        e.state.update_metrics(ServerMetrics(scraped_at=time.monotonic() + 3600))
    pool.replace_all(eps)
    tenants = [text_of_tokens(rng, tokens) for _ in range(4)]
    directors = {}
    for name, module in indexes.items():
        index = module.BlockIndex(model=settings.model, capacity_blocks=10**7)
        # Each tenant's prefix is cached on a quarter of the endpoints (as events would say).
        for t, system in enumerate(tenants):
            ids = await tokenizer.encode(tokenizer.prompt_text_for(body(system, "")))  # type: ignore[attr-defined]
            keys = chain_keys(ids, 16, index.root(None))
            for i, e in enumerate(eps):
                if i % 4 == t:
                    hashes = tuple(range(t * 10**7, t * 10**7 + len(keys)))
                    index.apply_batch(e.name, KVEventBatch(0.0, (BlockStored(
                        hashes, None, tuple(ids[: len(keys) * 16]), 16),)))
        producer = PreciseProducer(index, service, block_size=16,
                                   max_blocks=settings.max_prefix_blocks)
        directors[name] = Director(pool, cfg.scheduler,
                                   Admission({}, SaturationDetector(5, 0.8, 0.5)), metrics,
                                   producers=[producer])
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in indexes}
    clock = time.perf_counter
    order = list(directors.items())
    for r in range(requests):
        b = body(tenants[r % 4], f"Question number {r}: {rng.choice(WORDS)}?")
        for name, director in order if r % 2 else reversed(order):
            t0 = clock()
            handle = await director.route(HEADERS, b, None)
            out[name][0].append(clock() - t0)
            handle.on_done(False)
    for r in range(max(3, requests // 20)):
        b = body(text_of_tokens(rng, tokens), "Cold question?")
        for name, director in order if r % 2 else reversed(order):
            t0 = clock()
            handle = await director.route(HEADERS, b, None)
            out[name][1].append(clock() - t0)
            handle.on_done(False)
    return out


class _Tok:
    """The local prompt tokenizer plus a helper to render a body's prompt text."""

    def __init__(self) -> None:
        self.inner = load_local_tokenizer("qwen3.6")

    def prompt_text_for(self, raw: bytes) -> str:
        from epp.api.openai import parse_request
        return self.inner.prompt_text(parse_request("/v1/chat/completions", raw))

    async def encode(self, text: str) -> list[int]:
        return await self.inner.encode(text)

    async def tokens(self, request, candidates):  # type: ignore[no-untyped-def]
        return await self.inner.tokens(request, candidates)


def index_bytes_per_entry(module: ModuleType, endpoints: int, blocks_per_endpoint: int,
                          replicas: int) -> float:
    """Bytes of index per (block, endpoint) entry, measured with tracemalloc."""
    rng = random.Random(7)
    distinct = endpoints * blocks_per_endpoint // replicas
    chains = [tuple(rng.randrange(1, 200_000) for _ in range(16 * 64))
              for _ in range(distinct // 64)]
    names = [f"e{e}" for e in range(endpoints)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    index = module.BlockIndex(model="m", capacity_blocks=10**9)
    entries = 0
    # Each chain is held by `replicas` endpoints; events are built here, as a decoder
    # would, so the engine-hash ints the index keeps are counted (transients are freed).
    for c, chain in enumerate(chains):
        for r in range(replicas):
            e = (c + r) % endpoints
            hashes = tuple(range(e * 10**12 + c * 64, e * 10**12 + c * 64 + 64))
            index.apply_batch(names[e], KVEventBatch(0.0, (BlockStored(hashes, None, chain, 16),)))
            entries += 64
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return used / entries


LOOKUP_BLOCKS = 375  # 6,000 tokens
FILLER_CHAINS = 200  # other prefixes each endpoint holds, 64 blocks each


def lookup_cases(module: ModuleType, pods: int) -> dict[str, Callable[[], float]]:
    """One index: every endpoint holds a 375-block prefix (and 200 others); a sibling
    request's pick is pending on one endpoint for a prompt that shares the first 200
    blocks, and another pick for a prompt no one holds. Each case returns the seconds
    its call took."""
    rng = random.Random(3)
    index = module.BlockIndex(model="m", capacity_blocks=10**7)
    tokens = [rng.randrange(150_000) for _ in range(LOOKUP_BLOCKS * 16)]
    fillers = [tuple(rng.randrange(150_000) for _ in range(64 * 16))
               for _ in range(FILLER_CHAINS)]
    for e in range(pods):
        base = (e + 1) * 10**9
        index.apply_batch(f"p{e}", KVEventBatch(0.0, (BlockStored(
            tuple(range(base, base + LOOKUP_BLOCKS)), None, tuple(tokens), 16),)))
        for c, filler in enumerate(fillers):
            first = base + (c + 1) * 1000
            index.apply_batch(f"p{e}", KVEventBatch(0.0, (BlockStored(
                tuple(range(first, first + 64)), None, filler, 16),)))
    root = index.root(None)
    held = chain_keys(tokens, 16, root)
    sibling = chain_keys(tokens[:200 * 16] + [rng.randrange(150_000)
                                            for _ in range(175 * 16)], 16, root)
    new = chain_keys([rng.randrange(150_000) for _ in range(LOOKUP_BLOCKS * 16)], 16, root)
    index.add_pending("p1", sibling, 1e9)
    index.add_pending("p0", new, 1e9)
    names = [f"p{e}" for e in range(pods)]
    clock = time.perf_counter

    def timed(call: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            t0 = clock()
            call()
            return clock() - t0
        return run

    def add() -> float:
        t0 = clock()
        pick = index.add_pending(f"p{pods - 1}", new, 5.0)
        took = clock() - t0
        index.drop_pending(pick)
        return took

    def drop() -> float:
        pick = index.add_pending(f"p{pods - 1}", new, 5.0)
        t0 = clock()
        index.drop_pending(pick)
        return clock() - t0

    return {
        "held prefix": timed(lambda: index.match(held, names)),
        "held + pending suffix": timed(lambda: index.match(sibling, names)),
        "pending only": timed(lambda: index.match(new, names)),
        "pending pick: add": add,
        "pending pick: drop": drop,
    }


def lookup_latency(indexes: dict[str, ModuleType], pods: int, rounds: int
                   ) -> dict[str, dict[str, list[float]]]:
    """Per case and index module, seconds per call, alternating between the modules."""
    cases = {name: lookup_cases(module, pods) for name, module in indexes.items()}
    out: dict[str, dict[str, list[float]]] = {}
    for case in next(iter(cases.values())):
        out[case] = {name: [] for name in indexes}
        for r in range(rounds):
            for name in (indexes if r % 2 else reversed(list(indexes))):
                out[case][name].append(cases[name][case]())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="fewer requests, 1k and 8k only")
    p.add_argument("--baseline-ref", metavar="REF",
                   help="also time epp/kvcache/index.py as of git REF, alternating")
    args = p.parse_args()
    sizes = [1024, 8192] if args.quick else [1024, 8192, 32768, 131072]
    indexes = {"new": current_index}
    if args.baseline_ref:
        indexes["old"] = load_index_module(args.baseline_ref)
        print(f"old: epp/kvcache/index.py at {args.baseline_ref}; new: the working tree")
        print()
    old = "old" in indexes
    tok = _Tok()
    print("| prompt tokens | endpoints | warm p50 (ms) | warm p99 (ms) | cold p50 (ms) "
          "| cold max (ms) | goal |" + (" old warm p50 | old warm p99 | new/old p99 |"
                                         if old else ""))
    print("|---:|---:|---:|---:|---:|---:|---|" + ("---:|---:|---:|" if old else ""))
    for tokens in sizes:
        for n in (8, 64, 96):
            reqs = args.requests if tokens <= 8192 else max(20, args.requests // 10)
            if args.quick:
                reqs = max(20, reqs // 4)
            cell = asyncio.run(run_cell(tokens, n, reqs, tok, indexes))
            warm, cold = cell["new"]
            goal = ""
            if (tokens, n) == (8192, 64):
                goal = f"p99 <= 3 ms: {'PASS' if pct(warm, 0.99) <= 0.003 else 'MISS'} (warm)"
            if (tokens, n) == (131072, 96):
                goal = f"p99 <= 40 ms: {'PASS' if pct(warm, 0.99) <= 0.040 else 'MISS'} (warm)"
            line = (f"| {tokens} | {n} | {pct(warm, 0.5) * 1e3:.2f} | "
                    f"{pct(warm, 0.99) * 1e3:.2f} | {pct(cold, 0.5) * 1e3:.1f} | "
                    f"{max(cold) * 1e3:.1f} | {goal} |")
            if old:
                old_warm = cell["old"][0]
                line += (f" {pct(old_warm, 0.5) * 1e3:.2f} | {pct(old_warm, 0.99) * 1e3:.2f} "
                         f"| {pct(warm, 0.99) / pct(old_warm, 0.99):.2f} |")
            print(line, flush=True)
    print()
    print(f"BlockIndex alone: a {LOOKUP_BLOCKS}-block prompt (µs per call)")
    print()
    print("| endpoints | case | p50 | p99 |" + (" old p50 | old p99 | new/old p50 | "
                                              "new/old p99 |" if old else ""))
    print("|---:|---|---:|---:|" + ("---:|---:|---:|---:|" if old else ""))
    for pods in (4, 64):
        rounds = 400 if args.quick else 2000
        for case, by_index in lookup_latency(indexes, pods, rounds).items():
            new = by_index["new"]
            line = f"| {pods} | {case} | {pct(new, 0.5) * 1e6:.0f} | {pct(new, 0.99) * 1e6:.0f} |"
            if old:
                before = by_index["old"]
                line += (f" {pct(before, 0.5) * 1e6:.0f} | {pct(before, 0.99) * 1e6:.0f} | "
                         f"{pct(new, 0.5) / pct(before, 0.5):.2f} | "
                         f"{pct(new, 0.99) / pct(before, 0.99):.2f} |")
            print(line, flush=True)
    print()
    print("| endpoints | blocks per endpoint | replicas per block | index bytes per "
          "(block, endpoint) entry | goal <= 64 B |" + (" old bytes |" if old else ""))
    print("|---:|---:|---:|---:|---|" + ("---:|" if old else ""))
    for endpoints, blocks, replicas in ((8, 20_000, 1), (8, 20_000, 4), (64, 4_000, 8)):
        b = index_bytes_per_entry(current_index, endpoints, blocks, replicas)
        line = (f"| {endpoints} | {blocks} | {replicas} | {b:.0f} | "
                f"{'PASS' if b <= 64 else 'MISS'} |")
        if old:
            line += f" {index_bytes_per_entry(indexes['old'], endpoints, blocks, replicas):.0f} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
