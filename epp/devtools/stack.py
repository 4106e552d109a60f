"""A local stack: N epp-sim pods, the EPP, and Envoy in front, on loopback ports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import (
    Process,
    free_port,
    free_port_pair,
    python_module,
    wait_for_http,
)


@dataclass
class StackPorts:
    """Every port the stack uses; ``free()`` picks unused ones, ``default()`` the
    documented ones of `make run`."""

    envoy: int
    envoy_admin: int
    epp_grpc: int
    epp_health: int
    epp_metrics: int
    sims: list[int] = field(default_factory=list)
    kv_events: list[int] = field(default_factory=list)  # per sim; replay on port + 1

    @classmethod
    def free(cls, sims: int, kv_events: bool = False) -> StackPorts:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port(),
                   [free_port() for _ in range(sims)],
                   [free_port_pair() for _ in range(sims)] if kv_events else [])

    @classmethod
    def default(cls, sims: int, kv_events: bool = False) -> StackPorts:
        return cls(8081, 9901, 9002, 9003, 9090, [8001 + i for i in range(sims)],
                   [5557 + 10 * i for i in range(sims)] if kv_events else [])


class LocalStack:
    """Starts and stops the processes of a local deployment, in dependency order."""

    def __init__(self, work_dir: Path, ports: StackPorts, *,
                 sim_args: Sequence[str] = (), epp_args: Sequence[str] = (),
                 per_sim_args: dict[int, Sequence[str]] | None = None,
                 sim_labels: dict[int, dict[str, str]] | None = None,
                 envoy_concurrency: int = 2,
                 epp_tls: envoy_cfg.EppTls = envoy_cfg.KGATEWAY_TLS) -> None:
        self.work_dir = work_dir
        self.ports = ports
        self.sim_args = list(sim_args)
        self.per_sim_args = {i: list(a) for i, a in (per_sim_args or {}).items()}
        # Endpoint labels per sim index, e.g. {"llm-d.ai/role": "prefill"} for P/D pools.
        self.sim_labels = {i: dict(labels) for i, labels in (sim_labels or {}).items()}
        self.epp_args = list(epp_args)
        self.envoy_concurrency = envoy_concurrency
        self.epp_tls = epp_tls  # how Envoy dials the EPP (match the EPP's TLS flags)
        self.sims: list[Process] = []
        self.epp: Process | None = None
        self.envoy: Process | None = None
        self.endpoints_file = work_dir / "endpoints.yaml"

    @property
    def sim_addresses(self) -> list[str]:
        """``ip:port`` of each sim pod, in start order."""
        return [f"127.0.0.1:{p}" for p in self.ports.sims]

    @property
    def url(self) -> str:
        """Base URL of the Envoy listener."""
        return f"http://127.0.0.1:{self.ports.envoy}"

    def start(self) -> LocalStack:
        """Start sims, then the EPP, then Envoy; each is ready when this returns."""
        try:
            self.start_sims()
            self.start_epp()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def start_sims(self) -> None:
        """Start one epp-sim per sim port and write the endpoints file for them."""
        for i, port in enumerate(self.ports.sims):
            kv = []
            if self.ports.kv_events:
                kv_port = self.ports.kv_events[i]
                kv = ["--kv-events-port", str(kv_port),
                      "--kv-events-replay-port", str(kv_port + 1)]
            proc = Process(f"sim-{i}", python_module(
                "epp.sim", "--host", "127.0.0.1", "--port", str(port), *kv, *self.sim_args,
                *self.per_sim_args.get(i, [])),
                self.work_dir)
            self.sims.append(proc)
        for proc in self.sims:
            proc.wait_for_log("listening")
        self.write_endpoints(self.sim_addresses)

    def write_endpoints(self, addresses: Sequence[str]) -> None:
        """(Re)write the static endpoints file the EPP watches."""
        entries: list[dict[str, object]] = []
        for i, a in enumerate(addresses):
            entry: dict[str, object] = {"name": f"sim-{i}", "address": a}
            index = self.sim_addresses.index(a) if a in self.sim_addresses else i
            if self.ports.kv_events:
                entry["kvEvents"] = f"tcp://127.0.0.1:{self.ports.kv_events[index]}"
            if self.sim_labels.get(index):
                entry["labels"] = dict(self.sim_labels[index])
            entries.append(entry)
        doc = {"endpoints": entries}
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc), encoding="utf-8")
        tmp.replace(self.endpoints_file)  # atomic: the EPP never reads half a file

    def start_epp(self, extra_args: Sequence[str] = (),
                  discovery_args: Sequence[str] | None = None) -> Process:
        """Start the EPP on the stack's ports and wait until it serves. Discovery is the
        stack's endpoints file unless ``discovery_args`` says otherwise."""
        p = self.ports
        discovery = (["--endpoints-file", str(self.endpoints_file)] if discovery_args is None
                     else list(discovery_args))
        self.epp = Process("epp", python_module(
            "epp", *discovery,
            "--bind-address", "127.0.0.1", "--grpc-port", str(p.epp_grpc),
            "--grpc-health-port", str(p.epp_health), "--metrics-port", str(p.epp_metrics),
            *self.epp_args, *extra_args), self.work_dir)
        # The metrics server starts after the gRPC servers: it answering means serving
        # (independent of the EPP's log level).
        self.epp.wait_for_http(f"http://127.0.0.1:{p.epp_metrics}/metrics")
        return self.epp

    def stop_epp(self) -> int | None:
        """Stop the EPP (SIGTERM) and return its exit code."""
        code = self.epp.stop() if self.epp is not None else None
        self.epp = None
        return code

    def start_envoy(self) -> None:
        """Start Envoy with the shipped config, re-ported, and wait until it is live."""
        p = self.ports
        config = envoy_cfg.write_config(
            envoy_cfg.epp_config(p.envoy, p.epp_grpc, p.envoy_admin, self.epp_tls),
            self.work_dir / "envoy.yaml")
        self.envoy = Process("envoy", [
            envoy_cfg.envoy_binary(), "-c", str(config), "--disable-hot-restart",
            "--concurrency", str(self.envoy_concurrency), "--log-level", "warn",
        ], self.work_dir)
        wait_for_http(f"http://127.0.0.1:{p.envoy_admin}/ready", expect=b"LIVE")

    def stop(self) -> None:
        """Stop everything (Envoy first, so no request reaches a stopped EPP)."""
        for proc in [self.envoy, self.epp, *self.sims]:
            if proc is not None:
                proc.stop()
        self.envoy = self.epp = None
        self.sims = []
