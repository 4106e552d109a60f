"""The markdown report: setup, one table per workload, the rate sweep, the goals."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from benchmarks.compare.goals import SHARED, find_cell, goals, headline, replica_pairs
from benchmarks.compare.plan import Plan
from benchmarks.compare.routers import PEER_NOTES, EppRouter, Router, slug
from benchmarks.compare.run import Results
from epp.sim.profiles import load_profile

HEADLINE_MISSING = "epp default (did not run)"


def _f(value: float, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def workload_table(results: Results, workload: str, rate: float) -> list[str]:
    lead = headline(results)
    lines = [
        ("| router | config | TTFT p50 | TTFT p90 | TTFT p99 | E2E p50 | E2E p90 "
         "| output tok/s | hit rate | failed | path p50 / p99 (ms, wall) "
         "| router CPU (ms/req, wall) | pods CPU (ms/req) |"),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in results.cells:
        if c.workload != workload or c.rate != rate:
            continue
        cpu = "—" if c.kind == "oracle" else _f(c.router_cpu_ms_per_request, 1)
        info = results.routers.get(c.router)
        name = f"**{c.router}**" if c.router == lead else c.router
        lines.append(
            f"| {name} | {info.config if info else '—'} "
            f"| {_f(c.ttft_s[0])} | {_f(c.ttft_s[1])} | {_f(c.ttft_s[2])} "
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
            c = find_cell(results, router, workload, rate)
            row.append("—" if c is None else
                       f"{c.hit_rate:.0%} · {c.output_tokens_per_s:.0f} · {_f(c.ttft_s[1], 1)}")
        lines.append(f"| {router} | " + " | ".join(row) + " |")
    return lines


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
    replicated = sorted({info.replicas for info in results.routers.values()
                         if info.replicas > 1})
    if replicated:
        out.append(
            f"- ×N rows ({', '.join(f'×{n}' for n in replicated)}): N EPP processes, each "
            "with its own ports, its own metrics scrapes and its own subscription to every "
            "pod's KV events (so each builds the whole index), behind one Envoy whose "
            "ext_proc cluster round-robins the streams (one per request) over them; their "
            "router CPU and idle background are Envoy + all N EPPs.")
    if any(info.replica_sync for info in results.routers.values()):
        out.append(
            "- ×N sync rows: the same N replicas, also sharing their pending picks and "
            "in-flight load over NATS (`--replica-sync-url` to one `nats-server` on "
            "loopback for the whole run, `--replica-sync-subject` of the row's own, so rows "
            "never hear each other); traffic starts once every replica is connected and "
            "hears the others; their router CPU and idle background also count the "
            "nats-server.")
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
         "stime from /proc of the router's processes (Envoy + every EPP replica for ours), "
         "per request"),
        (f"- headline: **{headline(results) or HEADLINE_MISSING}** — no config file, KV "
         "events in the endpoints file: the built-in default a new user gets. The *config* "
         "column says what each EPP row ran; `configs/` holds each of them as YAML"),
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
        if isinstance(r, EppRouter):
            note += f" (config: `configs/{slug(r.base_name)}.yaml`)"
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
    lead = headline(results)
    pairs = replica_pairs(results)
    replicas = "" if not pairs else (" (c) on " + ", ".join(
        f"{many} against {one}" for many, one in pairs) + ".")
    lines += ["", "## Goals", "",
              (f"Checked on the headline row, **{lead or HEADLINE_MISSING}**; peers are every "
               "vllm-router and sglang-router policy that ran; each workload at its headline "
               f"rate.{replicas}"), "",
              "| goal | result | numbers |", "|---|---|---|"]
    for goal in goals(results):
        lines.append(f"| {goal.goal} | **{goal.verdict}** | {goal.numbers} |")
    lines += ["", "## Notes", ""] + notes(results)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", f"Run took {results.wall_s / 60:.1f} minutes.", ""]
    return "\n".join(lines)
