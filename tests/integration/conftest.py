"""Fixtures that run real processes: epp-sim pods, the EPP, and Envoy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.devtools.stack import LocalStack, StackPorts


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Three sim pods behind the EPP and Envoy, shared by a test module."""
    work: Path = tmp_path_factory.mktemp("stack")
    s = LocalStack(work, StackPorts.free(3), envoy_concurrency=1,
                   epp_args=["--endpoints-reload-seconds", "0.2"])
    s.start()
    yield s
    s.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[LocalStack]:
    """A private stack for tests that stop or change parts of it."""
    s = LocalStack(tmp_path, StackPorts.free(2), envoy_concurrency=1,
                   epp_args=["--endpoints-reload-seconds", "0.2",
                             "--shutdown-grace-seconds", "2"])
    s.start()
    yield s
    s.stop()
