"""Launchers for every router the comparison runs, all in front of the same fleet.

- ours: Envoy (``deploy/envoy/envoy.yaml``, ext_proc) + the EPP: the built-in default
  with KV events (the headline, "epp default"), the built-in default without them
  (approximate), load-only, random, any config file given on the command line
  (``epp NAME``) and, in the full plan, ``deploy/local/epp-config.yaml`` (precise with a
  local tokenizer); each can run as N replicas behind one Envoy ("epp default ×2"), and
  with ``--replica-sync`` also as N replicas sharing routing over NATS ("epp default ×2
  sync", see ``replica_sync``);
- Envoy round-robin (no picker);
- ``vllm-router`` (``round_robin``, ``cache_aware``, ``kv_aware`` fed by the pods' KV
  events) and ``sglang-router`` (``cache_aware``), from the peers' venv;
- the oracle (no process: the load generator routes, see ``fleet.Oracle``).

Each launcher starts its processes, says which pids are the router (for CPU accounting)
and stops them. Peers run with their defaults except where noted in ``PEER_NOTES``.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.compare.fleet import MODEL, Fleet
from benchmarks.compare.metrics import picks_counted, scrape, sync_messages
from benchmarks.compare.replica_sync import missing_for_sync, row_subject, wait_synced
from epp.config.picker_config import DEFAULT_CONFIG, DEFAULT_PRECISE_CONFIG
from epp.devtools import envoy as envoy_cfg
from epp.devtools.nats import NatsServer
from epp.devtools.procs import (
    REPO_ROOT,
    Process,
    free_port,
    python_module,
    wait_for_http,
)

PEERS_VENV = REPO_ROOT / ".venv-peers"
EPP_PRECISE_CONFIG = REPO_ROOT / "deploy" / "local" / "epp-config.yaml"
HEADLINE = "epp default"
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
EPP_ARGS = ("--log-level", "WARNING")
# Replica i runs with seed EPP_SEED + i: replicas break ties independently, as separate
# pods of a Deployment would.
EPP_SEED = 1
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

    @property
    def config_label(self) -> str:
        """Which configuration this row ran, for the tables ("—": not an EPP)."""
        return "—"

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
    """Envoy with ext_proc + ``replicas`` EPP processes with one scheduling configuration
    (Envoy round-robins the ext_proc streams over the replicas; every replica subscribes
    to every pod's KV events). With ``replica_sync`` the replicas also share pending picks
    and in-flight load over ``sync_server``, on a subject of this instance's own."""

    config_text: str | None = None  # None (and no file): the built-in default
    config_file: Path | None = None
    config_source: str = ""  # how the tables name the config
    replicas: int = 1
    base_name: str = ""  # the name without the replica count
    metrics_urls: list[str] = field(default_factory=list)  # one per running replica
    replica_sync: bool = False  # --replica-sync-url to every replica
    sync_server: NatsServer | None = field(default=None, repr=False, compare=False)
    sync_subject: str = ""  # set at start: one per started instance

    def __post_init__(self) -> None:
        if not self.base_name:
            self.base_name = self.name

    @property
    def config_label(self) -> str:
        return self.config_source

    def effective_config(self) -> str:
        """The EndpointPickerConfig YAML this router's EPP runs (the built-in text when
        it is given none), for the results directory."""
        if self.config_file is not None:
            return self.config_file.read_text(encoding="utf-8")
        if self.config_text is not None:
            return self.config_text
        return DEFAULT_PRECISE_CONFIG if self.uses_kv_events else DEFAULT_CONFIG

    def with_replicas(self, count: int, sync: bool = False) -> EppRouter:
        """This router as ``count`` replicas, named with the count when it is not 1 and
        with ``sync`` when they share routing over NATS (only for 2 or more)."""
        if count < 1:
            raise ValueError(f"replicas must be ≥ 1, not {count}")
        if sync and count < 2:
            raise ValueError("replica sync needs at least 2 replicas")
        name = replica_row_name(self.base_name, count, sync)
        description = self.description if count == 1 else (
            f"{self.description}; {count} EPP replicas behind one Envoy (round-robin per "
            "request), each subscribed to every pod's KV events")
        if sync:
            description += ("; sharing pending picks and in-flight load over NATS "
                            "(--replica-sync-url to one nats-server, a subject per row)")
        return dataclasses.replace(self, name=name, description=description, replicas=count,
                                   replica_sync=sync, processes=[], url=None,
                                   metrics_urls=[], sync_subject="")

    def available(self) -> str | None:
        return missing_for_sync() if self.replica_sync else None

    def sync_args(self) -> list[str]:
        """The replica-sync flags every replica of this instance runs with (none without
        ``replica_sync``)."""
        if not self.replica_sync:
            return []
        if self.sync_server is None or not self.sync_subject:
            raise RuntimeError(f"{self.name}: no NATS server or subject to sync over")
        return ["--replica-sync-url", self.sync_server.url,
                "--replica-sync-subject", self.sync_subject]

    def pids(self) -> list[int]:
        """Envoy and the replicas, and for a synced row the NATS server too (the rows
        run one at a time, so what it spends during a row is that row's)."""
        pids = super().pids()
        server = self.sync_server
        if self.replica_sync and server is not None and server.pid is not None:
            pids.append(server.pid)
        return pids

    def alive(self) -> bool:
        return super().alive() and (not self.replica_sync or (
            self.sync_server is not None and self.sync_server.alive()))

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
        if self.replica_sync:
            if self.sync_server is None:
                raise RuntimeError(f"{self.name}: no NATS server to sync over")
            self.sync_server.ensure_running()
            self.sync_subject = row_subject(slug(self.name), secrets.token_hex(4))
        grpc_ports: list[int] = []
        for replica in range(self.replicas):
            grpc, health, metrics = free_port(), free_port(), free_port()
            epp = Process(f"epp-{replica}", python_module(
                "epp", "--endpoints-file", str(endpoints), "--bind-address", "127.0.0.1",
                "--grpc-port", str(grpc), "--grpc-health-port", str(health),
                "--metrics-port", str(metrics), *config, *EPP_ARGS,
                "--seed", str(EPP_SEED + replica),
                "--metrics-scrape-interval", f"{EPP_SCRAPE_INTERVAL_S / fleet.time_scale:g}",
                "--metrics-staleness-threshold", f"{EPP_STALE_AFTER_S / fleet.time_scale:g}",
                *self.sync_args()),
                work_dir)
            self.processes.append(epp)
            grpc_ports.append(grpc)
            self.metrics_urls.append(f"http://127.0.0.1:{metrics}/metrics")
            epp.wait_for_http(self.metrics_urls[-1], timeout=START_TIMEOUT_S)
        if self.replica_sync:
            wait_synced(self.metrics_urls)
        listen, admin = free_port(), free_port()
        envoy_path = envoy_cfg.write_config(envoy_cfg.epp_config(listen, grpc_ports, admin),
                                            work_dir / "envoy.yaml")
        self.processes.append(_envoy(envoy_path, work_dir))
        wait_for_http(f"http://127.0.0.1:{admin}/ready", expect=b"LIVE")
        self.url = f"http://127.0.0.1:{listen}"
        time.sleep(SUBSCRIBE_GRACE_S)

    def stop(self) -> None:
        super().stop()  # the NATS server is the run's: it outlives the row
        self.metrics_urls = []

    def diagnostics(self) -> str | None:
        """With replicas: how many requests each one scheduled (its pick counter), which
        shows Envoy spread the streams over all of them; synced, the NATS messages each
        one sent and received."""
        if self.replicas < 2:
            return None
        counts, messages = [], []
        for url in self.metrics_urls:
            try:
                text = scrape(url)
            except OSError as exc:
                counts.append(f"? ({type(exc).__name__})")
                messages.append("?")
                continue
            counts.append(f"{picks_counted(text):.0f}")
            sent, received = sync_messages(text)
            messages.append(f"{sent:.0f}/{received:.0f}")
        note = f"requests scheduled per replica over the whole run: {' / '.join(counts)}"
        if self.replica_sync:
            note += ("; replica-sync messages sent/received per replica: "
                     f"{' · '.join(messages)}")
        return note


def replica_row_name(base: str, count: int, sync: bool = False) -> str:
    """A row's name: ``epp default``, ``epp default ×2``, ``epp default ×2 sync``."""
    name = base if count == 1 else f"{base} ×{count}"
    return f"{name} sync" if sync else name




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


def describe_config(text: str) -> str:
    """One line naming what an EndpointPickerConfig schedules with: each profile's plugins
    with their weights and short parameters, e.g. ``queue-scorer ×2 + ... →
    max-score-picker``. Raises ValueError when the text is no such config."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("schedulingProfiles"), list):
        raise ValueError("no schedulingProfiles list")
    plugins: dict[str, dict[str, Any]] = {}
    for plugin in spec.get("plugins") or []:
        if isinstance(plugin, dict) and "type" in plugin:
            plugins[str(plugin.get("name") or plugin["type"])] = plugin
    profiles = []
    for profile in spec["schedulingProfiles"]:
        parts = []
        for ref in (profile or {}).get("plugins") or []:
            name = str(ref.get("pluginRef", "?"))
            plugin = plugins.get(name, {})
            label = str(plugin.get("type", name))
            if name != label:
                label = f"{name} ({label})"
            params = plugin.get("parameters")
            if params:
                flat = yaml.safe_dump(params, default_flow_style=True, width=10_000).strip()
                label += f" {flat if len(flat) <= 60 else flat[:57] + '...'}"
            if ref.get("weight") is not None:
                label += f" ×{ref['weight']:g}"
            parts.append(label)
        profiles.append(f"{profile.get('name', '?')}: {' + '.join(parts)}")
    return "; ".join(profiles)


def default_with_prefix_weight(weight: int) -> EppRouter:
    """The built-in precise default with another prefix weight (a tuning probe, not a
    default)."""
    spec = yaml.safe_load(DEFAULT_PRECISE_CONFIG)
    refs = [ref for profile in spec["schedulingProfiles"] for ref in profile["plugins"]
            if ref["pluginRef"] == "precise-prefix-cache-scorer"]
    if not refs:
        raise ValueError("the built-in precise default has no precise-prefix-cache-scorer")
    old = refs[0].get("weight")
    for ref in refs:
        ref["weight"] = weight
    return EppRouter(
        f"{HEADLINE} prefix x{weight}", "ours",
        f"as {HEADLINE} with the prefix scorer weighted {weight} instead of {old} (a tuning "
        "probe, not a shipped profile)", uses_kv_events=True,
        config_text=yaml.safe_dump(spec, sort_keys=False),
        config_source=f"built-in precise default, prefix ×{weight}")


def config_router(name: str, path: Path) -> EppRouter:
    """``epp NAME``: the EPP running the config file ``path``, with KV events."""
    text = path.read_text(encoding="utf-8")
    return EppRouter(f"epp {name}", "ours",
                     f"Envoy + EPP, --config-file {display_path(path)} (KV events in the "
                     f"endpoints file): {describe_config(text)}",
                     uses_kv_events=True, config_file=path.resolve(),
                     config_source=display_path(path))


def display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it, else its file name (results
    are shared, the machine's layout is not)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path.name


def all_routers(variants: bool = False,
                configs: Sequence[tuple[str, Path]] = ()) -> list[Router]:
    """Every router of the comparison, in run order (the headline first, the oracle
    last). ``configs`` adds ``epp NAME`` routers (config files, after the headline);
    ``variants`` adds the full plan's extra profiles (see :func:`variant_names`)."""
    extra: list[Router] = [default_with_prefix_weight(3), _precise_local()] if variants else []
    return [
        EppRouter(HEADLINE, "ours",
                  "Envoy + EPP, no config file, kvEvents in the endpoints file: the "
                  "built-in default a new user gets — "
                  + describe_config(DEFAULT_PRECISE_CONFIG),
                  uses_kv_events=True, config_source="built-in default (kvEvents)"),
        *[config_router(name, path) for name, path in configs],
        *extra,
        EppRouter("epp approximate", "ours",
                  "Envoy + EPP, no config file, no KV events: the built-in default falls "
                  "back to GIE's approximate prefix scorer — " + describe_config(DEFAULT_CONFIG),
                  config_source="built-in default (no kvEvents)"),
        EppRouter("epp load-only", "ours",
                  "Envoy + EPP: " + describe_config(LOAD_ONLY_CONFIG),
                  config_text=LOAD_ONLY_CONFIG, config_source="inline: load-only"),
        EppRouter("epp random", "ours", "Envoy + EPP: " + describe_config(RANDOM_CONFIG),
                  config_text=RANDOM_CONFIG, config_source="inline: random"),
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


def _precise_local() -> EppRouter:
    text = EPP_PRECISE_CONFIG.read_text(encoding="utf-8")
    return EppRouter("epp precise", "ours",
                     f"Envoy + EPP, --config-file {display_path(EPP_PRECISE_CONFIG)} (the "
                     "local run's config, tokenizing in process with the sims' Qwen "
                     f"vocabulary): {describe_config(text)}",
                     uses_kv_events=True, config_file=EPP_PRECISE_CONFIG,
                     config_source=display_path(EPP_PRECISE_CONFIG))


def variant_names() -> list[str]:
    """The routers only the full plan runs unless named exactly in ``--routers``."""
    return [r.name for r in all_routers(variants=True) if r.name not in
            {o.name for o in all_routers()}]


def with_replicas(routers: Sequence[Router], counts: Sequence[int],
                  sync: bool = False) -> list[Router]:
    """Every EPP router once per replica count (``epp default``, ``epp default ×2``, ...,
    side by side), with ``sync`` each count above 1 also synced right after it (``epp
    default ×2 sync``); the others once."""
    out: list[Router] = []
    for router in routers:
        if not isinstance(router, EppRouter):
            out.append(router)
            continue
        for n in dict.fromkeys(counts):
            out.append(router.with_replicas(n))
            if sync and n > 1:
                out.append(router.with_replicas(n, sync=True))
    return out


def select(routers: Sequence[Router], names: Sequence[str] | None,
           exact_only: Sequence[str] = (), always: Sequence[str] = ()) -> list[Router]:
    """The routers whose names contain one of ``names`` (all when None). Routers whose
    base name is in ``exact_only`` are chosen only by their exact (base) name, those in
    ``always`` whatever ``names`` says."""
    def base(r: Router) -> str:
        return r.base_name if isinstance(r, EppRouter) else r.name

    def wanted(r: Router) -> bool:
        if base(r) in always:
            return True
        if base(r) in exact_only:
            return names is not None and any(n in (r.name, base(r)) for n in names)
        return not names or any(n in r.name for n in names)

    chosen = [r for r in routers if wanted(r)]
    if not chosen:
        raise ValueError(f"no router matches {list(names or [])}; routers: "
                         f"{', '.join(r.name for r in routers)}")
    return chosen


def slug(name: str) -> str:
    """A router name as a file name: ``epp default ×2`` → ``epp-default-x2``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("×", "x")).strip("-")


def peers_python() -> str | None:
    """The peers' venv interpreter (matplotlib, inference-perf), if installed."""
    path = PEERS_VENV / "bin" / "python"
    return str(path) if path.exists() and shutil.which(str(path)) else None
