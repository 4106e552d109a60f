"""How Envoy's ext_proc streams spread over the processes of ``epp --workers N``.

The kernel gives each new TCP connection to one worker (SO_REUSEPORT hashes the
connection's addresses), and Envoy multiplexes the ext_proc streams of each of its
worker threads on one long-lived HTTP/2 connection to the picker. So the spread is
decided per connection, not per request: with few connections one worker can get every
stream. This runs one set of instant sim pods and ``epp --workers N``, then for each
setting of the picker's cluster in Envoy and each Envoy ``--concurrency``: a fresh Envoy,
closed-loop load (16 connections, 1 KB completions) for a few seconds, and reports how
many streams each worker routed (from ``epp_worker_requests_total``), the busiest
worker's share (1/N is even), and how many connections Envoy opened to the picker
(``cluster.endpoint_picker.upstream_cx_total``). Each cell runs ``--repeats`` times with
a new Envoy (new connections, new hashes).

Settings of the ``endpoint_picker`` cluster:

- ``shipped``: ``deploy/envoy/envoy.yaml`` as is;
- ``max_concurrent_streams: 8`` (``http2_protocol_options``): Envoy opens another
  connection when one carries 8 streams, so load adds connections;
- ``max_requests_per_connection: 1000`` (``common_http_protocol_options``): a connection
  is replaced after 1,000 streams, so its hash is drawn again and again.

Run: ``.venv/bin/python benchmarks/workers_spread.py [--workers 2] [--seconds 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen import run_closed_loop

from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import Process, wait_for_http
from epp.devtools.stack import LocalStack, StackPorts

SIM_ARGS = ("--ttft-ms", "0", "--max-tokens", "1", "--tokenizer", "bytes",
            "--prefill-tokens-per-s", "0", "--no-enable-prefix-caching", "--max-num-seqs", "64")
CONCURRENCY = 16
OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _shipped(cluster: dict[str, Any]) -> None:
    pass


def _max_streams(cluster: dict[str, Any]) -> None:
    cluster["typed_extension_protocol_options"][OPTIONS_KEY]["explicit_http_config"][
        "http2_protocol_options"] = {"max_concurrent_streams": 8}


def _recycle(cluster: dict[str, Any]) -> None:
    cluster["typed_extension_protocol_options"][OPTIONS_KEY][
        "common_http_protocol_options"] = {"max_requests_per_connection": 1000}


SETTINGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "shipped": _shipped,
    "max_concurrent_streams: 8": _max_streams,
    "max_requests_per_connection: 1000": _recycle,
}


def worker_requests(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("epp_worker_requests_total{"):
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            out[worker] = float(line.rsplit(" ", 1)[1])
    return out


def picker_connections(admin_port: int) -> int:
    url = f"http://127.0.0.1:{admin_port}/stats?format=json&filter=endpoint_picker.upstream_cx_total"
    with urllib.request.urlopen(url, timeout=10) as r:
        stats = json.load(r)["stats"]
    return int(next(s["value"] for s in stats if s.get("name", "").endswith("upstream_cx_total")))


def run_cell(stack: LocalStack, work: Path, setting: Callable[[dict[str, Any]], None],
             concurrency: int, seconds: float, bodies: list[bytes]) -> tuple[list[float], int, float]:
    p = stack.ports
    config = envoy_cfg.epp_config(p.envoy, p.epp_grpc, p.envoy_admin)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "endpoint_picker":
            setting(cluster)
    path = envoy_cfg.write_config(config, work / "envoy.yaml")
    envoy = Process("envoy", [envoy_cfg.envoy_binary(), "-c", str(path), "--disable-hot-restart",
                              "--concurrency", str(concurrency), "--log-level", "warn"], work)
    try:
        wait_for_http(f"http://127.0.0.1:{p.envoy_admin}/ready", expect=b"LIVE")
        before = worker_requests(p.epp_metrics)
        result = run_closed_loop(f"{stack.url}/v1/completions", bodies, CONCURRENCY, seconds)
        after = worker_requests(p.epp_metrics)
        connections = picker_connections(p.envoy_admin)
    finally:
        envoy.stop()
    routed = [after[w] - before.get(w, 0.0) for w in sorted(after, key=int)]
    return routed, connections, result.requests / result.duration_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--envoy-concurrency", default="1,2,4")
    args = parser.parse_args()
    bodies = [json.dumps({"model": "qwen3", "prompt": f"{i} " + "x" * 1000,
                          "max_tokens": 1}).encode() for i in range(64)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stack = LocalStack(work, StackPorts.free(4), sim_args=SIM_ARGS,
                           epp_args=["--workers", str(args.workers), "--log-level", "WARNING"])
        try:
            stack.start_sims()
            stack.start_epp()
            for name, setting in SETTINGS.items():
                for concurrency in (int(c) for c in args.envoy_concurrency.split(",")):
                    for _ in range(args.repeats):
                        routed, connections, rate = run_cell(
                            stack, work, setting, concurrency, args.seconds, bodies)
                        total = sum(routed) or 1.0
                        rows.append((name, concurrency, connections, routed,
                                     max(routed) / total, rate))
                        print(f"{name} c={concurrency}: {routed} over {connections} "
                              "connections", file=sys.stderr)
        finally:
            stack.stop()
    print(f"# ext_proc streams over `epp --workers {args.workers}` ({platform.python_version()}, "
          f"{os.cpu_count()} CPUs; {CONCURRENCY} client connections, {args.seconds:g} s a run)")
    print()
    print("| picker cluster setting | Envoy threads | connections to the picker "
          "| streams per worker | busiest worker's share | req/s |")
    print("|---|---:|---:|---|---:|---:|")
    for name, concurrency, connections, routed, share, rate in rows:
        print(f"| {name} | {concurrency} | {connections} | "
              f"{' / '.join(f'{n:.0f}' for n in routed)} | {share:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
