"""epp-sim validates requests as vLLM does: a 400 in vLLM's error shape for what vLLM
refuses (out-of-range sampling params, a prompt or output too long for the context
window, malformed messages), and it keeps serving afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from epp.sim.config import SimConfig
from epp.sim.engine import Engine
from epp.sim.formatting import error_body
from epp.sim.server import build_app

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CONTEXT = 64  # tokens; the "bytes" tokenizer makes one token per UTF-8 byte
HUGE = 10**1000


def short_id(value: Any) -> str | None:
    """Test ids without 1,000-digit numbers."""
    if isinstance(value, int) and abs(value) == HUGE:
        return "10^1000" if value > 0 else "-10^1000"
    return None


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[tuple[TestClient, Engine]]:
    config = SimConfig(tokenizer="bytes", max_model_len=CONTEXT)
    engine = Engine.from_config(config)
    async with TestClient(TestServer(build_app(config, engine))) as client:
        yield client, engine


async def assert_400(client: TestClient, path: str, body: Any, param: str | None = None
                     ) -> str:
    response = await client.post(path, json=body)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "BadRequestError" and error["code"] == 400
    if param is not None:
        assert error["param"] == param
    assert isinstance(error["message"], str) and len(error["message"]) < 400
    return str(error["message"])


async def assert_serving(client: TestClient, engine: Engine) -> None:
    """A good request still gets its answer and nothing is left running."""
    for path, body in ((COMPLETIONS, {"prompt": "hello", "max_tokens": 3}),
                       (CHAT, {"messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 2, "stream": True})):
        response = await client.post(path, json=body)
        assert response.status == 200
        await response.read()
    assert engine.stats.in_flight == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,field", [(COMPLETIONS, "max_tokens"), (CHAT, "max_tokens"),
                                        (CHAT, "max_completion_tokens")])
async def test_max_tokens_of_10_to_the_1000_is_a_400_not_a_wedged_pod(
        sim: tuple[TestClient, Engine], path: str, field: str, stream: bool) -> None:
    client, engine = sim
    prompt: dict[str, Any] = ({"prompt": "hello"} if path == COMPLETIONS
                              else {"messages": [{"role": "user", "content": "hi"}]})
    message = await assert_400(client, path, {**prompt, field: HUGE, "stream": stream},
                               "max_tokens")
    assert "is too large" in message and f"maximum context length is {CONTEXT}" in message
    await assert_serving(client, engine)


@pytest.mark.asyncio
@pytest.mark.parametrize("value", [0, -1, -HUGE, 1.5, "16", True, [16], {"n": 1}],
                         ids=short_id)
async def test_max_tokens_that_is_not_a_positive_integer_is_a_400(
        sim: tuple[TestClient, Engine], value: Any) -> None:
    client, engine = sim
    await assert_400(client, COMPLETIONS, {"prompt": "x", "max_tokens": value}, "max_tokens")
    await assert_serving(client, engine)


@pytest.mark.asyncio
async def test_max_tokens_must_fit_beside_the_prompt(sim: tuple[TestClient, Engine]) -> None:
    client, engine = sim
    prompt = "p" * 10  # 10 tokens: 54 left of 64
    message = await assert_400(client, COMPLETIONS, {"prompt": prompt, "max_tokens": 55},
                               "max_tokens")
    assert message.endswith(f"(55 > {CONTEXT} - 10).")
    response = await client.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 54})
    assert response.status == 200
    assert (await response.json())["usage"]["completion_tokens"] == 54
    await assert_serving(client, engine)


@pytest.mark.asyncio
@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, {"prompt": "p" * CONTEXT}),
    (COMPLETIONS, {"prompt": list(range(CONTEXT))}),
    (COMPLETIONS, {"prompt": ["short", "p" * 100]}),  # any prompt of a batch
    (CHAT, {"messages": [{"role": "user", "content": "p" * CONTEXT}]}),
])
async def test_a_prompt_that_fills_the_context_window_is_a_400(
        sim: tuple[TestClient, Engine], path: str, body: dict[str, Any]) -> None:
    client, engine = sim
    message = await assert_400(client, path, body)
    assert f"maximum context length is {CONTEXT} tokens" in message
    assert "input tokens" in message
    await assert_serving(client, engine)


@pytest.mark.asyncio
async def test_the_default_output_budget_shrinks_to_fit(
        sim: tuple[TestClient, Engine]) -> None:
    client, engine = sim
    response = await client.post(COMPLETIONS, json={"prompt": "p" * (CONTEXT - 1)})
    assert response.status == 200
    usage = (await response.json())["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (CONTEXT - 1, 1)
    await assert_serving(client, engine)


@pytest.mark.asyncio
@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", -3), ("n", 1.5), ("n", "2"), ("n", -HUGE),
    ("temperature", -0.5), ("temperature", -HUGE), ("temperature", "hot"),
    ("temperature", True),
    ("top_p", 0), ("top_p", 1.01), ("top_p", -1), ("top_p", HUGE),
    ("top_k", -2), ("top_k", 0.5),
    ("min_p", 1.5), ("min_p", -0.1),
    ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 1.5),
], ids=short_id)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
async def test_sampling_params_vllm_refuses_are_a_400(
        sim: tuple[TestClient, Engine], path: str, field: str, value: Any) -> None:
    client, engine = sim
    prompt: dict[str, Any] = ({"prompt": "x"} if path == COMPLETIONS
                              else {"messages": [{"role": "user", "content": "x"}]})
    message = await assert_400(client, path, {**prompt, field: value}, field)
    assert message.startswith(f"{field} must")
    await assert_serving(client, engine)


@pytest.mark.asyncio
@pytest.mark.parametrize("field,value", [
    ("n", 1), ("n", 4), ("temperature", 0), ("temperature", 1.7), ("top_p", 1),
    ("top_p", 0.01), ("top_k", -1), ("top_k", 0), ("top_k", 40), ("min_p", 0),
    ("presence_penalty", -2), ("frequency_penalty", 2.0), ("repetition_penalty", 1.1),
    ("seed", -(2**63)), ("seed", 2**63 - 1), ("temperature", None),
])
async def test_sampling_params_vllm_accepts_are_served(
        sim: tuple[TestClient, Engine], field: str, value: Any) -> None:
    client, _ = sim
    response = await client.post(COMPLETIONS, json={"prompt": "x", field: value})
    assert response.status == 200, await response.text()


@pytest.mark.asyncio
@pytest.mark.parametrize("messages", [
    "hi", {"role": "user", "content": "hi"}, 5, [], [1], [None],
    [{"content": "hi"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [{"text": "no type"}]}],
])
async def test_malformed_messages_are_a_400(sim: tuple[TestClient, Engine],
                                            messages: Any) -> None:
    client, engine = sim
    await assert_400(client, CHAT, {"messages": messages})
    await assert_serving(client, engine)


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": "\xff"}',
    b'{"prompt": "x", "max_tokens": 1e999}',
])
async def test_undecodable_bodies_are_a_400(sim: tuple[TestClient, Engine], raw: bytes
                                            ) -> None:
    client, engine = sim
    response = await client.post(COMPLETIONS, data=raw,
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"]["type"] == "BadRequestError"
    await assert_serving(client, engine)


def test_a_500_names_its_type_as_vllm_does() -> None:
    assert error_body(500, "boom")["error"]["type"] == "InternalServerError"
    assert error_body(400, "bad")["error"]["type"] == "BadRequestError"
