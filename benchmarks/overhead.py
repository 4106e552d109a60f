"""What the endpoint picker costs on the request path, in one run.

The same simulated pods (instant: no TTFT, no prefill time) reached several ways:

  (a) client -> Envoy, plain round-robin cluster (no ext_proc)            -> pods
  (b) client -> Envoy + ext_proc EPP (the shipped deploy/envoy/envoy.yaml) -> pods
  (c) client -> one pod directly (a floor; concurrency 1 only)
  (d) as (b), the EPP on the grpc.aio transport (--extproc-server grpc)
  (e) as (b), the EPP with --secure-serving=false behind an Envoy dialling cleartext h2c
  (f) as (b) with Envoy on one worker thread and the EPP run with --workers 1
  (g) as (f) with --workers 2 (both only when the installed epp has --workers)

(b) and (d) use TLS on the ext_proc port as the shipped config does, so (b) vs (e) is the
cost of TLS. In (f)/(g) Envoy has one thread so the EPP is the bottleneck, and its
ext_proc cluster allows few streams per HTTP/2 connection so Envoy opens enough
connections for two EPP workers to share.

Workloads: OpenAI ``/v1/completions`` bodies of 1 KB and 32 KB with ``max_tokens: 1``,
and streamed answers (SSE, 200 output tokens, usage chunk, ``[DONE]``) for a 1 KB
prompt, once with the pods writing the tokens back to back ("burst", which Envoy
coalesces into fewer ext_proc messages) and once paced a few ms apart like a decoding
engine ("paced", one ext_proc message per token). Each cell reports throughput, p50/p99
latency, errors (a streamed answer with the wrong number of SSE events is one), and CPU
per request and per streamed chunk of the EPP and of the Envoy in the path, from
``/proc/<pid>/stat`` before/after the window (the EPP's worker processes included).
Ratios to (a) in the same run are what carry over to other machines: the whole stack
shares the cores. Results go to stdout, ``benchmarks/results/overhead-<date>.md``, a
``.json`` of the cells beside it, and PNG plots when matplotlib is importable.

Run: ``make bench-overhead`` or ``.venv/bin/python benchmarks/overhead.py [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import REPO_ROOT, Process, free_port, wait_for_http
from epp.devtools.stack import LocalStack, StackPorts

from loadgen import LoadResult, run_closed_loop

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PLOT_SCRIPT = Path(__file__).resolve().parent / "overhead_plot.py"
# `make bench` builds this venv with matplotlib; plots are drawn with it when the main
# venv has no matplotlib (it is never added to the main install).
PEERS_PYTHON = REPO_ROOT / ".venv-peers" / "bin" / "python"
MODEL = "qwen3"
PODS = 4
# Instant pods: no TTFT and no prefill time, so everything measured is proxy and picker.
# 64 batch slots so a pod never queues, whichever way the EPP spreads 16 streams.
SIM_BASE_ARGS = ("--ttft-ms", "0", "--max-tokens", "1", "--tokenizer", "bytes",
                 "--prefill-tokens-per-s", "0", "--no-enable-prefix-caching",
                 "--max-num-seqs", "64")
EPP_ARGS = ("--log-level", "WARNING")
BODY_VARIANTS = 64  # distinct prompts per workload, cycled, so no two requests in a row match
STREAM_TOKENS = 200
STREAM_PROMPT_BYTES = 1024
# Events in one streamed answer: a chunk per token, the usage chunk, and [DONE].
STREAM_EXTRA_EVENTS = 2
# Decode step of the paced workload. At 5 ms each token leaves the pod on its own and
# reaches the EPP as its own ext_proc message (a probe at c=16 measured 204 messages per
# 200-token answer; 131 at 1 ms, 65 at 0 ms); a real engine's 10-50 ms would only make
# the windows longer.
PACED_ITL_MS = 5.0
REQUEST_TIMEOUT_S = 30
TARGET_CHECK_S = 30.0  # a restarted pod may take the EPP a few scrapes to trust again
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Workers cells: Envoy on one thread so the EPP is the bottleneck, and at most this many
# ext_proc streams per HTTP/2 connection, so 16 concurrent requests open 8 connections
# for the EPP's workers to share (the kernel spreads connections, not streams).
WORKERS_ENVOY_THREADS = 1
WORKERS_STREAMS_PER_CONNECTION = 2
WORKER_COUNTS = (1, 2)

# The goals, checked for (b) in the same run.
GOAL_EPP_US_PER_REQUEST = 250.0  # EPP CPU per request, 1 KB, c=16, non-streaming
GOAL_EPP_US_PER_CHUNK = 25.0  # EPP CPU per streamed chunk, c=16, 200-token answers
GOAL_ADDED_P50_MS_C1 = 0.5  # (b) p50 - (a) p50 at c=1, 1 KB and 32 KB
GOAL_RPS_RATIO_C16 = {1024: 0.5, 32768: 0.7}  # (b) req/s ÷ (a) req/s at c=16

ENVOY_RR = "a"
ENVOY_EPP = "b"
DIRECT = "c"
ENVOY_EPP_GRPC = "d"
ENVOY_EPP_CLEARTEXT = "e"
WORKERS_1 = "f"
WORKERS_2 = "g"
SCENARIO_LABELS = {
    ENVOY_RR: "(a) Envoy round-robin",
    ENVOY_EPP: "(b) Envoy + EPP",
    DIRECT: "(c) direct to pod",
    ENVOY_EPP_GRPC: "(d) Envoy + EPP on grpc.aio",
    ENVOY_EPP_CLEARTEXT: "(e) Envoy + EPP, cleartext h2c",
    WORKERS_1: "(f) Envoy ×1 thread + EPP, 1 worker",
    WORKERS_2: "(g) Envoy ×1 thread + EPP, 2 workers",
}
EPP_SCENARIOS = (ENVOY_EPP, ENVOY_EPP_GRPC, ENVOY_EPP_CLEARTEXT, WORKERS_1, WORKERS_2)
WORKERS_SCENARIOS = {WORKERS_1: 1, WORKERS_2: 2}


# -- workloads -----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One kind of request: its bodies and how the pods answer it."""

    key: str
    label: str
    size: int  # request body bytes
    stream_tokens: int  # output tokens streamed as SSE; 0 = one JSON answer of 1 token
    itl_ms: float  # the pods' decode step while this workload runs
    only_highest_concurrency: bool = False
    bodies: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def streaming(self) -> bool:
        """Whether the answers are SSE streams."""
        return self.stream_tokens > 0

    @property
    def expect_events(self) -> int | None:
        """SSE events every streamed answer must carry."""
        return self.stream_tokens + STREAM_EXTRA_EVENTS if self.streaming else None


