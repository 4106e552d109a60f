"""The markdown report: setup, one table per workload, the rate sweep, the goals."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from benchmarks.compare.metrics import Cell
from benchmarks.compare.plan import Plan
from benchmarks.compare.routers import PEER_NOTES, Router
from benchmarks.compare.run import Results
from epp.sim.profiles import load_profile

PRECISE = "epp precise"
ROUND_ROBIN = "envoy round-robin"
VLLM_KV = "vllm-router kv_aware"
SGLANG = "sglang-router cache_aware"
LOAD_ONLY = "epp load-only"
ORACLE = "oracle"
SHARED = "shared-prefix"
CONTROL = "no-sharing"


def _f(value: float, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def main_rate(plan: Plan, workload: str) -> float:
    return next((w.main for w in plan.workloads if w.spec.name == workload), math.nan)


def cell(results: Results, router: str, workload: str, rate: float) -> Cell | None:
    for c in results.cells:
        if c.router == router and c.workload == workload and c.rate == rate:
            return c
    return None


def workload_table(results: Results, workload: str, rate: float) -> list[str]:
    lines = [
        ("| router | TTFT p50 | TTFT p90 | TTFT p99 | E2E p50 | E2E p90 | output tok/s "
         "| hit rate | failed | path p50 / p99 (ms, wall) | router CPU (ms/req, wall) "
         "| pods CPU (ms/req) |"),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in results.cells:
        if c.workload != workload or c.rate != rate:
            continue
        cpu = "—" if c.kind == "oracle" else _f(c.router_cpu_ms_per_request, 1)
        lines.append(
            f"| {c.router} | {_f(c.ttft_s[0])} | {_f(c.ttft_s[1])} | {_f(c.ttft_s[2])} "
            f"| {_f(c.e2e_s[0])} | {_f(c.e2e_s[1])} | {c.output_tokens_per_s:.0f} "
            f"| {c.hit_rate:.1%} | {c.failed}/{c.requests} "
            f"| {_f(c.path_ms[0], 1)} / {_f(c.path_ms[1], 1)} | {cpu} "
            f"| {_f(c.pods_cpu_ms_per_request, 1)} |")
    return lines


def sweep_table(results: Results, workload: str) -> list[str]:
    rates = sorted({c.rate for c in results.cells if c.workload == workload})
    if len(rates) < 2:
        return []
    routers = list(dict.fromkeys(c.router for c in results.cells if c.workload == workload))
    head = " | ".join(f"{r:g} req/s" for r in rates)
    lines = [f"| router | {head} |", "|---|" + "--:|" * len(rates)]
    for router in routers:
        row = []
        for rate in rates:
            c = cell(results, router, workload, rate)
            row.append("—" if c is None else
                       f"{c.hit_rate:.0%} · {c.output_tokens_per_s:.0f} · {_f(c.ttft_s[1], 1)}")
        lines.append(f"| {router} | " + " | ".join(row) + " |")
    return lines


def goals(results: Results) -> list[tuple[str, str, str]]:
    """(goal, PASS/MISS/n/a, numbers)."""
    plan = results.plan
    out: list[tuple[str, str, str]] = []
    rate = main_rate(plan, SHARED)
    ours = cell(results, PRECISE, SHARED, rate)

    def check(goal: str, other_name: str, ok: object, numbers: str) -> None:
        if ours is None or ok is None:
            out.append((goal, "n/a", f"{PRECISE} or {other_name} did not run"))
        else:
            out.append((goal, "PASS" if ok else "MISS", numbers))

    rr = cell(results, ROUND_ROBIN, SHARED, rate)
    check("(a) TTFT p90 ≤ 1/10 of round-robin's", ROUND_ROBIN,
          None if rr is None or ours is None else ours.ttft_s[1] <= rr.ttft_s[1] / 10,
          "" if rr is None or ours is None else
          f"{ours.ttft_s[1]:.2f} s vs {rr.ttft_s[1]:.2f} s (ratio 1/{rr.ttft_s[1] / ours.ttft_s[1]:.1f})")
    for name in (VLLM_KV, SGLANG):
        other = cell(results, name, SHARED, rate)
        check(f"(a) TTFT p90 no worse than {name}", name,
              None if other is None or ours is None else ours.ttft_s[1] <= other.ttft_s[1],
              "" if other is None or ours is None else
              f"{ours.ttft_s[1]:.2f} s vs {other.ttft_s[1]:.2f} s")
    oracle = cell(results, ORACLE, SHARED, rate)
    check("(a) hit rate ≥ 90% of the oracle's", ORACLE,
          None if oracle is None or ours is None else ours.hit_rate >= 0.9 * oracle.hit_rate,
          "" if oracle is None or ours is None else
          f"{ours.hit_rate:.1%} vs {oracle.hit_rate:.1%} "
          f"({ours.hit_rate / oracle.hit_rate:.0%} of it)" if oracle and oracle.hit_rate else "")
    rate_c = main_rate(plan, CONTROL)
    ours_c = cell(results, PRECISE, CONTROL, rate_c)
    load = cell(results, LOAD_ONLY, CONTROL, rate_c)
    if ours_c is None or load is None:
        out.append(("(c) TTFT p90 no worse than load-only", "n/a", "a router did not run"))
    else:
        ok = ours_c.ttft_s[1] <= load.ttft_s[1]
        out.append(("(c) TTFT p90 no worse than load-only", "PASS" if ok else "MISS",
                    f"{ours_c.ttft_s[1]:.2f} s vs {load.ttft_s[1]:.2f} s"))
    return out


def inference_perf_section(results: Results) -> list[str]:
    if not results.inference_perf and not results.inference_perf_skipped:
        return []
    run = next((w for w in results.plan.workloads if w.spec.name == SHARED), None)
    lines = ["", f"## {SHARED} driven by inference-perf", ""]
    if results.inference_perf_skipped:
        return lines + [f"Not run: {results.inference_perf_skipped}."]
    lines += [
        ("The same fleet and workload shape, generated and sent by `inference-perf` "
         "(`shared_prefix` data, Poisson load, `/v1/completions`, its own prompts in group "
         f"order) at {run.main if run else math.nan:g} req/s; its latencies are converted to "
         "fleet time; hit rate from the pods' usage it records."),
        "",
        ("| router | TTFT p50 | TTFT p90 | TTFT p99 | E2E p50 | E2E p90 | output tok/s "
         "| hit rate | failed |"),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in results.inference_perf:
        if c.error:
            lines.append(f"| {c.router} | failed: {c.error} ||||||||")
            continue
        lines.append(
            f"| {c.router} | {_f(c.ttft_s[0])} | {_f(c.ttft_s[1])} | {_f(c.ttft_s[2])} "
            f"| {_f(c.e2e_s[0])} | {_f(c.e2e_s[1])} | {c.output_tokens_per_s:.0f} "
            f"| {c.hit_rate:.1%} | {c.failed}/{c.requests} |")
    return lines


def notes(results: Results) -> list[str]:
    plan = results.plan
    out = [
        ("- *path* is the time from the client sending a request to the pod's handler "
         "receiving it (the pod stamps `x-sim-received-at` on the host's monotonic clock): "
         "everything the router does before forwarding, plus one proxy hop. The oracle "
         "sends straight to the pod, so its path is the floor (a direct connection)."),
        ("- router CPU is counted above the router's idle background (measured for "
         "1.5 s before its first cell: "
         + ", ".join(f"{name} {cores * 100:.0f}%" for name, cores in results.idle_cores.items()
                     if cores > 0.005)
         + " of a core). The EPP scrapes every pod's /metrics every "
         f"{100 / plan.time_scale:g} ms (100 ms of fleet time) here, 10x its default rate "
         "on the wall clock, because the fleet runs faster."),
        ("- the oracle asks every pod what it holds (`POST /debug/prefix_lookup`) before "
         "each request and its clock starts after that: it has no routing overhead at all."),
        ("- the pods' caches are reset before every cell, so each cell includes the cold "
         "start: every group's first request misses everywhere."),
    ]
    for name, note in results.notes.items():
        out.append(f"- {name}: {note}.")
    for name, reason in results.skipped.items():
        out.append(f"- {name} not measured: {reason}")
    return out


def _durations(plan: Plan) -> str:
    parts = [f"{w.spec.name} {w.duration_s if w.duration_s is not None else plan.duration_s:g} s"
             for w in plan.workloads]
    return "fleet seconds: " + ", ".join(parts)


def render_report(results: Results, routers: Sequence[Router], date: str,
                  plots: Sequence[str]) -> str:
    plan = results.plan
    profile = load_profile(plan.profile)
    per_pod = results.fleet_capacity_tokens // plan.pods
    lines = [
        f"# Routers compared on one fleet — {date} ({plan.name} run)",
        "",
        (f"- machine: nproc = {len(os.sched_getaffinity(0))}; the load generator, every "
         "router and the pods share these cores"),
        (f"- fleet: {plan.pods} × epp-sim `--profile {profile.name}` ({profile.description}): "
         f"KV cache {per_pod:,} tokens per pod, {results.fleet_capacity_tokens:,} in all; "
         f"`--time-scale {plan.time_scale:g}`"),
        (f"- time: every latency and throughput is fleet time (wall × {plan.time_scale:g}); "
         "the *path* (client send → pod receives the request) and the routers' CPU are "
         f"wall clock. A router's own overhead is not scaled, so inside the TTFT columns it "
         f"weighs {plan.time_scale:g}× what it would in front of real GPUs"),
        (f"- each cell: {_durations(plan)} of Poisson arrivals (seed "
         f"{plan.seed}), the same requests for every router, streamed chat completions; "
         "the pods' caches are reset (and the pods idle) before every cell"),
        ("- hit rate: Σ cached_tokens / Σ prompt_tokens from the pods' usage; CPU: utime + "
         "stime from /proc of the router's processes (Envoy + EPP for ours), per request"),
        "",
        "Workloads:",
        "",
    ]
    for run in plan.workloads:
        demand = [s for s in results.schedules if s.workload == run.spec.name and s.rate == run.main]
        extra = ""
        if demand and demand[0].kv_demand_tokens:
            share = demand[0].kv_demand_tokens / results.fleet_capacity_tokens
            extra = (f"; reusable KV {demand[0].kv_demand_tokens:,} tokens = {share:.0%} of the "
                     "fleet's cache")
        count = f"{len(demand[0].requests)} requests" if demand else ""
        lines.append(f"- **{run.spec.name}**: {run.spec.describe()}; rates "
                     f"{', '.join(f'{r:g}' for r in run.rates)} req/s ({count} at "
                     f"{run.main:g}{extra})")
    lines += ["", "Routers:", ""]
    for r in routers:
        note = ""
        for peer, text in PEER_NOTES.items():
            if r.name.startswith(peer):
                note = f" ({text})"
        skipped = results.skipped.get(r.name)
        lines.append(f"- **{r.name}**: {r.description}{note}"
                     + (f" — **not measured: {skipped}**" if skipped else ""))
    for run in plan.workloads:
        lines += ["", f"## {run.spec.name} at {run.main:g} req/s", "",
                  "TTFT and E2E in fleet seconds.", ""]
        lines += workload_table(results, run.spec.name, run.main)
        sweep = sweep_table(results, run.spec.name)
        if sweep:
            lines += ["", f"Rate sweep ({run.spec.name}): hit rate · output tok/s · TTFT p90 (s)",
                      ""] + sweep
    lines += inference_perf_section(results)
    lines += ["", "## Goals", "", "| goal | result | numbers |", "|---|---|---|"]
    for goal, verdict, numbers in goals(results):
        lines.append(f"| {goal} | **{verdict}** | {numbers} |")
    lines += ["", "## Notes", ""] + notes(results)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", f"Run took {results.wall_s / 60:.1f} minutes.", ""]
    return "\n".join(lines)
