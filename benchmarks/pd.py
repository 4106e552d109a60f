"""Prefill/decode disaggregation vs aggregated serving, at equal pod count, on the sim fleet.

Two fleets of 4 epp-sim pods, each behind Envoy + the EPP:

  P/D          2 prefill + 2 decode pods (label llm-d.ai/role), deploy/local/pd-config.yaml
  aggregated   4 pods that do both, deploy/local/epp-config.yaml (precise prefix + load)

Two workloads, each an open-loop Poisson arrival schedule of never-seen prompts (the same
schedule and prompts for both fleets), streamed over ``/v1/completions``:

  prefill-heavy   prompts of 4,000-8,000 tokens, 64 output tokens
  decode-heavy    prompts of 150-250 tokens, 128 output tokens

From every SSE stream the client takes the time to first token (TTFT: request sent ->
first token chunk) and the gaps between token chunks (inter-token latency, ITL); the
table shows p50/p90 of each, plus how many requests the EPP disaggregated.

What makes the comparison meaningful is the sim's timing model (``epp.sim.timeline``):
prefill takes ``tokens / --prefill-tokens-per-s`` and runs FIFO in chunks of
``--max-num-batched-tokens``; each chunk stretches the decode step of every request running
on that pod from ``--itl-ms`` to ``--itl-ms + chunk / rate``. Decode pods in the P/D fleet
receive the KV (``--kv-transfer-us-per-token``) instead, so their decodes are not
disturbed, but only half the fleet prefills and half decodes.

Run: ``.venv/bin/python benchmarks/pd.py [--quick]`` (about 2.5 minutes on 2 cores; --quick
under 1). The report goes to stdout and ``benchmarks/results/pd-<date>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from epp.devtools.procs import REPO_ROOT
from epp.devtools.stack import LocalStack, StackPorts
from loadgen import percentile

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "qwen3"
ROLE_LABEL = "llm-d.ai/role"
# Every pod of both fleets runs with these settings (the sim's defaults unless noted).
SIM_ARGS = (
    "--tokenizer", "qwen",
    "--ttft-ms", "5",  # fixed engine overhead before the first token
    "--itl-ms", "20",  # a decode step with nothing prefilling alongside
    "--prefill-tokens-per-s", "20000",  # 8B model on an H100 (see epp.sim.config)
    "--max-num-batched-tokens", "2048",  # prefill chunk per step: +102 ms per chunk
    "--kv-transfer-us-per-token", "5",  # 128 KiB/token over ~25 GB/s RDMA
    "--max-num-seqs", "8",
    # 8 slots x 16K tokens: an 8K-token prompt must not fill the pod's whole KV cache.
    "--kv-capacity-tokens", "131072",
)
EPP_ARGS = ("--log-level", "WARNING")
# Words that are one Qwen token each with their leading space.
WORDS = ("alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike",
         "november", "papa", "uniform", "whiskey")
REQUEST_TIMEOUT_S = 120.0
WARMUP_REQUESTS = 3


@dataclass(frozen=True)
class Fleet:
    """Four pods and the EndpointPickerConfig that routes over them."""

    name: str
    roles: tuple[str, ...]
    config: Path


@dataclass(frozen=True)
class Workload:
    """Poisson arrivals at ``rate`` req/s of unique prompts of ``prompt_tokens`` tokens."""

    name: str
    prompt_tokens: tuple[int, int]
    output_tokens: int
    rate: float


FLEETS = (
    Fleet("P/D (2 prefill + 2 decode)", ("prefill", "prefill", "decode", "decode"),
          REPO_ROOT / "deploy" / "local" / "pd-config.yaml"),
    Fleet("aggregated (4 both)", ("both",) * 4,
          REPO_ROOT / "deploy" / "local" / "epp-config.yaml"),
)
# Rates: the prefill-heavy one keeps the P/D fleet's two prefill pods ~60% busy (6K tokens
# x 4 req/s / 2 pods / 20K tokens/s), and its 64 output tokens (~1.3 s) make decodes
# overlap other requests' prefills on an aggregated pod. The decode-heavy one keeps ~13 of
# the decode pods' 16 batch slots busy in P/D, where short prompts are never disaggregated.
WORKLOADS = (
    Workload("prefill-heavy", (4000, 8000), 64, 4.0),
    Workload("decode-heavy", (150, 250), 128, 5.0),
)


READING = (
    ("- In the aggregated fleet every pod prefills. A decode running on a pod that "
     "prefills another request's prompt waits for each 2,048-token chunk: that token takes "
     "20 + 102 ms instead of 20 ms. Few tokens overlap a prefill (the EPP's load-aware "
     "scoring spreads requests), so ITL p50/p90 barely move and the damage shows in ITL p99 "
     "and in the slowest requests' TPOT."),
    ("- P/D keeps prefill off the decode pods, so their ITL stays at the bare step time, but "
     "at equal pod count only two pods prefill: prompts queue longer for prefill (TTFT), "
     "and the KV transfer adds ~5 µs per prompt token."),
    ("- Short prompts stay below the 256-token threshold: P/D serves them on its two decode "
     "pods alone (half the batch slots) while the prefill pods idle, so bursts queue (TTFT "
     "p90). The sim's decode step does not grow with batch size, so that queueing is the "
     "whole cost here."),
)


@dataclass
class Stream:
    """What the client saw of one streamed request."""

    status: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    prefilled_by: str = ""
    error: str | None = None


@dataclass
class Cell:
    """One fleet x workload measurement."""

    fleet: str
    workload: str
    requests: int
    ok: int
    disaggregated: float | None  # EPP prefill-decode decisions / all (None: no P/D)
    prefilled_remotely: int  # responses whose x-sim-prefilled-by names a prefill pod
    ttft_ms: tuple[float, float]  # p50, p90
    itl_ms: tuple[float, float, float]  # p50, p90, p99
    tpot_p90_ms: float  # p90 over requests of each request's mean inter-token time
    errors: int


def prompt_text(rng: random.Random, index: int, tokens: int) -> str:
    """~``tokens`` Qwen tokens (a word and its space are one token), unique by index."""
    words = [f"Request {index}-{rng.randrange(10**9)}:"]  # ~16 tokens (digits are one each)
    words += [rng.choice(WORDS) for _ in range(tokens - 16)]
    return " ".join(words)


def schedule(workload: Workload, duration_s: float, seed: int) -> list[tuple[float, str]]:
    """(arrival offset, prompt) pairs: the same for every fleet."""
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    at = rng.expovariate(workload.rate)
    while at < duration_s:
        tokens = rng.randint(*workload.prompt_tokens)
        out.append((at, prompt_text(rng, len(out), tokens)))
        at += rng.expovariate(workload.rate)
    return out


async def one_stream(session: aiohttp.ClientSession, url: str, prompt: str,
                     max_tokens: int) -> Stream:
    """Send one streaming completion; record TTFT and the gaps between token chunks."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    result = Stream()
    sent = time.perf_counter()
    last: float | None = None
    try:
        async with session.post(url, json=body) as resp:
            result.status = resp.status
            result.prefilled_by = resp.headers.get("x-sim-prefilled-by", "")
            if resp.status != 200:
                result.error = f"status {resp.status}"
                await resp.read()
                return result
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[len(b"data: "):])
                if not chunk.get("choices"):
                    continue
                if last is None:
                    result.ttft_s = now - sent
                else:
                    result.gaps_s.append(now - last)
                last = now
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = type(exc).__name__
    return result


