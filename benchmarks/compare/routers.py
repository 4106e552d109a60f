"""Launchers for every router the comparison runs, all in front of the same fleet.

- ours: Envoy (``deploy/envoy/envoy.yaml``, ext_proc) + the EPP with one of four
  scheduling configurations (precise, approximate, load-only, random);
- Envoy round-robin (no picker);
- ``vllm-router`` (``round_robin``, ``cache_aware``, ``kv_aware`` fed by the pods' KV
  events) and ``sglang-router`` (``cache_aware``), from the peers' venv;
- the oracle (no process: the load generator routes, see ``fleet.Oracle``).

Each launcher starts its processes, says which pids are the router (for CPU accounting)
and stops them. Peers run with their defaults except where noted in ``PEER_NOTES``.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.compare.fleet import MODEL, Fleet
from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import (
    REPO_ROOT,
    Process,
    free_port,
    python_module,
    wait_for_http,
)

PEERS_VENV = REPO_ROOT / ".venv-peers"
EPP_PRECISE_CONFIG = REPO_ROOT / "deploy" / "local" / "epp-config.yaml"
# Queue and KV-utilisation scorers only: the load-balancing half of the default profile.
LOAD_ONLY_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: max-score-picker}
"""
RANDOM_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: random-picker}
"""
EPP_ARGS = ("--log-level", "WARNING", "--seed", "1")
# The EPP's metrics timing (defaults: scrape every 0.1 s, stale after 0.5 s) runs on the
# fleet's clock, so it is divided by the time scale like the pods' timings; otherwise a
# 10x-faster fleet would look 10x staler to it than a real one. The peers keep their
# defaults: they count in-flight requests themselves and poll nothing on this path.
EPP_SCRAPE_INTERVAL_S = 0.1
EPP_STALE_AFTER_S = 0.5
# ZMQ subscribers connect asynchronously; give them this long before traffic.
SUBSCRIBE_GRACE_S = 1.0
START_TIMEOUT_S = 60.0
PEER_NOTES = {
    "vllm-router": "defaults; --prometheus-port moved to a free port",
    "sglang-router": "defaults, --log-level warn; --prometheus-port moved to a free port",
}


@dataclass
class Router:
    """One routing setup; ``url`` is where clients send requests (None: the oracle)."""

    name: str
    kind: str  # "ours", "baseline", "peer", "oracle"
    description: str
    uses_kv_events: bool = False
    processes: list[Process] = field(default_factory=list)
    url: str | None = None

    def start(self, fleet: Fleet, work_dir: Path) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def alive(self) -> bool:
        return all(p.alive() for p in self.processes)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes = []

    def available(self) -> str | None:
        """Why this router cannot run here (None: it can)."""
        return None

    def diagnostics(self) -> str | None:
        """Anything its own logs say about how it routed (read before it stops)."""
        return None


@dataclass
class EppRouter(Router):
    """Envoy with ext_proc + our EPP with one scheduling configuration."""

    config_text: str | None = None  # None: the built-in default (approximate without events)
    config_file: Path | None = None

    def start(self, fleet: Fleet, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        endpoints = work_dir / "endpoints.yaml"
        entries = []
        for pod in fleet.pods:
            entry: dict[str, object] = {"name": pod.name, "address": pod.address, "model": MODEL}
            if self.uses_kv_events:
                entry["kvEvents"] = pod.kv_endpoint
            entries.append(entry)
        endpoints.write_text(yaml.safe_dump({"endpoints": entries}), encoding="utf-8")
        config: list[str] = []
        if self.config_file is not None:
            config = ["--config-file", str(self.config_file)]
        elif self.config_text is not None:
            path = work_dir / "epp-config.yaml"
            path.write_text(self.config_text, encoding="utf-8")
            config = ["--config-file", str(path)]
        grpc, health, metrics = free_port(), free_port(), free_port()
        epp = Process("epp", python_module(
            "epp", "--endpoints-file", str(endpoints), "--bind-address", "127.0.0.1",
            "--grpc-port", str(grpc), "--grpc-health-port", str(health),
            "--metrics-port", str(metrics), *config, *EPP_ARGS,
            "--metrics-scrape-interval", f"{EPP_SCRAPE_INTERVAL_S / fleet.time_scale:g}",
            "--metrics-staleness-threshold", f"{EPP_STALE_AFTER_S / fleet.time_scale:g}"),
            work_dir)
        self.processes.append(epp)
        epp.wait_for_http(f"http://127.0.0.1:{metrics}/metrics", timeout=START_TIMEOUT_S)
        listen, admin = free_port(), free_port()
        envoy_path = envoy_cfg.write_config(envoy_cfg.epp_config(listen, grpc, admin),
                                            work_dir / "envoy.yaml")
        self.processes.append(_envoy(envoy_path, work_dir))
        wait_for_http(f"http://127.0.0.1:{admin}/ready", expect=b"LIVE")
        self.url = f"http://127.0.0.1:{listen}"
        time.sleep(SUBSCRIBE_GRACE_S)


@dataclass
class EnvoyRoundRobin(Router):
    """Plain Envoy, round-robin over the pods, no picker."""

    def start(self, fleet: Fleet, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        listen, admin = free_port(), free_port()
        config = envoy_cfg.round_robin_config(listen, admin,
                                              [("127.0.0.1", p.port) for p in fleet.pods])
        self.processes.append(_envoy(envoy_cfg.write_config(config, work_dir / "envoy.yaml"),
                                     work_dir))
        wait_for_http(f"http://127.0.0.1:{admin}/ready", expect=b"LIVE")
        self.url = f"http://127.0.0.1:{listen}"


@dataclass
class VllmRouter(Router):
    """``vllm-router --policy P`` from the peers' venv."""

    policy: str = "round_robin"

    def available(self) -> str | None:
        return None if (PEERS_VENV / "bin" / "vllm-router").exists() else (
            "vllm-router not installed (make bench installs it into .venv-peers)")

    def start(self, fleet: Fleet, work_dir: Path) -> None:
        port, prometheus = free_port(), free_port()
        argv = [str(PEERS_VENV / "bin" / "vllm-router"), "--host", "127.0.0.1",
                "--port", str(port), "--policy", self.policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus),
                "--worker-urls", *[p.url for p in fleet.pods]]
        if self.policy == "kv_aware":
            for pod in fleet.pods:
                argv += ["--kv-event-source", f"{pod.url}={pod.kv_endpoint}",
                         "--kv-event-replay-source", f"{pod.url}={pod.kv_replay_endpoint}"]
            argv += ["--kv-event-model", MODEL, "--kv-event-block-size", str(fleet.block_size)]
        # kv_aware logs each decision at debug level, with the prefix it credited.
        log = "warn,vllm_router_rs::policies::kv_aware=debug" if self.policy == "kv_aware" \
            else "warn"
        self.processes.append(Process(f"vllm-router-{self.policy}", argv, work_dir,
                                      env={"RUST_LOG": log}))
        self._wait(port)

    def diagnostics(self) -> str | None:
        if self.policy != "kv_aware" or not self.processes:
            return None
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.processes[0].log_path.read_text(
            errors="replace"))
        credited = re.findall(r"credited_prefix_tokens=(\d+)", text)
        if not credited:
            return "its log shows no KV prefix decision"
        hits = sum(1 for c in credited if int(c) > 0)
        return (f"its debug log shows {len(credited)} KV prefix decisions, {hits} of which "
                "credited any cached prefix (credited_prefix_tokens > 0)")

    def _wait(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                wait_for_http(url + "/health", timeout=1)
                break
            except TimeoutError:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited:\n{self.processes[-1].tail()}")
                if time.monotonic() > deadline:
                    raise
        self.url = url
        time.sleep(SUBSCRIBE_GRACE_S)


@dataclass
class SglangRouter(VllmRouter):
    """``sglang-router launch --policy cache_aware --log-level warn``."""

    def available(self) -> str | None:
        return None if (PEERS_VENV / "bin" / "sglang-router").exists() else (
            "sglang-router not installed (make bench installs it into .venv-peers)")

    def start(self, fleet: Fleet, work_dir: Path) -> None:
        port, prometheus = free_port(), free_port()
        argv = [str(PEERS_VENV / "bin" / "sglang-router"), "launch", "--host", "127.0.0.1",
                "--port", str(port), "--policy", self.policy, "--log-level", "warn",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus),
                "--worker-urls", *[p.url for p in fleet.pods]]
        self.processes.append(Process(f"sglang-router-{self.policy}", argv, work_dir))
        self._wait(port)


