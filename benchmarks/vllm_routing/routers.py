"""The routers of the benchmark, each in front of the same vLLM servers:

- ours: Envoy with the shipped config (``epp.devtools.envoy.epp_config``) + N EPP
  processes (round-robin over them per request, each subscribed to every server's KV
  events) on an endpoints file that lists ``kvEvents``, with no config file (the built-in
  default) or with ``--config-file``; started fresh for every cell, so each starts cold;
- client-side round-robin (no router);
- the hand-pinned reference: each tenant always goes to one server
  (``workload.pin_tenants``).
"""

from __future__ import annotations

import secrets
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.vllm_routing.measure import IndexCheck, parse_metrics
from benchmarks.vllm_routing.workload import BenchRequest, pin_tenants
from benchmarks.compare.replica_sync import row_subject, wait_synced
from epp.devtools import envoy as envoy_cfg
from epp.devtools.nats import NatsServer
from epp.devtools.procs import Process, free_port, python_module, wait_for_http
from tests.vllm.servers import VLLMServer

# Replica i runs with seed EPP_SEED + i: replicas break ties independently, as separate
# pods of a Deployment would.
EPP_SEED = 1
# ZMQ subscribers connect asynchronously and the block size comes from the first scrape
# of vllm:cache_config_info; give both this long before traffic.
SUBSCRIBE_GRACE_S = 1.5
START_TIMEOUT_S = 60.0
# The one addition to the shipped Envoy config: a response header naming the server that
# answered (the pick travels in a request header the client never sees).
UPSTREAM_HEADER = "x-bench-upstream"


@dataclass
class Router:
    """One routing setup."""

    name: str
    description: str
    servers: list[VLLMServer] = field(default_factory=list)

    def start(self, servers: Sequence[VLLMServer], work: Path) -> None:
        self.servers = list(servers)

    def target(self, request: BenchRequest, seq: int) -> tuple[str, int | None]:
        """Base URL for a request and the server index when the client picked it."""
        raise NotImplementedError

    def index_check(self) -> IndexCheck | None:
        """The EPP's index check over the cell (None: no EPP)."""
        return None

    def stop(self) -> None:
        pass


@dataclass
class EppRouter(Router):
    """Envoy + ``replicas`` EPP processes, the built-in default or ``config_file``."""

    config_file: Path | None = None
    replicas: int = 1
    # Replicas share pending picks and in-flight load over this NATS server (None: not).
    nats: NatsServer | None = None
    processes: list[Process] = field(default_factory=list)
    metrics_urls: list[str] = field(default_factory=list)
    url: str = ""

    def start(self, servers: Sequence[VLLMServer], work: Path) -> None:
        super().start(servers, work)
        work.mkdir(parents=True, exist_ok=True)
        endpoints = work / "endpoints.yaml"
        endpoints.write_text(yaml.safe_dump({"endpoints": [
            {"name": f"vllm-{s.index}", "address": s.address, "kvEvents": s.kv_endpoint}
            for s in servers]}), encoding="utf-8")
        config = [] if self.config_file is None else ["--config-file", str(self.config_file)]
        if self.nats is not None:
            config += ["--replica-sync-url", self.nats.ensure_running().url,
                       "--replica-sync-subject",
                       row_subject(self.name.replace(" ", "-").replace("×", "x"),
                                   secrets.token_hex(4))]
        grpc_ports = []
        try:
            for replica in range(self.replicas):
                grpc, health, metrics = free_port(), free_port(), free_port()
                epp = Process(f"epp-{replica}", python_module(
                    "epp", "--endpoints-file", str(endpoints), "--bind-address", "127.0.0.1",
                    "--grpc-port", str(grpc), "--grpc-health-port", str(health),
                    "--metrics-port", str(metrics), *config, "--log-level", "WARNING",
                    "--seed", str(EPP_SEED + replica), "--enable-explain"), work)
                self.processes.append(epp)
                grpc_ports.append(grpc)
                self.metrics_urls.append(f"http://127.0.0.1:{metrics}/metrics")
            for epp, url in zip(self.processes, self.metrics_urls, strict=True):
                epp.wait_for_http(url, timeout=START_TIMEOUT_S)
            if self.nats is not None:
                wait_synced(self.metrics_urls)
            listen, admin = free_port(), free_port()
            config_doc = envoy_cfg.epp_config(listen, grpc_ports, admin)
            _name_upstream(config_doc)
            envoy_path = envoy_cfg.write_config(config_doc, work / "envoy.yaml")
            self.processes.append(Process("envoy", [
                envoy_cfg.envoy_binary(), "-c", str(envoy_path), "--disable-hot-restart",
                "--concurrency", "1", "--log-level", "warn"], work))
            wait_for_http(f"http://127.0.0.1:{admin}/ready", expect=b"LIVE")
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{listen}"
        time.sleep(SUBSCRIBE_GRACE_S)

    def target(self, request: BenchRequest, seq: int) -> tuple[str, int | None]:
        return self.url, None

    def index_check(self) -> IndexCheck:
        pages = []
        for url in self.metrics_urls:
            with urllib.request.urlopen(url, timeout=10) as resp:
                pages.append(parse_metrics(resp.read().decode()))
        return IndexCheck.from_pages(pages)

    def stop(self) -> None:
        for proc in reversed(self.processes):  # Envoy first
            proc.stop()
        self.processes = []
        self.metrics_urls = []


