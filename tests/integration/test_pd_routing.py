"""Prefill/decode disaggregation end to end: real Envoy, the EPP on the P/D config, and
sim pods labelled ``llm-d.ai/role`` whose decode pods act like llm-d's routing sidecar."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from epp.devtools.procs import REPO_ROOT
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import Reply, post, request

pytestmark = pytest.mark.integration

PD_CONFIG = str(REPO_ROOT / "deploy" / "local" / "pd-config.yaml")
ROLE = "llm-d.ai/role"
PREFILL, DECODE = "prefill", "decode"
# The P/D config's nonCachedTokens threshold is 256; these prompts are far from it.
LONG_PROMPT_TOKENS_AT_LEAST = 1000
_tenants = itertools.count()


def pd_stack(work: Path, roles: list[str], per_sim_args: dict[int, list[str]] | None = None
             ) -> LocalStack:
    args = dict(per_sim_args or {})
    for i, role in enumerate(roles):
        args[i] = ["--role", role, *args.get(i, [])]
    return LocalStack(work, StackPorts.free(len(roles), kv_events=True), envoy_concurrency=1,
                      sim_args=["--tokenizer", "qwen", "--ttft-ms", "5", "--itl-ms", "2"],
                      epp_args=["--config-file", PD_CONFIG], per_sim_args=args,
                      sim_labels={i: {ROLE: role} for i, role in enumerate(roles)})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = pd_stack(tmp_path_factory.mktemp("pd"), [PREFILL, PREFILL, DECODE, DECODE])
    s.start()
    yield s
    s.stop()


def pods(stack: LocalStack, role: str) -> set[str]:
    return {a for i, a in enumerate(stack.sim_addresses) if stack.sim_labels[i][ROLE] == role}


def long_system_prompt() -> str:
    """A never-seen system prompt of ~2,000 tokens."""
    tenant = next(_tenants)
    facts = " ".join(f"Fact {i} of tenant {tenant}: the value is {i * 13 + tenant}."
                     for i in range(150))
    return f"You answer for tenant {tenant} ({time.time_ns()}). {facts}"


def chat(stack: LocalStack, system: str | None, question: str,
         headers: dict[str, str] | None = None, **extra: Any) -> Reply:
    messages = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": "qwen3", "max_tokens": 3, "messages": messages, **extra}
    reply = post(stack.url + "/v1/chat/completions", body, headers)
    assert reply.status == 200, reply.body
    return reply


def decisions(stack: LocalStack) -> dict[str, float]:
    text = request(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics").body.decode()
    counts = {"prefill-decode": 0.0, "decode-only": 0.0}
    for line in text.splitlines():
        if line.startswith("epp_pd_decision_total{"):
            kind = line.split('decision_type="', 1)[1].split('"', 1)[0]
            counts[kind] = float(line.rsplit(" ", 1)[1])
    return counts


def sim_metric(address: str, name: str) -> float:
    text = request(f"http://{address}/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on {address}/metrics")


def test_long_cold_prompt_is_prefilled_on_a_prefill_pod(stack: LocalStack) -> None:
    before = decisions(stack)
    reply = chat(stack, long_system_prompt(), "Summarise the facts.")
    assert reply.headers["x-sim-endpoint"] in pods(stack, DECODE)
    prefiller = reply.headers["x-sim-prefilled-by"]
    assert prefiller in pods(stack, PREFILL)
    # The decode pod received the EPP's x-prefiller-host-port, and used it.
    assert reply.headers["x-sim-prefiller"] == prefiller
    usage = reply.json()["usage"]
    assert usage["prompt_tokens"] > LONG_PROMPT_TOKENS_AT_LEAST
    # The prompt's KV came from the prefill pod (vLLM reports it as cached).
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16
    assert sim_metric(prefiller, "epp_sim_prefills_for_remote_decode_total") >= 1
    after = decisions(stack)
    assert after["prefill-decode"] == before["prefill-decode"] + 1
    assert after["decode-only"] == before["decode-only"]
    # Streaming works the same way through Envoy.
    streamed = chat(stack, long_system_prompt(), "Again, streamed.", stream=True)
    assert streamed.headers["x-sim-prefilled-by"] in pods(stack, PREFILL)
    assert streamed.body.rstrip().endswith(b"data: [DONE]")


def test_short_prompt_is_decoded_where_it_is_prefilled(stack: LocalStack) -> None:
    before = decisions(stack)
    reply = chat(stack, None, "Hello there!")
    assert reply.headers["x-sim-endpoint"] in pods(stack, DECODE)
    assert reply.headers["x-sim-prefilled-by"] == "local"
    assert "x-sim-prefiller" not in reply.headers
    after = decisions(stack)
    assert after["decode-only"] == before["decode-only"] + 1
    assert after["prefill-decode"] == before["prefill-decode"]


def test_prefix_already_on_the_decode_pod_is_not_prefilled_again(stack: LocalStack) -> None:
    system = long_system_prompt()
    first = chat(stack, system, "First question?")
    decode_pod = first.headers["x-sim-endpoint"]
    assert first.headers["x-sim-prefilled-by"] in pods(stack, PREFILL)
    time.sleep(0.5)  # the decode pod's BlockStored for the received blocks reach the EPP
    before = decisions(stack)
    second = chat(stack, system, "Second question, same tenant?")
    assert second.headers["x-sim-endpoint"] == decode_pod
    assert second.headers["x-sim-prefilled-by"] == "local"
    assert "x-sim-prefiller" not in second.headers
    usage = second.json()["usage"]
    assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] < 64
    assert decisions(stack)["decode-only"] == before["decode-only"] + 1


def test_client_supplied_prefiller_header_never_reaches_a_pod(stack: LocalStack) -> None:
    bogus = {"x-prefiller-host-port": "10.255.255.1:9"}
    short = chat(stack, None, "Short and sweet.", headers=bogus)
    assert "x-sim-prefiller" not in short.headers  # removed by the EPP
    assert short.headers["x-sim-prefilled-by"] == "local"
    long = chat(stack, long_system_prompt(), "Long one.", headers=bogus)
    assert long.headers["x-sim-prefiller"] in pods(stack, PREFILL)  # the EPP's, not ours
    assert long.headers["x-sim-prefilled-by"] == long.headers["x-sim-prefiller"]


def test_failing_prefill_pod_falls_back_to_local_prefill(tmp_path: Path) -> None:
    # The only prefill pod answers every prefill request with 500.
    s = pd_stack(tmp_path, [PREFILL, DECODE],
                 per_sim_args={0: ["--remote-prefill-error-status", "500"]})
    s.start()
    try:
        prefill_pod, decode_pod = s.sim_addresses
        reply = chat(s, long_system_prompt(), "Does this still work?")
        assert reply.headers["x-sim-endpoint"] == decode_pod
        assert reply.headers["x-sim-prefiller"] == prefill_pod  # the EPP did disaggregate
        assert reply.headers["x-sim-prefilled-by"] == "local"
        assert reply.headers["x-sim-prefill-fallback"] == "status 500"
        assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert decisions(s)["prefill-decode"] == 1
        assert sim_metric(decode_pod, 'epp_sim_remote_prefills_total{model_name="qwen3",'
                                      'engine="0",outcome="fallback"}') == 1
    finally:
        s.stop()
