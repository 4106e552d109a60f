"""An EPP that starts after the engines learns what they cached before it existed:
the first event it sees has a sequence past 0, so it replays the engine's buffer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post, request

pytestmark = pytest.mark.integration
SYSTEM = "You are the archivist of an old library with many rooms. " * 50


def chat(question: str) -> dict[str, object]:
    return {"model": "qwen3", "max_tokens": 1, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}


def test_epp_started_late_recovers_earlier_blocks_by_replay(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, StackPorts.free(2, kv_events=True), envoy_concurrency=1,
                       epp_args=["--kv-events"])
    try:
        stack.start_sims()
        warm = stack.sim_addresses[1]
        # Before any EPP exists, pod 1 caches the long system prompt.
        assert post(f"http://{warm}/v1/chat/completions", chat("before")).status == 200
        stack.start_epp()
        stack.start_envoy()
        # Any new event from pod 1 shows the EPP a sequence past 0: it replays from 0.
        assert post(f"http://{warm}/v1/completions",
                    {"model": "qwen3", "prompt": "unrelated " * 40, "max_tokens": 1}
                    ).status == 200
        time.sleep(1.0)
        metrics = request(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics").body.decode()
        assert any(line.startswith("epp_kv_event_replays_total") and
                   not line.endswith(" 0.0") for line in metrics.splitlines())
        for i in range(3):
            reply = post(stack.url + "/v1/chat/completions", chat(f"after {i}"))
            assert reply.headers["x-sim-endpoint"] == warm
            assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 500
    finally:
        stack.stop()
