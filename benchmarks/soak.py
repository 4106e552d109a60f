"""Soak: the EPP behind a real Envoy for a long run of mixed traffic, with pod kills and
endpoint churn, watching its memory and classifying every failed request.

The stack runs on 127.0.0.1 only: N ``epp-sim`` pods publishing KV events (plus one spare
pod for churn), the EPP on an endpoints file with its built-in default profile (the
precise prefix-cache scorer, implied by ``kvEvents`` in the file, as a new user runs it),
and Envoy with the shipped ``deploy/envoy/envoy.yaml`` (re-ported, plus a file access
log so a request Envoy failed can be traced to the pod it was sent to).

Traffic (Poisson arrivals at ``--rate``, at most ``--concurrency`` in flight): streaming
and non-streaming chat and completions, multi-tenant shared system prompts and unique
prompts, and a share of client aborts (before the answer and mid-stream). After
``--warmup`` seconds, faults start: every ``--kill-every`` s one pod gets SIGKILL and is
restarted on the same ports ``--kill-pause`` s later; every ``--churn-every`` s the
endpoints file loses a pod (or gains the spare one) and is restored ``--churn-pause`` s
later. The RSS of the EPP and of Envoy is sampled from ``/proc/<pid>/status``.

Results go to stdout and ``benchmarks/results/soak-<date>.md`` (``-short`` for runs
shorter than the default), with a PNG of RSS over time when matplotlib is installed.

Run: ``.venv/bin/python benchmarks/soak.py`` (30 min) or
``.venv/bin/python benchmarks/soak.py --duration 120 --kill-every 40 --churn-every 30``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import Process, python_module, wait_for_http
from epp.devtools.stack import LocalStack, StackPorts

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "qwen3"
HOST = "127.0.0.1"
# make run's pods: 50 ms to the first token, 20 ms per token, the Qwen tokenizer the
# EPP's render mode asks them for.
SIM_ARGS = ("--ttft-ms", "50", "--itl-ms", "20", "--tokenizer", "qwen")
DEFAULT_DURATION_S = 1800
DEFAULT_WARMUP_S = 120.0
DEFAULT_KILL_PAUSE_S = 15.0
DEFAULT_CHURN_PAUSE_S = 30.0
POD_START_TIMEOUT_S = 60.0  # the Qwen tokenizer loads in ~2 s, much longer on a busy box
REQUEST_TIMEOUT_S = 30.0  # the longest answer here takes ~1.5 s; a timeout is a failure
DRAIN_S = REQUEST_TIMEOUT_S + 5  # after the last arrival, wait this long for stragglers
ENDPOINTS_RELOAD_GRACE_S = 3.0  # the EPP polls the file every 1 s; then it must obey it
RSS_GOAL_PCT = 5.0
PROGRESS_EVERY_S = 30.0
ID_HEADER = "x-soak-id"
POD_HEADER = "x-sim-endpoint"
# Traffic mix.
CHAT_SHARE = 0.6
STREAM_SHARE = 0.5
SHARED_PREFIX_SHARE = 0.7
ABORT_BEFORE_ANSWER_SHARE = 0.04
ABORT_MID_STREAM_SHARE = 0.08  # of streaming requests
TENANTS = 8
WORDS = ("the model cache token prefix request answer system user prompt route pod engine "
         "block event memory latency queue batch decode prefill gateway envoy picker score "
         "weight tenant policy contract invoice order shipment account balance ledger audit "
         "river mountain forest ocean desert valley island harbor bridge tower market garden "
         "red green blue yellow purple orange silver golden quiet rapid gentle brave clever "
         "build check write read send receive measure compare explain summarize translate "
         "one two three four five six seven eight nine ten hundred first last next").split()

# Cause labels, in report order; only the first is expected.
IN_FLIGHT = "in flight on a killed pod at the kill instant"
AFTER_KILL = "routed to a pod after it was killed"
EPP_5XX = "EPP 5xx/503: an ext_proc error, or a 5xx without an upstream"
EPP_4XX = "EPP refusal 4xx without an upstream (429, 400, ...)"
OTHER = "other"
CAUSES = (IN_FLIGHT, AFTER_KILL, EPP_5XX, EPP_4XX, OTHER)

ACCESS_LOG_FORMAT = {
    "id": f"%REQ({ID_HEADER.upper()})%", "code": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%", "details": "%RESPONSE_CODE_DETAILS%",
    "upstream": "%UPSTREAM_HOST%", "picked": "%REQ(X-GATEWAY-DESTINATION-ENDPOINT)%",
}


# -- workload --------------------------------------------------------------------------


@dataclass
class Planned:
    """One request as drawn from the seeded mix."""

    id: str
    path: str
    stream: bool
    prefix: str  # "shared" | "unique"
    abort: str  # "" | "before-answer" | "mid-stream"
    abort_after: float  # seconds (before-answer) or chunks (mid-stream)
    body: bytes


@dataclass
class Record:
    """What happened to one request, on the client's monotonic clock."""

    plan: Planned
    t_send: float
    t_end: float = 0.0
    status: int = 0
    pod: str = ""  # from the pod's response header, else Envoy's access log
    outcome: str = ""  # "ok" | "aborted" | "failed"
    error: str = ""
    cause: str = ""


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Workload:
    """Seeded request bodies: tenants share long system prompts, others are unique."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tenants = [f"You are the assistant of tenant {t}. Policy: "
                        f"{_words(self.rng, self.rng.randint(400, 800))}"
                        for t in range(TENANTS)]
        self.count = 0

    def next(self) -> Planned:
        rng = self.rng
        self.count += 1
        chat = rng.random() < CHAT_SHARE
        stream = rng.random() < STREAM_SHARE
        shared = rng.random() < SHARED_PREFIX_SHARE
        system = rng.choice(self.tenants) if shared else \
            f"Request {self.count}: {_words(rng, rng.randint(100, 600))}"
        question = f"Question {self.count}: {_words(rng, rng.randint(10, 40))}?"
        max_tokens = rng.randint(8, 32)
        body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream}
        if chat:
            body["messages"] = [{"role": "system", "content": system},
                                {"role": "user", "content": question}]
        else:
            body["prompt"] = f"{system}\n\n{question}\nAnswer:"
        if stream:
            body["stream_options"] = {"include_usage": True}
        abort, after = "", 0.0
        draw = rng.random()
        if draw < ABORT_BEFORE_ANSWER_SHARE:
            abort, after = "before-answer", rng.uniform(0.002, 0.040)
        elif stream and draw < ABORT_BEFORE_ANSWER_SHARE + ABORT_MID_STREAM_SHARE:
            abort, after = "mid-stream", float(rng.randint(1, max_tokens - 1))
        return Planned(id=f"r{self.count}", path="/v1/chat/completions" if chat
                       else "/v1/completions", stream=stream,
                       prefix="shared" if shared else "unique", abort=abort,
                       abort_after=after, body=json.dumps(body).encode())


async def _exchange(session: aiohttp.ClientSession, url: str, rec: Record) -> None:
    """Send one request and read its answer; fills status, pod and outcome."""
    plan = rec.plan
    headers = {"Content-Type": "application/json", ID_HEADER: plan.id}
    async with session.post(url + plan.path, data=plan.body, headers=headers) as resp:
        rec.status = resp.status
        rec.pod = resp.headers.get(POD_HEADER, "")
        if resp.status != 200:
            rec.outcome, rec.error = "failed", f"HTTP {resp.status}: {(await resp.read())[:120]!r}"
            return
        if not plan.stream:
            answer = json.loads(await resp.read())
            rec.outcome = "ok" if answer.get("choices") else "failed"
            rec.error = "" if rec.outcome == "ok" else "answer without choices"
            return
        chunks = 0
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                rec.outcome = "ok"
                return
            if line.startswith(b"data: "):
                chunks += 1
                if plan.abort == "mid-stream" and chunks >= plan.abort_after:
                    rec.outcome = "aborted"
                    resp.close()  # drops the connection: a client reset mid-stream
                    return
        rec.outcome, rec.error = "failed", f"stream ended without [DONE] after {chunks} chunks"


async def send(session: aiohttp.ClientSession, url: str, rec: Record) -> None:
    """One request, with its planned abort; never raises."""
    task = asyncio.create_task(_exchange(session, url, rec))
    timeout = rec.plan.abort_after if rec.plan.abort == "before-answer" else None
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:  # the planned cancel, before the answer came
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            rec.outcome = "aborted"
        else:
            task.result()
    except Exception as exc:  # noqa: BLE001 (any client-side error is a failed request)
        rec.outcome, rec.error = "failed", f"{type(exc).__name__}: {exc}"[:160]
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        rec.plan.body = b""  # 30 min of kept bodies would be ~200 MB of client memory
    rec.t_end = time.monotonic()


# -- faults ----------------------------------------------------------------------------


@dataclass
class Event:
    """A fault or a repair, on the monotonic clock (``t``) and as run time (``at``)."""

    t: float
    at: float
    kind: str  # kill | restart | remove | add-back | add-spare | remove-spare
    pod: str
    ready: float = math.inf  # restart: when the new pod listened


@dataclass
class Faults:
    """The pods, the endpoints file and the fault schedule's state."""

    stack: LocalStack
    pods: int  # the first ``pods`` sims are the pool; the last is the spare
    t0: float
    in_file: set[int] = field(default_factory=set)
    down: set[int] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)
    restarts: int = 0
    exited: list[str] = field(default_factory=list)  # EPP or Envoy died during the run

    def address(self, i: int) -> str:
        return self.stack.sim_addresses[i]

    def write_endpoints(self) -> None:
        """The endpoints file with stable names, the pool pods first, kvEvents each."""
        entries = [{"name": f"pod-{i}", "address": self.address(i),
                    "kvEvents": f"tcp://{HOST}:{self.stack.ports.kv_events[i]}"}
                   for i in sorted(self.in_file)]
        path = self.stack.endpoints_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"endpoints": entries}), encoding="utf-8")
        tmp.replace(path)  # atomic: the EPP never reads half a file

    def _event(self, kind: str, i: int) -> Event:
        now = time.monotonic()
        event = Event(now, now - self.t0, kind, self.address(i))
        self.events.append(event)
        return event

    def kill(self, i: int) -> None:
        proc = self.stack.sims[i]
        proc.proc.kill()  # SIGKILL: no goodbye to Envoy, the EPP or the subscribers
        self._event("kill", i)
        proc.stop()  # reaps it and closes its log
        self.down.add(i)

    def spawn(self, i: int, name: str) -> Process:
        """Start pod ``i`` on its ports; ``stack.stop()`` stops it from now on."""
        kv = self.stack.ports.kv_events[i]
        proc = Process(name, python_module(
            "epp.sim", "--host", HOST, "--port", str(self.stack.ports.sims[i]),
            "--kv-events-port", str(kv), "--kv-events-replay-port", str(kv + 1), *SIM_ARGS),
            self.stack.work_dir)
        if i < len(self.stack.sims):
            self.stack.sims[i] = proc
        else:
            self.stack.sims.append(proc)
        return proc

    def start_all(self) -> None:
        """Start the pool and the spare (the stack's own start waits only 20 s, short
        on a busy box), then write the endpoints file without the spare."""
        procs = [self.spawn(i, f"sim-{i}") for i in range(len(self.stack.ports.sims))]
        for proc in procs:
            proc.wait_for_log("listening", POD_START_TIMEOUT_S)
        self.write_endpoints()

    async def restart(self, i: int) -> None:
        self.restarts += 1
        proc = self.spawn(i, f"sim-{i}-restart-{self.restarts}")
        event = self._event("restart", i)
        await asyncio.to_thread(proc.wait_for_log, "listening", POD_START_TIMEOUT_S)
        event.ready = time.monotonic()
        self.down.discard(i)

    def edit(self, kind: str, i: int) -> None:
        if kind in ("remove", "remove-spare"):
            self.in_file.discard(i)
        else:
            self.in_file.add(i)
        self.write_endpoints()
        self._event(kind, i)


