"""What `epp --workers N` builds before any worker runs: the flag, the setup a worker
reads from its supervisor, and the ext_proc port the supervisor holds for them."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
from pathlib import Path

import pytest

from epp.cli import parse_args, settings_from_args
from epp.config import ConfigError, EppSettings
from epp.config.settings import MAX_WORKERS, WorkerRole
from epp.extproc.certs import generate_self_signed
from epp.workers.supervisor import describe_exit, reserve_port
from epp.workers.worker import WorkerSetup, read_setup


def _settings(tmp_path: Path, *flags: str) -> EppSettings:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    return settings_from_args(parse_args(["--endpoints-file", str(endpoints), *flags]))


def test_one_worker_by_default_and_n_when_asked(tmp_path: Path) -> None:
    assert _settings(tmp_path).workers == 1
    assert _settings(tmp_path, "--workers", "4").workers == 4


@pytest.mark.parametrize("count", ["0", "-1", str(MAX_WORKERS + 1)])
def test_worker_counts_out_of_range_are_refused(tmp_path: Path, count: str) -> None:
    with pytest.raises(ConfigError, match="--workers"):
        _settings(tmp_path, "--workers", count)


def test_a_worker_reads_exactly_its_setup_from_the_pipe(tmp_path: Path) -> None:
    role = WorkerRole(1, str(tmp_path / "w.sock"),
                      generate_self_signed(["localhost"], ["127.0.0.1"]))
    settings = EppSettings(endpoints_file="e.yaml", worker=role, workers=2)
    setup = WorkerSetup(settings, "json", 10)
    read, write = os.pipe()
    try:
        os.write(write, setup.encode())  # and the pipe stays open, as the supervisor's
        assert read_setup(read) == setup
    finally:
        os.close(read)
        os.close(write)


def test_a_truncated_or_foreign_setup_is_refused() -> None:
    for payload in (WorkerSetup(EppSettings(endpoints_file="e.yaml"), "json", 10).encode(),
                    WorkerSetup(EppSettings(endpoints_file="e.yaml", worker=WorkerRole(
                        0, "w.sock")), "json", 10).encode()[:20],
                    len(pickle.dumps("x")).to_bytes(8, "big") + pickle.dumps("x")):
        read, write = os.pipe()
        os.write(write, payload)
        os.close(write)
        try:
            with pytest.raises(EOFError):
                read_setup(read)  # no role, cut short, not a setup
        finally:
            os.close(read)


@pytest.mark.asyncio
async def test_the_held_port_takes_reuseport_listeners_but_no_one_else() -> None:
    held = reserve_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        assert port != 0
        accepted = asyncio.Event()
        server = await asyncio.get_running_loop().create_server(
            lambda: _Accept(accepted), "127.0.0.1", port, reuse_address=True,
            reuse_port=True)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.wait_for(accepted.wait(), 5)  # the listener, not the held socket
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        plain = socket.socket()
        with plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    finally:
        held.close()


def test_a_port_in_use_fails_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="cannot bind the ext_proc port"):
            reserve_port("127.0.0.1", taken.getsockname()[1])


def test_exits_are_described_for_the_log() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"


class _Accept(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Event) -> None:
        self._accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accepted.set()
        transport.close()
