"""Tests of epp-sim's service model (batch slots, queue, KV usage, LoRA) and its /metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, aclosing
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer import parse_metrics
from epp.datastore import ServerMetrics
from epp.sim.cli import build_parser, config_from_args
from epp.sim.config import SimConfig
from epp.sim.engine import Engine, GenerationRequest
from epp.sim.server import build_app

Client = TestClient[web.Request, web.Application]
COMPLETIONS = "/v1/completions"
PROMPT = "x" * 400  # 100 tokens by the sim's 4-characters-per-token estimate


async def scrape(client: Client) -> tuple[ServerMetrics, dict[str, float]]:
    """GET /metrics; parse it with the EPP's parser and, fully, with prometheus_client."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    raw = await response.read()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(raw.decode()):  # the page is valid exposition
        for sample in family.samples:
            extra = sample.labels.get("finished_reason")
            samples[sample.name + (f"/{extra}" if extra else "")] = sample.value
    return parse_metrics(raw), samples


async def scrape_until(
    client: Client, condition: Callable[[ServerMetrics], bool], timeout: float = 3.0
) -> tuple[ServerMetrics, dict[str, float]]:
    deadline = time.monotonic() + timeout
    while True:
        metrics, samples = await scrape(client)
        if condition(metrics):
            return metrics, samples
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached; last scrape {metrics}")
        await asyncio.sleep(0.005)


async def complete(client: Client, model: str = "qwen3") -> Any:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 1}
    response = await client.post(COMPLETIONS, json=body)
    assert response.status == 200, await response.text()
    return await response.json()


@pytest.mark.asyncio
async def test_queue_builds_beyond_max_num_seqs_and_round_trips() -> None:
    # Two slots, 0.4 s per request: of 5 concurrent requests 2 run and 3 wait.
    config = SimConfig(max_num_seqs=2, ttft_ms=400, kv_capacity_tokens=4096, block_size=32)
    async with TestClient(TestServer(build_app(config))) as client:
        start = time.monotonic()
        requests = [asyncio.create_task(complete(client)) for _ in range(5)]
        metrics, _ = await scrape_until(client, lambda m: m.waiting == 3)
        assert (metrics.running, metrics.waiting) == (2, 3)
        # Prompts of the two running requests, no tokens generated yet (TTFT not over).
        assert metrics.kv_cache_usage == 200 / 4096
        assert (metrics.block_size, metrics.num_gpu_blocks) == (32, 128)
        assert (metrics.running_loras, metrics.max_lora) == (frozenset(), 0)  # LoRA off
        await asyncio.gather(*requests)
        assert time.monotonic() - start >= 3 * 0.4 * 0.95  # three rounds through 2 slots
        metrics, samples = await scrape(client)
        assert (metrics.running, metrics.waiting, metrics.kv_cache_usage) == (0, 0, 0.0)
        assert samples["vllm:prompt_tokens_total"] == 500
        assert samples["vllm:generation_tokens_total"] == 5
        assert samples["vllm:request_success_total/length"] == 5
        assert samples["vllm:request_success_total/abort"] == 0
        assert samples["vllm:prefix_cache_queries_total"] == 0
        assert samples["vllm:prefix_cache_hits_total"] == 0


@pytest.mark.asyncio
async def test_counters_increase_per_request() -> None:
    async with TestClient(TestServer(build_app(SimConfig()))) as client:
        _, before = await scrape(client)
        await complete(client)
        _, after = await scrape(client)
        for name, delta in [("vllm:prompt_tokens_total", 100), ("vllm:generation_tokens_total", 1),
                            ("vllm:request_success_total/length", 1)]:
            assert after[name] - before[name] == delta, name


@pytest.mark.asyncio
async def test_lora_adapters_appear_and_max_loras_limits_the_batch() -> None:
    config = SimConfig(
        lora_names=["sql", "chat", "extra"], max_loras=2, max_num_seqs=8, ttft_ms=300
    )
    async with TestClient(TestServer(build_app(config))) as client:
        models = await (await client.get("/v1/models")).json()
        cards = {card["id"]: card["parent"] for card in models["data"]}
        assert cards == {"qwen3": None, "sql": "qwen3", "chat": "qwen3", "extra": "qwen3"}
        requests = [asyncio.create_task(complete(client, model))
                    for model in ("sql", "chat", "extra", "qwen3", "sql")]
        # "extra" would be a third adapter in the batch: it waits although slots are free,
        # and the base-model and second "sql" requests behind it start anyway.
        metrics, _ = await scrape_until(client, lambda m: m.running + m.waiting == 5)
        assert (metrics.running, metrics.waiting) == (4, 1)
        assert metrics.running_loras == {"sql", "chat"}
        assert metrics.waiting_loras == {"extra"} and metrics.max_lora == 2
        answers = await asyncio.gather(*requests)
        assert [a["model"] for a in answers] == ["sql", "chat", "extra", "qwen3", "sql"]
        # Earlier label sets stay on the page with older timestamps; the newest is current.
        response = await client.get("/metrics")
        raw = await response.read()
        assert raw.count(b"vllm:lora_requests_info{") >= 2
        metrics = parse_metrics(raw)
        assert metrics.running_loras == frozenset() and metrics.waiting_loras == frozenset()
        unknown = await client.post(COMPLETIONS, json={"model": "nope", "prompt": "x"})
        assert unknown.status == 404