def _times(start: float, every: float, end: float) -> list[float]:
    if every <= 0:
        return []
    return [start + k * every for k in range(int((end - start) // every) + 1)
            if start + k * every < end]


async def run_faults(faults: Faults, args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Kill/restart pods and churn the endpoints file on the schedule, until ``stop``."""
    last = args.duration - max(args.kill_pause, args.churn_pause) - 5
    plan: list[tuple[float, str]] = []
    for k, at in enumerate(_times(args.warmup, args.kill_every, last)):
        plan += [(at, f"kill:{k}"), (at + args.kill_pause, f"restart:{k}")]
    for k, at in enumerate(_times(args.warmup + args.churn_every / 2, args.churn_every, last)):
        plan += [(at, f"churn:{k}"), (at + args.churn_pause, f"unchurn:{k}")]
    plan.sort()
    spare = faults.pods
    chosen: dict[str, int] = {}
    for at, action in plan:
        delay = faults.t0 + at - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        if stop.is_set():
            return
        what, k = action.split(":")
        n = int(k)
        if what == "kill":
            # Round robin over the pool, skipping a pod that churn took out of the file.
            i = next((j % faults.pods for j in range(n, n + faults.pods)
                      if j % faults.pods in faults.in_file), n % faults.pods)
            chosen[action] = i
            faults.kill(i)
        elif what == "restart":
            await faults.restart(chosen[f"kill:{k}"])
        elif what == "churn":
            if n % 2 == 1:
                faults.edit("add-spare", spare)
                chosen[action] = spare
            else:
                i = next((j % faults.pods for j in range(n // 2, n // 2 + faults.pods)
                          if j % faults.pods not in faults.down), (n // 2) % faults.pods)
                chosen[action] = i
                faults.edit("remove", i)
        else:
            i = chosen[f"churn:{k}"]
            faults.edit("remove-spare" if i == spare else "add-back", i)


# -- memory ----------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


async def sample_rss(pids: dict[str, int], every: float, t0: float, stop: asyncio.Event,
                     samples: list[tuple[float, dict[str, float]]], exited: list[str]) -> None:
    """Append (run time, {name: RSS MiB}) every ``every`` s; stop the run when a process
    is gone (its name goes to ``exited``)."""
    while not stop.is_set():
        values = {name: rss_mib(pid) for name, pid in pids.items()}
        if any(v is None for v in values.values()):
            exited += [n for n, v in values.items() if v is None]
            print(f"soak: {', '.join(exited)} exited; stopping the run", file=sys.stderr)
            stop.set()
            return
        samples.append((time.monotonic() - t0, {k: v for k, v in values.items() if v}))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


# -- the run ---------------------------------------------------------------------------


async def drive(url: str, args: argparse.Namespace, faults: Faults,
                pids: dict[str, int]) -> tuple[list[Record], list[tuple[float, dict[str, float]]],
                                               float]:
    """Traffic, faults and sampling for ``args.duration`` seconds; returns what happened."""
    workload = Workload(args.seed)
    arrivals = random.Random(args.seed + 1)
    records: list[Record] = []
    samples: list[tuple[float, dict[str, float]]] = []
    stop = asyncio.Event()
    limit = asyncio.Semaphore(args.concurrency)
    max_requests = math.ceil(args.rate * args.duration * 1.5) + 100  # bounds the loop
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    tasks: set[asyncio.Task[None]] = set()

    async def one(rec: Record) -> None:
        try:
            await send(session, url, rec)
        finally:
            limit.release()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = faults.t0 = time.monotonic()
        background = [asyncio.create_task(sample_rss(pids, args.sample_every, t0, stop,
                                                     samples, faults.exited)),
                      asyncio.create_task(run_faults(faults, args, stop))]
        next_at = 0.0
        progress = 0.0
        try:
            for _ in range(max_requests):
                next_at += arrivals.expovariate(args.rate)
                if next_at >= args.duration or stop.is_set():
                    break
                delay = t0 + next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await limit.acquire()
                rec = Record(workload.next(), time.monotonic())
                records.append(rec)
                task = asyncio.create_task(one(rec))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if next_at >= progress:
                    progress += PROGRESS_EVERY_S
                    _progress(next_at, args.duration, records, faults, samples)
            if tasks:  # stragglers, bounded by the request timeout
                await asyncio.wait(set(tasks), timeout=DRAIN_S)
        finally:
            elapsed = time.monotonic() - t0
            stop.set()
            for task in [*tasks, *background]:
                task.cancel()
            await asyncio.gather(*tasks, *background, return_exceptions=True)
            for rec in records:
                if not rec.outcome:
                    rec.outcome, rec.error = "failed", "not finished at the end of the run"
                    rec.t_end = rec.t_end or time.monotonic()
    return records, samples, elapsed


def _progress(at: float, duration: float, records: Sequence[Record], faults: Faults,
              samples: Sequence[tuple[float, dict[str, float]]]) -> None:
    failed = sum(r.outcome == "failed" for r in records)
    rss = samples[-1][1] if samples else {}
    print(f"[{at:6.0f}/{duration:.0f} s] {len(records)} requests, {failed} failed, "
          f"{sum(e.kind == 'kill' for e in faults.events)} kills, "
          f"EPP RSS {rss.get('epp', 0):.1f} MiB, Envoy RSS {rss.get('envoy', 0):.1f} MiB",
          file=sys.stderr, flush=True)


def start_envoy(stack: LocalStack, access_log: Path) -> None:
    """Envoy with the shipped config (re-ported) plus a JSON access log per request."""
    p = stack.ports
    config = envoy_cfg.epp_config(p.envoy, p.epp_grpc, p.envoy_admin)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["access_log"] = [{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log),
            "log_format": {"json_format": ACCESS_LOG_FORMAT},
        },
    }]
    path = envoy_cfg.write_config(config, stack.work_dir / "envoy.yaml")
    stack.envoy = Process("envoy", [
        envoy_cfg.envoy_binary(), "-c", str(path), "--disable-hot-restart",
        "--concurrency", str(stack.envoy_concurrency), "--log-level", "warn",
        "--file-flush-interval-msec", "1000",
    ], stack.work_dir)
    wait_for_http(f"http://{HOST}:{p.envoy_admin}/ready", expect=b"LIVE")


def read_access_log(path: Path) -> dict[str, dict[str, str]]:
    """Envoy's access log entries by request id (torn or foreign lines skipped)."""
    entries: dict[str, dict[str, str]] = {}
    if not path.exists():
        return entries
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("id"):
            entries[str(entry["id"])] = {k: str(v) for k, v in entry.items()}
    return entries


# -- classification --------------------------------------------------------------------


def classify(records: Sequence[Record], events: Sequence[Event],
             access: dict[str, dict[str, str]]) -> None:
    """Give every failed request a cause (one of CAUSES)."""
    kills = [e for e in events if e.kind == "kill"]
    restarts = [e for e in events if e.kind == "restart"]
    for rec in records:
        entry = access.get(rec.plan.id, {})
        upstream = entry.get("upstream", "-")
        if not rec.pod and upstream not in ("-", "", "None"):
            rec.pod = upstream
        if rec.outcome != "failed":
            continue
        if entry:
            rec.error += f" [envoy {entry.get('code')} {entry.get('flags')} " \
                         f"{entry.get('details')}]"
        rec.cause = OTHER
        for kill in kills:
            if kill.pod != rec.pod:
                continue
            ready = min((r.ready for r in restarts if r.pod == kill.pod and r.t > kill.t),
                        default=math.inf)
            if rec.t_send <= kill.t <= rec.t_end:
                rec.cause = IN_FLIGHT
                break
            if kill.t < rec.t_send < ready:
                rec.cause = AFTER_KILL
                break
        if rec.cause != OTHER:
            continue
        if "ext_proc_error" in entry.get("details", ""):  # the EPP failed the stream
            rec.cause = EPP_5XX
        elif rec.status >= 400 and not rec.pod:  # answered without reaching a pod
            rec.cause = EPP_5XX if rec.status >= 500 else EPP_4XX


# -- report ----------------------------------------------------------------------------


def rss_at(samples: Sequence[tuple[float, dict[str, float]]], name: str, at: float,
           window: float) -> float:
    """Median RSS of ``name`` over the samples in [at - window, at] (noise-proof)."""
    values = [s[name] for t, s in samples if at - window <= t <= at and name in s]
    if not values:
        values = [s[name] for t, s in samples if name in s and t <= at][-1:] or \
            [s[name] for _, s in samples[:1] if name in s]
    return statistics.median(values) if values else math.nan


def rss_window(sample_every: float, elapsed: float) -> float:
    """How many seconds of samples one RSS figure is the median of."""
    return max(3 * sample_every, 0.02 * elapsed)


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q / 100 *
                                                                     len(sorted_values)) - 1))]


