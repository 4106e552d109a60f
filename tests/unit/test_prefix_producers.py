"""Prefix-match producers, the prefix scorers, and local-tokenizer segment caching."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import pytest

from epp.api.openai import LLMRequest, parse_request
from epp.datastore import Endpoint
from epp.kvcache.index import BlockIndex
from epp.kvcache.keys import chain_keys
from epp.kvcache.match import PrefixMatch
from epp.kvcache.producer import ApproximateProducer, PreciseProducer, record_routing
from epp.kvcache.tokens import LocalPromptTokenizer, parse_render_response
from epp.kvcache.types import BlockStored, KVEventBatch

BS = 4


class WordTokenizer:
    """A real (if tiny) tokenizer: one id per character, specials as single ids."""

    special_token_pattern = re.compile(r"<\|im_start\|>|<\|im_end\|>")

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        out = []
        for part in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            if part == "<|im_start|>":
                out.append(1)
            elif part == "<|im_end|>":
                out.append(2)
            else:
                out.extend(1000 + ord(c) for c in part)
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Any = None,
                    add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chat(system: str, user: str) -> LLMRequest:
    body = {"model": "m", "messages": [{"role": "system", "content": system},
                                      {"role": "user", "content": user}]}
    return parse_request("/v1/chat/completions", json.dumps(body).encode())


@pytest.mark.asyncio
async def test_segment_cache_reuses_a_long_system_prompt() -> None:
    tok = WordTokenizer()
    local = LocalPromptTokenizer(tok, offload_chars=10**9)
    system = "You are a careful assistant. " * 40
    first = await local.tokens(chat(system, "question one"), [])
    tok.encoded.clear()
    second = await local.tokens(chat(system, "question two"), [])
    # The system segment came from the cache; only short pieces were encoded again.
    assert all(system not in t for t in tok.encoded)
    assert local.cache_hits >= 1
    whole = WordTokenizer().encode(tok.render_chat(
        [{"role": "system", "content": system}, {"role": "user", "content": "question two"}]))
    assert second == whole and first[:300] == second[:300]


@pytest.mark.asyncio
async def test_offloaded_encoding_gives_the_same_tokens() -> None:
    inline = LocalPromptTokenizer(WordTokenizer(), offload_chars=10**9)
    threaded = LocalPromptTokenizer(WordTokenizer(), offload_chars=1)
    req = chat("s" * 500, "u" * 500)
    assert await inline.tokens(req, []) == await threaded.tokens(req, [])


@pytest.mark.asyncio
async def test_token_id_prompts_are_used_as_given() -> None:
    req = parse_request("/v1/completions", b'{"model": "m", "prompt": [5, 6, 7]}')
    assert await LocalPromptTokenizer(WordTokenizer()).tokens(req, []) == [5, 6, 7]


class FixedTokens:
    def __init__(self, tokens: list[int]) -> None:
        self.t = tokens

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]:
        return self.t


@pytest.mark.asyncio
async def test_precise_producer_matches_engine_blocks() -> None:
    tokens = list(range(50, 70))  # 5 blocks of 4
    index = BlockIndex(model="m")
    index.apply_batch("a", KVEventBatch(0, (BlockStored((1, 2, 3), None, tuple(tokens[:12]),
                                                        BS),)))
    producer = PreciseProducer(index, FixedTokens(tokens), block_size=BS)
    eps = [Endpoint("a", "10.0.0.1:8000"), Endpoint("b", "10.0.0.2:8000")]
    req = parse_request("/v1/completions", b'{"model": "m", "prompt": "x"}')
    match = await producer.produce(req, eps)
    assert match is not None and match.precise
    assert (match.prompt_tokens, match.total_blocks) == (20, 5)
    assert match.cached_tokens("a") == 12 and match.uncached_tokens("b") == 20
    assert match.predicted_engine_cached("a") == 12


def test_predicted_engine_cached_never_covers_the_whole_prompt() -> None:
    from epp.kvcache.index import EndpointMatch
    m = PrefixMatch(True, 16, 4, 4, {"a": EndpointMatch(4, 4)})
    assert m.cached_tokens("a") == 16
    assert m.predicted_engine_cached("a") == 12  # vLLM recomputes the last block


@pytest.mark.asyncio
async def test_approximate_producer_learns_from_routing() -> None:
    producer = ApproximateProducer(block_size=4, max_blocks=64, capacity_per_endpoint=100)
    eps = [Endpoint("a", "10.0.0.1:8000"), Endpoint("b", "10.0.0.2:8000")]
    req1 = chat("shared system prompt " * 10, "first")
    first = await producer.produce(req1, eps)
    assert first is not None and not first.precise
    assert first.of("a").blocks == 0 and first.total_blocks > 5
    record_routing(producer, first, eps[1])
    second = await producer.produce(chat("shared system prompt " * 10, "second"), eps)
    assert second is not None
    assert second.of("b").blocks >= 5 and second.of("a").blocks == 0
    other_model = parse_request("/v1/chat/completions", json.dumps({
        "model": "other", "messages": [{"role": "system",
                                        "content": "shared system prompt " * 10}]}).encode())
    third = await producer.produce(other_model, eps)
    assert third is not None and third.of("b").blocks == 0  # keys are seeded by model


def test_chain_keys_match_between_request_and_events() -> None:
    index = BlockIndex(model="m")
    assert chain_keys(list(range(8)), BS, index.root(None)) == chain_keys(
        list(range(8)), BS, index.root(None))


def test_parse_render_response_shapes() -> None:
    assert parse_render_response({"prompt_token_ids": [1, 2]}) == [1, 2]
    assert parse_render_response([{"prompt_token_ids": [3]}]) == [3]
    assert parse_render_response({"engine_prompt": {"prompt_token_ids": [4]}}) == [4]
    with pytest.raises(ValueError):
        parse_render_response({"nope": 1})
