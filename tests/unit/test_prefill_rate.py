"""What the EPP learns from responses about each endpoint's prefill: the uncached prompt
tokens still to be prefilled (in flight until the first response bytes), and the
endpoint's prefill rate from streamed responses' time to first token."""

from __future__ import annotations

import asyncio
import json

import pytest

from epp.api.usage import Usage
from epp.datastore import PrefillRate
from epp.datastore.metrics import PREFILL_MIN_SAMPLES, PREFILL_MIN_TOKENS
from tests.unit.test_served_endpoint import BLOCK, PROMPT_TOKENS, make

STREAM_BODY = json.dumps({"model": "m", "prompt": "hello " * 40, "stream": True}).encode()
# PreciseMatch credits 4 blocks to e0: 16 of the 80 prompt tokens are left to prefill.
UNCACHED = PROMPT_TOKENS - 4 * BLOCK


def test_the_rate_is_unknown_until_enough_samples() -> None:
    rate = PrefillRate()
    for _ in range(PREFILL_MIN_SAMPLES - 1):
        rate.observe(1000, 0.5)
    assert rate.tokens_per_s() is None
    rate.observe(1000, 0.5)
    assert rate.tokens_per_s() == pytest.approx(2000)


def test_the_rate_follows_the_least_queued_samples_not_one_outlier() -> None:
    rate = PrefillRate()
    for _ in range(50):
        rate.observe(1000, 1.0)  # 1,000 tokens/s: mostly queued behind others
    for _ in range(10):
        rate.observe(1000, 0.25)  # 4,000 tokens/s: the engine's real speed
    rate.observe(1000, 0.0001)  # one absurd sample
    assert rate.tokens_per_s() == pytest.approx(4000)


@pytest.mark.parametrize(("tokens", "ttft"), [
    (PREFILL_MIN_TOKENS - 1, 0.1), (1000, 0.0), (1000, -1.0), (1000, 1e9)])
def test_samples_that_say_nothing_about_prefill_are_ignored(tokens: int, ttft: float) -> None:
    rate = PrefillRate()
    for _ in range(PREFILL_MIN_SAMPLES):
        rate.observe(tokens, ttft)
    assert rate.samples == 0


@pytest.mark.asyncio
async def test_uncached_tokens_are_outstanding_prefill_until_the_first_bytes() -> None:
    director, pool, _ = make()
    e0 = pool.snapshot()[0]
    handle = await asyncio.create_task(director.route({":path": "/v1/completions"}, STREAM_BODY,
                                                      None))
    assert (e0.state.load.prompt_tokens, e0.state.load.prefill_tokens) == (PROMPT_TOKENS,
                                                                          UNCACHED)
    handle.on_response_headers(200, {"content-type": "text/event-stream"})
    assert e0.state.load.prefill_tokens == UNCACHED  # headers come before the prefill
    handle.on_response_body(b'data: {"choices": []}\n\n', False)
    assert e0.state.load.prefill_tokens == 0
    assert e0.state.load.prompt_tokens == PROMPT_TOKENS
    handle.on_done(True)
    assert (e0.state.load.prompt_tokens, e0.state.load.prefill_tokens) == (0, 0)


@pytest.mark.asyncio
async def test_a_request_cut_before_its_first_bytes_releases_its_prefill() -> None:
    director, pool, _ = make()
    e0 = pool.snapshot()[0]
    handle = await asyncio.create_task(director.route({":path": "/v1/completions"}, STREAM_BODY,
                                                      None))
    handle.on_done(False)
    assert e0.state.load.prefill_tokens == 0


@pytest.mark.asyncio
async def test_streamed_responses_teach_the_served_endpoint_its_prefill_rate() -> None:
    director, pool, _ = make()
    e0 = pool.snapshot()[0]
    for _ in range(PREFILL_MIN_SAMPLES):
        handle = await asyncio.create_task(
            director.route({":path": "/v1/completions"}, STREAM_BODY, None))
        handle.on_response_headers(200, {"content-type": "text/event-stream"})
        handle.on_response_body(b"data: {}\n\n", False)
        handle.ttft = 0.05  # the measured time, pinned for the arithmetic
        handle.usage = Usage(prompt_tokens=1000, completion_tokens=5, cached_tokens=200)
        handle.on_done(True)
    assert e0.state.prefill.tokens_per_s() == pytest.approx(800 / 0.05)


@pytest.mark.asyncio
async def test_non_streamed_responses_are_not_prefill_samples() -> None:
    director, pool, _ = make()
    body = json.dumps({"model": "m", "prompt": "hello " * 40}).encode()
    for _ in range(PREFILL_MIN_SAMPLES):
        handle = await asyncio.create_task(director.route({":path": "/v1/completions"}, body,
                                                          None))
        handle.on_response_headers(200, {"content-type": "application/json"})
        handle.on_response_body(b"{}", True)
        handle.usage = Usage(prompt_tokens=1000, completion_tokens=5, cached_tokens=0)
        handle.on_done(True)
    assert pool.snapshot()[0].state.prefill.samples == 0