def make_bodies(size: int, max_tokens: int = 1, stream: bool = False,
                count: int = BODY_VARIANTS, seed: int = 1) -> list[bytes]:
    """``count`` distinct ``/v1/completions`` JSON bodies of exactly ``size`` bytes."""
    fields: dict[str, Any] = {"model": MODEL, "prompt": "", "max_tokens": max_tokens}
    if stream:
        fields |= {"stream": True, "stream_options": {"include_usage": True}}
    skeleton = json.dumps(fields, separators=(",", ":"))
    room = size - len(skeleton)
    if room < 16:
        raise ValueError(f"body size {size} is too small (the JSON skeleton takes "
                         f"{len(skeleton)} bytes)")
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    bodies = []
    for i in range(count):
        words = [f"request {i}:"]
        length = len(words[0])
        while length < room:
            word = "".join(rng.choices(alphabet, k=rng.randint(2, 9)))
            words.append(word)
            length += len(word) + 1
        body = json.dumps(fields | {"prompt": " ".join(words)[:room]},
                          separators=(",", ":")).encode()
        assert len(body) == size, (len(body), size)
        bodies.append(body)
    return bodies


def size_label(size: int) -> str:
    """1024 -> "1 KB"; sizes that are not whole KiB stay in bytes."""
    return f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"


def build_workloads(sizes: Sequence[int], stream_tokens: int,
                    paced_itl_ms: float) -> list[Workload]:
    """Non-streaming bodies per size, then the burst and paced streams (if any)."""
    out = [Workload(f"json-{size}", size_label(size), size, 0, 0.0,
                    bodies=tuple(make_bodies(size))) for size in sizes]
    if stream_tokens > 0:
        bodies = tuple(make_bodies(STREAM_PROMPT_BYTES, stream_tokens, stream=True))
        out.append(Workload("sse-burst", f"SSE {stream_tokens} tok, burst",
                            STREAM_PROMPT_BYTES, stream_tokens, 0.0, bodies=bodies))
        if paced_itl_ms > 0:
            out.append(Workload("sse-paced", f"SSE {stream_tokens} tok, paced "
                                f"{paced_itl_ms:g} ms", STREAM_PROMPT_BYTES, stream_tokens,
                                paced_itl_ms, only_highest_concurrency=True, bodies=bodies))
    return out


def sim_args(itl_ms: float) -> list[str]:
    """The pods' flags for one phase of the run."""
    return [*SIM_BASE_ARGS, "--itl-ms", f"{itl_ms:g}"]


# -- CPU accounting ------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    # Fields after "(comm)": state is field 3, utime field 14, stime field 15.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (an EPP's worker processes)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            continue  # exited meanwhile
    return found


def system_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return total - idle, total


def own_cpu_s() -> float:
    """CPU seconds of this process (the load generator runs in it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU counters at one instant: per process of each group, the client, the box."""

    per_pid: dict[str, dict[int, float]]
    client_s: float
    busy_ticks: int
    total_ticks: int
    at: float

    @classmethod
    def take(cls, groups: Mapping[str, Sequence[int]]) -> CpuSnapshot:
        """Read every counter now (each group's processes and their descendants)."""
        busy, total = system_busy_ticks()
        per_pid: dict[str, dict[int, float]] = {}
        for name, roots in groups.items():
            counters = per_pid[name] = {}
            for root in roots:
                for pid in process_tree(root):
                    try:
                        counters[pid] = process_cpu_s(pid)
                    except OSError:
                        pass  # exited between listing and reading
        return cls(per_pid, own_cpu_s(), busy, total, time.monotonic())


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds spent during one window, per group and per process, and box load."""

    seconds: dict[str, float]  # group name -> CPU s; "client" included
    per_pid: dict[str, dict[int, float]]
    busy_pct: float  # share of all cores that was busy during the window
    wall_s: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
        """The difference of two snapshots (a process that started meanwhile counts
        from zero; one that exited meanwhile is lost)."""
        per_pid = {name: {pid: value - before.per_pid.get(name, {}).get(pid, 0.0)
                          for pid, value in counters.items()}
                   for name, counters in after.per_pid.items()}
        seconds = {name: sum(values.values()) for name, values in per_pid.items()}
        seconds["client"] = after.client_s - before.client_s
        total = after.total_ticks - before.total_ticks
        busy = (after.busy_ticks - before.busy_ticks) / total * 100 if total else math.nan
        return cls(seconds, per_pid, busy, after.at - before.at)


# -- what Envoy and the EPP say about a window ----------------------------------------

_ENVOY_STATS_FILTER = (r"ext_proc\.(stream_msgs_sent|streams_started)$"
                       r"|endpoint_picker\.upstream_cx_(total|active)$")
# The supervisor of `epp --workers N` counts each worker's routed requests here.
_WORKER_REQUESTS = re.compile(r'^epp_worker_requests_total\{[^}]*\bworker="([^"]*)"[^}]*\}'
                              r"\s+(\S+)$", re.MULTILINE)


def envoy_stats(admin_port: int) -> dict[str, int]:
    """Envoy's ext_proc message counters and its connections to the EPP."""
    url = (f"http://127.0.0.1:{admin_port}/stats?filter="
           f"{urllib.parse.quote(_ENVOY_STATS_FILTER)}")
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            stats[name.rsplit(".", 1)[-1]] = int(value)  # the filter leaves one of each
    return stats