async def run_schedule(url: str, workload: Workload,
                       arrivals: Sequence[tuple[float, str]]) -> list[Stream]:
    """Fire every request at its arrival time (open loop) and wait for all of them."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def at(offset: float, prompt: str) -> Stream:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await one_stream(session, url, prompt, workload.output_tokens)

        return await asyncio.gather(*(at(offset, p) for offset, p in arrivals))


def pd_decisions(stack: LocalStack) -> dict[str, float]:
    """The EPP's epp_pd_decision_total by decision type (empty without P/D)."""
    url = f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("epp_pd_decision_total{"):
            kind = line.split('decision_type="', 1)[1].split('"', 1)[0]
            counts[kind] = float(line.rsplit(" ", 1)[1])
    return counts


def measure(stack: LocalStack, fleet: Fleet, workload: Workload,
            arrivals: Sequence[tuple[float, str]]) -> Cell:
    """Run one workload on a started fleet and summarise it."""
    before = pd_decisions(stack)
    streams = asyncio.run(run_schedule(stack.url + "/v1/completions", workload, arrivals))
    after = pd_decisions(stack)
    delta = {kind: after.get(kind, 0.0) - before.get(kind, 0.0) for kind in after}
    total = sum(delta.values())
    ok = [s for s in streams if s.error is None and s.ttft_s is not None]
    ttfts = sorted(s.ttft_s * 1e3 for s in ok if s.ttft_s is not None)
    gaps = sorted(g * 1e3 for s in ok for g in s.gaps_s)
    tpots = sorted(sum(s.gaps_s) / len(s.gaps_s) * 1e3 for s in ok if s.gaps_s)
    prefill_pods = {a for a, role in zip(stack.sim_addresses, fleet.roles, strict=True)
                    if role == "prefill"}
    return Cell(
        fleet=fleet.name,
        workload=workload.name,
        requests=len(streams),
        ok=len(ok),
        disaggregated=delta.get("prefill-decode", 0.0) / total if total else None,
        prefilled_remotely=sum(1 for s in ok if s.prefilled_by in prefill_pods),
        ttft_ms=(percentile(ttfts, 50), percentile(ttfts, 90)),
        itl_ms=(percentile(gaps, 50), percentile(gaps, 90), percentile(gaps, 99)),
        tpot_p90_ms=percentile(tpots, 90),
        errors=len(streams) - len(ok),
    )