def _removed_served(records: Sequence[Record], events: Sequence[Event]) -> int:
    """Requests sent well after their pod left the endpoints file, before it came back."""
    count = 0
    for rec in records:
        for ev in events:
            if ev.kind not in ("remove", "remove-spare") or ev.pod != rec.pod:
                continue
            back = min((e.t for e in events if e.pod == ev.pod and e.t > ev.t
                        and e.kind in ("add-back", "add-spare")), default=math.inf)
            if ev.t + ENDPOINTS_RELOAD_GRACE_S < rec.t_send < back:
                count += 1
                break
    return count


def render(args: argparse.Namespace, records: Sequence[Record], events: Sequence[Event],
           samples: Sequence[tuple[float, dict[str, float]]], elapsed: float,
           cpu: dict[str, float], plot: str | None, today: str,
           names: dict[str, str]) -> tuple[str, bool]:
    """The markdown report; also whether every goal passed."""
    n = len(records)
    outcomes = Counter(r.outcome for r in records)
    causes = Counter(r.cause for r in records if r.outcome == "failed")
    real = n_failed = outcomes["failed"]
    real -= causes[IN_FLIGHT]
    exited = sorted({e.pod for e in events if e.kind == "exited"})
    lines = [f"# Soak run, {today}", "",
             f"{elapsed:.0f} s of traffic at {args.rate:g} req/s (Poisson, at most "
             f"{args.concurrency} in flight) through Envoy "
             f"(Envoy {envoy_cfg.envoy_version() or '?'}, shipped config) to the EPP "
             f"(built-in profile, precise prefix scorer from kvEvents) and {args.pods} epp-sim "
             f"pods (+1 spare for churn; `{' '.join(SIM_ARGS)}`). Warm-up {args.warmup:g} s; "
             f"then a pod SIGKILLed every {args.kill_every:g} s (restarted after "
             f"{args.kill_pause:g} s) and the endpoints file churned every "
             f"{args.churn_every:g} s (restored after {args.churn_pause:g} s). "
             f"nproc = {len(os.sched_getaffinity(0))}.", "",
             *([f"**The run stopped early: {', '.join(exited)} exited "
                f"{elapsed:.0f} s in.**", ""] if exited else []),
             "## Requests", "",
             "| outcome | requests | share |", "|---|--:|--:|"]
    for label, key in (("completed", "ok"), ("client abort (intended)", "aborted"),
                       ("failed", "failed")):
        lines.append(f"| {label} | {outcomes[key]} | {100 * outcomes[key] / max(n, 1):.2f}% |")
    lines += [f"| **total** | {n} | |", "",
              "## Failed requests by cause", "",
              "| cause | requests | expected |", "|---|--:|---|"]
    for cause in CAUSES:
        lines.append(f"| {cause} | {causes[cause]} | {'yes' if cause == IN_FLIGHT else 'no'} |")
    lines.append("")
    after = sorted(min(r.t_send - e.t for e in events if e.kind == "kill" and e.pod == r.pod
                       and e.t < r.t_send) for r in records if r.cause == AFTER_KILL)
    if after:
        lines += [f"Routed to a killed pod: {after[0] * 1e3:.0f} ms to {after[-1] * 1e3:.0f} ms "
                  f"after its kill (median {statistics.median(after) * 1e3:.0f} ms).", ""]
    examples = Counter(r.error for r in records
                       if r.outcome == "failed" and r.cause != IN_FLIGHT)
    if examples:
        lines += ["Unexpected failures, most frequent errors:", ""]
        lines += [f"- {count} × `{error}`" for error, count in examples.most_common(6)]
        lines.append("")
    lines += ["## Traffic mix", "",
              "| kind | sent | completed | aborted | failed | p50 ms | p99 ms |",
              "|---|--:|--:|--:|--:|--:|--:|"]
    kinds = sorted({(r.plan.path, r.plan.stream) for r in records})
    groups = [(f"{'chat' if 'chat' in path else 'completions'}{' SSE' if stream else ''}",
               [r for r in records if (r.plan.path, r.plan.stream) == (path, stream)])
              for path, stream in kinds]
    groups += [(f"{p} prefix", [r for r in records if r.plan.prefix == p])
               for p in ("shared", "unique")]
    for label, group in groups:
        c = Counter(r.outcome for r in group)
        lat = sorted((r.t_end - r.t_send) * 1e3 for r in group if r.outcome == "ok")
        lines.append(f"| {label} | {len(group)} | {c['ok']} | {c['aborted']} | {c['failed']} | "
                     f"{_pct(lat, 50):.0f} | {_pct(lat, 99):.0f} |")
    served = Counter(r.pod for r in records if r.outcome == "ok")
    lines += ["", "Completed per pod: " + ", ".join(
        f"{names.get(pod, pod or '?')} {count}" for pod, count in sorted(
            served.items(), key=lambda item: names.get(item[0], item[0]))) + ".",
              f"Sent more than {ENDPOINTS_RELOAD_GRACE_S:g} s after their pod left the "
              f"endpoints file and served by it: {_removed_served(records, events)}.", "",
              "## Faults", ""]
    fault_counts = Counter(e.kind for e in events)
    lines.append(", ".join(f"{k} {v}" for k, v in sorted(fault_counts.items())) or "none")
    lines += ["", "| at (s) | event | pod | failed in flight | routed to it while down "
              "(last, s after the kill) |", "|--:|---|---|--:|--:|"]
    for e in events:
        detail = f" (ready after {e.ready - e.t:.1f} s)" if e.kind == "restart" else ""
        cells = " | |"
        if e.kind == "kill":
            down = [r for r in records if r.pod == e.pod and r.cause == AFTER_KILL
                    and e.t < r.t_send and not any(k.kind == "kill" and k.pod == e.pod
                                                   and e.t < k.t < r.t_send for k in events)]
            flight = sum(r.cause == IN_FLIGHT and r.pod == e.pod and r.t_send <= e.t <= r.t_end
                         for r in records)
            last = f" (+{max(r.t_send for r in down) - e.t:.1f})" if down else ""
            cells = f" {flight} | {len(down)}{last} |"
        lines.append(f"| {e.at:.1f} | {e.kind}{detail} | {names.get(e.pod, e.pod)} |{cells}")
    window = rss_window(args.sample_every, elapsed)
    third = elapsed / 3
    lines += ["", "## Memory (RSS, MiB; median over the preceding "
              f"{window:.0f} s)", "",
              f"| process | warm-up end ({args.warmup:.0f} s) | 1/3 ({third:.0f} s) | middle "
              f"({elapsed / 2:.0f} s) | end ({elapsed:.0f} s) | growth over the last 2/3 | "
              "CPU s (avg %) |", "|---|--:|--:|--:|--:|--:|--:|"]
    growth: dict[str, float] = {}
    for name in ("epp", "envoy"):
        at = [rss_at(samples, name, t, window) for t in (args.warmup, third, elapsed / 2,
                                                         elapsed)]
        growth[name] = 100 * (at[3] - at[1]) / at[1] if at[1] else math.nan
        lines.append(f"| {name} | {at[0]:.1f} | {at[1]:.1f} | {at[2]:.1f} | {at[3]:.1f} | "
                     f"{growth[name]:+.2f}% | {cpu.get(name, 0):.0f} "
                     f"({100 * cpu.get(name, 0) / max(elapsed, 1):.0f}%) |")
    last_min = (elapsed - third) / 60
    rss_ok = growth["epp"] <= RSS_GOAL_PCT and not exited  # an early stop proves nothing
    fail_ok = real == 0 and not exited
    lines += ["", "## Goals", "", "| goal | result | numbers |", "|---|---|---|",
              f"| EPP RSS growth ≤ {RSS_GOAL_PCT:g}% over the last 20 minutes (here the last "
              f"2/3: {last_min:.1f} min) | **{'PASS' if rss_ok else 'MISS'}** | "
              f"{growth['epp']:+.2f}%{' (run incomplete)' if exited else ''} |",
              f"| no failed request other than those in flight on a killed pod | "
              f"**{'PASS' if fail_ok else 'MISS'}** | {real} other of {n_failed} failed"
              f"{'; ' + ', '.join(exited) + ' exited' if exited else ''} |", ""]
    if plot:
        lines += [f"Plot: `{plot}` (RSS over time; red: kills, green: restarts, blue: "
                  "endpoints-file churn).", ""]
    return "\n".join(lines), rss_ok and fail_ok