def worker_requests(metrics_port: int) -> dict[str, float]:
    """Requests routed so far per worker, from the merged /metrics of ``epp --workers N``
    (empty for a single process, which has no supervisor)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                timeout=5) as resp:
        text = resp.read().decode()
    per_worker: dict[str, float] = defaultdict(float)
    for worker, value in _WORKER_REQUESTS.findall(text):
        per_worker[worker] += float(value)
    return dict(per_worker)


def epp_accepts_workers() -> bool:
    """Whether the installed ``epp`` has a ``--workers`` flag."""
    done = subprocess.run([sys.executable, "-m", "epp", "--help"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO_ROOT)
    return re.search(r"--workers\b", done.stdout) is not None


# -- processes -----------------------------------------------------------------------


def start_round_robin_envoy(work_dir: Path, listen_port: int, admin_port: int,
                            pod_ports: Sequence[int], concurrency: int) -> Process:
    """Start the baseline Envoy (same listener, no ext_proc, round-robin over the pods)."""
    config = envoy_cfg.write_config(
        envoy_cfg.round_robin_config(listen_port, admin_port,
                                     [("127.0.0.1", port) for port in pod_ports]),
        work_dir / "envoy-rr.yaml")
    proc = Process("envoy-rr", [
        envoy_cfg.envoy_binary(), "-c", str(config), "--disable-hot-restart",
        "--concurrency", str(concurrency), "--log-level", "warn",
    ], work_dir)
    wait_for_http(f"http://127.0.0.1:{admin_port}/ready", expect=b"LIVE")
    return proc


def start_tuned_envoy(stack: LocalStack, tune: Callable[[dict[str, Any]], None],
                      concurrency: int) -> Process:
    """Start an Envoy for ``stack`` whose picker cluster's HTTP protocol options ``tune``
    changes in place, and wait until it is live."""
    p = stack.ports
    config = envoy_cfg.epp_config(p.envoy, p.epp_grpc, p.envoy_admin, stack.epp_tls)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "endpoint_picker":
            tune(cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"])
    path = envoy_cfg.write_config(config, stack.work_dir / "envoy.yaml")
    envoy = Process("envoy", [
        envoy_cfg.envoy_binary(), "-c", str(path), "--disable-hot-restart",
        "--concurrency", str(concurrency), "--log-level", "warn",
    ], stack.work_dir)
    try:
        wait_for_http(f"http://127.0.0.1:{p.envoy_admin}/ready", expect=b"LIVE")
    except BaseException:
        envoy.stop()
        raise
    return envoy


def start_workers_envoy(stack: LocalStack) -> None:
    """Start the stack's Envoy on one worker thread, with few ext_proc streams per HTTP/2
    connection so that several connections reach the EPP's workers."""
    def few_streams(options: dict[str, Any]) -> None:
        options["explicit_http_config"]["http2_protocol_options"] = {
            "max_concurrent_streams": WORKERS_STREAMS_PER_CONNECTION}

    stack.envoy = start_tuned_envoy(stack, few_streams, WORKERS_ENVOY_THREADS)


def restart_sims(stack: LocalStack, args: Sequence[str]) -> None:
    """Stop the pods and start them again, on the same ports, with ``args``."""
    for proc in stack.sims:
        proc.stop()
    stack.sims = []
    stack.sim_args = list(args)
    stack.start_sims()


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- the run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One way to reach the pods."""

    key: str  # a scenario key
    url: str
    envoy_group: str | None  # the CPU group of the Envoy in the path, if any
    envoy_admin: int | None
    epp_group: str = "epp-b"  # the CPU group of the EPP in the path (or (b)'s, idle)
    epp_metrics: int | None = None


@dataclass(frozen=True)
class Cell:
    """One measured window."""

    scenario: str
    workload: Workload
    concurrency: int
    load: LoadResult
    cpu: CpuUsage
    envoy_group: str | None
    epp_group: str
    extproc_msgs_per_request: float  # NaN without ext_proc
    epp_connections: int | None  # Envoy's open connections to the EPP at the end
    worker_requests: dict[str, float]  # per worker label, when /metrics has one

    def _us(self, group: str | None, per: float) -> float:
        if group is None or per <= 0:
            return math.nan
        return self.cpu.seconds[group] * 1e6 / per

    @property
    def chunks(self) -> int:
        """Streamed chunks in the window: answers × tokens per answer."""
        return self.load.requests * self.workload.stream_tokens

    @property
    def epp_us(self) -> float:
        """EPP CPU µs per request (its idle cost when the EPP is not in the path)."""
        return self._us(self.epp_group, self.load.requests)

    @property
    def envoy_us(self) -> float:
        """CPU µs per request of the Envoy in the path (NaN when there is none)."""
        return self._us(self.envoy_group, self.load.requests)

    @property
    def epp_us_chunk(self) -> float:
        """EPP CPU µs per streamed chunk (NaN for non-streaming cells)."""
        return self._us(self.epp_group, self.chunks) if self.workload.streaming else math.nan

    @property
    def envoy_us_chunk(self) -> float:
        """Envoy CPU µs per streamed chunk (NaN for non-streaming cells)."""
        return (self._us(self.envoy_group, self.chunks) if self.workload.streaming
                else math.nan)

    def per_request_us(self, group: str) -> float:
        """CPU µs per request of any group (client, sims, ...)."""
        return self._us(group, self.load.requests)

    def epp_process_shares(self) -> list[float]:
        """Share (%) of the EPP's CPU each of its processes used, largest first; only
        processes that used at least 1% of the group's CPU."""
        values = self.cpu.per_pid.get(self.epp_group, {}).values()
        total = sum(values)
        if total <= 0:
            return []
        return sorted((v / total * 100 for v in values if v / total >= 0.01), reverse=True)


