"""epp-sim's prefill/decode disaggregation: the decode pod's sidecar, the prefill pod's
``kv_transfer_params``, fallbacks, KV events on both sides, and the prefill timeline."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port

from epp.sim.cli import build_parser, config_from_args
from epp.sim.config import SimConfig
from epp.sim.disagg import prefill_request_body
from epp.sim.engine import Engine, GenerationRequest
from epp.sim.kvcache import BlockStored, CacheEvent
from epp.sim.server import ENGINE_KEY, build_app
from epp.sim.timeline import ComputeTimeline

Client = TestClient[web.Request, web.Application]
HEADER = "x-prefiller-host-port"
# 330 bytes = 330 tokens under the byte tokenizer: 20 full blocks of 16 are transferable
# (the last prompt token is always recomputed), 10 tokens are left for the decode pod.
PROMPT = "".join(f"sentence {i} of a long prompt. " for i in range(12))[:330]
TRANSFERABLE = 320


class Recorder:
    def __init__(self) -> None:
        self.events: list[CacheEvent] = []

    def __call__(self, events: Any) -> None:
        self.events.extend(events)

    def stored_hashes(self) -> list[bytes]:
        return [h for e in self.events if isinstance(e, BlockStored) for h in e.block_hashes]


async def start_pod(stack: AsyncExitStack, **settings: Any) -> tuple[Client, str, Recorder]:
    """A sim pod on a known port; returns its client, ``ip:port`` and cache recorder."""
    port = unused_port()
    config = SimConfig(tokenizer="bytes", port=port, **settings)
    app = build_app(config)
    recorder = Recorder()
    cache = app[ENGINE_KEY].prefix_cache
    assert cache is not None
    cache.subscribe(recorder)
    client = await stack.enter_async_context(TestClient(TestServer(app, port=port)))
    return client, f"127.0.0.1:{port}", recorder


async def start_stub(stack: AsyncExitStack,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
    """A plain aiohttp server answering every POST with ``handler``; returns ``ip:port``."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await stack.enter_async_context(TestServer(app, port=unused_port()))
    return f"127.0.0.1:{server.port}"


async def metrics(client: Client) -> dict[str, float]:
    text = await (await client.get("/metrics")).text()
    samples = {}
    for line in text.splitlines():
        if line.startswith("epp_sim_"):
            name, value = line.rsplit(" ", 1)
            samples[name.replace('model_name="qwen3",engine="0"', "").replace("{,", "{")
                    .replace("{}", "")] = float(value)
    return samples


@pytest_asyncio.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


@pytest.mark.asyncio
async def test_decode_pod_receives_the_prefill_pods_blocks_instead_of_prefilling(
        stack: AsyncExitStack) -> None:
    prefill, prefill_addr, prefill_events = await start_pod(stack, role="prefill")
    # Locally the 330-token prompt would take 0.66 s; receiving 320 tokens takes 0.08 s.
    decode, _, decode_events = await start_pod(
        stack, role="decode", prefill_tokens_per_s=500, kv_transfer_us_per_token=250)
    start = time.monotonic()
    reply = await decode.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3},
                              headers={HEADER: prefill_addr})
    elapsed = time.monotonic() - start
    assert reply.status == 200, await reply.text()
    assert reply.headers["x-sim-prefilled-by"] == prefill_addr
    assert reply.headers["x-sim-prefiller"] == prefill_addr
    assert "x-sim-prefill-fallback" not in reply.headers
    usage = (await reply.json())["usage"]
    # vLLM counts KV received from the prefill pod as cached prompt tokens.
    assert (usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]) == (
        330, TRANSFERABLE)
    assert 0.08 <= elapsed < 0.4, elapsed
    # Both pods published the prompt's 20 full blocks: computed on one, received on the other.
    assert len(prefill_events.stored_hashes()) == 20
    assert decode_events.stored_hashes() == prefill_events.stored_hashes()
    assert await metrics(decode) == {
        'epp_sim_info{role="decode"}': 1.0,
        'epp_sim_remote_prefills_total{outcome="remote"}': 1.0,
        'epp_sim_remote_prefills_total{outcome="fallback"}': 0.0,
        "epp_sim_prefills_for_remote_decode_total": 0.0,
        "epp_sim_kv_transfer_tokens_total": TRANSFERABLE,
    }
    served = await metrics(prefill)
    assert served['epp_sim_info{role="prefill"}'] == 1.0
    assert served["epp_sim_prefills_for_remote_decode_total"] == 1.0
    # Again: the decode pod holds the blocks now, so nothing more is transferred.
    again = await decode.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3},
                              headers={HEADER: prefill_addr})
    assert again.headers["x-sim-prefilled-by"] == prefill_addr
    assert (await metrics(decode))["epp_sim_kv_transfer_tokens_total"] == TRANSFERABLE


