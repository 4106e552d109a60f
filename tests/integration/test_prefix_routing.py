"""Precise prefix-cache routing end to end: sims publish vLLM KV events over ZMQ, the
EPP indexes them, and requests sharing a prefix go to the pod that holds it."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.devtools.procs import REPO_ROOT
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post, request

pytestmark = pytest.mark.integration

LOCAL_CONFIG = str(REPO_ROOT / "deploy" / "local" / "epp-config.yaml")


def system_prompt(group: int) -> str:
    facts = " ".join(f"Fact {i} about tenant {group}: the value is {i * 7 + group}."
                     for i in range(120))
    return f"You are the assistant of tenant {group}. {facts}"


def ask(stack: LocalStack, group: int, question: str) -> tuple[str, int]:
    body = {"model": "qwen3", "max_tokens": 2, "messages": [
        {"role": "system", "content": system_prompt(group)},
        {"role": "user", "content": question}]}
    reply = post(stack.url + "/v1/chat/completions", body)
    assert reply.status == 200, reply.body
    cached = reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return reply.headers["x-sim-endpoint"], cached


def _metric(stack: LocalStack, name: str) -> float:
    text = request(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module", params=["local", "render"])
def kv_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[LocalStack]:
    work: Path = tmp_path_factory.mktemp(f"kv-{request.param}")
    if request.param == "local":
        epp_args = ["--config-file", LOCAL_CONFIG]
    else:  # the built-in default with KV events: precise scorer, render-mode tokens
        epp_args = ["--kv-events"]
    # One pod speaks vLLM >= 0.26's map encoding with digest-bytes hashes.
    s = LocalStack(work, StackPorts.free(3, kv_events=True), envoy_concurrency=1,
                   sim_args=["--tokenizer", "qwen"], epp_args=epp_args,
                   per_sim_args={2: ["--kv-events-encoding", "map",
                                     "--kv-events-hash", "bytes"]})
    s.start()
    yield s
    s.stop()


def test_shared_prefix_lands_on_its_warm_pod_and_load_stays_balanced(
        kv_stack: LocalStack) -> None:
    stack = kv_stack
    home: dict[int, str] = {}
    for group in range(6):
        home[group], cached = ask(stack, group, "Hello!")
        assert cached == 0
    time.sleep(0.5)  # KV events reach the EPP within milliseconds; leave margin
    served: dict[int, Counter[str]] = defaultdict(Counter)
    cached_tokens = []
    for round_ in range(3):
        for group in range(6):
            pod, cached = ask(stack, group, f"Question {round_} for group {group}?")
            served[group][pod] += 1
            cached_tokens.append(cached)
    for group in range(6):
        assert served[group] == Counter({home[group]: 3}), (group, served[group], home)
    assert min(cached_tokens) > 1000  # the whole system prompt came from the cache
    # Six tenants over three pods: cold requests spread, so no pod holds them all.
    assert len(set(home.values())) >= 2
    assert _metric(stack, "epp_kv_index_mispredictions_total") == 0
    assert _metric(stack, "epp_kv_index_prediction_error_tokens_count") >= 18
