"""The local tokenizer's segment cache is bounded by (estimated) bytes, not entries."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import pytest

from epp.kvcache.tokens import (
    BYTES_PER_CACHED_TOKEN,
    DEFAULT_SEGMENT_CACHE_BYTES,
    MAX_SEGMENT_SHARE,
    LocalPromptTokenizer,
    segment_bytes,
)

IM_START = "<|im_start|>"


class CharTokenizer:
    """One id per character; ``<|im_start|>`` is a special token (segments split there)."""

    special_token_pattern = re.compile(re.escape(IM_START))

    def __init__(self) -> None:
        self.encoded = 0

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        return [1] if text == IM_START else [1000 + ord(c) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Any = None,
                    add_generation_prompt: bool = True) -> str:
        raise NotImplementedError


def accounted(local: LocalPromptTokenizer) -> int:
    """What the cache holds, recomputed entry by entry."""
    return sum(segment_bytes(s, t) for s, t in local._cache.items())


@pytest.mark.asyncio
async def test_cached_bytes_stay_within_the_budget() -> None:
    budget = 256 * 1024
    local = LocalPromptTokenizer(CharTokenizer(), cache_bytes=budget, offload_chars=10**9)
    inserted = 0
    for i in range(400):  # ~18x the budget: 400 segments of ~11 KB each
        text = f"{i:05d}" + "x" * (300 + i % 7)
        tokens = await local.encode(text)
        assert len(tokens) == len(text)
        inserted += segment_bytes(text, tokens)
        assert local.cache_bytes <= budget
        assert local.cache_bytes == accounted(local)
    assert inserted > 15 * budget
    assert len(local._cache) > 1  # still caching: the newest segments fit


@pytest.mark.asyncio
async def test_least_recently_used_segments_go_first() -> None:
    one = segment_bytes("a" * 1000, [0] * 1000)
    local = LocalPromptTokenizer(CharTokenizer(), cache_bytes=3 * one, max_segment_share=1,
                                 offload_chars=10**9)
    for c in "abc":
        await local.encode(c * 1000)
    await local.encode("a" * 1000)  # a hit: "a" is now the most recent
    await local.encode("d" * 1000)  # over budget: "b", the least recent, goes
    assert set(local._cache) == {"a" * 1000, "c" * 1000, "d" * 1000}
    assert local.cache_bytes == accounted(local) <= 3 * one


@pytest.mark.asyncio
async def test_a_segment_over_its_share_of_the_budget_is_not_cached() -> None:
    budget = 1024 * 1024
    tok = CharTokenizer()
    local = LocalPromptTokenizer(tok, cache_bytes=budget, offload_chars=10**9)
    small = "s" * 1000
    await local.encode(small)
    huge = "h" * int(budget * MAX_SEGMENT_SHARE / BYTES_PER_CACHED_TOKEN)
    assert segment_bytes(huge, [0] * len(huge)) > budget * MAX_SEGMENT_SHARE
    assert await local.encode(huge) == [1000 + ord("h")] * len(huge)
    assert set(local._cache) == {small}  # the small one was not flushed for it
    before = tok.encoded
    await local.encode(IM_START + small)
    assert tok.encoded == before + 1  # only the special token was encoded again


@pytest.mark.asyncio
async def test_a_segment_encoded_twice_concurrently_is_counted_once() -> None:
    local = LocalPromptTokenizer(CharTokenizer(), offload_chars=1)  # both go to a thread
    text = "y" * 5000
    await asyncio.gather(local.encode(text), local.encode(text))
    assert local.cache_bytes == accounted(local) == segment_bytes(text, [0] * 5000)


def test_a_32k_token_prompt_is_estimated_at_its_real_size() -> None:
    """The estimate the default budget is derived from: ~1.3 MB per 32k-token prompt,
    so the default holds a few hundred, not 8,192 of them (~11 GB)."""
    text = "word " * 26_000  # ~130 KB of text
    size = segment_bytes(text, list(range(100_000, 132_768)))
    assert 1_200_000 < size < 1_400_000
    assert 150 < DEFAULT_SEGMENT_CACHE_BYTES // size < 250