def check_target(url: str, body: bytes, timeout_s: float = TARGET_CHECK_S) -> None:
    """A request must come back 2xx from a sim pod, or the run is pointless.

    Retries for ``timeout_s``: the EPP may still be syncing its pool when it starts.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                resp.read()
                if "x-sim-endpoint" in resp.headers:
                    return
                problem = f"status {resp.status} without x-sim-endpoint: {dict(resp.headers)}"
        except OSError as exc:  # urllib's HTTPError (non-2xx) is an OSError too
            problem = str(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: no 2xx answer from a pod: {problem}")
        time.sleep(0.2)


def plan_cells(workloads: Sequence[Workload], concurrencies: Sequence[int],
               scenarios: Sequence[str]) -> list[tuple[Workload, int, str]]:
    """Every (workload, concurrency, scenario) cell, in run order: scenarios interleaved
    per (workload, concurrency) so drift on the box hits them alike."""
    highest = max(concurrencies)
    cells = []
    for workload in workloads:
        for conc in concurrencies:
            if workload.only_highest_concurrency and conc != highest:
                continue
            for key in scenarios:
                if key == DIRECT and (conc != 1 or workload.only_highest_concurrency):
                    continue
                if key in WORKERS_SCENARIOS and conc != highest:
                    continue
                cells.append((workload, conc, key))
    return cells


def measure_cell(target: Target, workload: Workload, conc: int,
                 groups: Mapping[str, Sequence[int]], warmup_s: float,
                 duration_s: float) -> Cell:
    """Warm up, then one measured window with every counter read before and after."""
    def load(seconds: float) -> LoadResult:
        return run_closed_loop(target.url, workload.bodies, conc, seconds, REQUEST_TIMEOUT_S,
                               expect_events=workload.expect_events)

    if warmup_s > 0:
        load(warmup_s)
    stats_before = envoy_stats(target.envoy_admin) if target.envoy_admin else {}
    workers_before = worker_requests(target.epp_metrics) if target.epp_metrics else {}
    before = CpuSnapshot.take(groups)
    result = load(duration_s)
    after = CpuSnapshot.take(groups)
    stats_after = envoy_stats(target.envoy_admin) if target.envoy_admin else {}
    workers_after = worker_requests(target.epp_metrics) if target.epp_metrics else {}
    streams = stats_after.get("streams_started", 0) - stats_before.get("streams_started", 0)
    msgs = stats_after.get("stream_msgs_sent", 0) - stats_before.get("stream_msgs_sent", 0)
    return Cell(
        target.key, workload, conc, result, CpuUsage.between(before, after),
        target.envoy_group, target.epp_group,
        msgs / streams if streams else math.nan,
        stats_after.get("upstream_cx_active") if target.epp_metrics else None,
        {k: v - workers_before.get(k, 0.0) for k, v in workers_after.items()})


@dataclass
class Bench:
    """Every process of the run, started once; the pods restart between phases."""

    work_dir: Path
    envoy_concurrency: int
    with_workers: bool
    stack: LocalStack | None = None
    extra: dict[str, LocalStack] = field(default_factory=dict)
    rr_envoy: Process | None = None
    targets: dict[str, Target] = field(default_factory=dict)

    def start(self, first_itl_ms: float) -> None:
        """Pods, the (b) stack, the round-robin Envoy, then the other EPP stacks."""
        ports = StackPorts.free(PODS)
        stack = self.stack = LocalStack(self.work_dir, ports, sim_args=sim_args(first_itl_ms),
                                        epp_args=EPP_ARGS,
                                        envoy_concurrency=self.envoy_concurrency)
        stack.start_sims()
        stack.start_epp()
        stack.start_envoy()
        rr_port, rr_admin = free_port(), free_port()
        self.rr_envoy = start_round_robin_envoy(self.work_dir, rr_port, rr_admin, ports.sims,
                                                self.envoy_concurrency)
        assert stack.epp is not None and stack.envoy is not None
        path = "/v1/completions"
        self.targets = {
            ENVOY_RR: Target(ENVOY_RR, f"http://127.0.0.1:{rr_port}{path}", "envoy-rr", None),
            ENVOY_EPP: Target(ENVOY_EPP, f"{stack.url}{path}", "envoy-b",
                              ports.envoy_admin, "epp-b", ports.epp_metrics),
            DIRECT: Target(DIRECT, f"http://{stack.sim_addresses[0]}{path}", None, None),
        }
        extras: list[tuple[str, list[str], envoy_cfg.EppTls, bool]] = [
            (ENVOY_EPP_GRPC, ["--extproc-server", "grpc"], envoy_cfg.KGATEWAY_TLS, False),
            (ENVOY_EPP_CLEARTEXT, ["--secure-serving=false"], envoy_cfg.CLEARTEXT, False),
        ]
        if self.with_workers:
            extras += [(key, ["--workers", str(n)], envoy_cfg.KGATEWAY_TLS, True)
                       for key, n in WORKERS_SCENARIOS.items()]
        for key, epp_flags, tls, workers in extras:
            extra = LocalStack(self.work_dir / key, StackPorts.free(0), epp_args=EPP_ARGS,
                               envoy_concurrency=self.envoy_concurrency, epp_tls=tls)
            extra.endpoints_file = stack.endpoints_file
            self.extra[key] = extra
            extra.start_epp(extra_args=epp_flags)
            if workers:
                start_workers_envoy(extra)
            else:
                extra.start_envoy()
            self.targets[key] = Target(key, f"{extra.url}{path}", f"envoy-{key}",
                                       extra.ports.envoy_admin, f"epp-{key}",
                                       extra.ports.epp_metrics)

    def groups(self) -> dict[str, list[int]]:
        """CPU groups: each EPP (with its workers), each Envoy, all pods."""
        stack = self.stack
        assert stack is not None and stack.epp is not None and stack.envoy is not None
        assert self.rr_envoy is not None
        out = {"epp-b": [stack.epp.pid], "envoy-b": [stack.envoy.pid],
               "envoy-rr": [self.rr_envoy.pid], "sims": [sim.pid for sim in stack.sims]}
        for key, extra in self.extra.items():
            assert extra.epp is not None and extra.envoy is not None
            out[f"epp-{key}"] = [extra.epp.pid]
            out[f"envoy-{key}"] = [extra.envoy.pid]
        return out

    def check(self, workload: Workload, scenarios: Sequence[str]) -> None:
        """Every target must answer ``workload`` from a pod."""
        for key in scenarios:
            check_target(self.targets[key].url, workload.bodies[0])

    def processes(self) -> list[Process]:
        """Every process, for the tails printed on failure."""
        procs: list[Process | None] = [self.rr_envoy]
        for stack in [self.stack, *self.extra.values()]:
            if stack is not None:
                procs += [stack.envoy, stack.epp, *stack.sims]
        return [p for p in procs if p is not None]

    def stop(self) -> None:
        """Stop everything (each Envoy before its EPP)."""
        if self.rr_envoy is not None:
            self.rr_envoy.stop()
        for extra in self.extra.values():
            extra.stop()
        if self.stack is not None:
            self.stack.stop()


@dataclass(frozen=True)
class Measured:
    """What the run produced: the cells and the idle cost of each process group."""

    cells: list[Cell]
    idle_ms_per_s: dict[str, float]


def measure(args: argparse.Namespace, workloads: Sequence[Workload],
            scenarios: Sequence[str], work_dir: Path) -> Measured:
    """Start everything, run every cell phase by phase (pods restarted when the decode
    step changes), stop everything."""
    bench = Bench(work_dir, args.envoy_concurrency,
                  any(key in WORKERS_SCENARIOS for key in scenarios))
    plan = plan_cells(workloads, args.concurrency, scenarios)
    cells: list[Cell] = []
    try:
        bench.start(workloads[0].itl_ms)
        for workload in workloads:
            if workload.itl_ms == workloads[0].itl_ms:
                bench.check(workload, scenarios)
        time.sleep(1.0)  # let start-up settle before the idle window
        idle_before = CpuSnapshot.take(bench.groups())
        time.sleep(args.idle)
        idle = CpuUsage.between(idle_before, CpuSnapshot.take(bench.groups()))
        idle_ms = {name: s * 1e3 / idle.wall_s for name, s in idle.seconds.items()
                   if name != "client"}
        itl_ms = workloads[0].itl_ms
        for i, (workload, conc, key) in enumerate(plan, 1):
            if workload.itl_ms != itl_ms:
                print(f"restarting the pods with --itl-ms {workload.itl_ms:g} ...",
                      file=sys.stderr, flush=True)
                assert bench.stack is not None
                restart_sims(bench.stack, sim_args(workload.itl_ms))
                itl_ms = workload.itl_ms
                bench.check(workload, scenarios)
            label = f"[{i}/{len(plan)}] {SCENARIO_LABELS[key]}, {workload.label}, c={conc}"
            print(f"{label}: warm-up {args.warmup:g}s, measure {args.duration:g}s ...",
                  file=sys.stderr, flush=True)
            cell = measure_cell(bench.targets[key], workload, conc, bench.groups(),
                                args.warmup, args.duration)
            load = cell.load
            print(f"{label}: {load.rps:.0f} req/s, p50 {load.p50_ms:.3f} ms, "
                  f"p99 {load.p99_ms:.3f} ms, errors {load.errors}", file=sys.stderr,
                  flush=True)
            cells.append(cell)
        return Measured(cells, idle_ms)
    except Exception:
        for proc in bench.processes():
            tail = proc.tail(10)
            if tail:
                print(f"--- last lines of {proc.name} ---\n{tail}", file=sys.stderr)
        raise
    finally:
        bench.stop()


# -- the report ----------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def find(cells: Sequence[Cell], scenario: str, workload_key: str, conc: int) -> Cell | None:
    """The cell of (scenario, workload, concurrency), if it ran."""
    for cell in cells:
        if (cell.scenario, cell.workload.key, cell.concurrency) == (scenario, workload_key,
                                                                   conc):
            return cell
    return None


def rps_ratio(x: Cell, base: Cell) -> float:
    """Throughput of ``x`` over that of ``base``."""
    return x.load.rps / base.load.rps if base.load.rps else math.nan


def added_cpu_us(x: Cell, rr: Cell) -> float:
    """CPU per request the EPP path adds: EPP + Envoy in ``x`` − Envoy in (a)."""
    return x.epp_us + x.envoy_us - rr.envoy_us


def added_cpu_us_chunk(x: Cell, rr: Cell) -> float:
    """The same per streamed chunk."""
    return x.epp_us_chunk + x.envoy_us_chunk - rr.envoy_us_chunk


@dataclass(frozen=True)
class RunInfo:
    """Everything the report header says about the run."""

    date: str
    nproc: int
    cpu: str
    envoy: str
    envoy_concurrency: int
    warmup_s: float
    duration_s: float
    idle_s: float
    workers: str  # why the workers cells ran or did not
    plots: str  # where the plots are, or why there are none


def _pairs(cells: Sequence[Cell], scenario: str, base: str
           ) -> list[tuple[Workload, int, Cell, Cell]]:
    out = []
    seen = set()
    for cell in cells:
        key = (cell.workload.key, cell.concurrency)
        if key in seen:
            continue
        seen.add(key)
        x, b = find(cells, scenario, *key), find(cells, base, *key)
        if x is not None and b is not None:
            out.append((cell.workload, cell.concurrency, x, b))
    return out


def render(info: RunInfo, measured: Measured, workloads: Sequence[Workload]) -> str:
    """The markdown report."""
    cells = measured.cells
    sse = [w for w in workloads if w.streaming]
    tokens = sse[0].stream_tokens if sse else STREAM_TOKENS
    out = [
        f"# EPP overhead — {info.date}",
        "",
        f"- machine: nproc = {info.nproc} ({info.cpu}); the load generator, every Envoy, "
        f"the EPPs and the {PODS} sim pods share these cores, so absolute numbers are a "
        "floor and the ratios to (a) are the point",
        "- load generator: benchmarks/loadgen.py (uvloop, raw HTTP/1.1, closed loop, "
        "keep-alive connections; every streamed answer's SSE events counted)",
        f"- Envoy {info.envoy}, --concurrency {info.envoy_concurrency} in (a)–(e); EPP "
        f"{' '.join(EPP_ARGS)}; pods: {PODS} × epp-sim {' '.join(SIM_BASE_ARGS)} "
        "--itl-ms 0 (paced workload: --itl-ms as labelled)",
        f"- workloads: OpenAI /v1/completions JSON, model {MODEL}, {BODY_VARIANTS} distinct "
        "prompts each, cycled; non-streaming bodies ask max_tokens 1; streamed ones ask "
        f"max_tokens {tokens}, stream with include_usage, {size_label(STREAM_PROMPT_BYTES)}"
        f" body: {tokens} token chunks + usage + [DONE] per answer",
        f"- windows: warm-up {info.warmup_s:g} s, measured {info.duration_s:g} s per cell, "
        "cells run one after another on the same processes",
        "- CPU: utime+stime from /proc/<pid>/stat (EPP worker processes included) over the "
        "window ÷ completed requests (µs/req), or ÷ (answers × "
        f"{tokens}) (µs/chunk); the EPP column in (a)/(c) is the (b) EPP's idle "
        "cost; ext_proc msgs/req = Envoy's stream_msgs_sent ÷ streams_started",
        f"- workers cells: {info.workers}",
        "",
        "## Results",
        "",
        "| scenario | workload | c | req/s | p50 ms | p99 ms | errors | EPP µs/req "
        "| Envoy µs/req | EPP µs/chunk | Envoy µs/chunk | ext_proc msgs/req |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in cells:
        load = cell.load
        out.append(
            f"| {SCENARIO_LABELS[cell.scenario]} | {cell.workload.label} | "
            f"{cell.concurrency} | {_f(load.rps, 0)} | {_f(load.p50_ms, 3)} | "
            f"{_f(load.p99_ms, 3)} | {load.errors} | {_f(cell.epp_us, 0)} | "
            f"{_f(cell.envoy_us, 0)} | {_f(cell.epp_us_chunk)} | {_f(cell.envoy_us_chunk)} | "
            f"{_f(cell.extproc_msgs_per_request)} |")
    if sse:
        out += ["", _streams_line(cells, sse[0])]

    out += ["", "## Envoy + EPP vs plain Envoy (a), same run", "",
            "CPU added = EPP + Envoy in the scenario − Envoy in (a). (f)/(g) run Envoy on "
            f"{WORKERS_ENVOY_THREADS} thread against (a)'s {info.envoy_concurrency}. In the "
            "paced rows the pods' decode step sets the throughput: read the CPU columns.", "",
            "| scenario | workload | c | req/s ÷ (a) | p50 added ms | p99 added ms "
            "| CPU added µs/req | CPU added µs/chunk |",
            "|---|---|--:|--:|--:|--:|--:|--:|"]
    for key in EPP_SCENARIOS:
        for workload, conc, x, a in _pairs(cells, key, ENVOY_RR):
            out.append(
                f"| {SCENARIO_LABELS[key]} | {workload.label} | {conc} | "
                f"{_f(rps_ratio(x, a), 2)} | {_f(x.load.p50_ms - a.load.p50_ms, 3)} | "
                f"{_f(x.load.p99_ms - a.load.p99_ms, 3)} | {_f(added_cpu_us(x, a), 0)} | "
                f"{_f(added_cpu_us_chunk(x, a))} |")

    out += ["", "## Transport: lean HTTP/2 (b) vs grpc.aio (d), same run", "",
            "| workload | c | (b)/(d) req/s | (b) EPP µs/req | (d) EPP µs/req | (b) EPP µs/chunk "
            "| (d) EPP µs/chunk | p50 (b) ms | p50 (d) ms |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for workload, conc, b, d in _pairs(cells, ENVOY_EPP, ENVOY_EPP_GRPC):
        out.append(f"| {workload.label} | {conc} | {_f(rps_ratio(b, d), 2)} | "
                   f"{_f(b.epp_us, 0)} | {_f(d.epp_us, 0)} | {_f(b.epp_us_chunk)} | "
                   f"{_f(d.epp_us_chunk)} | {_f(b.load.p50_ms, 3)} | {_f(d.load.p50_ms, 3)} |")

    out += ["", "## TLS on the ext_proc port: (b) TLS vs (e) cleartext h2c, same run", "",
            "| workload | c | (b)/(e) req/s | EPP µs/req TLS | EPP µs/req clear "
            "| Envoy µs/req TLS | Envoy µs/req clear | TLS CPU added µs/req (EPP + Envoy) "
            "| TLS CPU added µs/chunk |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for workload, conc, b, e in _pairs(cells, ENVOY_EPP, ENVOY_EPP_CLEARTEXT):
        added = (b.epp_us + b.envoy_us) - (e.epp_us + e.envoy_us)
        added_chunk = (b.epp_us_chunk + b.envoy_us_chunk) - (e.epp_us_chunk + e.envoy_us_chunk)
        out.append(f"| {workload.label} | {conc} | {_f(rps_ratio(b, e), 2)} | "
                   f"{_f(b.epp_us, 0)} | {_f(e.epp_us, 0)} | {_f(b.envoy_us, 0)} | "
                   f"{_f(e.envoy_us, 0)} | {_f(added, 0)} | {_f(added_chunk)} |")

    out += ["", "## EPP workers: (f) 1 worker vs (g) 2 workers, Envoy on one thread", ""]
    out += _workers_section(cells, info)

    out += ["", "## Goals", ""]
    out += [f"- {line}" for line in goal_lines(cells, workloads, measured.idle_ms_per_s)]

    out += ["", "## Where the CPU goes (µs per request)", "",
            "| scenario | workload | c | client | Envoy | EPP | sims (all) | box busy % |",
            "|---|---|--:|--:|--:|--:|--:|--:|"]
    for cell in cells:
        out.append(
            f"| {SCENARIO_LABELS[cell.scenario]} | {cell.workload.label} | "
            f"{cell.concurrency} | {_f(cell.per_request_us('client'), 0)} | "
            f"{_f(cell.envoy_us, 0)} | {_f(cell.epp_us, 0)} | "
            f"{_f(cell.per_request_us('sims'), 0)} | {_f(cell.cpu.busy_pct, 0)} |")
    idle = ", ".join(f"{name} {value:.1f}" for name, value in sorted(
        measured.idle_ms_per_s.items()))
    out += ["", f"Idle cost with no traffic ({info.idle_s:g} s after start-up), CPU ms per "
            f"second: {idle}.", "", "## Plots", "", info.plots, ""]
    return "\n".join(out)


def _streams_line(cells: Sequence[Cell], workload: Workload) -> str:
    streamed = [c for c in cells if c.workload.streaming]
    answers = sum(c.load.requests - c.load.non_2xx for c in streamed)
    short = sum(c.load.short_streams for c in streamed)
    lows = [c.load.events_min for c in streamed if c.load.events_min is not None]
    highs = [c.load.events_max for c in streamed if c.load.events_max is not None]
    expect = workload.expect_events
    span = f"{min(lows)}..{max(highs)}" if lows else "none"
    verdict = ("every one carried exactly" if short == 0 and lows
               else f"{short} did not carry (counted as errors)")
    return (f"Streamed answers: the client counted the SSE events of all {answers:,} 2xx "
            f"streamed answers (seen per answer: {span}); {verdict} {expect} "
            f"({workload.stream_tokens} token chunks + usage + [DONE]).")


def _workers_section(cells: Sequence[Cell], info: RunInfo) -> list[str]:
    pairs = _pairs(cells, WORKERS_2, WORKERS_1)
    if not pairs:
        return [f"Not available: {info.workers}."]
    out = [f"Envoy --concurrency {WORKERS_ENVOY_THREADS}, at most "
           f"{WORKERS_STREAMS_PER_CONNECTION} ext_proc streams per HTTP/2 connection. "
           "EPP CPU split = share of the EPP's CPU per process (its workers and any "
           "parent), largest first; requests per worker from the supervisor's "
           "epp_worker_requests_total, with the busiest worker's share (50% is even).", "",
           "| workload | c | (f) req/s | (g) req/s | (g)/(f) | (f) EPP µs/req | (g) EPP µs/req "
           "| (g) EPP µs/chunk | (g) EPP CPU split % | (g) requests per worker "
           "| (g) connections to EPP |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for workload, conc, g, f in pairs:
        split = " / ".join(f"{share:.0f}" for share in g.epp_process_shares()) or "—"
        spread = _spread(g.worker_requests)
        out.append(f"| {workload.label} | {conc} | {_f(f.load.rps, 0)} | {_f(g.load.rps, 0)} "
                   f"| {_f(rps_ratio(g, f), 2)} | {_f(f.epp_us, 0)} | {_f(g.epp_us, 0)} | "
                   f"{_f(g.epp_us_chunk)} | {split} | {spread} | "
                   f"{g.epp_connections if g.epp_connections is not None else '—'} |")
    return out


def _spread(per_worker: Mapping[str, float]) -> str:
    total = sum(per_worker.values())
    if total <= 0:
        return "not in /metrics"
    counts = " / ".join(f"{per_worker[w]:,.0f}" for w in sorted(per_worker, key=_worker_order))
    return f"{counts} (busiest {max(per_worker.values()) / total * 100:.0f}%)"


def _worker_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def goal_lines(cells: Sequence[Cell], workloads: Sequence[Workload],
               idle_ms_per_s: Mapping[str, float]) -> list[str]:
    """One PASS/MISS line per goal of the issue, for (b) (or "not measured")."""
    lines = []

    def line(ok: bool, name: str, figure: str) -> None:
        lines.append(f"{'PASS' if ok else 'MISS'} {name}: {figure}")

    b = find(cells, ENVOY_EPP, "json-1024", 16)
    name = f"EPP CPU per request, 1 KB, c=16 (non-streaming): ≤ {GOAL_EPP_US_PER_REQUEST:g} µs"
    if b is None:
        lines.append(f"{name}: not measured")
    else:
        line(b.epp_us <= GOAL_EPP_US_PER_REQUEST, name, f"{b.epp_us:,.0f} µs")
    streams = [w for w in workloads if w.streaming]
    for workload in streams:
        b = find(cells, ENVOY_EPP, workload.key, 16)
        name = (f"EPP CPU per streamed chunk, c=16, {workload.label}: "
                f"≤ {GOAL_EPP_US_PER_CHUNK:g} µs")
        if b is None:
            lines.append(f"{name}: not measured")
        else:
            # The EPP's background work (scrapes, ...) over the window, per chunk.
            idle_us = (idle_ms_per_s.get(b.epp_group, math.nan) * 1e3 * b.cpu.wall_s
                       / b.chunks if b.chunks else math.nan)
            line(b.epp_us_chunk <= GOAL_EPP_US_PER_CHUNK and b.load.errors == 0, name,
                 f"{b.epp_us_chunk:.1f} µs, of which about {idle_us:.1f} µs is the EPP's idle "
                 f"background cost spread over the chunks ({b.extproc_msgs_per_request:.0f} "
                 f"ext_proc messages per answer, {b.load.errors} errors)")
    if not streams:
        lines.append(f"EPP CPU per streamed chunk, c=16: ≤ {GOAL_EPP_US_PER_CHUNK:g} µs: "
                     "not measured")
    for size in (1024, 32768):
        a, b = find(cells, ENVOY_RR, f"json-{size}", 1), find(cells, ENVOY_EPP,
                                                               f"json-{size}", 1)
        name = f"added p50 over (a) at c=1, {size_label(size)}: ≤ {GOAL_ADDED_P50_MS_C1} ms"
        if a is None or b is None:
            lines.append(f"{name}: not measured")
            continue
        added = b.load.p50_ms - a.load.p50_ms
        line(added <= GOAL_ADDED_P50_MS_C1, name,
             f"{added:.3f} ms ({a.load.p50_ms:.3f} → {b.load.p50_ms:.3f})")
    for size, goal in GOAL_RPS_RATIO_C16.items():
        a, b = find(cells, ENVOY_RR, f"json-{size}", 16), find(cells, ENVOY_EPP,
                                                                f"json-{size}", 16)
        name = f"throughput (b) ÷ (a) at c=16, {size_label(size)}: ≥ {goal}"
        if a is None or b is None:
            lines.append(f"{name}: not measured")
            continue
        ratio = rps_ratio(b, a)
        line(ratio >= goal and b.load.errors == 0, name,
             f"{ratio:.2f} ({b.load.rps:,.0f} ÷ {a.load.rps:,.0f} req/s, "
             f"{b.load.errors} errors)")
    return lines


def cell_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The cells as plain data (the .json beside the report, read by the plots)."""
    rows = []
    for cell in cells:
        rr = find(cells, ENVOY_RR, cell.workload.key, cell.concurrency)
        load = cell.load
        rows.append({
            "scenario": cell.scenario, "scenario_label": SCENARIO_LABELS[cell.scenario],
            "workload": cell.workload.key, "workload_label": cell.workload.label,
            "streaming": cell.workload.streaming, "paced": cell.workload.itl_ms > 0,
            "concurrency": cell.concurrency,
            "requests": load.requests, "duration_s": load.duration_s, "rps": load.rps,
            "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "errors": load.errors,
            "epp_us_per_request": cell.epp_us, "envoy_us_per_request": cell.envoy_us,
            "epp_us_per_chunk": cell.epp_us_chunk, "envoy_us_per_chunk": cell.envoy_us_chunk,
            "extproc_msgs_per_request": cell.extproc_msgs_per_request,
            "rps_ratio_to_a": (rps_ratio(cell, rr) if rr is not None and cell.scenario
                               in EPP_SCENARIOS else None),
            "cpu_s": cell.cpu.seconds, "box_busy_pct": cell.cpu.busy_pct,
            "epp_process_shares_pct": cell.epp_process_shares(),
            "worker_requests": cell.worker_requests,
        })
    return rows


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def draw_plots(data_file: Path) -> str:
    """Draw the PNGs beside ``data_file`` with matplotlib from this venv or, failing
    that, the peers' venv; returns the report's Plots paragraph."""
    if importlib.util.find_spec("matplotlib") is not None:
        from overhead_plot import plot_file
        paths = plot_file(data_file)
        where = "drawn with this venv's matplotlib"
    elif PEERS_PYTHON.exists():
        done = subprocess.run([str(PEERS_PYTHON), str(PLOT_SCRIPT), str(data_file)],
                              capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            return f"No plots: {PLOT_SCRIPT.name} failed in the peers' venv:\n\n```\n" \
                   f"{done.stderr.strip()[-2000:]}\n```"
        paths = [Path(line) for line in done.stdout.split() if line.endswith(".png")]
        where = "drawn with the peers' venv (`make bench` builds it)"
    else:
        return ("No plots: matplotlib is not importable here and the peers' venv is absent "
                f"(`make bench` builds it); `{PLOT_SCRIPT.name} {data_file.name}` draws them "
                "later from the .json.")
    return "\n".join([f"{len(paths)} PNGs beside this report, {where}:", "",
                      *[f"- ![{p.stem}]({p.name})" for p in paths]])


# -- main ----------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"need positive integers: {text}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=14.0,
                   help="measured seconds per cell (14)")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per cell (3)")
    p.add_argument("--idle", type=float, default=3.0,
                   help="seconds of no traffic to measure each process's idle cost (3)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 16],
                   help="comma-separated concurrencies (1,16); the paced and workers cells "
                   "run at the highest")
    p.add_argument("--sizes", type=_int_list, default=[1024, 32768],
                   help="comma-separated non-streaming body sizes in bytes (1024,32768)")
    p.add_argument("--stream-tokens", type=int, default=STREAM_TOKENS,
                   help=f"output tokens per streamed answer ({STREAM_TOKENS}; 0: no "
                   "streaming cells)")
    p.add_argument("--paced-itl-ms", type=float, default=PACED_ITL_MS,
                   help=f"decode step of the paced stream ({PACED_ITL_MS:g}; 0: no paced "
                   "cells)")
    p.add_argument("--workers", choices=["auto", "skip"], default="auto",
                   help="run the --workers 1/2 cells when the epp has the flag (auto)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 0.5 s warm-up, 1.5 s windows; writes "
                   "overhead-<date>-quick.md")
    p.add_argument("--envoy-concurrency", type=int, default=2,
                   help="Envoy worker threads in (a)-(e) (2)")
    p.add_argument("--output", type=Path, default=None,
                   help="report file (default benchmarks/results/overhead-<date>.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.idle = 1.5, 0.5, 1.0
    return args


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so every process gets stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report, write it (and its data and plots)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    workloads = build_workloads(args.sizes, args.stream_tokens, args.paced_itl_ms)
    scenarios = [ENVOY_RR, ENVOY_EPP, DIRECT, ENVOY_EPP_GRPC, ENVOY_EPP_CLEARTEXT]
    if args.workers == "skip":
        workers = "skipped (--workers skip)"
    elif epp_accepts_workers():
        workers = (f"ran: the installed epp accepts --workers; {', '.join(map(str, WORKER_COUNTS))}"
                   " workers")
        scenarios += list(WORKERS_SCENARIOS)
    else:
        workers = "not available: the installed epp has no --workers flag"
    today = dt.date.today().isoformat()
    plan = plan_cells(workloads, args.concurrency, scenarios)
    estimate = len(plan) * (args.warmup + args.duration) + args.idle + 30
    print(f"{len(plan)} cells, {args.warmup:g}s warm-up + {args.duration:g}s each: about "
          f"{estimate / 60:.0f} min; workers cells: {workers}", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="epp-overhead-") as tmp:
            measured = measure(args, workloads, scenarios, Path(tmp))
    except KeyboardInterrupt:
        print("interrupted; every process was stopped", file=sys.stderr)
        return 130
    output = args.output or RESULTS_DIR / f"overhead-{today}{'-quick' if args.quick else ''}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    data_file = output.with_suffix(".json")
    data_file.write_text(json.dumps(_json_safe(cell_rows(measured.cells)), indent=1) + "\n",
                         encoding="utf-8")
    info = RunInfo(date=today, nproc=len(os.sched_getaffinity(0)), cpu=cpu_model(),
                   envoy=envoy_cfg.envoy_version() or "unknown",
                   envoy_concurrency=args.envoy_concurrency, warmup_s=args.warmup,
                   duration_s=args.duration, idle_s=args.idle, workers=workers,
                   plots=draw_plots(data_file))
    report = render(info, measured, workloads)
    print(report)
    output.write_text(report, encoding="utf-8")
    print(f"written to {output} (cells: {data_file.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