@dataclass
class OracleRouter(Router):
    """No process: the load generator asks every pod what it holds and picks."""

    def start(self, fleet: Fleet, work_dir: Path) -> None:
        self.url = None


def _envoy(config: Path, work_dir: Path) -> Process:
    return Process(f"envoy-{config.parent.name}", [
        envoy_cfg.envoy_binary(), "-c", str(config), "--disable-hot-restart",
        "--concurrency", "1", "--log-level", "warn"], work_dir)


def precise_with_prefix_weight(weight: int) -> EppRouter:
    """The precise profile with another prefix weight (a tuning probe, not a default)."""
    text = EPP_PRECISE_CONFIG.read_text(encoding="utf-8")
    old = "{pluginRef: precise-prefix-cache-scorer, weight: 6}"
    if old not in text:
        raise ValueError(f"{EPP_PRECISE_CONFIG} changed: no {old!r} to reweight")
    return EppRouter(
        f"epp precise prefix x{weight}", "ours",
        f"as epp precise with the prefix scorer weighted {weight} instead of 6 (a tuning "
        "probe, not a shipped profile)", uses_kv_events=True,
        config_text=text.replace(old, old.replace("weight: 6", f"weight: {weight}")))


def all_routers(variants: bool = False) -> list[Router]:
    """Every router of the comparison, in run order (ours first, the oracle last);
    ``variants`` adds tuning probes of our profiles."""
    extra: list[Router] = [precise_with_prefix_weight(3)] if variants else []
    return [
        EppRouter("epp precise", "ours",
                  "Envoy + EPP, deploy/local/epp-config.yaml: precise prefix (KV events, "
                  "local Qwen tokenizer) x6 + queue x2 + KV utilisation x2",
                  uses_kv_events=True, config_file=EPP_PRECISE_CONFIG),
        *extra,
        EppRouter("epp approximate", "ours",
                  "Envoy + EPP, built-in default without KV events: GIE's approximate "
                  "prefix scorer x3 + queue x2 + KV utilisation x2"),
        EppRouter("epp load-only", "ours",
                  "Envoy + EPP: queue x2 + KV utilisation x2", config_text=LOAD_ONLY_CONFIG),
        EppRouter("epp random", "ours", "Envoy + EPP: random-picker", config_text=RANDOM_CONFIG),
        EnvoyRoundRobin("envoy round-robin", "baseline", "Envoy ROUND_ROBIN cluster, no picker"),
        VllmRouter("vllm-router round_robin", "peer", "vllm-router --policy round_robin",
                   policy="round_robin"),
        VllmRouter("vllm-router cache_aware", "peer",
                   "vllm-router --policy cache_aware (calls render on every pod per request)",
                   policy="cache_aware"),
        VllmRouter("vllm-router kv_aware", "peer",
                   "vllm-router --policy kv_aware, fed by the pods' KV events (+ replay)",
                   uses_kv_events=True, policy="kv_aware"),
        SglangRouter("sglang-router cache_aware", "peer",
                     "sglang-router launch --policy cache_aware (approximate radix tree)",
                     policy="cache_aware"),
        OracleRouter("oracle", "oracle",
                     "longest cached prefix from every pod's true cache, ties by load; "
                     "its lookup time is not counted"),
    ]


def select(routers: Sequence[Router], names: Sequence[str] | None) -> list[Router]:
    """The routers whose names contain one of ``names`` (all when None)."""
    if not names:
        return list(routers)
    chosen = [r for r in routers if any(n in r.name for n in names)]
    if not chosen:
        raise ValueError(f"no router matches {list(names)}; routers: "
                         f"{', '.join(r.name for r in routers)}")
    return chosen


def peers_python() -> str | None:
    """The peers' venv interpreter (matplotlib, inference-perf), if installed."""
    path = PEERS_VENV / "bin" / "python"
    return str(path) if path.exists() and shutil.which(str(path)) else None