@pytest.mark.asyncio
async def test_engine_fifo_and_cancelled_waiters_leave_the_queue() -> None:
    engine = Engine(itl_ms=5, max_num_seqs=1)
    order: list[str] = []

    async def run(name: str, tokens: int) -> None:
        completion = engine.plan(GenerationRequest(prompt_text="abcd", max_tokens=tokens))
        async with aclosing(engine.generate(completion)) as stream:
            async for _ in stream:
                if name not in order:
                    order.append(name)

    first = asyncio.create_task(run("a", 20))
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(run(name, 2)) for name in ("b", "c", "d")]
    await asyncio.sleep(0.01)
    assert (engine.stats.running, engine.stats.waiting, engine.stats.in_flight) == (1, 3, 4)
    queued[1].cancel()  # "c" gives up while waiting
    await asyncio.gather(first, queued[0], queued[2], return_exceptions=False)
    with pytest.raises(asyncio.CancelledError):
        await queued[1]
    assert order == ["a", "b", "d"]
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.in_flight, stats.kv_tokens) == (0, 0, 0, 0)
    assert (stats.requests_finished, stats.requests_aborted) == (4, 1)


@pytest.mark.asyncio
async def test_kv_usage_grows_with_generated_tokens_and_clips() -> None:
    engine = Engine(itl_ms=1, kv_capacity_tokens=10)
    completion = engine.plan(GenerationRequest(prompt_token_ids=(1, 2, 3, 4), max_tokens=8))
    usage: list[float] = []
    async with aclosing(engine.generate(completion)) as stream:
        async for _ in stream:
            usage.append(engine.kv_cache_usage)
    assert usage[:3] == [0.5, 0.6, 0.7] and usage[-1] == 1.0  # 4 + 8 tokens > 10: clipped
    assert engine.kv_cache_usage == 0.0


@pytest.mark.asyncio
async def test_streaming_disconnect_while_waiting_is_an_abort() -> None:
    engine = Engine(itl_ms=10, max_num_seqs=1)
    async with AsyncExitStack() as stack:
        app = build_app(SimConfig(), engine)
        client = await stack.enter_async_context(TestClient(TestServer(app)))
        body = {"prompt": "x", "max_tokens": 30, "stream": True}
        first = await client.post(COMPLETIONS, json=body)
        await first.content.readuntil(b"\n\n")
        second = await client.post(COMPLETIONS, json=body)  # headers sent, then it queues
        assert engine.stats.waiting == 1
        first.close()
        second.close()
        deadline = time.monotonic() + 3
        while engine.stats.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert engine.stats.in_flight == 0 and engine.stats.requests_aborted == 2


def test_cli_flags_and_validation() -> None:
    args = build_parser().parse_args([
        "--max-num-seqs", "3", "--kv-capacity-tokens", "4096", "--block-size", "32",
        "--lora", "a", "--lora", "b", "--max-loras", "2",
    ])
    config = config_from_args(args)
    assert (config.max_num_seqs, config.kv_capacity_tokens, config.block_size) == (3, 4096, 32)
    assert (config.lora_names, config.max_loras, config.num_gpu_blocks) == (("a", "b"), 2, 128)
    assert config.model_names == ("qwen3", "a", "b")
    defaults = SimConfig()
    assert (defaults.max_num_seqs, defaults.kv_capacity_tokens, defaults.block_size) == (
        8, 8192, 16)
    assert (defaults.lora_names, defaults.max_loras, defaults.num_gpu_blocks) == ((), 4, 512)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"block_size": 0}, "block_size"),
        ({"kv_capacity_tokens": 8}, "kv_capacity_tokens"),
        ({"max_loras": 0}, "max_loras"),
        ({"lora_names": "ab"}, "lora_names"),
        ({"lora_names": ["a", "a"]}, "lora_names"),
        ({"lora_names": ["qwen3"]}, "repeat served model names"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            SimConfig(**kwargs)
