"""Per-cell figures (one router x one workload x one rate), the CPU accounting, and what
a router's own /metrics page says.

Latencies the client measured on the wall clock are converted to fleet time (x the time
scale), like the pods' own timings. The path through the router (client send -> pod
receives) and the router's CPU are reported on the wall clock: a router's own overhead
is not scaled, so inside the fleet-time TTFT it weighs ``time_scale`` times more than it
would in front of real GPUs.
"""

from __future__ import annotations

import math
import os
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.compare.client import Sample

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN if empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def process_tree_cpu_s(pids: Iterable[int]) -> float:
    """utime + stime (seconds) of ``pids`` and all their descendants, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # after the command: state(0) ppid(1) ... utime(11) stime(12)
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    wanted = set(pids)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    return sum(times.get(pid, 0.0) for pid in wanted)


@dataclass
class Cell:
    """The figures of one router on one workload at one request rate."""

    router: str
    kind: str
    workload: str
    rate: float  # requests per fleet second
    requests: int
    failed: int
    ttft_s: tuple[float, float, float]  # p50, p90, p99, fleet seconds
    e2e_s: tuple[float, float]  # p50, p90, fleet seconds
    output_tokens_per_s: float  # fleet time
    hit_rate: float  # cached / prompt tokens over answered requests
    path_ms: tuple[float, float]  # client -> pod, p50 and p99, wall ms
    router_cpu_ms_per_request: float  # wall CPU of the router processes
    router_cpu_cores: float  # their average load over the cell
    pods_cpu_ms_per_request: float
    wall_s: float
    errors: dict[str, int]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def summarize(samples: Sequence[Sample], *, router: str, kind: str, workload: str,
              rate: float, time_scale: float, router_cpu_s: float, pods_cpu_s: float,
              wall_s: float) -> Cell:
    ok = [s for s in samples if s.ok]
    ttft = [(s.first_token - s.sent) * time_scale for s in ok if s.first_token is not None]
    e2e = [(s.done - s.sent) * time_scale for s in ok if s.done is not None]
    path = [(s.received_at_pod - s.sent) * 1e3 for s in samples
            if s.received_at_pod is not None and s.sent]
    prompt = sum(s.prompt_tokens for s in ok)
    output = sum(s.completion_tokens for s in ok)
    if ok:
        span = (max(s.done for s in ok if s.done is not None)
                - min(s.sent for s in ok)) * time_scale
    else:
        span = 0.0
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            key = s.error or "unknown"
            errors[key] = errors.get(key, 0) + 1
    n = max(1, len(samples))
    return Cell(
        router=router, kind=kind, workload=workload, rate=rate, requests=len(samples),
        failed=len(samples) - len(ok),
        ttft_s=(percentile(ttft, 50), percentile(ttft, 90), percentile(ttft, 99)),
        e2e_s=(percentile(e2e, 50), percentile(e2e, 90)),
        output_tokens_per_s=output / span if span > 0 else 0.0,
        hit_rate=sum(s.cached_tokens for s in ok) / prompt if prompt else 0.0,
        path_ms=(percentile(path, 50), percentile(path, 99)),
        router_cpu_ms_per_request=router_cpu_s * 1e3 / n,
        router_cpu_cores=router_cpu_s / wall_s if wall_s > 0 else 0.0,
        pods_cpu_ms_per_request=pods_cpu_s * 1e3 / n,
        wall_s=wall_s,
        errors=errors,
    )


def ttft_values(samples: Sequence[Sample], time_scale: float) -> list[float]:
    """Every answered request's TTFT in fleet seconds (for the CDF plot)."""
    return sorted((s.first_token - s.sent) * time_scale for s in samples
                  if s.ok and s.first_token is not None)


def scrape(url: str, timeout: float = 5.0) -> str:
    """A /metrics page as text."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def metric_sum(metrics_text: str, name: str) -> float:
    """The sum of every series of the metric ``name`` in a Prometheus text page."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def picks_counted(metrics_text: str) -> float:
    """The sum of an EPP's ``epp_endpoint_picks_total`` series (its primary picks)."""
    return metric_sum(metrics_text, "epp_endpoint_picks_total")


def sync_messages(metrics_text: str) -> tuple[float, float]:
    """An EPP's replica-sync messages (every kind): sent, and received from peers."""
    return (metric_sum(metrics_text, "epp_replica_sync_messages_sent_total"),
            metric_sum(metrics_text, "epp_replica_sync_messages_received_total"))


def sync_state(metrics_text: str) -> tuple[bool, int]:
    """Whether an EPP's replica sync is connected, and how many peers it hears."""
    return (metric_sum(metrics_text, "epp_replica_sync_connected") >= 1,
            int(metric_sum(metrics_text, "epp_replica_sync_peers")))
