"""`make run`: 4 epp-sim pods, the EPP and Envoy on the documented local ports.

Prints a curl to try, then runs until Ctrl-C (or SIGTERM) and stops everything.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from epp.devtools.procs import REPO_ROOT
from epp.devtools.stack import LocalStack, StackPorts

# Precise prefix-cache routing from the sims' KV events (local Qwen3.6 tokenizer).
CONFIG = REPO_ROOT / "deploy" / "local" / "epp-config.yaml"


def _busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    """Run the local stack in the foreground."""
    p = argparse.ArgumentParser(prog="make run", description=__doc__)
    p.add_argument("--sims", type=int, default=4, help="number of simulated vLLM pods")
    p.add_argument("--itl-ms", default="20", help="sim inter-token latency (ms)")
    p.add_argument("--ttft-ms", default="50", help="sim time to first token (ms)")
    args = p.parse_args(argv)

    ports = StackPorts.default(args.sims, kv_events=True)
    busy = [port for port in (ports.envoy, ports.envoy_admin, ports.epp_grpc, ports.epp_health,
                              ports.epp_metrics, *ports.sims, *ports.kv_events,
                              *(p + 1 for p in ports.kv_events)) if _busy(port)]
    if busy:
        print(f"make run: port(s) {busy} already in use; stop whatever holds them",
              file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="epp-run-"))
    stack = LocalStack(work, ports,
                       sim_args=["--ttft-ms", args.ttft_ms, "--itl-ms", args.itl_ms,
                                 "--tokenizer", "qwen"],
                       epp_args=["--config-file", str(CONFIG)])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting {args.sims} epp-sim pods with KV events, the EPP and Envoy "
          f"(logs in {work}) ...",
          flush=True)
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"make run: failed to start: {exc}", file=sys.stderr)
        return 1
    url = stack.url
    print(f"""
Ready. Envoy listens on {url}; the EPP picks one of {', '.join(stack.sim_addresses)}.

  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "qwen3", "messages": [{{"role": "user", "content": "Hello!"}}]}}' -i

The response header x-sim-endpoint names the pod that served it. Send the same long
system prompt twice: the second request goes to the pod that cached it, and its
usage.prompt_tokens_details.cached_tokens says how much was reused.
EPP metrics: http://127.0.0.1:{ports.epp_metrics}/metrics   Envoy admin: http://127.0.0.1:{ports.envoy_admin}
Ctrl-C stops everything.
""", flush=True)
    try:
        while not stop.wait(0.5):
            dead = [proc.name for proc in [stack.envoy, stack.epp, *stack.sims]
                    if proc is not None and not proc.alive()]
            if dead:
                print(f"make run: {', '.join(dead)} exited; see logs in {work}", file=sys.stderr)
                return 1
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
