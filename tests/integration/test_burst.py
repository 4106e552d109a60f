"""A burst of concurrent requests straight after the EPP (re)starts, through real Envoy:
Envoy opens its ext_proc streams before it has read the EPP's HTTP/2 SETTINGS, so a
transport that enforced a small default stream limit as a connection error failed every
one of them (a rollout would hit this every time)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from epp.devtools.stack import LocalStack
from tests.integration.httputil import post

pytestmark = pytest.mark.integration

BURST = 300
BODY = {"model": "qwen3", "prompt": "A burst after a restart", "max_tokens": 2}


@pytest.mark.parametrize("transport", ["h2", "grpc"])
def test_burst_after_restart_all_succeed(own_stack: LocalStack, transport: str) -> None:
    own_stack.stop_epp()
    own_stack.start_epp(["--extproc-server", transport])
    gate = threading.Barrier(BURST)

    def one(_: int) -> int:
        gate.wait()
        return post(own_stack.url + "/v1/completions", BODY).status

    with ThreadPoolExecutor(max_workers=BURST) as pool:
        statuses = list(pool.map(one, range(BURST)))
    failed = {s: statuses.count(s) for s in set(statuses) if s != 200}
    assert not failed, json.dumps(failed)
