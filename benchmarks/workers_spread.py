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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen import run_closed_loop
from overhead import envoy_stats, start_tuned_envoy, worker_requests

from epp.devtools.stack import LocalStack, StackPorts

SIM_ARGS = ("--ttft-ms", "0", "--max-tokens", "1", "--tokenizer", "bytes",
            "--prefill-tokens-per-s", "0", "--no-enable-prefix-caching", "--max-num-seqs", "64")
CONCURRENCY = 16


def _shipped(options: dict[str, Any]) -> None:
    pass


def _max_streams(options: dict[str, Any]) -> None:
    options["explicit_http_config"]["http2_protocol_options"] = {"max_concurrent_streams": 8}


def _recycle(options: dict[str, Any]) -> None:
    options["common_http_protocol_options"] = {"max_requests_per_connection": 1000}


# Each changes the picker cluster's HTTP protocol options in place.
SETTINGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "shipped": _shipped,
    "max_concurrent_streams: 8": _max_streams,
    "max_requests_per_connection: 1000": _recycle,
}


def run_cell(stack: LocalStack, setting: Callable[[dict[str, Any]], None],
             concurrency: int, seconds: float, bodies: list[bytes]) -> tuple[list[float], int, float]:
    p = stack.ports
    envoy = start_tuned_envoy(stack, setting, concurrency)
    try:
        before = worker_requests(p.epp_metrics)
        result = run_closed_loop(f"{stack.url}/v1/completions", bodies, CONCURRENCY, seconds)
        after = worker_requests(p.epp_metrics)
        connections = envoy_stats(p.envoy_admin)["upstream_cx_total"]
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
                            stack, setting, concurrency, args.seconds, bodies)
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
