"""Tests of epp-sim, the simulated vLLM pod (engine, HTTP API and console entry)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from epp.sim.config import SimConfig
from epp.sim.engine import Engine, GenerationRequest, estimate_prompt_tokens
from epp.sim.server import build_app, run

ADVERTISE = "10.1.2.3:8000"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def make_config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {"advertise": ADVERTISE, "served_model_names": ["qwen3", "other"]}
    return SimConfig(**{**values, **overrides})


@pytest_asyncio.fixture
async def client() -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(make_config()))) as test_client:
        yield test_client


async def post_json(client: TestClient, path: str, body: Any, status: int = 200) -> Any:
    response = await client.post(path, json=body)
    assert response.status == status
    assert response.headers["x-sim-endpoint"] == ADVERTISE
    return await response.json()


async def post_sse(client: TestClient, path: str, body: dict[str, Any]) -> list[Any]:
    """POST a streaming request; parse the SSE body strictly (each event one data line)."""
    response = await client.post(path, json={**body, "stream": True})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["x-sim-endpoint"] == ADVERTISE
    raw = await response.text()
    assert raw.endswith("\n\n"), raw[-50:]
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]" and "data: [DONE]" not in events[:-1]
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def usage(prompt: int, completion: int) -> dict[str, Any]:
    counts = {"prompt_tokens": prompt, "completion_tokens": completion}
    details = {"cached_tokens": 0}
    return {**counts, "total_tokens": prompt + completion, "prompt_tokens_details": details}


def test_config_defaults_and_validation() -> None:
    config = SimConfig(host="0.0.0.0", port=9000)
    assert config.advertise == "0.0.0.0:9000"
    assert config.served_model_names == ("qwen3",)
    assert (config.ttft_ms, config.itl_ms, config.default_max_tokens) == (0.0, 0.0, 16)
    assert config.max_body_bytes == 64 * 1024 * 1024
    bad = [
        ({"port": 70000}, "port"),
        ({"advertise": "no-port"}, "advertise"),
        ({"ttft_ms": -1}, "ttft_ms"),
        ({"itl_ms": float("nan")}, "itl_ms"),
        ({"served_model_names": []}, "served_model_names"),
        ({"served_model_names": "qwen3"}, "served_model_names"),
        ({"default_max_tokens": 0}, "default_max_tokens"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError, match=field):
            SimConfig(**kwargs)


def test_prompt_token_estimate() -> None:
    assert [estimate_prompt_tokens(t) for t in ("", "abcd", "abcde", "x" * 400)] == [1, 1, 2, 100]


@pytest.mark.asyncio
async def test_engine_latency_and_counters() -> None:
    engine = Engine(ttft_ms=50, itl_ms=10)
    completion = engine.plan(GenerationRequest(prompt_text="x" * 10, max_tokens=4))
    assert completion.prompt_tokens == 3 and completion.text == "tok0 tok1 tok2 tok3"
    loop = asyncio.get_running_loop()
    start = loop.time()
    stamps: list[float] = []
    async for _ in engine.generate(completion):
        stamps.append(loop.time() - start)
        assert engine.stats.in_flight == 1 and engine.stats.running == 1
    assert stamps[0] >= 0.045 and stamps[-1] >= 0.075  # ttft, then ttft + 3 * itl
    stats = engine.stats
    assert (stats.in_flight, stats.running, stats.requests_finished) == (0, 0, 1)
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (3, 4)


@pytest.mark.asyncio
async def test_completion_non_streaming(client: TestClient) -> None:
    body = {"model": "qwen3", "prompt": "x" * 41, "max_tokens": 5}
    data = await post_json(client, COMPLETIONS, body)
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert isinstance(data["created"], int) and data["model"] == "qwen3"
    assert len(data["choices"]) == 1
    choice = data["choices"][0]
    assert (choice["index"], choice["text"]) == (0, "tok0 tok1 tok2 tok3 tok4")
    assert choice["finish_reason"] == "length"
    assert data["usage"] == usage(11, 5)


@pytest.mark.asyncio
async def test_chat_non_streaming(client: TestClient) -> None:
    data = await post_json(client, CHAT, {"model": "other", "messages": HI, "max_tokens": 3})
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion" and data["model"] == "other"
    message = data["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == "tok0 tok1 tok2"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == usage(data["usage"]["prompt_tokens"], 3)
    assert data["usage"]["prompt_tokens"] >= 2


@pytest.mark.asyncio
async def test_defaults_and_max_tokens(client: TestClient) -> None:
    headers = {"x-request-id": "r1"}
    response = await client.post(COMPLETIONS, json={"prompt": "hi"}, headers=headers)
    data = await response.json()
    assert data["id"] == "cmpl-r1"  # like vLLM, an incoming request id names the response
    assert data["model"] == "qwen3" and data["usage"]["completion_tokens"] == 16
    body = {"messages": HI, "max_tokens": 9, "max_completion_tokens": 2}
    data = await post_json(client, CHAT, body)
    assert data["choices"][0]["message"]["content"] == "tok0 tok1"


@pytest.mark.asyncio
async def test_prompt_forms(client: TestClient) -> None:
    data = await post_json(client, COMPLETIONS, {"prompt": [1, 2, 3, 4, 5, 6, 7], "max_tokens": 1})
    assert data["usage"] == usage(7, 1)
    data = await post_json(client, COMPLETIONS, {"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 2})
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"] == usage(5, 4)
    data = await post_json(client, COMPLETIONS, {"prompt": ["abcd", "abcdefgh"], "max_tokens": 1})
    assert [c["text"] for c in data["choices"]] == ["tok0", "tok0"]
    assert data["usage"] == usage(1 + 2, 2)


@pytest.mark.asyncio
async def test_content_parts_and_tools(client: TestClient) -> None:
    parts = [
        {"type": "text", "text": "a" * 40},
        {"type": "image_url", "image_url": {"url": "http://example/x.png"}},
        {"type": "text", "text": "b" * 40},
    ]
    plain = [{"role": "user", "content": "a" * 40 + "\n" + "b" * 40}]
    plain_usage = (await post_json(client, CHAT, {"messages": plain}))["usage"]
    with_parts = [{"role": "user", "content": parts}]
    parts_usage = (await post_json(client, CHAT, {"messages": with_parts}))["usage"]
    assert parts_usage["prompt_tokens"] == plain_usage["prompt_tokens"] > 20
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    without = (await post_json(client, CHAT, {"messages": HI}))["usage"]["prompt_tokens"]
    with_tools = (await post_json(client, CHAT, {"messages": HI, "tools": [tool]}))["usage"]
    assert with_tools["prompt_tokens"] > without


@pytest.mark.asyncio
async def test_completion_streaming(client: TestClient) -> None:
    chunks = await post_sse(client, COMPLETIONS, {"prompt": "hello", "max_tokens": 4})
    assert len(chunks) == 4  # one per token, no usage chunk
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == "tok0 tok1 tok2 tok3"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    body = {"prompt": "x" * 8, "max_tokens": 3, "stream_options": {"include_usage": True}}
    chunks = await post_sse(client, COMPLETIONS, body)
    assert len(chunks) == 4 and all(c["choices"] for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage(2, 3)


@pytest.mark.asyncio
async def test_chat_streaming(client: TestClient) -> None:
    body = {"messages": HI, "max_completion_tokens": 3, "stream_options": {"include_usage": True}}
    chunks = await post_sse(client, CHAT, body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = chunks[1:-1]
    assert [c["choices"][0]["delta"]["content"] for c in tokens] == ["tok0", " tok1", " tok2"]
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    chunks = await post_sse(client, CHAT, {"messages": HI, "max_tokens": 2})
    assert len(chunks) == 3 and all(c["choices"] for c in chunks)  # role + 2 tokens, no usage


@pytest.mark.asyncio
async def test_batch_streaming_interleaves_choices(client: TestClient) -> None:
    chunks = await post_sse(client, COMPLETIONS, {"prompt": [[1], [2, 3]], "max_tokens": 2})
    assert [c["choices"][0]["index"] for c in chunks] == [0, 1, 0, 1]


@pytest.mark.asyncio
async def test_streaming_honours_ttft() -> None:
    async with TestClient(TestServer(build_app(make_config(ttft_ms=120.0)))) as slow:
        start = time.monotonic()
        body = {"prompt": "x", "max_tokens": 2, "stream": True}
        response = await slow.post(COMPLETIONS, json=body)
        first = await response.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {") and time.monotonic() - start >= 0.1
        await response.read()


@pytest.mark.asyncio
async def test_unknown_model_is_404(client: TestClient) -> None:
    error = (await post_json(client, COMPLETIONS, {"model": "nope", "prompt": "x"}, 404))["error"]
    assert error == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


@pytest.mark.asyncio
async def test_invalid_json_is_400(client: TestClient) -> None:
    headers = {"Content-Type": "application/json"}
    response = await client.post(CHAT, data=b"{not json", headers=headers)
    assert response.status == 400
    assert response.headers["x-sim-endpoint"] == ADVERTISE
    assert response.headers["x-sim-request-bytes"] == "9"
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "BadRequestError" and error["code"] == 400


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (COMPLETIONS, [{"prompt": "x"}]), (COMPLETIONS, "text"),  # not objects
        (CHAT, {"model": "qwen3"}), (CHAT, {"messages": []}),  # no messages
        (CHAT, {"messages": [{"role": "user", "content": 5}]}),
        (COMPLETIONS, {"model": "qwen3"}), (COMPLETIONS, {"prompt": []}),  # no prompt
        (COMPLETIONS, {"prompt": [1, "a"]}),
        (COMPLETIONS, {"prompt": "x", "max_tokens": 0}),
        (COMPLETIONS, {"prompt": "x", "stream": "yes"}),
        (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}),
    ],
)
async def test_bad_requests_are_400(client: TestClient, path: str, body: Any) -> None:
    error = (await post_json(client, path, body, 400))["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["message"]


@pytest.mark.asyncio
async def test_unknown_route_and_oversized_body_are_json_errors() -> None:
    async with TestClient(TestServer(build_app(make_config(max_body_bytes=1000)))) as small:
        response = await small.get("/v1/nothing")
        assert response.status == 404 and response.headers["x-sim-endpoint"] == ADVERTISE
        assert (await response.json())["error"]["code"] == 404
        response = await small.post(COMPLETIONS, json={"prompt": "x" * 2000})
        assert response.status == 413 and response.headers["x-sim-endpoint"] == ADVERTISE
        assert (await response.json())["error"]["code"] == 413


@pytest.mark.asyncio
async def test_models_and_health(client: TestClient) -> None:
    response = await client.get("/v1/models")
    assert response.status == 200 and response.headers["x-sim-endpoint"] == ADVERTISE
    data = await response.json()
    assert data["object"] == "list" and all(m["object"] == "model" for m in data["data"])
    assert [m["id"] for m in data["data"]] == ["qwen3", "other"]
    response = await client.get("/health")
    assert response.status == 200 and response.headers["x-sim-endpoint"] == ADVERTISE
    assert await response.read() == b""


@pytest.mark.asyncio
async def test_large_chunked_body_echoes_size_and_sha(client: TestClient) -> None:
    raw = json.dumps({"prompt": "y" * 300_000, "max_tokens": 1}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        # An async generator body makes aiohttp send Transfer-Encoding: chunked, like Envoy.
        for offset in range(0, len(raw), 16_384):
            yield raw[offset:offset + 16_384]

    headers = {"Content-Type": "application/json"}
    response = await client.post(COMPLETIONS, data=chunks(), headers=headers)
    assert response.status == 200
    assert response.headers["x-sim-request-bytes"] == str(len(raw))
    assert response.headers["x-sim-request-sha256"] == hashlib.sha256(raw).hexdigest()
    assert (await response.json())["usage"]["prompt_tokens"] == 75_000
    raw = b'{"prompt": "abc", "stream": true, "max_tokens": 1}'  # SSE responses echo too
    response = await client.post(COMPLETIONS, data=raw, headers=headers)
    assert response.headers["x-sim-request-sha256"] == hashlib.sha256(raw).hexdigest()
    await response.read()


@pytest.mark.asyncio
async def test_client_disconnect_releases_engine() -> None:
    engine = Engine(itl_ms=20)
    async with TestClient(TestServer(build_app(make_config(), engine))) as test_client:
        body = {"prompt": "x", "max_tokens": 1000, "stream": True}
        response = await test_client.post(COMPLETIONS, json=body)
        await response.content.readuntil(b"\n\n")
        assert engine.stats.in_flight == 1
        response.close()
        for _ in range(100):
            if engine.stats.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert engine.stats.in_flight == 0 and engine.stats.generation_tokens_total < 1000


@pytest.mark.asyncio
async def test_run_with_ephemeral_port_advertises_bound_port() -> None:
    stop = asyncio.Event()
    bound: list[int] = []
    server = asyncio.create_task(
        run(SimConfig(port=0), stop=stop, on_listening=lambda _, port: bound.append(port))
    )
    try:
        for _ in range(200):
            if bound or server.done():
                break
            await asyncio.sleep(0.01)
        assert bound and bound[0] > 0
        url = f"http://127.0.0.1:{bound[0]}/health"
        async with ClientSession() as session, session.get(url) as response:
            assert response.status == 200
            assert response.headers["x-sim-endpoint"] == f"127.0.0.1:{bound[0]}"
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """Read one stdout line or fail after ``timeout`` seconds (never hang the suite)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError("epp-sim printed nothing in time")
    return proc.stdout.readline()


def test_console_entry_serves_and_exits_cleanly_on_sigterm() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "epp.sim", "--port", str(port), "--model", "m1"]
    argv += ["--max-tokens", "3"]
    pipe = subprocess.PIPE
    with subprocess.Popen(argv, stdout=pipe, stderr=pipe, text=True) as proc:
        try:  # the with-block closes the pipes and reaps the process
            assert read_line(proc, timeout=20).strip() == f"epp-sim listening on 127.0.0.1:{port}"
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{COMPLETIONS}",
                data=json.dumps({"model": "m1", "prompt": "hello"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.headers["x-sim-endpoint"] == f"127.0.0.1:{port}"
                data = json.loads(response.read())
            assert data["choices"][0]["text"] == "tok0 tok1 tok2"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
