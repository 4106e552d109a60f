"""Routing quality and overhead, side by side: one fleet, one workload, one table.

    .venv/bin/python -m benchmarks.compare                 # the short run (make bench)
    .venv/bin/python -m benchmarks.compare --plan full     # the rate sweep (make bench-full)
    .venv/bin/python -m benchmarks.compare --routers "epp precise" oracle --duration 20

Writes ``benchmarks/results/compare-<date>[-full]/``: ``README.md`` (the tables and the
goals), ``cells.json`` (every figure), PNG plots (drawn with the peers' venv matplotlib)
and ``raw/`` (every request; not committed). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.compare.plan import PLANS
from benchmarks.compare.report import render_report
from benchmarks.compare.routers import all_routers, peers_python, select
from benchmarks.compare.run import run_plan

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", choices=sorted(PLANS), default="short")
    p.add_argument("--routers", nargs="*", default=None, metavar="NAME",
                   help="only routers whose name contains one of these")
    p.add_argument("--workloads", nargs="*", default=None, metavar="NAME",
                   help="only these workloads (shared-prefix, multi-turn, no-sharing)")
    p.add_argument("--rates", type=float, nargs="*", default=None,
                   help="request rates for every selected workload (default: the plan's)")
    p.add_argument("--duration", type=float, default=None,
                   help="fleet seconds of arrivals per cell (default: the plan's)")
    p.add_argument("--time-scale", type=float, default=None, help="default: the plan's")
    p.add_argument("--output", type=Path, default=None,
                   help="results directory (default benchmarks/results/compare-<date>)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    plan = PLANS[args.plan]
    if args.duration is not None:
        plan = dataclasses.replace(plan, duration_s=args.duration, workloads=tuple(
            dataclasses.replace(w, duration_s=None) for w in plan.workloads))
    if args.workloads:
        unknown = set(args.workloads) - {w.spec.name for w in plan.workloads}
        if unknown:
            p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
        plan = dataclasses.replace(plan, workloads=tuple(
            w for w in plan.workloads if w.spec.name in args.workloads))
    if args.rates:
        plan = dataclasses.replace(plan, workloads=tuple(
            dataclasses.replace(w, rates=tuple(args.rates), main=max(args.rates))
            for w in plan.workloads))
    if args.time_scale is not None:
        plan = dataclasses.replace(plan, time_scale=args.time_scale)
    routers = select(all_routers(variants=plan.variants), args.routers)
    today = dt.date.today().isoformat()
    out = args.output or RESULTS_DIR / f"compare-{today}{'' if plan.name == 'short' else '-' + plan.name}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="epp-bench-compare-") as tmp:
        results = run_plan(plan, routers, Path(tmp), out / "raw")
    (out / "cells.json").write_text(json.dumps(results.to_json(), indent=1), encoding="utf-8")
    plots: list[str] = []
    if not args.no_plots:
        plots = _plots(out)
    report = render_report(results, routers, today, plots)
    (out / "README.md").write_text(report, encoding="utf-8")
    print(report)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _plots(out: Path) -> list[str]:
    """Draw the PNGs with the peers' venv (matplotlib lives there, not in the package)."""
    python = peers_python()
    if python is None:
        print("no .venv-peers: skipping plots (make bench creates it)", file=sys.stderr)
        return []
    done = subprocess.run([python, str(Path(__file__).with_name("plots.py")), str(out)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"plots failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return []
    return [line for line in done.stdout.splitlines() if line.endswith(".png")]


if __name__ == "__main__":
    raise SystemExit(main())