@pytest.mark.asyncio
async def test_prefill_request_is_the_request_cut_to_one_token(stack: AsyncExitStack) -> None:
    seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def prefiller(request: web.Request) -> web.Response:
        headers = {name.lower(): value for name, value in request.headers.items()}
        seen.append((await request.json(), headers))
        params = {"do_remote_prefill": True, "do_remote_decode": False,
                  "remote_block_ids": [7, 8, 9], "remote_host": "10.0.0.9", "remote_port": 1}
        return web.json_response({"choices": [], "kv_transfer_params": params})

    stub = await start_stub(stack, prefiller)
    decode, _, decode_events = await start_pod(stack, role="decode")
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "stream_options": {"include_usage": True}, "max_completion_tokens": 5}
    reply = await decode.post("/v1/chat/completions", json=body,
                              headers={HEADER: stub, "x-request-id": "r1"})
    assert reply.status == 200 and reply.headers["x-sim-prefilled-by"] == stub
    events = [line for line in (await reply.text()).splitlines() if line.startswith("data: {")]
    usage = json.loads(events[-1][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 3 * 16  # what was offered
    assert len(decode_events.stored_hashes()) > 3  # the rest was computed here
    (sent, headers), = seen
    assert sent == {
        "messages": body["messages"], "stream": False, "max_tokens": 1,
        "max_completion_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                               "remote_engine_id": None, "remote_block_ids": None,
                               "remote_host": None, "remote_port": None}}
    assert headers["x-request-id"] == "r1" and HEADER not in headers
    assert prefill_request_body({"prompt": "p", "max_tokens": 9})["max_tokens"] == 1


@pytest.mark.asyncio
async def test_prefill_pod_answers_with_kv_transfer_params(stack: AsyncExitStack) -> None:
    prefill, prefill_addr, _ = await start_pod(stack, role="prefill")
    body = prefill_request_body({"prompt": PROMPT, "max_tokens": 50})
    reply = await prefill.post("/v1/completions", json=body)
    answer = await reply.json()
    host, port = prefill_addr.split(":")
    assert answer["kv_transfer_params"] == {
        "do_remote_prefill": True, "do_remote_decode": False,
        "remote_block_ids": list(range(20)), "remote_engine_id": prefill_addr,
        "remote_request_id": answer["id"], "remote_host": host, "remote_port": int(port),
        "tp_size": 1}
    assert answer["usage"]["completion_tokens"] == 1
    # An ordinary request to a prefill pod is served in full, as vLLM would.
    plain = await (await prefill.post("/v1/completions",
                                      json={"prompt": "hi", "max_tokens": 4})).json()
    assert plain["usage"]["completion_tokens"] == 4 and "kv_transfer_params" not in plain


async def _hang(request: web.Request) -> web.Response:
    await asyncio.sleep(1)  # well past the decode pod's 0.2 s timeout
    return web.json_response({})


async def _no_params(request: web.Request) -> web.Response:
    return web.json_response({"choices": []})


async def _not_json(request: web.Request) -> web.Response:
    return web.Response(text="<html>")


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", ["refused", "500", "timeout", "no params", "not json"])
async def test_a_failed_prefill_pod_falls_back_to_local_prefill(
        stack: AsyncExitStack, failure: str) -> None:
    reasons = {"refused": "ClientConnectorError", "500": "status 500", "timeout": "timeout",
               "no params": "no kv_transfer_params", "not json": "invalid JSON"}
    if failure == "refused":
        prefiller = f"127.0.0.1:{unused_port()}"
    elif failure == "500":
        _, prefiller, _ = await start_pod(stack, role="prefill", remote_prefill_error_status=500)
    else:
        handler = {"timeout": _hang, "no params": _no_params, "not json": _not_json}[failure]
        prefiller = await start_stub(stack, handler)
    decode, _, decode_events = await start_pod(stack, role="decode",
                                               remote_prefill_timeout_s=0.2)
    reply = await decode.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                              headers={HEADER: prefiller})
    assert reply.status == 200, await reply.text()
    assert reply.headers["x-sim-prefilled-by"] == "local"
    assert reply.headers["x-sim-prefill-fallback"] == reasons[failure]
    assert reply.headers["x-sim-prefiller"] == prefiller
    assert (await reply.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert len(decode_events.stored_hashes()) == 20  # computed here, published here
    counts = await metrics(decode)
    assert counts['epp_sim_remote_prefills_total{outcome="fallback"}'] == 1
    assert counts["epp_sim_kv_transfer_tokens_total"] == 0


@pytest.mark.asyncio
async def test_prefill_is_local_without_the_header_on_prefill_pods_and_for_batches(
        stack: AsyncExitStack) -> None:
    prefill, prefill_addr, prefill_events = await start_pod(stack, role="prefill")
    decode, decode_addr, _ = await start_pod(stack, role="decode")
    both, _, _ = await start_pod(stack)  # the default role
    plain = await decode.post("/v1/completions", json={"prompt": PROMPT})
    assert plain.headers["x-sim-prefilled-by"] == "local"
    assert "x-sim-prefiller" not in plain.headers
    # A prefill pod has no sidecar: the header is echoed but ignored.
    own = await prefill.post("/v1/completions", json={"prompt": PROMPT},
                             headers={HEADER: decode_addr})
    assert own.headers["x-sim-prefilled-by"] == "local"
    assert own.headers["x-sim-prefiller"] == decode_addr
    # Several prompts in one request are prefilled where they decode.
    batch = await decode.post("/v1/completions", json={"prompt": [PROMPT, PROMPT + "!"]},
                              headers={HEADER: prefill_addr})
    assert batch.headers["x-sim-prefilled-by"] == "local"
    assert len(prefill_events.stored_hashes()) == 20  # only from the prefill pod's own one
    # A "both" pod acts on the header like a decode pod.
    mixed = await both.post("/v1/completions", json={"prompt": PROMPT},
                            headers={HEADER: prefill_addr})
    assert mixed.headers["x-sim-prefilled-by"] == prefill_addr
    assert (await metrics(both))['epp_sim_info{role="both"}'] == 1.0


@pytest.mark.asyncio
async def test_request_carrying_a_remote_prefill_result_is_decoded_from_it(
        stack: AsyncExitStack) -> None:
    # A real sidecar's second call: the decode request names the prefill pod's blocks.
    decode, _, events = await start_pod(stack, role="decode")
    params = {"do_remote_prefill": True, "do_remote_decode": False,
              "remote_block_ids": list(range(20)), "remote_host": "10.1.2.3",
              "remote_port": 8000}
    reply = await decode.post("/v1/completions",
                              json={"prompt": PROMPT, "kv_transfer_params": params})
    assert reply.headers["x-sim-prefilled-by"] == "10.1.2.3:8000"
    usage = (await reply.json())["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == TRANSFERABLE
    assert len(events.stored_hashes()) == 20


def test_timeline_serializes_prefills_in_chunks_between_decode_slots() -> None:
    # 1,000 tokens/s, chunks of 100 tokens (0.1 s), 10 ms decode steps.
    line = ComputeTimeline(prefill_tokens_per_s=1000, chunk_tokens=100, step_s=0.01)
    assert line.decode_step_end(5.0) == 5.01  # nothing prefilling: one plain step
    assert line.prefill(0.0, 250) == pytest.approx(0.27)  # [0, .1] [.11, .21] [.22, .27]
    assert line.prefill(0.05, 100) == pytest.approx(0.38)  # queued behind: [.28, .38]
    assert line.prefill(1.0, 0) == 1.0 and line.busy_until == pytest.approx(0.38)
    # A step begun inside a chunk waits for it, then runs in the decode slot after it.
    assert line.decode_step_end(0.05) == pytest.approx(0.11)
    assert line.decode_step_end(0.0) == pytest.approx(0.11)
    assert line.decode_step_end(0.205) == pytest.approx(0.22)
    # A step split by a chunk: 5 ms in the slot before it, the rest after it.
    assert line.decode_step_end(0.215) == pytest.approx(0.275)
    assert line.decode_step_end(0.38) == pytest.approx(0.39)
    # With nothing decoding on the pod, the chunks run back to back.
    assert line.prefill(1.0, 250, interleave=False) == pytest.approx(1.25)
    instant = ComputeTimeline(prefill_tokens_per_s=0, chunk_tokens=100, step_s=0.01)
    assert instant.prefill(2.0, 10_000) == 2.0


@pytest.mark.asyncio
async def test_prefill_on_the_same_pod_slows_running_decodes() -> None:
    # 10 ms decode steps; 2,000 prompt tokens prefill in 20 chunks of 10 ms.
    def engine() -> Engine:
        return Engine(itl_ms=10, prefill_tokens_per_s=10_000, max_num_batched_tokens=100)

    async def decode_time(e: Engine) -> float:
        start = time.monotonic()
        await e.execute(e.plan(GenerationRequest(prompt_token_ids=(1,), max_tokens=21)))
        return time.monotonic() - start

    alone = await decode_time(engine())
    shared = engine()
    long_prompt = GenerationRequest(prompt_token_ids=tuple(range(2000)), max_tokens=1)
    prefill = asyncio.create_task(shared.execute(shared.plan(long_prompt)))
    await asyncio.sleep(0)  # let its prefill take the accelerator first
    with_prefill = await decode_time(shared)
    await prefill
    # 20 steps of 10 ms alone; each stretched by a 10 ms chunk while the prefill runs.
    assert 0.19 <= alone < 0.3, alone
    assert with_prefill > 1.6 * alone, (alone, with_prefill)


def test_cli_disaggregation_flags() -> None:
    parser = build_parser()
    config = config_from_args(parser.parse_args([
        "--role", "decode", "--kv-transfer-us-per-token", "2.5",
        "--max-num-batched-tokens", "512", "--remote-prefill-timeout-s", "3",
        "--remote-prefill-error-status", "503"]))
    assert (config.role, config.kv_transfer_us_per_token, config.max_num_batched_tokens) == (
        "decode", 2.5, 512)
    assert (config.remote_prefill_timeout_s, config.remote_prefill_error_status) == (3, 503)
    defaults = config_from_args(parser.parse_args([]))
    assert (defaults.role, defaults.kv_transfer_us_per_token) == ("both", 5.0)
    assert (defaults.max_num_batched_tokens, defaults.remote_prefill_error_status) == (2048, 0)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"role": "encode"}, "role"),
        ({"kv_transfer_us_per_token": -1}, "kv_transfer_us_per_token"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"remote_prefill_timeout_s": 0}, "remote_prefill_timeout_s"),
        ({"remote_prefill_error_status": 200}, "remote_prefill_error_status"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            SimConfig(**kwargs)
