"""Static discovery from an endpoints YAML file, reloaded when the file changes.

File format::

    endpoints:
      - name: vllm-0                      # unique
        address: 10.0.0.5:8000            # ip:port, what Envoy connects to
        labels: {llm-d.ai/role: decode}   # optional
        model: Qwen/Qwen3-8B              # optional
        kvEvents: tcp://10.0.0.5:5557     # optional: the engine's KV-event publisher
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from epp.datastore import Endpoint, EndpointPool
from epp.supervise import FailureCounter, LogLimiter, supervised

log = logging.getLogger(__name__)

# How often the file's mtime is checked; cheap (one stat) and fast enough for hand edits.
DEFAULT_RELOAD_INTERVAL_S = 1.0
# The watcher's kind in the background-failure count.
ENDPOINTS_FILE_TASK = "endpoints-file"
_ENDPOINT_KEYS = {"name", "address", "labels", "model", "kvEvents"}
# One DNS label (RFC 1123): letters, digits and inner hyphens, at most 63 characters.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DNS_NAME_MAX = 253  # RFC 1035, without the trailing dot
# The hosts an engine's own bind address uses for all interfaces; the subscriber
# replaces them with the endpoint's IP, so a copied vLLM config value works.
_WILDCARD_HOSTS = ("*",)


class EndpointsFileError(ValueError):
    """The endpoints file is unreadable or invalid; the message names the field."""


def parse_endpoints(text: str, source: str = "endpoints file") -> list[Endpoint]:
    """Parse and validate endpoints YAML; raises :class:`EndpointsFileError`."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EndpointsFileError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        raise EndpointsFileError(f"{source}: expected a mapping with an 'endpoints' list")
    endpoints: list[Endpoint] = []
    seen: set[str] = set()
    for i, item in enumerate(doc["endpoints"]):
        endpoints.append(_parse_one(item, f"{source}: endpoints[{i}]", seen))
    return endpoints


def _parse_one(item: Any, where: str, seen: set[str]) -> Endpoint:
    if not isinstance(item, dict):
        raise EndpointsFileError(f"{where}: must be a mapping")
    unknown = set(item) - _ENDPOINT_KEYS
    if unknown:
        raise EndpointsFileError(f"{where}: unknown field(s) {sorted(unknown)}")
    address = item.get("address")
    if not isinstance(address, str):
        raise EndpointsFileError(f"{where}.address: required, as ip:port")
    name = item.get("name", address)
    if not isinstance(name, str) or not name:
        raise EndpointsFileError(f"{where}.name: must be a non-empty string")
    if name in seen:
        raise EndpointsFileError(f"{where}.name: duplicate name {name!r}")
    seen.add(name)
    labels = item.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise EndpointsFileError(f"{where}.labels: must map strings to strings")
    model = item.get("model")
    if model is not None and not isinstance(model, str):
        raise EndpointsFileError(f"{where}.model: must be a string")
    kv_events = item.get("kvEvents")
    if kv_events is not None:
        problem = kv_events_problem(kv_events)
        if problem is not None:
            raise EndpointsFileError(f"{where}.kvEvents: {problem}")
    try:
        return Endpoint(name=name, address=address, labels=labels, model=model,
                        kv_events=kv_events)
    except ValueError as exc:
        raise EndpointsFileError(f"{where}.address: {exc}") from None


def kv_events_problem(value: object) -> str | None:
    """Why ``value`` is not a KV-event publisher address ``tcp://host:port``, or None.

    ZMQ itself accepts some mistypes (``tcp://10.0.0.5:55S7`` connects to port 55,
    ``:99999`` to nothing) and refuses others only when the subscriber connects, so
    the file is checked here: host an IPv4 address, a bracketed IPv6 address, a DNS
    name or ``*`` (vLLM's bind-all default); port 1-65535.
    """
    example = "must look like tcp://10.0.0.5:5557"
    if not isinstance(value, str):
        return f"{example}, got {type(value).__name__}"
    scheme, sep, rest = value.partition("://")
    if scheme != "tcp" or not sep:
        return f"{example} (tcp:// is the only transport vLLM publishes on), got {value!r}"
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return f"{example} (host and port), got {value!r}"
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return f"port {port!r} in {value!r} must be 1-65535"
    if not _valid_host(host):
        return (f"host {host!r} in {value!r} must be an IP address ([...] for IPv6), a DNS "
                "name or *")
    return None


def _valid_host(host: str) -> bool:
    if host in _WILDCARD_HOSTS:
        return True
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    return (len(host) <= _DNS_NAME_MAX
            and all(_DNS_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())  # 10.0.0.300 is a bad IP, not a name


def load_endpoints_file(path: str | os.PathLike[str]) -> list[Endpoint]:
    """Read and parse an endpoints file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EndpointsFileError(f"{path}: cannot read: {exc}") from None
    return parse_endpoints(text, str(path))


class StaticDiscovery:
    """Feeds the pool from an endpoints file; on edits, applies the new list atomically.

    An invalid edit is logged and ignored: the pool keeps the last good list. The watcher
    is supervised: if it dies of anything else it is counted (``on_task_failure``),
    logged, and restarted with backoff, and it then reads the file again.
    """

    def __init__(self, pool: EndpointPool, path: str | os.PathLike[str],
                 reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S, *,
                 on_task_failure: FailureCounter | None = None) -> None:
        self._pool = pool
        self._path = Path(path)
        self._interval = reload_interval_s
        self._mtime: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_task_failure = on_task_failure
        self._logs = LogLimiter(log)

    async def start(self) -> None:
        """Load the file (errors propagate: a bad file fails start-up) and watch it."""
        self._mtime = self._stat()
        self._pool.replace_all(load_endpoints_file(self._path))
        self._pool.mark_synced()
        log.info("loaded %d endpoints from %s", len(self._pool), self._path)
        if self._interval > 0:
            self._task = asyncio.create_task(
                supervised(self._watch, task=ENDPOINTS_FILE_TASK, what=f"watcher of {self._path}",
                           logs=self._logs, count=self._on_task_failure,
                           on_restart=self._forget_mtime),
                name="static-discovery")

    async def stop(self) -> None:
        """Stop watching the file."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _stat(self) -> float | None:
        try:
            return self._path.stat().st_mtime
        except OSError:
            return None

    def _forget_mtime(self, _exc: Exception) -> None:
        # The dead watcher may have recorded an edit it never applied: read the file again.
        self._mtime = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            mtime = self._stat()
            if mtime is None or mtime == self._mtime:
                continue
            self._mtime = mtime
            try:
                endpoints = load_endpoints_file(self._path)
            except EndpointsFileError as exc:
                log.error("ignoring edit, keeping %d endpoints: %s", len(self._pool), exc)
                continue
            if self._pool.replace_all(endpoints):
                log.info("reloaded %d endpoints from %s", len(self._pool), self._path)
