"""Faulty pods through real Envoy, the EPP and epp-sim pods: a killed pod, a wedged pod,
and endpoints that come and go under load."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from epp.devtools.procs import Process, free_port, python_module
from epp.devtools.stack import LocalStack, StackPorts
from epp.kvcache.tokens import RENDER_STALL_COOLDOWN_S
from tests.integration.httputil import post, request
from tests.integration.openloop import Load

pytestmark = pytest.mark.integration

# One token per byte: exact through the render endpoint, and quick to load.
SIM_ARGS = ["--tokenizer", "bytes", "--itl-ms", "10"]
# Requests per second of the load generator: the rate of the incident in the issue.
RATE = 20.0


def system_prompt(group: int) -> str:
    facts = " ".join(f"Fact {i} about tenant {group}: the value is {i * 7 + group}."
                     for i in range(60))
    return f"You are the assistant of tenant {group}. {facts}"


def chat(group: int, question: str) -> dict[str, Any]:
    return {"model": "qwen3", "max_tokens": 8, "messages": [
        {"role": "system", "content": system_prompt(group)},
        {"role": "user", "content": question}]}


def epp_metric(stack: LocalStack, name: str, **labels: str) -> float:
    """Sum of the EPP's samples called ``name`` whose labels include ``labels``."""
    text = request(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics").body.decode()
    total = 0.0
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series = line.rsplit(" ", 1)[0]
            if all(w in series for w in want):
                total += float(line.rsplit(" ", 1)[1])
    return total


def chat_load(url: str, groups: Callable[[int], int]) -> Load:
    """Shared-prefix chat traffic at ``RATE``: request ``n`` belongs to tenant ``groups(n)``."""
    return Load(url, RATE, path="/v1/chat/completions", groups=groups, workers=32,
                body=lambda group, n: chat(group, f"Question {n}?"))


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def sim_process(stack: LocalStack, i: int, label: str) -> Process:
    """Start (or restart) sim ``i`` on its own ports, as the stack does."""
    kv = stack.ports.kv_events[i]
    return Process(label, python_module(
        "epp.sim", "--host", "127.0.0.1", "--port", str(stack.ports.sims[i]),
        "--kv-events-port", str(kv), "--kv-events-replay-port", str(kv + 1),
        *stack.sim_args), stack.work_dir)


@pytest.fixture
def kv_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """Three sims behind the built-in precise profile (KV events, render tokens, x6)."""
    s = LocalStack(tmp_path, StackPorts.free(3, kv_events=True), envoy_concurrency=1,
                   sim_args=SIM_ARGS, epp_args=["--kv-events", "--endpoints-reload-seconds",
                                                "0.2"])
    s.start()
    yield s
    s.stop()


# After the kill the EPP needs one piece of evidence: the gateway's 503 for the first
# request routed there (a refused connection on loopback fails within milliseconds) or
# a refused scrape (every 100 ms). At 20 req/s at most 2 requests arrive in one scrape
# interval, plus 1 whose routing was already under way at the kill.
KILL_SLACK = 3


def test_killed_warm_pod_leaves_at_once_and_returns_when_restarted(
        kv_stack: LocalStack) -> None:
    stack = kv_stack
    home = {}
    for group in range(3):
        reply = post(stack.url + "/v1/chat/completions", chat(group, "Hello"))
        assert reply.status == 200
        home[group] = reply.headers["x-sim-endpoint"]
    time.sleep(0.5)  # KV events arrive within milliseconds; leave margin
    victim = stack.sim_addresses.index(home[0])
    name = f"sim-{victim}"

    load = chat_load(stack.url, lambda n: n % 3).start()
    time.sleep(1.5)
    in_flight = epp_metric(stack, "epp_endpoint_inflight_requests", endpoint=name)
    killed_at = time.monotonic()
    stack.sims[victim].proc.kill()  # a crash: no goodbye, connections reset
    stack.sims[victim].stop()  # reaps it and closes its log
    picks_at_kill = epp_metric(stack, "epp_endpoint_picks_total", endpoint=name)
    time.sleep(3.0)
    picks_after_kill = epp_metric(stack, "epp_endpoint_picks_total", endpoint=name) - \
        picks_at_kill
    results = load.stop()

    before = [r for r in results if r.sent < killed_at]
    assert all(r.status == 200 for r in before if r.done < killed_at), \
        [(r.status, round(r.done - killed_at, 3)) for r in before if r.status != 200]
    assert Counter(r.pod for r in before if r.group == 0 and r.status == 200) == \
        Counter({home[0]: len([r for r in before if r.group == 0 and r.status == 200])})
    failed = [r for r in results if r.status != 200]
    # Before the fix the dead pod kept its tenant's third of the traffic until the end.
    assert len(failed) <= in_flight + KILL_SLACK, (len(failed), in_flight)
    assert picks_after_kill <= KILL_SLACK, picks_after_kill
    after = [r for r in results if r.sent > killed_at + 1.0]
    assert after and all(r.status == 200 for r in after)

    stack.sims[victim] = sim_process(stack, victim, f"sim-{victim}-restarted")
    stack.sims[victim].wait_for_log("listening")
    wait_until(lambda: epp_metric(stack, "epp_endpoint_metrics_stale", endpoint=name) == 0)
    served: Counter[str] = Counter()
    with ThreadPoolExecutor(4) as pool:
        for reply in pool.map(lambda g: post(stack.url + "/v1/chat/completions",
                                             chat(g, "Hello again")), range(10, 22)):
            assert reply.status == 200
            served[reply.headers["x-sim-endpoint"]] += 1
    # Cold tenants go to the least loaded pod: the restarted one has an empty cache.
    assert served[home[0]] >= 1, served


# --- a wedged pod ------------------------------------------------------------------------


class FaultProxy:
    """A pod's HTTP front that forwards to an epp-sim, except that its render or metrics
    endpoint can be made to hang (as a wedged vLLM API server does)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.hang_render = False
        self.hang_metrics = False
        self.render_hits = 0  # render calls that hung here
        self.render_abandoned = 0  # ... of which the client gave up on
        self.port = free_port()
        self._release: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._release = asyncio.Event()
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1,
                                     handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self._release is not None and self._runner is not None
        self._release.set()
        await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _hang(self) -> None:
        assert self._release is not None
        await self._release.wait()

    async def _handle(self, req: web.Request) -> web.StreamResponse:
        if req.path.endswith("/render") and self.hang_render:
            self.render_hits += 1
            try:
                await self._hang()
            except asyncio.CancelledError:
                self.render_abandoned += 1
                raise
        if req.path == "/metrics" and self.hang_metrics:
            await self._hang()
        assert self._session is not None
        async with self._session.request(
                req.method, f"http://{self.backend}{req.path_qs}", data=await req.read(),
                headers={"content-type": req.headers.get("content-type", "")}) as resp:
            body = await resp.read()
            headers = {k: v for k, v in resp.headers.items()
                       if k.lower() == "content-type" or k.lower().startswith("x-sim-")}
            return web.Response(status=resp.status, body=body, headers=headers)


class ProxyThread:
    """Runs fault proxies on an event loop of their own, beside the blocking test."""

    def __init__(self, backends: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxies = [FaultProxy(b) for b in backends]
        for p in self.proxies:
            self._run(p.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        for p in self.proxies:
            self._run(p.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def wedged_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, list[FaultProxy]]]:
    """Four sims, each behind a fault proxy; the endpoints file lists the proxies (with
    the sims' KV-event publishers), so Envoy and the EPP both talk to the proxies."""
    s = LocalStack(tmp_path, StackPorts.free(4, kv_events=True), envoy_concurrency=1,
                   sim_args=SIM_ARGS, epp_args=["--kv-events", "--endpoints-reload-seconds",
                                                "0.2"])
    proxies: ProxyThread | None = None
    try:
        s.start_sims()
        proxies = ProxyThread(s.sim_addresses)
        s.write_endpoints([p.address for p in proxies.proxies])
        s.start_epp()
        s.start_envoy()
        yield s, proxies.proxies
    finally:
        s.stop()
        if proxies is not None:
            proxies.close()




def hung_render_bound(elapsed: float) -> int:
    """Render calls a hung pod may see in ``elapsed`` s: one as a first choice that the
    hedge beats, one as a hedge while it is still unknown, and one retry per cooldown."""
    return 2 + int(elapsed / RENDER_STALL_COOLDOWN_S)


def test_a_wedged_pod_does_not_stall_routing(
        wedged_stack: tuple[LocalStack, list[FaultProxy]]) -> None:
    stack, proxies = wedged_stack
    # sim-0 and sim-1 sort first by name: the pods every render call used to go to.
    proxies[0].hang_render = True
    proxies[1].hang_metrics = True
    started = time.monotonic()
    for n in range(40):
        reply = post(stack.url + "/v1/chat/completions", chat(n % 4, f"Question {n}?"))
        assert reply.status == 200, reply.body
    # Before the fix every request waited 2 s on sim-0's render first.
    bound = hung_render_bound(time.monotonic() - started)
    assert 1 <= proxies[0].render_hits <= bound, (proxies[0].render_hits, bound)
    time.sleep(0.1)
    assert proxies[0].render_abandoned == proxies[0].render_hits  # the hedge's loser
    assert epp_metric(stack, "epp_prefix_match_degraded_total") == 0  # hedges sufficed

    for p in proxies:  # now every render endpoint hangs: only the deadline helps
        p.hang_render = True
    for n in range(5):
        reply = post(stack.url + "/v1/chat/completions", chat(n, f"Question {n}?"))
        assert reply.status == 200, reply.body
    assert epp_metric(stack, "epp_prefix_match_degraded_total", reason="deadline") == 5


# --- churn ---------------------------------------------------------------------------------


def test_endpoints_churn_under_load_fails_no_request(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, StackPorts.free(4, kv_events=True), envoy_concurrency=1,
                       sim_args=SIM_ARGS, epp_args=["--kv-events", "--endpoints-reload-seconds",
                                                    "0.2"])
    addresses = stack.sim_addresses
    try:
        stack.ports.sims, all_sims = stack.ports.sims[:2], stack.ports.sims
        stack.start()
        stack.ports.sims = all_sims
        load = chat_load(stack.url, lambda n: n % 6).start()
        time.sleep(1.0)
        # Pods are listed as they are scheduled, before their servers listen.
        for i in (2, 3):
            stack.sims.append(sim_process(stack, i, f"sim-{i}"))
            stack.write_endpoints(addresses[:i + 1])
            time.sleep(1.0)
        stack.sims[2].wait_for_log("listening")
        stack.sims[3].wait_for_log("listening")
        time.sleep(1.0)
        stack.write_endpoints([addresses[0], addresses[2], addresses[3]])  # drain sim-1
        time.sleep(1.0)
        stack.write_endpoints(addresses)  # and back
        time.sleep(1.0)
        results = load.stop()
    finally:
        stack.stop()
    statuses = Counter(r.status for r in results)
    assert statuses == Counter({200: len(results)}), statuses
    served = Counter(r.pod for r in results)
    assert served[addresses[2]] and served[addresses[3]], served  # the new pods served
