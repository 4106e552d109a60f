"""The explain endpoint: every profile's candidates, plugin scores, prefix match, pick."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post, request

pytestmark = pytest.mark.integration

SYSTEM = "You are a meticulous assistant for tenant X. " * 60


def chat(question: str) -> dict[str, object]:
    return {"model": "qwen3", "max_tokens": 2, "messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path, StackPorts.free(2, kv_events=True), envoy_concurrency=1,
                   epp_args=["--kv-events", "--enable-explain"])
    s.start()
    yield s
    s.stop()


def test_explain_shows_scores_prefix_match_and_pick(stack: LocalStack) -> None:
    served = post(stack.url + "/v1/chat/completions", chat("first")).headers["x-sim-endpoint"]
    time.sleep(0.5)  # KV events reach the index
    url = f"http://127.0.0.1:{stack.ports.epp_metrics}/debug/explain"
    reply = post(url, chat("second"))
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["destination"] == served
    warm = next(e["name"] for e in doc["candidates"] if e["address"] == served)
    cold = next(e["name"] for e in doc["candidates"] if e["address"] != served)
    match = doc["prefix_match"]
    assert match["precise"] and match["endpoints"][warm]["cached_tokens"] > 500
    assert match["endpoints"][cold]["cached_tokens"] == 0
    profile = doc["profiles"]["default"]
    assert profile["plugin_scores"]["precise-prefix-cache-scorer"][warm] > 0.9
    # The built-in profile's affinity filter kept only the pod holding the prompt.
    assert list(profile["total_scores"]) == [warm]
    # Explaining routes nothing: the pods saw only the first request.
    for sim in stack.sim_addresses:
        metrics = request(f"http://{sim}/metrics").body.decode()
        total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("vllm:request_success_total"))
        assert total == (1.0 if sim == served else 0.0)


def test_explain_reports_bad_requests_and_is_off_by_default(stack: LocalStack,
                                                            tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{stack.ports.epp_metrics}/debug/explain"
    bad = post(url, b"{not json")
    assert bad.status == 400 and "not valid JSON" in json.loads(bad.body)["error"]["message"]
    other = LocalStack(tmp_path / "off", StackPorts.free(1), envoy_concurrency=1)
    other.start_sims()
    other.start_epp()
    try:
        off = post(f"http://127.0.0.1:{other.ports.epp_metrics}/debug/explain", chat("x"))
        assert off.status in (404, 405)
    finally:
        other.stop()
