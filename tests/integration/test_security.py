"""Control headers a client could use to steer the data plane never reach a pod, and
spoofed routing headers do not move the pick (real Envoy, real EPP, real epp-sim pods)."""

from __future__ import annotations

import pytest

from epp.devtools.stack import LocalStack
from tests.integration.httputil import post

pytestmark = pytest.mark.integration

CHAT = {"model": "qwen3", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def test_client_prefiller_header_never_reaches_a_pod(stack: LocalStack) -> None:
    # Outside the P/D profile, a pod that received x-prefiller-host-port would send the
    # prompt to that address first (llm-d's routing sidecar does).
    for _ in range(6):
        reply = post(stack.url + "/v1/chat/completions", CHAT,
                     headers={"x-prefiller-host-port": "127.0.0.1:9"})
        assert reply.status == 200, reply.body
        assert "x-sim-prefiller" not in reply.headers
        assert reply.headers.get("x-sim-prefilled-by", "local") == "local"


def test_spoofed_destination_and_subset_headers_do_not_steer(stack: LocalStack) -> None:
    target = stack.sim_addresses[0]
    served = set()
    for _ in range(12):
        reply = post(stack.url + "/v1/chat/completions", CHAT, headers={
            "x-gateway-destination-endpoint": target,
            "x-gateway-destination-endpoint-subset": target,
            "test-epp-endpoint-selection": target})
        assert reply.status == 200, reply.body
        # The pod saw the EPP's pick, not the client's value.
        assert reply.headers["x-sim-destination"] == reply.headers["x-sim-endpoint"]
        served.add(reply.headers["x-sim-endpoint"])
    # Random picks over 3 pods: 12 requests all on the spoofed one has p = 3^-11.
    assert served != {target}
