"""Faulty pods, measured through real Envoy + the EPP + epp-sim pods (built-in precise
profile: KV events, render tokens, prefix x6).

  kill     3 sims, shared-prefix chat at 20 req/s; the pod holding tenant 0's prefix is
           SIGKILLed mid-run. Reports requests failed, requests the EPP had in flight to
           the pod at the kill, and the time from the kill to the EPP's last pick of it
           (its pick counter polled every 10 ms).
  hung     4 sims behind fault proxies; sequential requests with no faults, then with
           sim-0's render endpoint hung and sim-1's /metrics hung (the two pods every
           render call used to go to). Reports client latency p50/p99 of both runs and the
           difference: the routing time a hung pod adds.

Run: ``.venv/bin/python benchmarks/faults.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epp.devtools.stack import LocalStack, StackPorts  # noqa: E402
from tests.integration.httputil import post  # noqa: E402
from tests.integration.test_faults_pods import (  # noqa: E402
    SIM_ARGS,
    ProxyThread,
    chat,
    chat_load,
    epp_metric,
)

EPP_ARGS = ["--kv-events", "--endpoints-reload-seconds", "0.2"]
HUNG_REQUESTS = 200


def kill_run(work: Path) -> dict[str, float]:
    stack = LocalStack(work, StackPorts.free(3, kv_events=True), envoy_concurrency=1,
                       sim_args=SIM_ARGS, epp_args=EPP_ARGS)
    stack.start()
    try:
        home = {g: post(stack.url + "/v1/chat/completions", chat(g, "Hello")
                        ).headers["x-sim-endpoint"] for g in range(3)}
        time.sleep(0.5)
        victim = stack.sim_addresses.index(home[0])
        name = f"sim-{victim}"
        load = chat_load(stack.url, lambda n: n % 3).start()
        time.sleep(2.0)
        in_flight = epp_metric(stack, "epp_endpoint_inflight_requests", endpoint=name)
        killed_at = time.monotonic()
        stack.sims[victim].proc.kill()
        last_pick_at = killed_at
        picks = epp_metric(stack, "epp_endpoint_picks_total", endpoint=name)
        while time.monotonic() - killed_at < 3.0:
            now_picks = epp_metric(stack, "epp_endpoint_picks_total", endpoint=name)
            if now_picks != picks:
                picks, last_pick_at = now_picks, time.monotonic()
            time.sleep(0.01)
        results = load.stop()
    finally:
        stack.stop()
    return {"requests": len(results),
            "failed": sum(r.status != 200 for r in results),
            "in_flight": in_flight,
            "stop_ms": (last_pick_at - killed_at) * 1000}


def latencies(stack: LocalStack, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        reply = post(stack.url + "/v1/chat/completions",
                     {**chat(i % 4, f"Question {i}?"), "max_tokens": 1})
        out.append(time.perf_counter() - t0)
        assert reply.status == 200, reply.body
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def hung_run(work: Path) -> dict[str, float]:
    stack = LocalStack(work, StackPorts.free(4, kv_events=True), envoy_concurrency=1,
                       sim_args=[a for a in SIM_ARGS], epp_args=EPP_ARGS)
    proxies = None
    try:
        stack.start_sims()
        proxies = ProxyThread(stack.sim_addresses)
        stack.write_endpoints([p.address for p in proxies.proxies])
        stack.start_epp()
        stack.start_envoy()
        latencies(stack, 20)  # warm up: connections, KV index
        base = latencies(stack, HUNG_REQUESTS)
        proxies.proxies[0].hang_render = True
        proxies.proxies[1].hang_metrics = True
        time.sleep(1.5)  # let the metrics scrape time out once
        hung = latencies(stack, HUNG_REQUESTS)
        degraded = epp_metric(stack, "epp_prefix_match_degraded_total")
        render_hits = proxies.proxies[0].render_hits
    finally:
        stack.stop()
        if proxies is not None:
            proxies.close()
    return {"base_p50": pct(base, 50), "base_p99": pct(base, 99),
            "hung_p50": pct(hung, 50), "hung_p99": pct(hung, 99),
            "degraded": degraded, "render_hits": render_hits}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        k = kill_run(Path(tmp) / "kill")
        h = hung_run(Path(tmp) / "hung")
    rows = [
        ("requests failed by a pod kill (20 req/s, ~5 s)",
         f"{k['failed']:.0f} of {k['requests']:.0f} (in flight to it at the kill: "
         f"{k['in_flight']:.0f})"),
        ("time to stop routing to a dead pod", f"{k['stop_ms']:.0f} ms"),
        ("latency, no faults p50 / p99", f"{h['base_p50']:.1f} / {h['base_p99']:.1f} ms"),
        ("latency, hung render + hung metrics p50 / p99",
         f"{h['hung_p50']:.1f} / {h['hung_p99']:.1f} ms"),
        ("routing time added by a hung pod p50 / p99",
         f"{h['hung_p50'] - h['base_p50']:+.1f} / {h['hung_p99'] - h['base_p99']:+.1f} ms"),
        (f"render calls to the hung pod ({HUNG_REQUESTS} requests)",
         f"{h['render_hits']:.0f}"),
        ("prefix matches degraded by the deadline", f"{h['degraded']:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | result |")
    print(f"|{'-' * (width + 2)}|--------|")
    for label, value in rows:
        print(f"| {label:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
