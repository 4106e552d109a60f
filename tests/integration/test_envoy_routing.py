"""Real HTTP through a real Envoy (ext_proc, ORIGINAL_DST) to real epp-sim pods."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

import pytest

from epp.devtools.stack import LocalStack
from tests.integration.httputil import post, request

pytestmark = pytest.mark.integration

CHAT = {"model": "qwen3", "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 5}
COMPLETION = {"model": "qwen3", "prompt": "Once upon a time", "max_tokens": 4}


def _served_where_picked(headers: dict[str, str]) -> str:
    served = headers["x-sim-endpoint"]
    # The sim echoes the destination header Envoy forwarded: the EPP's pick.
    assert headers["x-sim-destination"] == served
    return served


def test_chat_and_completion_land_on_the_picked_pod(stack: LocalStack) -> None:
    served = Counter()
    for i in range(30):
        body = CHAT if i % 2 else COMPLETION
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        reply = post(stack.url + path, body)
        assert reply.status == 200, reply.body
        served[_served_where_picked(reply.headers)] += 1
        data = reply.json()
        assert data["usage"]["completion_tokens"] == body["max_tokens"]
    # Random picks over 3 pods: all of them get traffic in 30 requests (p(miss) ~ 1e-5).
    assert set(served) == set(stack.sim_addresses)


def _sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n")
    return [block[len("data: "):] for block in text.strip().split("\n\n")]


def test_sse_stream_arrives_intact(stack: LocalStack) -> None:
    body = {**CHAT, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    reply = post(stack.url + "/v1/chat/completions", body)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    _served_where_picked(reply.headers)
    events = _sse_events(reply.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 12
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]
               if c["choices"]]
    assert len([t for t in content if t]) == 12


def test_300kb_body_reaches_the_pod_byte_identical(stack: LocalStack) -> None:
    prompt = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                     for i in range(6000))
    raw = json.dumps({"model": "qwen3", "prompt": prompt, "max_tokens": 1}).encode()
    assert len(raw) > 300_000
    reply = post(stack.url + "/v1/completions", raw)
    assert reply.status == 200
    assert int(reply.headers["x-sim-request-bytes"]) == len(raw)
    assert reply.headers["x-sim-request-sha256"] == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("raw, fragment", [
    (b'{"model": "qwen3", "prompt": ', "not valid JSON"),
    (b'{"prompt": "hi"}', "missing required field 'model'"),
    (b'["qwen3"]', "must be a JSON object"),
    (b'{"model": "qwen3", "prompt": "\xff\xfe"}', "UTF-8"),
    (b'{"model": 7, "prompt": "hi"}', "'model' must be a non-empty string"),
])
def test_bad_bodies_get_400_from_the_epp(stack: LocalStack, raw: bytes, fragment: str) -> None:
    reply = post(stack.url + "/v1/completions", raw)
    assert reply.status == 400
    assert "x-sim-endpoint" not in reply.headers  # refused before any pod saw it
    error = reply.json()["error"]
    assert fragment in error["message"] and error["code"] == 400


def test_get_models_routes_without_a_body(stack: LocalStack) -> None:
    reply = request(stack.url + "/v1/models")
    assert reply.status == 200
    _served_where_picked(reply.headers)
    assert [m["id"] for m in reply.json()["data"]] == ["qwen3"]


def test_unknown_model_404_passes_through_from_the_pod(stack: LocalStack) -> None:
    reply = post(stack.url + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert reply.status == 404
    assert "x-sim-endpoint" in reply.headers


def test_epp_down_gives_configured_503_and_recovers(own_stack: LocalStack) -> None:
    assert post(own_stack.url + "/v1/completions", COMPLETION).status == 200
    assert own_stack.stop_epp() == 0  # graceful SIGTERM exit
    reply = post(own_stack.url + "/v1/completions", COMPLETION)
    assert reply.status == 503
    own_stack.start_epp()
    deadline = time.monotonic() + 15
    status = 0
    while time.monotonic() < deadline:
        status = post(own_stack.url + "/v1/completions", COMPLETION).status
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200


def test_removed_endpoint_gets_no_more_traffic(own_stack: LocalStack) -> None:
    keep = own_stack.sim_addresses[0]
    own_stack.write_endpoints([keep])
    time.sleep(1.0)  # the EPP re-reads the file every 0.2 s
    served = {post(own_stack.url + "/v1/completions", COMPLETION).headers["x-sim-endpoint"]
              for _ in range(15)}
    assert served == {keep}


def test_pod_that_vanishes_gives_an_error_not_a_hang_then_is_avoided(
        own_stack: LocalStack) -> None:
    own_stack.sims[1].stop()
    started = time.monotonic()
    first = Counter(post(own_stack.url + "/v1/completions", COMPLETION).status
                    for _ in range(6))
    # Right after the pod dies, a request picked for it fails fast with Envoy's 503.
    assert set(first) <= {200, 503} and time.monotonic() - started < 10
    # Once its /metrics scrapes fail for longer than the staleness threshold (0.5 s), it
    # scores 0 on load and the live pod takes every request.
    time.sleep(1.0)
    later = Counter(post(own_stack.url + "/v1/completions", COMPLETION).status
                    for _ in range(12))
    assert later == Counter({200: 12})
