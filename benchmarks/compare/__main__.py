"""Routing quality and overhead, side by side: one fleet, one workload, one table.

    .venv/bin/python -m benchmarks.compare                 # the short run (make bench)
    .venv/bin/python -m benchmarks.compare --plan full     # the rate sweep (make bench-full)
    .venv/bin/python -m benchmarks.compare --routers "epp default" oracle --duration 20
    .venv/bin/python -m benchmarks.compare --epp-config sticky=my-config.yaml --replicas 1 2
    .venv/bin/python -m benchmarks.compare --routers "epp default" --replicas 1 2 --replica-sync

The headline row is ``epp default``: the EPP with no config file and KV events in its
endpoints file, the built-in default a new user gets. Writes
``benchmarks/results/compare-<date>[-full]/``: ``README.md`` (the tables and the goals),
``cells.json`` (every figure), ``configs/`` (the EndpointPickerConfig each EPP row ran),
PNG plots (drawn with the peers' venv matplotlib) and ``raw/`` (every request; not
committed). Progress goes to stderr.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.compare.options import parse_args
from benchmarks.compare.report import render_report
from benchmarks.compare.routers import EppRouter, peers_python, slug
from benchmarks.compare.run import run_plan

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv, description=__doc__.split("\n\n")[0])
    signal.signal(signal.SIGTERM, _interrupt)
    plan, routers = options.plan, list(options.routers)
    today = dt.date.today().isoformat()
    out = options.output or RESULTS_DIR / (
        f"compare-{today}{'' if plan.name == 'short' else '-' + plan.name}")
    out.mkdir(parents=True, exist_ok=True)
    _write_configs(routers, out / "configs")
    with tempfile.TemporaryDirectory(prefix="epp-bench-compare-") as tmp:
        results = run_plan(plan, routers, Path(tmp), out / "raw")
    (out / "cells.json").write_text(json.dumps(results.to_json(), indent=1), encoding="utf-8")
    plots: list[str] = []
    if options.plots:
        plots = _plots(out)
    report = render_report(results, routers, today, plots)
    (out / "README.md").write_text(report, encoding="utf-8")
    print(report)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _write_configs(routers: Sequence[object], directory: Path) -> None:
    """The EndpointPickerConfig every EPP router runs, one file per configuration (the
    built-in ones included, as the EPP compiles them), so a results directory says
    exactly what each row ran."""
    directory.mkdir(parents=True, exist_ok=True)
    for router in routers:
        if isinstance(router, EppRouter):
            header = f"# {router.base_name}: {router.config_label}\n"
            if router.config_file is None and router.config_text is None:
                header += ("# (no --config-file: the EPP's built-in default text, copied "
                           "here for reference)\n")
            (directory / f"{slug(router.base_name)}.yaml").write_text(
                header + router.effective_config(), encoding="utf-8")


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