def draw(samples: Sequence[tuple[float, dict[str, float]]], events: Sequence[Event],
         warmup: float, elapsed: float, window: float, path: Path) -> bool:
    """RSS of the EPP and Envoy over time with fault markers; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("soak: matplotlib is not installed, so no plot "
              "(.venv/bin/pip install matplotlib; it is not a dependency of the package)",
              file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    colors = {"kill": "red", "restart": "green", "exited": "black"}
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, name in zip(axes, ("epp", "envoy"), strict=True):
        ax.plot([t / 60 for t, s in samples if name in s],
                [s[name] for _, s in samples if name in s], color="black", linewidth=1.2)
        ax.axvspan(0, warmup / 60, color="grey", alpha=0.15)
        ax.axvspan(elapsed / 3 / 60, elapsed / 60, color="gold", alpha=0.08)
        base = rss_at(samples, name, elapsed / 3, window)
        if not math.isnan(base):  # the goal's ceiling keeps the y scale honest
            ax.hlines(base * (1 + RSS_GOAL_PCT / 100), elapsed / 3 / 60, elapsed / 60,
                      color="darkorange", linestyle="--", linewidth=1)
        for e in events:
            ax.axvline(e.at / 60, color=colors.get(e.kind, "tab:blue"), alpha=0.7,
                       linestyle="--" if e.kind in colors else ":", linewidth=1.2)
        ax.set_ylabel(f"{name} RSS (MiB)")
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color="red", linestyle="--", label="pod killed"),
               Line2D([], [], color="green", linestyle="--", label="pod restarted"),
               Line2D([], [], color="tab:blue", linestyle=":", label="endpoints file edited"),
               Line2D([], [], color="darkorange", linestyle="--",
                      label=f"+{RSS_GOAL_PCT:g}% over the RSS at 1/3"),
               Patch(color="grey", alpha=0.15, label="warm-up"),
               Patch(color="gold", alpha=0.08, label="growth window (last 2/3)")]
    axes[0].legend(handles=handles, loc="lower right", fontsize=7, ncol=2)
    axes[1].set_xlabel("run time (min)")
    fig.suptitle("Soak: RSS of the EPP and Envoy over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                   help=f"seconds of traffic ({DEFAULT_DURATION_S})")
    p.add_argument("--rate", type=float, default=25.0, help="requests per second (25)")
    p.add_argument("--concurrency", type=int, default=48, help="most requests in flight (48)")
    p.add_argument("--pods", type=int, default=4, help="pods in the pool, plus a spare (4)")
    p.add_argument("--kill-every", type=float, default=300.0,
                   help="seconds between pod kills, 0: none (300)")
    p.add_argument("--kill-pause", type=float, default=None,
                   help="seconds a killed pod stays down (15, at most half of --kill-every)")
    p.add_argument("--churn-every", type=float, default=240.0,
                   help="seconds between endpoints-file edits, 0: none (240)")
    p.add_argument("--churn-pause", type=float, default=None,
                   help="seconds before an edit is undone (30, at most half of --churn-every)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of traffic before the first fault (120, at most 1/6 of "
                   "--duration)")
    p.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling period (5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the work directory (process logs, access log, requests.jsonl)")
    p.add_argument("--out", type=Path, default=None,
                   help="report file (default benchmarks/results/soak-<date>[-short].md; "
                   "the plot goes beside it as .png)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(DEFAULT_WARMUP_S, args.duration / 6)
    if args.kill_pause is None:
        args.kill_pause = min(DEFAULT_KILL_PAUSE_S, args.kill_every / 2)
    if args.churn_pause is None:
        args.churn_pause = min(DEFAULT_CHURN_PAUSE_S, args.churn_every / 2)
    if args.pods < 2:
        p.error("--pods must be at least 2 (a kill and a removal can overlap)")
    if not 0 < args.rate <= 200 or args.concurrency < 1:
        p.error("--rate must be in (0, 200] and --concurrency at least 1")
    if args.warmup >= args.duration:
        p.error("--warmup must be shorter than --duration")
    for every, pause in ((args.kill_every, args.kill_pause), (args.churn_every, args.churn_pause)):
        if every and not 0 < pause < every:
            p.error("each pause must be positive and shorter than its period")
    return args


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so every process gets stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, work: Path) -> tuple[
        list[Record], list[Event], list[tuple[float, dict[str, float]]], float,
        dict[str, float], dict[str, str]]:
    """Start the stack, drive it, stop it; returns records, events, RSS samples, run time,
    CPU seconds per process and the pods' names by address."""
    ports = StackPorts.free(args.pods + 1, kv_events=True)
    stack = LocalStack(work, ports, sim_args=SIM_ARGS)
    faults = Faults(stack, args.pods, time.monotonic(), in_file=set(range(args.pods)))
    try:
        print(f"starting {args.pods + 1} epp-sim pods, the EPP and Envoy (logs in {work}) ...",
              file=sys.stderr, flush=True)
        faults.start_all()
        stack.start_epp()
        start_envoy(stack, work / "access.log")
        assert stack.epp is not None and stack.envoy is not None
        pids = {"epp": stack.epp.pid, "envoy": stack.envoy.pid}
        cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
        records, samples, elapsed = asyncio.run(drive(stack.url, args, faults, pids))
        cpu = {name: cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
        time.sleep(1.5)  # one access-log flush
    except Exception:
        for proc in [stack.envoy, stack.epp, *stack.sims]:
            if proc is not None and proc.tail(10):
                print(f"--- last lines of {proc.name} ---\n{proc.tail(10)}", file=sys.stderr)
        raise
    finally:
        stack.stop()
    classify(records, faults.events, read_access_log(work / "access.log"))
    with open(work / "requests.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r.plan.id, "path": r.plan.path, "stream": r.plan.stream,
                                "prefix": r.plan.prefix, "abort": r.plan.abort,
                                "t_send": round(r.t_send - faults.t0, 4),
                                "t_end": round(r.t_end - faults.t0, 4), "status": r.status,
                                "pod": r.pod, "outcome": r.outcome, "cause": r.cause,
                                "error": r.error}) + "\n")
    names = {faults.address(i): f"pod-{i}" for i in range(args.pods + 1)}
    faults.events += [Event(faults.t0 + elapsed, elapsed, "exited", name)
                      for name in faults.exited]
    return records, faults.events, samples, elapsed, cpu, names


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak, print the report, write it (and the plot) under benchmarks/results/."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    today = dt.date.today().isoformat()
    short = "-short" if args.duration < DEFAULT_DURATION_S else ""
    output: Path = args.out or RESULTS_DIR / f"soak-{today}{short}.md"
    work = Path(tempfile.mkdtemp(prefix="epp-soak-"))
    try:
        records, events, samples, elapsed, cpu, names = run(args, work)
    except KeyboardInterrupt:
        print(f"interrupted; every process was stopped (logs in {work})", file=sys.stderr)
        return 130
    output.parent.mkdir(parents=True, exist_ok=True)
    png = output.with_suffix(".png")
    plotted = draw(samples, events, args.warmup, elapsed,
                   rss_window(args.sample_every, elapsed), png)
    plot_name = png.name if plotted else None
    report, passed = render(args, records, events, samples, elapsed, cpu, plot_name, today,
                            names)
    print(report)
    output.write_text(report, encoding="utf-8")
    print(f"written to {output}{' and ' + str(png) if plotted else ''}", file=sys.stderr)
    if args.keep_logs or not passed:
        print(f"logs, Envoy access log and requests.jsonl kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
