"""Token ids no vocabulary holds (from a render answer, an engine event, a caller that
skipped the parser) never crash block keying or the precise producer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from epp.api.openai import LLMRequest, TokenPrompt, parse_request
from epp.datastore import Endpoint
from epp.kvcache.index import BlockIndex
from epp.kvcache.keys import chain_keys
from epp.kvcache.producer import PreciseProducer
from epp.kvcache.types import BlockStored, KVEventBatch

BS = 4


@pytest.mark.parametrize("bad", [2**32, 2**40, 10**30, -1, -(2**63)])
def test_out_of_range_ids_fold_to_uint32_instead_of_raising(bad: int) -> None:
    tokens = [1, 2, 3, bad, 5, 6, 7, 8]
    assert chain_keys(tokens, BS, 0) == chain_keys([t % 2**32 for t in tokens], BS, 0)
    assert chain_keys(tokens[:BS], BS, 0) == chain_keys([1, 2, 3, bad % 2**32], BS, 0)


@pytest.mark.parametrize("bad", [1.5, "7", None, [1]])
def test_non_integer_ids_are_a_value_error(bad: Any) -> None:
    with pytest.raises(ValueError):
        chain_keys([1, 2, 3, bad, 5, 6, 7, 8], BS, 0)
    with pytest.raises(ValueError):
        chain_keys([2**40, 2, 3, bad], BS, 0)


@pytest.mark.parametrize("block_size", [0, -4])
def test_a_block_size_below_one_is_a_value_error(block_size: int) -> None:
    with pytest.raises(ValueError):
        chain_keys([1, 2, 3, 4], block_size, 0)


class FixedTokens:
    def __init__(self, tokens: list[Any]) -> None:
        self.t = tokens

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[Any]:
        return self.t


EPS = [Endpoint("a", "10.0.0.1:8000")]


def prompt_request() -> LLMRequest:
    return parse_request("/v1/completions", json.dumps({"model": "m", "prompt": "x"}).encode())


@pytest.mark.asyncio
async def test_precise_producer_matches_folded_ids_from_an_engine() -> None:
    tokens = [2**32 + 5, 6, 7, 8, 9, 10, 11, 12]
    index = BlockIndex(model="m")
    index.apply_batch("a", KVEventBatch(0, (BlockStored((1, 2), None, tuple(tokens), BS),)))
    producer = PreciseProducer(index, FixedTokens(tokens), block_size=BS)
    match = await producer.produce(prompt_request(), EPS)
    assert match is not None and match.cached_tokens("a") == 8


@pytest.mark.asyncio
async def test_precise_producer_routes_without_prefix_data_on_non_integer_ids() -> None:
    producer = PreciseProducer(BlockIndex(model="m"), FixedTokens([1, 2, 3, 4.5]),
                               block_size=BS)
    assert await producer.produce(prompt_request(), EPS) is None
    assert producer.failures == 1


@pytest.mark.asyncio
async def test_a_token_prompt_bypassing_the_parser_still_keys() -> None:
    request = prompt_request()
    request.prompt = TokenPrompt(((2**40, 1, 2, 3),))
    producer = PreciseProducer(BlockIndex(model="m"), FixedTokens([2**40, 1, 2, 3]),
                               block_size=BS)
    match = await producer.produce(request, EPS)
    assert match is not None and match.total_blocks == 1
