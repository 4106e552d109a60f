"""This round's goals, checked on the headline row (``epp default``, the built-in default
with KV events), each with PASS/MISS/n/a and the figures behind the verdict:

- (a) on shared-prefix and on multi-turn, its TTFT p90 ≤ 0.75× the best peer's (the
  lowest p90 of every vllm-router and sglang-router policy that ran);
- (b) on no-sharing, its TTFT p90 ≤ Envoy round-robin's (cache awareness must cost
  nothing when there is nothing to reuse);
- (c) when replica rows ran, for every KV-event-fed EPP router and every workload with
  hits: the hit rate of ×N, with and without replica sync (``×N sync``), within 3%
  (relative) of ×1's on the same workload (replicas that each hold the whole index must
  route as one); each line names the two rows it compared;
- (d) kept from the last round: on shared-prefix, its hit rate ≥ 90% of the oracle's.

A cell with failed requests never passes: its percentiles cover only what was answered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.compare.metrics import Cell
from benchmarks.compare.run import Results

SHARED = "shared-prefix"
MULTI = "multi-turn"
CONTROL = "no-sharing"
ROUND_ROBIN = "envoy round-robin"
ORACLE = "oracle"
PEER_FACTOR = 0.75  # (a): headline p90 ≤ this × the best peer's
REPLICA_HIT_TOLERANCE = 0.03  # (c): |hit ×N − hit ×1| ≤ this × hit ×1
ORACLE_HIT_SHARE = 0.9  # (d)


@dataclass(frozen=True)
class Goal:
    """One line of the goals table."""

    goal: str
    verdict: str  # "PASS", "MISS" or "n/a"
    numbers: str


def main_rate(results: Results, workload: str) -> float:
    return next((w.main for w in results.plan.workloads if w.spec.name == workload), math.nan)


def find_cell(results: Results, router: str, workload: str, rate: float) -> Cell | None:
    for c in results.cells:
        if c.router == router and c.workload == workload and c.rate == rate:
            return c
    return None


def headline(results: Results) -> str | None:
    """The headline row (see :meth:`Results.headline`)."""
    return results.headline()


def _failed(c: Cell) -> str | None:
    return f"{c.router} failed {c.failed}/{c.requests} requests" if c.failed else None


def _p90(c: Cell) -> float:
    return c.ttft_s[1]


def versus_best_peer(ours: Cell | None, peers: Sequence[Cell], factor: float = PEER_FACTOR,
                     label: str = "") -> Goal:
    """(a): ``ours``' TTFT p90 ≤ ``factor`` × the lowest p90 among ``peers``."""
    goal = f"(a) {label} TTFT p90 ≤ {factor:g}× the best peer's".replace("  ", " ")
    measured = [p for p in peers if not math.isnan(_p90(p))]
    if ours is None or not measured:
        return Goal(goal, "n/a", "the headline did not run" if ours is None
                    else "no vllm-router or sglang-router policy was measured")
    best = min(measured, key=_p90)
    ratio = _p90(ours) / _p90(best) if _p90(best) > 0 else math.inf
    numbers = (f"{_p90(ours):.2f} s vs {_p90(best):.2f} s ({best.router}): "
               f"{ratio:.2f}×")
    failed = _failed(ours)
    if failed:
        return Goal(goal, "MISS", f"{numbers}; {failed}")
    return Goal(goal, "PASS" if _p90(ours) <= factor * _p90(best) else "MISS", numbers)


def no_worse(ours: Cell | None, other: Cell | None, goal: str) -> Goal:
    """(b): ``ours``' TTFT p90 ≤ ``other``'s."""
    if ours is None or other is None:
        return Goal(goal, "n/a", "the headline did not run" if ours is None
                    else "the router compared did not run")
    numbers = f"{_p90(ours):.2f} s vs {_p90(other):.2f} s"
    failed = _failed(ours)
    if failed:
        return Goal(goal, "MISS", f"{numbers}; {failed}")
    return Goal(goal, "PASS" if _p90(ours) <= _p90(other) else "MISS", numbers)


