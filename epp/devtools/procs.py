"""Start, wait for, and stop local processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


# Ports handed to child processes come from below the kernel's ephemeral range: a port
# picked by binding to 0 is itself ephemeral, and any outgoing connection (a scrape, a
# KV-event socket, Envoy's upstream pool) may take it before the child binds it. Below
# the range only another explicit bind can collide.
_PORTS_FROM = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class _PortPicker:
    """Walks the ports below the ephemeral range from a random start, so picks never
    repeat within a process and rarely collide across processes."""

    def __init__(self) -> None:
        try:
            low = int(_EPHEMERAL_RANGE.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            low = 0
        self._span = max(0, low - _PORTS_FROM)
        self._next = int.from_bytes(os.urandom(4), "big") % self._span if self._span else 0

    def skip(self, port: int) -> None:
        """Never hand out ``port`` next (it was taken with the one before it)."""
        if self._span and _PORTS_FROM + self._next == port:
            self._next = (self._next + 1) % self._span

    def pick(self) -> int:
        for _ in range(self._span):
            port = _PORTS_FROM + self._next
            self._next = (self._next + 1) % self._span
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


_picker = _PortPicker()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range."""
    return _picker.pick()


def free_port_pair() -> int:
    """A port ``p`` such that ``p`` and ``p + 1`` were both free (publisher + replay)."""
    for _ in range(200):
        p = free_port()
        if p >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        _picker.skip(p + 1)  # the next pick must not hand out the replay port
        return p
    raise OSError("no two consecutive free ports found")


def wait_for_http(url: str, timeout: float = 20.0, expect: bytes | None = None) -> None:
    """Block until ``url`` answers 200 (and its body contains ``expect``)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                body = resp.read()
                if resp.status == 200 and (expect is None or expect in body):
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s (last error: {last})")


class Process:
    """A child process whose output goes to a log file; stopped with SIGTERM."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=REPO_ROOT,
        )

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.proc.poll() is None

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        """Block until ``text`` appears in the process's output."""
        deadline = time.monotonic() + timeout
        needle = text.encode()
        while time.monotonic() < deadline:
            if needle in self.log_path.read_bytes():
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {text!r} after {timeout}s:\n{self.tail()}")

    def wait_for_http(self, url: str, timeout: float = 20.0) -> None:
        """Block until ``url`` answers 200; fail fast if the process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {url} not ready after {timeout}s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 30) -> str:
        """The last lines of output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
