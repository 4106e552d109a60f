"""`make run`: 4 epp-sim pods, the EPP and Envoy on the documented local ports.

`make run PD=1` (``--pd``): half the pods prefill and half decode (label
``llm-d.ai/role``), on the prefill/decode-disaggregated config.

Prints a curl to try, then runs until Ctrl-C (or SIGTERM) and stops everything.
"""

from __future__ import annotations

import argparse
import json
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
# The same with prefill/decode disaggregation over role-labelled pods.
PD_CONFIG = REPO_ROOT / "deploy" / "local" / "pd-config.yaml"
ROLE_LABEL = "llm-d.ai/role"


def _busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    """Run the local stack in the foreground."""
    p = argparse.ArgumentParser(prog="make run", description=__doc__)
    p.add_argument("--sims", type=int, default=4, help="number of simulated vLLM pods")
    p.add_argument("--itl-ms", default="20", help="sim inter-token latency (ms)")
    p.add_argument("--ttft-ms", default="50", help="sim time to first token (ms)")
    p.add_argument("--pd", action="store_true",
                   help="prefill/decode disaggregation: half the pods prefill, half decode")
    args = p.parse_args(argv)
    if args.pd and args.sims < 2:
        p.error("--pd needs at least 2 pods (one prefill, one decode)")
    roles = _roles(args.sims) if args.pd else {}

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
                       epp_args=["--config-file", str(PD_CONFIG if args.pd else CONFIG)],
                       per_sim_args={i: ["--role", role] for i, role in roles.items()},
                       sim_labels={i: {ROLE_LABEL: role} for i, role in roles.items()})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    kind = "prefill/decode " if args.pd else ""
    print(f"starting {args.sims} {kind}epp-sim pods with KV events, the EPP and Envoy "
          f"(logs in {work}) ...",
          flush=True)
    try:
        stack.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"make run: failed to start: {exc}", file=sys.stderr)
        return 1
    if args.pd:
        print(_pd_banner(stack, roles, ports.epp_metrics, ports.envoy_admin), flush=True)
    else:
        _print_banner(stack, ports.epp_metrics, ports.envoy_admin)
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


def _roles(sims: int) -> dict[int, str]:
    """The first half of the pods prefill, the rest decode."""
    return {i: "prefill" if i < sims // 2 else "decode" for i in range(sims)}


def _pd_banner(stack: LocalStack, roles: dict[int, str], metrics_port: int,
               admin_port: int) -> str:
    # A long prompt (~3,000 tokens) is far above the config's nonCachedTokens (256), so
    # the EPP names a prefill pod; a file keeps the curl line short.
    facts = " ".join(f"Fact {i}: the value of item {i} is {i * 7}." for i in range(250))
    body = {"model": "qwen3", "max_tokens": 8, "messages": [
        {"role": "system", "content": f"You answer questions about these facts. {facts}"},
        {"role": "user", "content": "What is the value of item 42?"}]}
    body_file = stack.work_dir / "pd-request.json"
    body_file.write_text(json.dumps(body), encoding="utf-8")
    pods = "\n".join(f"  {role:7} {address}" for address, role in
                     zip(stack.sim_addresses, roles.values(), strict=True))
    return f"""
Ready. Envoy listens on {stack.url}; the EPP disaggregates over these pods:
{pods}

A long prompt is prefilled on a prefill pod and decoded on a decode pod:

  curl -s -o /dev/null -D - {stack.url}/v1/chat/completions \\
    -H 'content-type: application/json' -d @{body_file} | grep -i '^x-sim-'

x-sim-endpoint is the decode pod that served it, x-sim-prefilled-by the prefill pod that
computed the prompt (x-sim-prefiller: the x-prefiller-host-port the EPP set). Send the
same file again: the decode pod now holds the prompt, so it is not disaggregated
(x-sim-prefilled-by: local). Short prompts are never disaggregated.
EPP metrics (epp_pd_decision_total): http://127.0.0.1:{metrics_port}/metrics   Envoy admin: http://127.0.0.1:{admin_port}
Ctrl-C stops everything.
"""


def _print_banner(stack: LocalStack, metrics_port: int, admin_port: int) -> None:
    url = stack.url
    print(f"""
Ready. Envoy listens on {url}; the EPP picks one of {', '.join(stack.sim_addresses)}.

  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "qwen3", "messages": [{{"role": "user", "content": "Hello!"}}]}}' -i

The response header x-sim-endpoint names the pod that served it. Send the same long
system prompt twice: the second request goes to the pod that cached it, and its
usage.prompt_tokens_details.cached_tokens says how much was reused.
EPP metrics: http://127.0.0.1:{metrics_port}/metrics   Envoy admin: http://127.0.0.1:{admin_port}
Ctrl-C stops everything.
""", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