def replica_hit_rate(one: Cell, many: Cell, replicas: int,
                     tolerance: float = REPLICA_HIT_TOLERANCE) -> Goal:
    """(c): ``many``'s hit rate within ``tolerance`` (relative) of ``one``'s."""
    goal = (f"(c) {many.router}: {many.workload} hit rate within {tolerance:.0%} of "
            f"×1's ({one.router})")
    if one.hit_rate <= 0:
        return Goal(goal, "n/a", f"{one.router} hit nothing on {one.workload}")
    change = (many.hit_rate - one.hit_rate) / one.hit_rate
    numbers = (f"{many.hit_rate:.1%} (×{replicas}) vs {one.hit_rate:.1%} (×1): "
               f"{change:+.1%} relative")
    failed = _failed(many) or _failed(one)
    if failed:
        return Goal(goal, "MISS", f"{numbers}; {failed}")
    return Goal(goal, "PASS" if abs(change) <= tolerance else "MISS", numbers)


def replica_pairs(results: Results) -> list[tuple[str, str]]:
    """The rows (c) compares, in run order: (×N row, its ×1 row) for every KV-event-fed
    EPP router that ran at ×1 and at more replicas, synced or not."""
    ran = {c.router for c in results.cells}
    singles = {info.base: name for name, info in results.routers.items()
               if info.replicas == 1 and info.kv_events and name in ran}
    return [(name, singles[info.base]) for name, info in results.routers.items()
            if info.replicas > 1 and info.kv_events and info.base in singles and name in ran]


def replica_goals(results: Results) -> list[Goal]:
    """(c) for every pair of :func:`replica_pairs`, on every workload (headline rate)
    whose ×1 hit anything."""
    out: list[Goal] = []
    for name, single in replica_pairs(results):
        for run in results.plan.workloads:
            rate = run.main
            one = find_cell(results, single, run.spec.name, rate)
            many = find_cell(results, name, run.spec.name, rate)
            if one is None or many is None or one.hit_rate <= 0:
                continue
            out.append(replica_hit_rate(one, many, results.routers[name].replicas))
    return out


def goals(results: Results) -> list[Goal]:
    """The goals table of a run."""
    lead = headline(results)
    planned = {w.spec.name for w in results.plan.workloads}
    out: list[Goal] = []
    for workload in (SHARED, MULTI):
        rate = main_rate(results, workload)
        ours = find_cell(results, lead, workload, rate) if lead else None
        peers = [c for c in results.cells
                 if c.kind == "peer" and c.workload == workload and c.rate == rate]
        out.append(_unless_skipped(versus_best_peer(ours, peers, label=workload),
                                   workload, planned))
    rate = main_rate(results, CONTROL)
    out.append(_unless_skipped(no_worse(
        find_cell(results, lead, CONTROL, rate) if lead else None,
        find_cell(results, ROUND_ROBIN, CONTROL, rate),
        f"(b) {CONTROL} TTFT p90 ≤ {ROUND_ROBIN}'s"), CONTROL, planned))
    replicas = replica_goals(results)
    if replicas:
        out += replicas
    elif any(info.replicas > 1 for info in results.routers.values()):
        out.append(Goal("(c) hit rate of ×N within 3% of ×1's", "n/a",
                        "no KV-event-fed EPP router ran at both ×1 and ×N on a workload "
                        "with hits"))
    rate = main_rate(results, SHARED)
    ours = find_cell(results, lead, SHARED, rate) if lead else None
    oracle = find_cell(results, ORACLE, SHARED, rate)
    goal = f"(d) {SHARED} hit rate ≥ {ORACLE_HIT_SHARE:.0%} of the oracle's"
    if SHARED not in planned:
        out.append(Goal(goal, "n/a", f"{SHARED} was not in this run"))
    elif ours is None or oracle is None or oracle.hit_rate <= 0:
        out.append(Goal(goal, "n/a", "the headline or the oracle did not run"))
    else:
        ok = ours.hit_rate >= ORACLE_HIT_SHARE * oracle.hit_rate
        out.append(Goal(goal, "PASS" if ok else "MISS",
                        f"{ours.hit_rate:.1%} vs {oracle.hit_rate:.1%} "
                        f"({ours.hit_rate / oracle.hit_rate:.0%} of it)"))
    return out


def _unless_skipped(goal: Goal, workload: str, planned: set[str]) -> Goal:
    """``goal``, or n/a saying so when ``workload`` was not in the run at all."""
    if workload in planned:
        return goal
    return Goal(goal.goal, "n/a", f"{workload} was not in this run")
