"""One worker process of ``epp --workers N`` (``python -m epp.workers``).

The supervisor writes the worker's :class:`WorkerSetup` to its stdin (an 8-byte length,
then a pickle) and keeps stdin open: end of file there means the supervisor is gone, and
the worker stops. The worker reports in JSON lines on its stdout, which it then points
at stderr so nothing else can write into that channel:

- ``{"event": "serving"}`` once its servers are up;
- ``{"event": "pool", "synced": bool, "endpoints": bool}`` when its pool changes state
  (the supervisor reports ready while any worker's pool is synced and has endpoints);
- ``{"event": "error", "code": int, "message": str}`` when it cannot start, just before
  it exits with that code (the supervisor prints the message once, not once a worker).

SIGTERM drains and stops a worker as it does a single ``epp``; SIGINT is ignored (Ctrl-C
reaches the whole process group, and the supervisor decides).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import struct
import sys
from dataclasses import dataclass

import uvloop

from epp.config import ConfigError, EppSettings
from epp.datastore import Endpoint
from epp.discovery.kubernetes import DiscoveryError
from epp.discovery.static import EndpointsFileError
from epp.observability.logsetup import configure_logging
from epp.runner import build_app, serve_until_stopped, settle_heap

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """Everything a worker needs: its settings (``worker`` set) and how to log."""

    settings: EppSettings
    log_encoder: str
    log_level: int

    def encode(self) -> bytes:
        """The bytes the supervisor writes to the worker's stdin."""
        payload = pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        return _LENGTH.pack(len(payload)) + payload


def read_setup(fd: int) -> WorkerSetup:
    """Read the setup from ``fd`` (exactly its bytes: the rest of the stream is the
    supervisor's liveness). Raises EOFError when the stream ends first."""
    size = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))[0]
    setup = pickle.loads(_read_exactly(fd, size))  # from our own supervisor, over a pipe
    if not isinstance(setup, WorkerSetup) or setup.settings.worker is None:
        raise EOFError("not a worker setup")
    return setup


def _read_exactly(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError("the supervisor closed the pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class StatusChannel:
    """JSON lines to the supervisor. Each is one small write to a pipe (atomic below
    PIPE_BUF), which the supervisor always reads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, event: str, **fields: object) -> None:
        line = json.dumps({"event": event, **fields}).encode() + b"\n"
        try:
            os.write(self._fd, line)
        except OSError:
            pass  # the supervisor is gone; the end of stdin stops this worker


class _WorkerTag(logging.Filter):
    """Marks a worker's log lines: a ``worker`` field in json, a prefix in console."""

    def __init__(self, index: int, console: bool) -> None:
        super().__init__()
        self._index = index
        self._prefix = f"worker-{index} " if console else ""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self._index
            if self._prefix:
                record.name = self._prefix + record.name
        return True


async def serve_worker(settings: EppSettings, status: StatusChannel, control_fd: int) -> None:
    """Start the app, report to the supervisor, serve until SIGTERM (drain as a single
    process does) or until the supervisor goes away (``control_fd`` reaches its end)."""
    assert settings.worker is not None
    index = settings.worker.index
    loop = asyncio.get_running_loop()
    stop_requests: asyncio.Queue[object] = asyncio.Queue()
    # Before starting: a SIGTERM during start-up waits its turn instead of killing us.
    loop.add_signal_handler(signal.SIGTERM, stop_requests.put_nowait, "SIGTERM")

    def supervisor_gone() -> None:
        try:
            data = os.read(control_fd, 4096)
        except OSError:
            data = b""
        if data:
            return  # nothing else is written; ignore it
        loop.remove_reader(control_fd)
        log.warning("worker %d: the supervisor is gone, stopping", index)
        # Two requests: no drain, since no health port reports this worker any more.
        stop_requests.put_nowait("supervisor gone")
        stop_requests.put_nowait("supervisor gone")

    loop.add_reader(control_fd, supervisor_gone)
    app = build_app(settings)
    await app.start()
    settle_heap()
    reported: tuple[bool, bool] | None = None

    def report(endpoints: tuple[Endpoint, ...]) -> None:
        nonlocal reported
        state = (app.pool.synced, bool(endpoints))
        if state != reported:
            reported = state
            status.send("pool", synced=state[0], endpoints=state[1])

    status.send("serving")
    report(app.pool.snapshot())
    app.pool.add_listener(report)
    await serve_until_stopped(app, stop_requests)


def main() -> int:
    """Entry point of ``python -m epp.workers``."""
    status = StatusChannel(os.dup(1))
    os.dup2(2, 1)  # stray prints go to stderr, not into the status channel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        setup = read_setup(0)
    except (EOFError, pickle.UnpicklingError, struct.error) as exc:
        print(f"epp worker: no setup from a supervisor ({exc}); run `epp --workers N`",
              file=sys.stderr)
        return 2
    settings = setup.settings
    assert settings.worker is not None
    configure_logging(setup.log_encoder, setup.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerTag(settings.worker.index, setup.log_encoder == "console"))
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_worker(settings, status, 0))
    except (ConfigError, EndpointsFileError, DiscoveryError) as exc:
        status.send("error", code=2, message=str(exc))
        return 2
    except OSError as exc:
        status.send("error", code=1, message=str(exc))
        return 1
    return 0