def warm_up(stack: LocalStack) -> None:
    """A few requests of each kind first, so no cell pays for a cold start."""
    rng = random.Random(0)
    for i in range(WARMUP_REQUESTS):
        for tokens in (200, 5000):
            body = json.dumps({"model": MODEL, "prompt": prompt_text(rng, -1 - i, tokens),
                               "max_tokens": 2}).encode()
            req = urllib.request.Request(stack.url + "/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()


def run_fleet(fleet: Fleet, work: Path, duration_s: float, seed: int) -> list[Cell]:
    """Start a fleet, run every workload on it, stop it."""
    roles = dict(enumerate(fleet.roles))
    stack = LocalStack(work, StackPorts.free(len(fleet.roles), kv_events=True),
                       sim_args=SIM_ARGS,
                       epp_args=["--config-file", str(fleet.config), *EPP_ARGS],
                       per_sim_args={i: ["--role", role] for i, role in roles.items()},
                       sim_labels={i: {ROLE_LABEL: role} for i, role in roles.items()
                                   if role != "both"},
                       envoy_concurrency=1)
    cells: list[Cell] = []
    try:
        _progress(f"starting {fleet.name} (logs in {work}) ...")
        stack.start()
        warm_up(stack)
        for index, workload in enumerate(WORKLOADS):
            arrivals = schedule(workload, duration_s, seed + index)
            _progress(f"  {workload.name}: {len(arrivals)} requests over {duration_s:g} s")
            cells.append(measure(stack, fleet, workload, arrivals))
    finally:
        stack.stop()
    return cells


def report(cells: Sequence[Cell], duration_s: float, date: str) -> str:
    """The markdown report."""
    workloads = "; ".join(
        f"{w.name} {w.prompt_tokens[0]:,}-{w.prompt_tokens[1]:,} prompt tokens, "
        f"{w.output_tokens} output tokens, {w.rate:g} req/s" for w in WORKLOADS)
    lines = [
        f"# Prefill/decode disaggregation vs aggregated serving — {date}",
        "",
        (f"- machine: nproc = {len(os.sched_getaffinity(0))}; the load generator, Envoy, "
         "the EPP and the 4 sim pods share these cores"),
        f"- pods: 4 × epp-sim {' '.join(SIM_ARGS)}; P/D pods add --role prefill|decode",
        ("- P/D fleet: deploy/local/pd-config.yaml (disaggregate at >= 256 non-cached "
         "tokens); aggregated fleet: deploy/local/epp-config.yaml"),
        ("- workloads: open-loop Poisson arrivals of never-seen /v1/completions prompts, "
         f"streamed, {duration_s:g} s of arrivals each, the same schedule for both fleets: "
         f"{workloads}"),
        ("- TTFT: request sent -> first token chunk; ITL: gaps between token chunks, over "
         "all tokens of all requests; TPOT: each request's mean gap, p90 over requests; "
         "all in ms"),
        "",
        ("| workload | fleet | requests | disaggregated | TTFT p50 | TTFT p90 | ITL p50 "
         "| ITL p90 | ITL p99 | TPOT p90 | errors |"),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for workload in WORKLOADS:
        for c in cells:
            if c.workload != workload.name:
                continue
            disaggregated = ("—" if c.disaggregated is None else
                             f"{c.disaggregated:.0%} ({c.prefilled_remotely} remote)")
            lines.append(
                f"| {c.workload} | {c.fleet} | {c.requests} | {disaggregated} "
                f"| {c.ttft_ms[0]:.0f} | {c.ttft_ms[1]:.0f} "
                f"| {c.itl_ms[0]:.1f} | {c.itl_ms[1]:.1f} | {c.itl_ms[2]:.1f} "
                f"| {c.tpot_p90_ms:.1f} | {c.errors} |")
    lines += ["", "Reading it:", "", *READING, ""]
    return "\n".join(lines)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run both fleets on both workloads and write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30.0,
                   help="seconds of arrivals per workload (default 30)")
    p.add_argument("--quick", action="store_true", help="6 s of arrivals per workload")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path, default=None,
                   help="report file (default benchmarks/results/pd-<date>.md)")
    args = p.parse_args(argv)
    duration = 6.0 if args.quick else args.duration
    signal.signal(signal.SIGTERM, _interrupt)
    today = dt.date.today().isoformat()
    started = time.monotonic()
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="epp-bench-pd-") as tmp:
        for index, fleet in enumerate(FLEETS):
            cells += run_fleet(fleet, Path(tmp) / f"fleet-{index}", duration, args.seed)
    text = report(cells, duration, today)
    print(text)
    output = args.output or RESULTS_DIR / f"pd-{today}{'-quick' if args.quick else ''}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    _progress(f"wrote {output} ({time.monotonic() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
