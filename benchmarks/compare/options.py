"""The command line of ``python -m benchmarks.compare``: parsed and checked here, before
any process starts, into the plan and the routers to run."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.compare.plan import PLANS, Plan
from benchmarks.compare.routers import (
    Router,
    all_routers,
    describe_config,
    select,
    variant_names,
    with_replicas,
)

# An ``--epp-config`` name becomes part of a row name, a file name and a results key.
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Names the built-in routers already use after "epp ".
RESERVED_NAMES = frozenset({"default", "precise", "approximate", "load-only", "random"})


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    plan: Plan
    routers: tuple[Router, ...]
    output: Path | None
    plots: bool


def epp_config_arg(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` → (NAME, PATH), the file checked to exist and to be an
    EndpointPickerConfig with scheduling profiles."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=PATH")
    if not CONFIG_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{name!r}: a name is letters, digits, '.', '_' and '-' (it names a row and files)")
    if name in RESERVED_NAMES:
        raise argparse.ArgumentTypeError(f"{name!r}: 'epp {name}' is a built-in router")
    file = Path(path)
    if not file.is_file():
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    try:
        describe_config(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path}: not an EndpointPickerConfig: {exc}") from None
    return name, file


def replica_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: at least one replica")
    return count


def parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=description)
    p.add_argument("--plan", choices=sorted(PLANS), default="short")
    p.add_argument("--routers", nargs="*", default=None, metavar="NAME",
                   help="only routers whose name contains one of these (the full plan's "
                   "extra profiles, e.g. 'epp precise', only by their exact name)")
    p.add_argument("--epp-config", action="append", type=epp_config_arg, default=[],
                   metavar="NAME=PATH", help="also run an EPP router 'epp NAME' with this "
                   "EndpointPickerConfig file (KV events in the endpoints file), whatever "
                   "--routers selects; repeatable")
    p.add_argument("--replicas", type=replica_count, nargs="+", default=[1], metavar="N",
                   help="run every selected EPP router once per count, as N EPP replicas "
                   "behind one Envoy (rows 'epp default', 'epp default ×2', ...; default 1)")
    p.add_argument("--replica-sync", action="store_true",
                   help="also run every EPP router of more than one replica with its "
                   "replicas sharing routing over NATS ('epp default ×2 sync'; starts one "
                   "nats-server; needs a --replicas count above 1)")
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
    return p


def parse_args(argv: Sequence[str] | None, description: str = "") -> Options:
    """The options of a run; exits with a usage error on anything wrong."""
    p = parser(description)
    args = p.parse_args(argv)
    names = [name for name, _ in args.epp_config]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        p.error(f"--epp-config: {', '.join(duplicates)} given more than once")
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
    if args.replica_sync and max(args.replicas) < 2:
        p.error("--replica-sync: needs a --replicas count above 1 (e.g. --replicas 1 2)")
    routers = with_replicas(all_routers(variants=True, configs=args.epp_config),
                            args.replicas, sync=args.replica_sync)
    try:
        chosen = select(routers, args.routers,
                        exact_only=() if plan.variants else variant_names(),
                        always=[f"epp {name}" for name in names])
    except ValueError as exc:
        p.error(str(exc))
    return Options(plan=plan, routers=tuple(chosen), output=args.output,
                   plots=not args.no_plots)
