"""Tests of epp-sim's fleet model: profiles, time scaling, batch-dependent decode steps,
the oracle's prefix lookup and the received-at stamp."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from epp.sim.cli import build_parser, config_from_args
from epp.sim.config import SimConfig
from epp.sim.engine import Engine, GenerationRequest
from epp.sim.profiles import ProfileError, available_profiles, load_profile
from epp.sim.server import RECEIVED_AT_HEADER, build_app

Client = TestClient[web.Request, web.Application]


def test_shipped_profiles_load_and_hold_every_fleet_setting() -> None:
    names = available_profiles()
    assert "h100-llama8b" in names
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
        for key in ("prefill_tokens_per_s", "itl_ms", "itl_ms_per_seq", "itl_us_per_kv_token",
                    "max_num_seqs", "kv_capacity_tokens", "block_size"):
            assert key in profile.settings, (name, key)
    h100 = load_profile("h100-llama8b").settings
    assert h100["kv_capacity_tokens"] == 24_800 * 16  # num_gpu_blocks x block_size


def test_profile_flag_sets_values_and_explicit_flags_win() -> None:
    parser = build_parser()
    config = config_from_args(parser.parse_args(["--profile", "h100-llama8b"]))
    assert (config.prefill_tokens_per_s, config.itl_ms, config.max_num_seqs) == (20_000, 7.0, 256)
    assert config.num_gpu_blocks == 24_800 and config.time_scale == 1.0
    overridden = config_from_args(parser.parse_args([
        "--profile", "h100-llama8b", "--itl-ms", "3", "--num-gpu-blocks-override", "100",
        "--time-scale", "10"]))
    assert (overridden.itl_ms, overridden.num_gpu_blocks, overridden.time_scale) == (3, 100, 10)
    assert overridden.prefill_tokens_per_s == 20_000  # still the profile's


def test_profile_from_a_path_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "tiny.yaml"
    good.write_text("name: tiny\nitl_ms: 2.5\nkv_capacity_tokens: 4096\n")
    config = config_from_args(build_parser().parse_args(["--profile", str(good)]))
    assert (config.itl_ms, config.kv_capacity_tokens) == (2.5, 4096)
    for text, message in [
        ("itl_ms: -1\n", "itl_ms"),
        ("warp_speed: 9\n", "unknown setting"),
        ("num_gpu_blocks: 4\nkv_capacity_tokens: 64\n", "not both"),
        ("- a list\n", "mapping"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ProfileError, match=message):
            load_profile(str(bad))
    with pytest.raises(ProfileError, match="not found"):
        load_profile("no-such-gpu")
    with pytest.raises(ValueError, match="time_scale"):
        SimConfig(time_scale=0)


def test_decode_step_grows_with_the_batch_and_its_kv() -> None:
    engine = Engine(itl_ms=10, itl_ms_per_seq=1, itl_us_per_kv_token=100)
    assert engine.decode_step_s() == pytest.approx(0.010)
    engine.stats.running, engine.stats.kv_tokens = 4, 20
    assert engine.decode_step_s() == pytest.approx(0.010 + 0.004 + 0.002)
    scaled = Engine(itl_ms=10, itl_ms_per_seq=1, time_scale=10)
    scaled.stats.running = 4
    assert scaled.decode_step_s() == pytest.approx(0.0014)


@pytest.mark.asyncio
async def test_time_scale_runs_prefill_and_decode_faster() -> None:
    async def run(scale: float) -> float:
        engine = Engine(itl_ms=20, prefill_tokens_per_s=1000, time_scale=scale)
        start = time.monotonic()
        request = GenerationRequest(prompt_token_ids=tuple(range(100)), max_tokens=6)
        await engine.execute(engine.plan(request))
        return time.monotonic() - start

    real, fast = await run(1), await run(10)
    # 100 tokens at 1K/s = 0.1 s of prefill + 5 steps of 20 ms = 0.2 s; 10x faster: 0.02 s.
    assert 0.19 <= real < 0.3, real
    assert fast < 0.06, fast


@pytest.mark.asyncio
async def test_full_batch_decodes_slower() -> None:
    async def decode_time(concurrent: int) -> float:
        engine = Engine(itl_ms=5, itl_ms_per_seq=5, max_num_seqs=8)
        request = GenerationRequest(prompt_token_ids=(1,), max_tokens=11)
        start = time.monotonic()
        await asyncio.gather(*(engine.execute(engine.plan(request)) for _ in range(concurrent)))
        return time.monotonic() - start

    alone, crowded = await decode_time(1), await decode_time(4)
    # 10 steps of 10 ms alone; of 25 ms with four sequences running.
    assert 0.09 <= alone < 0.16, alone
    assert crowded > 2 * alone, (alone, crowded)


@pytest.mark.asyncio
async def test_prefix_lookup_reports_cache_and_load_and_changes_nothing() -> None:
    config = SimConfig(tokenizer="bytes", block_size=4, kv_capacity_tokens=1024)
    async with TestClient(TestServer(build_app(config))) as client:
        prompt = "0123456789abcdef!"  # 17 bytes: 4 full blocks

        async def lookup(body: dict[str, Any]) -> Any:
            response = await client.post("/debug/prefix_lookup", json=body)
            assert response.status == 200, await response.text()
            return await response.json()

        cold = await lookup({"prompt": prompt})
        assert (cold["prompt_tokens"], cold["cached_tokens"], cold["running"]) == (17, 0, 0)
        assert (await lookup({"prompt": prompt}))["cached_tokens"] == 0  # lookups store nothing
        response = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        assert response.status == 200
        received = float(response.headers[RECEIVED_AT_HEADER])
        assert abs(received - time.monotonic()) < 5  # the host's monotonic clock
        warm = await lookup({"token_ids": list(prompt.encode())})
        assert warm["cached_tokens"] == 16
        chat = await lookup({"messages": [{"role": "user", "content": prompt}]})
        assert chat["cached_tokens"] == 0  # the chat template changes the first block
        bad = await client.post("/debug/prefix_lookup", json={"token_ids": ["x"]})
        assert bad.status == 400


@pytest.mark.asyncio
async def test_kv_usage_counts_shared_prefix_blocks_once() -> None:
    config = SimConfig(tokenizer="bytes", block_size=4, kv_capacity_tokens=400, itl_ms=20)
    engine = Engine.from_config(config)
    prompt = tuple(range(40))  # 10 full blocks

    async def run() -> None:
        await engine.execute(engine.plan(GenerationRequest(prompt_token_ids=prompt,
                                                           max_tokens=5)))

    tasks = [asyncio.create_task(run()) for _ in range(3)]
    await asyncio.sleep(0.03)  # all three running, one token generated each
    assert engine.stats.running == 3
    # 10 shared blocks (40 tokens) once, plus each sequence's 1-2 generated tokens.
    assert 40 / 400 < engine.kv_cache_usage < 50 / 400
    await asyncio.gather(*tasks)
    assert engine.kv_cache_usage == 0.0


@pytest.mark.asyncio
async def test_requests_whose_prefill_has_not_started_count_as_waiting() -> None:
    # 1,000 tokens/s: the first 100-token prompt prefills for 0.1 s, the second queues.
    engine = Engine(itl_ms=1, prefill_tokens_per_s=1000)

    async def run(first: int) -> None:
        request = GenerationRequest(prompt_token_ids=tuple(range(first, first + 100)),
                                    max_tokens=2)
        await engine.execute(engine.plan(request))

    tasks = [asyncio.create_task(run(0)), asyncio.create_task(run(1000))]
    await asyncio.sleep(0.05)
    assert (engine.stats.running, engine.stats.queued_for_prefill) == (2, 1)
    await asyncio.sleep(0.1)
    assert engine.stats.queued_for_prefill == 0
    await asyncio.gather(*tasks)
    assert engine.stats.queued_for_prefill == 0
