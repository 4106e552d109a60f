"""Property tests of the request path: any body a client can send, any ext_proc sequence
Envoy can produce (and any order a broken proxy could), through the real state machine,
director and prefix producers. Invariants: nothing raises, nothing hangs, load is
settled once, client faults are 4xx, nothing is logged at ERROR (no tracebacks).
``benchmarks/fuzz.py`` runs the same properties at 10,000+ examples."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from epp.extproc import messages as msg
from tests.fuzzing import Harness, any_order_sequences, envoy_sequences

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_client_sequences_never_fail_the_picker(loop: asyncio.AbstractEventLoop) -> None:
    harness = Harness()

    @FUZZ
    @given(envoy_sequences())
    def check(sequence: list[msg.ProcessingRequest]) -> None:
        loop.run_until_complete(asyncio.wait_for(harness.run(sequence, client_order=True), 10))

    check()
    # The run exercised both routing and refusals, not one path only.
    assert harness.outcomes["routed"] > 0
    assert any(k.startswith("immediate_4") for k in harness.outcomes)


def test_any_order_of_messages_fails_only_the_stream(loop: asyncio.AbstractEventLoop) -> None:
    harness = Harness()

    @FUZZ
    @given(any_order_sequences())
    def check(sequence: list[msg.ProcessingRequest]) -> None:
        loop.run_until_complete(asyncio.wait_for(harness.run(sequence, client_order=False),
                                                 10))

    check()
    assert harness.outcomes["protocol_error"] > 0