def _name_upstream(config: dict[str, Any]) -> None:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    for host in hcm["route_config"]["virtual_hosts"]:
        host.setdefault("response_headers_to_add", []).append({"header": {
            "key": UPSTREAM_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}})


@dataclass
class RoundRobin(Router):
    """The client sends request n to server n mod N (no router)."""

    def target(self, request: BenchRequest, seq: int) -> tuple[str, int | None]:
        i = seq % len(self.servers)
        return self.servers[i].url, i


@dataclass
class Pinned(Router):
    """Each tenant always to the same server, tenants balanced over the servers."""

    tenants: int = 0
    assignment: dict[int, int] = field(default_factory=dict)

    def start(self, servers: Sequence[VLLMServer], work: Path) -> None:
        super().start(servers, work)
        self.assignment = pin_tenants(self.tenants, len(self.servers))

    def target(self, request: BenchRequest, seq: int) -> tuple[str, int | None]:
        i = self.assignment[request.tenant]
        return self.servers[i].url, i


def epp_routers(configs: Sequence[tuple[str, Path]], replicas: Sequence[int],
                nats: NatsServer | None = None) -> list[EppRouter]:
    """The built-in default and every given config, each at every replica count; with
    ``nats``, every count above 1 also as replicas that share their routing over it."""
    out = []
    for name, path in [("default", None), *configs]:
        source = "built-in default (no config file)" if path is None else f"--config-file {path}"
        for count in replicas:
            label = f"epp {name}" if count == 1 else f"epp {name} ×{count}"
            more = "" if count == 1 else f"; {count} EPP replicas behind one Envoy"
            out.append(EppRouter(label, f"Envoy + EPP, {source}{more}", config_file=path,
                                 replicas=count))
            if nats is not None and count > 1:
                out.append(EppRouter(f"{label} sync", f"Envoy + EPP, {source}{more}, "
                                     "sharing pending picks and in-flight load over NATS",
                                     config_file=path, replicas=count, nats=nats))
    return out


def all_routers(configs: Sequence[tuple[str, Path]], replicas: Sequence[int],
                tenants: int, nats: NatsServer | None = None) -> list[Router]:
    """Every router in run order: ours, then round-robin, then the pinned reference."""
    return [
        *epp_routers(configs, replicas, nats),
        RoundRobin("round-robin", "client-side round-robin over the servers, no router"),
        Pinned("pinned", "each tenant pinned to one server (hash order, balanced), no router",
               tenants=tenants),
    ]
