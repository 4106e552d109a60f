"""Runs a plan: one fleet, every router in turn, every workload and rate on each, with the
pods' caches reset (and idle) before every cell; with synced rows, one NATS server for
the whole run."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.compare import inference_perf
from benchmarks.compare.client import Sample, run_schedule
from benchmarks.compare.fleet import Fleet, Oracle
from benchmarks.compare.metrics import Cell, process_tree_cpu_s, summarize, ttft_values
from benchmarks.compare.plan import Plan
from benchmarks.compare.routers import HEADLINE, EppRouter, OracleRouter, Router, slug
from benchmarks.workloads import (
    BenchRequest,
    PromptText,
    SharedPrefix,
    kv_demand_tokens,
)
from epp.sim.profiles import load_profile
from epp.devtools.nats import NatsServer

# After a reset, let the AllBlocksCleared events reach event-fed routers.
RESET_SETTLE_S = 0.3
# How long a started router is watched, idle, to measure its background CPU.
IDLE_SAMPLE_S = 1.5


@dataclass
class Schedule:
    """One workload at one rate: the requests every router gets."""

    workload: str
    rate: float
    requests: list[BenchRequest]
    kv_demand_tokens: int


@dataclass(frozen=True)
class RouterInfo:
    """What the report needs to know of a router beyond its cells."""

    base: str  # the name without the replica count
    replicas: int  # EPP processes (0: not an EPP)
    config: str  # which configuration it ran ("—": not an EPP)
    kv_events: bool = False  # fed by the pods' KV events
    replica_sync: bool = False  # the replicas shared routing over NATS

    @staticmethod
    def of(router: Router) -> RouterInfo:
        if isinstance(router, EppRouter):
            return RouterInfo(router.base_name, router.replicas, router.config_label,
                              router.uses_kv_events, router.replica_sync)
        return RouterInfo(router.name, 0, router.config_label, router.uses_kv_events)


@dataclass
class Results:
    """Everything a run produced, for the report and the plots."""

    plan: Plan
    fleet_capacity_tokens: int
    schedules: list[Schedule]
    cells: list[Cell] = field(default_factory=list)
    ttft: dict[str, list[float]] = field(default_factory=dict)  # "router|workload|rate"
    skipped: dict[str, str] = field(default_factory=dict)  # router -> reason
    idle_cores: dict[str, float] = field(default_factory=dict)  # router -> background CPU
    inference_perf: list[inference_perf.InferencePerfCell] = field(default_factory=list)
    inference_perf_skipped: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # router -> what its logs showed
    routers: dict[str, RouterInfo] = field(default_factory=dict)  # by name, in run order
    started: float = field(default_factory=time.time)
    wall_s: float = 0.0

    def headline(self) -> str | None:
        """The headline row: ``epp default`` with the fewest replicas among those that
        ran (None: it did not run)."""
        ran = {c.router for c in self.cells}
        rows = [(info.replicas, name) for name, info in self.routers.items()
                if info.base == HEADLINE and name in ran]
        return min(rows)[1] if rows else None

    def to_json(self) -> dict[str, object]:
        return {
            "headline": self.headline(),
            "plan": {"name": self.plan.name, "profile": self.plan.profile,
                     "pods": self.plan.pods, "time_scale": self.plan.time_scale,
                     "duration_s": self.plan.duration_s, "seed": self.plan.seed},
            "fleet_capacity_tokens": self.fleet_capacity_tokens,
            "main_rates": {w.spec.name: w.main for w in self.plan.workloads},
            "schedules": [{"workload": s.workload, "rate": s.rate,
                           "requests": len(s.requests),
                           "kv_demand_tokens": s.kv_demand_tokens} for s in self.schedules],
            "cells": [c.to_json() for c in self.cells],
            "ttft": self.ttft,
            "skipped": self.skipped,
            "idle_cores": self.idle_cores,
            "inference_perf": [c.to_json() for c in self.inference_perf],
            "inference_perf_skipped": self.inference_perf_skipped,
            "notes": self.notes,
            "routers": {name: info.__dict__ for name, info in self.routers.items()},
            "wall_s": self.wall_s,
        }


def key(router: str, workload: str, rate: float) -> str:
    return f"{router}|{workload}|{rate:g}"


def build_schedules(plan: Plan) -> list[Schedule]:
    text = PromptText()
    out: list[Schedule] = []
    for index, run in enumerate(plan.workloads):
        for rate in run.rates:
            duration = run.duration_s if run.duration_s is not None else plan.duration_s
            requests = run.spec.generate(text, rate, duration, plan.seed + index)
            out.append(Schedule(run.spec.name, rate, requests, kv_demand_tokens(requests)))
    return out


def run_plan(plan: Plan, routers: Sequence[Router], work_dir: Path, raw_dir: Path) -> Results:
    _say(f"generating workloads ({plan.name}) ...")
    schedules = build_schedules(plan)
    for s in schedules:
        _say(f"  {s.workload} @ {s.rate:g} req/s: {len(s.requests)} requests, "
             f"reusable KV {s.kv_demand_tokens:,} tokens")
    profile = load_profile(plan.profile)
    fleet = Fleet(work_dir / "fleet", profile, plan.pods, plan.time_scale)
    results = Results(plan, fleet.capacity_tokens * plan.pods, schedules,
                      routers={r.name: RouterInfo.of(r) for r in routers})
    raw_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Started by the first synced row, stopped however the run ends (Ctrl-C included).
    with NatsServer(work_dir / "nats") as nats:
        for router in routers:
            if isinstance(router, EppRouter) and router.replica_sync:
                router.sync_server = nats
        _say(f"starting {plan.pods} pods ({profile.name}, time scale {plan.time_scale:g}) ...")
        fleet.start()
        try:
            for router in routers:
                reason = router.available()
                if reason is not None:
                    _say(f"skipping {router.name}: {reason}")
                    results.skipped[router.name] = reason
                    continue
                _run_router(router, fleet, schedules, results, work_dir, raw_dir)
        finally:
            fleet.stop()
    results.wall_s = time.monotonic() - started
    return results


def _run_router(router: Router, fleet: Fleet, schedules: Sequence[Schedule], results: Results,
                work_dir: Path, raw_dir: Path) -> None:
    _say(f"{router.name}: starting ...")
    try:
        router.start(fleet, work_dir / slug(router.name))
    except Exception as exc:  # noqa: BLE001 (a router that cannot start is reported)
        router.stop()
        reason = f"could not start: {type(exc).__name__}: {str(exc).strip()[-400:]}"
        _say(f"  {reason}")
        results.skipped[router.name] = reason
        return
    oracle = Oracle(fleet.pods, fleet.block_size) if isinstance(router, OracleRouter) else None
    try:
        idle_cores = _idle_cores(router)
        results.idle_cores[router.name] = idle_cores
        for schedule in schedules:
            fleet.reset()
            time.sleep(RESET_SETTLE_S)
            label = f"{router.name} / {schedule.workload} @ {schedule.rate:g}"
            router_cpu = process_tree_cpu_s(router.pids())
            pods_cpu = process_tree_cpu_s(fleet.pids())
            t0 = time.monotonic()
            samples = asyncio.run(run_schedule(
                schedule.requests, url=router.url, oracle=oracle,
                time_scale=fleet.time_scale, label=label))
            wall = time.monotonic() - t0
            router_cpu = process_tree_cpu_s(router.pids()) - router_cpu
            pods_cpu = process_tree_cpu_s(fleet.pids()) - pods_cpu
            cell = summarize(samples, router=router.name, kind=router.kind,
                             workload=schedule.workload, rate=schedule.rate,
                             time_scale=fleet.time_scale,
                             router_cpu_s=max(0.0, router_cpu - idle_cores * wall),
                             pods_cpu_s=pods_cpu, wall_s=wall)
            results.cells.append(cell)
            results.ttft[key(router.name, schedule.workload, schedule.rate)] = ttft_values(
                samples, fleet.time_scale)
            _write_raw(raw_dir / f"{slug(router.name)}__{schedule.workload}__"
                       f"{schedule.rate:g}.jsonl", samples)
            _say(f"    TTFT p50/p90 {cell.ttft_s[0]:.2f}/{cell.ttft_s[1]:.2f} s, "
                 f"hit rate {cell.hit_rate:.0%}, failed {cell.failed}, "
                 f"path p50 {cell.path_ms[0]:.1f} ms, router CPU "
                 f"{cell.router_cpu_ms_per_request:.1f} ms/req")
            if not router.alive():
                raise RuntimeError(f"{router.name} died during the run")
        if router.name in results.plan.inference_perf_routers and router.url is not None:
            _run_inference_perf(router, fleet, results, work_dir)
        note = router.diagnostics()
        if note:
            results.notes[router.name] = note
    except Exception as exc:  # noqa: BLE001 (a router that fails is reported, the run goes on)
        _say(f"  {router.name} failed: {type(exc).__name__}: {exc}")
        results.skipped.setdefault(router.name, f"failed during the run: {exc}")
    finally:
        router.stop()


def _run_inference_perf(router: Router, fleet: Fleet, results: Results,
                        work_dir: Path) -> None:
    """The shared-prefix workload at its headline rate, driven by inference-perf."""
    reason = inference_perf.available()
    if reason is not None:
        results.inference_perf_skipped = reason
        return
    plan = results.plan
    run = next((w for w in plan.workloads if isinstance(w.spec, SharedPrefix)), None)
    if run is None or router.url is None:
        return
    spec = run.spec
    assert isinstance(spec, SharedPrefix)
    duration = run.duration_s if run.duration_s is not None else plan.duration_s
    fleet.reset()
    time.sleep(RESET_SETTLE_S)
    _say(f"  {router.name} / inference-perf shared_prefix @ {run.main:g} ...")
    cell = inference_perf.run(router.name, router.url, spec, run.main, duration,
                              fleet.time_scale, work_dir / "inference-perf" /
                              slug(router.name), plan.seed)
    fleet.wait_idle()
    results.inference_perf.append(cell)
    if cell.error:
        _say(f"    inference-perf failed: {cell.error}")
    else:
        _say(f"    TTFT p50/p90 {cell.ttft_s[0]:.2f}/{cell.ttft_s[1]:.2f} s, "
             f"hit rate {cell.hit_rate:.0%}, failed {cell.failed}/{cell.requests}")


def _idle_cores(router: Router) -> float:
    """The router's background CPU with no traffic (metrics scrapes, health checks, event
    subscribers), in cores; a cell's CPU per request is counted above it."""
    if not router.pids():
        return 0.0
    before, t0 = process_tree_cpu_s(router.pids()), time.monotonic()
    time.sleep(IDLE_SAMPLE_S)
    return (process_tree_cpu_s(router.pids()) - before) / (time.monotonic() - t0)


def _write_raw(path: Path, samples: Sequence[Sample]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s.__dict__) + "\n" for s in samples)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
