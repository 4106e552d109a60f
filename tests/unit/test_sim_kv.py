"""Tests of epp-sim's prefix cache, tokenizers, render endpoints and KV event encoding."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from tokenizers import Tokenizer, models, pre_tokenizers

from epp.sim.cli import build_parser, config_from_args
from epp.sim.config import SimConfig
from epp.sim.kv_events import BatchEncoder, KVEventsConfig
from epp.sim.kvcache import (
    NONE_HASH,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheEvent,
    PrefixCache,
)
from epp.sim.prompts import ByteTokenizer
from epp.sim.server import ENGINE_KEY, build_app

Client = TestClient[web.Request, web.Application]
BS = 4  # block size of the HTTP tests: short prompts span several blocks


def blocks(text: str) -> list[list[int]]:
    """The full blocks of ``text`` under the byte tokenizer."""
    ids = list(text.encode())
    return [ids[i:i + BS] for i in range(0, len(ids) - BS + 1, BS)]


def expected_hashes(token_blocks: list[list[int]], lora: str | None = None) -> list[bytes]:
    """The chained digests, derived here from the documented formula."""
    out: list[bytes] = []
    parent = NONE_HASH
    for tokens in token_blocks:
        extra = [lora] if lora is not None else None
        parent = hashlib.sha256(msgspec.msgpack.encode([parent, tokens, extra])).digest()
        out.append(parent)
    return out


class Recorder:
    def __init__(self) -> None:
        self.events: list[CacheEvent] = []

    def __call__(self, events: Any) -> None:
        self.events.extend(events)

    def take(self) -> list[CacheEvent]:
        events, self.events = self.events, []
        return events


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[tuple[Client, Recorder]]:
    config = SimConfig(tokenizer="bytes", block_size=BS, kv_capacity_tokens=1024,
                       lora_names=["sql"])
    app = build_app(config)
    recorder = Recorder()
    cache = app[ENGINE_KEY].prefix_cache
    assert cache is not None
    cache.subscribe(recorder)
    async with TestClient(TestServer(app)) as client:
        yield client, recorder


async def usage_of(client: Client, body: dict[str, Any], path: str = "/v1/completions") -> Any:
    response = await client.post(path, json={"max_tokens": 1, **body})
    assert response.status == 200, await response.text()
    return (await response.json())["usage"]


def test_block_hashes_chain_and_depend_on_lora() -> None:
    cache = PrefixCache(block_size=BS, num_gpu_blocks=8)
    text = "abcdefghij"  # two full blocks, two tokens left over
    hashes = cache.block_hashes(list(text.encode()))
    assert hashes == expected_hashes(blocks(text))
    longer = cache.block_hashes(list((text + "klmnop").encode()))
    assert longer[:2] == hashes and len(longer) == 4  # a shared prefix shares its keys
    lora = cache.block_hashes(list(text.encode()), "sql")
    assert lora == expected_hashes(blocks(text), "sql") and not set(lora) & set(hashes)


@pytest.mark.asyncio
async def test_repeated_prefix_hits_and_usage_reports_whole_blocks(
    sim: tuple[Client, Recorder],
) -> None:
    client, recorder = sim
    first = await usage_of(client, {"prompt": "The quick brown fox"})  # 19 bytes, 4 blocks
    assert (first["prompt_tokens"], first["prompt_tokens_details"]["cached_tokens"]) == (19, 0)
    (stored,) = recorder.take()
    assert isinstance(stored, BlockStored) and stored.parent_block_hash is None
    assert list(stored.block_hashes) == expected_hashes(blocks("The quick brown fox"))
    assert len(stored.token_ids) == 4 * BS and stored.medium == "GPU"
    # "The quick brown " is the 16-byte, four-block prefix both prompts share.
    second = await usage_of(client, {"prompt": "The quick brown cat jumps"})
    assert second["prompt_tokens_details"]["cached_tokens"] == 16
    (stored,) = recorder.take()
    assert isinstance(stored, BlockStored)
    assert stored.parent_block_hash == expected_hashes(blocks("The quick brown fox"))[3]
    assert stored.token_ids == tuple(b"cat jump")  # the two new full blocks
    # A prompt cached in full still recomputes its last token: one block less is reported.
    again = await usage_of(client, {"prompt": "The quick brown cat jump"})  # 6 blocks
    assert again["prompt_tokens_details"]["cached_tokens"] == 20
    assert recorder.take() == []  # nothing new to store
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'vllm:prefix_cache_queries_total{model_name="qwen3",engine="0"} 68.0' in metrics
    assert 'vllm:prefix_cache_hits_total{model_name="qwen3",engine="0"} 36.0' in metrics


@pytest.mark.asyncio
async def test_chat_is_rendered_then_cached(sim: tuple[Client, Recorder]) -> None:
    client, recorder = sim
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    body = {"messages": messages, "tools": [tool]}
    render = await client.post("/v1/chat/completions/render", json=body)
    rendered = await render.json()
    ids = rendered["token_ids"]
    assert rendered["request_id"].startswith("chatcmpl-") and rendered["model"] == "qwen3"
    assert bytes(ids).decode().endswith("<|im_start|>assistant\n") and '"name": "f"' in bytes(
        ids).decode()
    first = await usage_of(client, body, "/v1/chat/completions")
    assert first["prompt_tokens"] == len(ids)
    (stored,) = recorder.take()
    assert isinstance(stored, BlockStored)
    assert list(stored.token_ids) == ids[:len(ids) // BS * BS]  # the ids the cache used
    more = {"messages": [*messages, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "and?"}], "tools": [tool]}
    second = await usage_of(client, more, "/v1/chat/completions")
    # The first prompt, generation prompt included, starts the second one.
    assert second["prompt_tokens_details"]["cached_tokens"] == len(ids) // BS * BS


@pytest.mark.asyncio
async def test_completions_render_matches_the_prompts(sim: tuple[Client, Recorder]) -> None:
    client, _ = sim
    body = {"model": "sql", "prompt": ["héllo", "x"], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    rendered = await (await client.post("/v1/completions/render", json=body)).json()
    assert [r["token_ids"] for r in rendered] == [list("héllo".encode()), [120]]
    first = rendered[0]
    assert first["request_id"].startswith("cmpl-") and first["model"] == "sql"
    assert first["sampling_params"] == {"max_tokens": 3}
    assert (first["stream"], first["stream_options"]) == (True, {"include_usage": True})
    ids = await (await client.post("/v1/completions/render", json={"prompt": [5, 6]})).json()
    assert ids[0]["token_ids"] == [5, 6]  # token prompts pass through
    bad = await client.post("/v1/chat/completions/render", json={"messages": []})
    assert bad.status == 400 and (await bad.json())["error"]["code"] == 400


@pytest.mark.asyncio
async def test_lora_requests_use_their_own_keys(sim: tuple[Client, Recorder]) -> None:
    client, recorder = sim
    prompt = "abcdefghijklmnop"
    await usage_of(client, {"prompt": prompt})
    recorder.take()
    lora = await usage_of(client, {"prompt": prompt, "model": "sql"})
    assert lora["prompt_tokens_details"]["cached_tokens"] == 0  # base blocks do not count
    (stored,) = recorder.take()
    assert isinstance(stored, BlockStored)
    assert (stored.lora_name, stored.lora_id) == ("sql", 1)
    assert stored.extra_keys == (("sql",),) * 4
    assert list(stored.block_hashes) == expected_hashes(blocks(prompt), "sql")
    again = await usage_of(client, {"prompt": prompt, "model": "sql"})
    assert again["prompt_tokens_details"]["cached_tokens"] == 12


@pytest.mark.asyncio
async def test_reset_prefix_cache_clears_everything(sim: tuple[Client, Recorder]) -> None:
    client, recorder = sim
    await usage_of(client, {"prompt": "abcdefghijkl"})
    response = await client.post("/reset_prefix_cache")
    assert response.status == 200 and await response.read() == b""
    assert recorder.take()[-1] == AllBlocksCleared()
    after = await usage_of(client, {"prompt": "abcdefghijkl"})
    assert after["prompt_tokens_details"]["cached_tokens"] == 0


def test_lru_eviction_emits_block_removed_tail_first() -> None:
    cache = PrefixCache(block_size=2, num_gpu_blocks=4)
    recorder = Recorder()
    cache.subscribe(recorder)
    a, b, c = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    for ids in (a, b, a):  # a is used again: b becomes least recently used
        cache.finish(cache.start(ids))
    recorder.take()
    cache.finish(cache.start(c))
    removed, stored = recorder.take()
    b_hashes = cache.block_hashes(b)
    assert removed == BlockRemoved((b_hashes[1], b_hashes[0]), "GPU")  # tail block first
    assert isinstance(stored, BlockStored) and stored.block_hashes == tuple(cache.block_hashes(c))
    assert cache.lookup(a + [0]) == 4 and cache.lookup(b + [0]) == 0


def test_blocks_held_by_running_requests_are_never_evicted() -> None:
    cache = PrefixCache(block_size=2, num_gpu_blocks=3)
    recorder = Recorder()
    cache.subscribe(recorder)
    running = cache.start([1, 2, 3, 4])
    recorder.take()
    lease = cache.start([5, 6, 7, 8, 9, 10])  # room for one of its three blocks
    (stored,) = recorder.take()
    assert isinstance(stored, BlockStored) and len(stored.block_hashes) == 1
    assert cache.lookup([1, 2, 3, 4, 0]) == 4
    cache.finish(lease)
    cache.finish(running)
    assert cache.start([5, 6, 7, 8, 0]).cached_tokens == 2


def test_cpu_tier_receives_evictions_and_serves_hits() -> None:
    cache = PrefixCache(block_size=2, num_gpu_blocks=2, cpu_blocks=2)
    recorder = Recorder()
    cache.subscribe(recorder)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    cache.finish(cache.start(a))
    recorder.take()
    cache.finish(cache.start(b))
    a_hashes = cache.block_hashes(a)
    events = recorder.take()
    assert events[0] == BlockRemoved((a_hashes[1],), "GPU")
    assert isinstance(events[1], BlockStored) and events[1].medium == "CPU"
    assert events[1].block_hashes == (a_hashes[1],) and events[1].token_ids == (3, 4)
    assert events[1].parent_block_hash == a_hashes[0]
    assert cache.cpu_block_hashes == frozenset(a_hashes)
    lease = cache.start(a + [0])  # served from the CPU tier, loaded back onto the GPU
    assert lease.cached_tokens == 4 and cache.gpu_block_hashes == frozenset(a_hashes)


def test_batch_encoding_in_both_forms() -> None:
    digest = hashlib.sha256(b"x").digest()
    stored = BlockStored((digest,), None, (1, 2), 2, 1, "GPU", "sql", (("sql",),))
    events: list[CacheEvent] = [stored, BlockRemoved((digest,), "CPU"), AllBlocksCleared()]
    ts, folded = 12.5, int.from_bytes(digest[-8:], "big")
    array = msgspec.msgpack.decode(BatchEncoder("array", "uint64").encode(ts, events))
    assert array == [ts, [
        ["BlockStored", [folded], None, [1, 2], 2, 1, "GPU", "sql", [["sql"]], 0,
         "full_attention", None],
        ["BlockRemoved", [folded], "CPU", 0],
        ["AllBlocksCleared"],
    ], 0]
    mapped = msgspec.msgpack.decode(BatchEncoder("map", "bytes").encode(ts, events))
    assert mapped == {"ts": ts, "data_parallel_rank": 0, "events": [
        {"type": "BlockStored", "block_hashes": [digest], "parent_block_hash": None,
         "token_ids": [1, 2], "block_size": 2, "lora_id": 1, "medium": "GPU",
         "lora_name": "sql", "extra_keys": [["sql"]], "group_idx": 0,
         "kv_cache_spec_kind": "full_attention"},  # the None sliding window is omitted
        {"type": "BlockRemoved", "block_hashes": [digest], "medium": "CPU", "group_idx": 0},
        {"type": "AllBlocksCleared"},
    ]}


@pytest.mark.asyncio
async def test_prefill_time_follows_uncached_tokens() -> None:
    # 2 ms per uncached token: 200 tokens take 0.4 s, the cached repeat only its last block.
    config = SimConfig(tokenizer="bytes", prefill_tokens_per_s=500)
    async with TestClient(TestServer(build_app(config))) as client:
        prompt = "p" * 200
        start = time.monotonic()
        await usage_of(client, {"prompt": prompt})
        cold = time.monotonic() - start
        start = time.monotonic()
        warm = await usage_of(client, {"prompt": prompt})
        hot = time.monotonic() - start
    assert warm["prompt_tokens_details"]["cached_tokens"] == 192  # 12 blocks of 16
    assert cold >= 0.39 and hot < 0.2, (cold, hot)


@pytest.mark.asyncio
async def test_hf_tokenizer_directory(tmp_path: Path) -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<s>": 3, "user": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<s> {{ m.role }} {{ m.content }} {% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    config = SimConfig(tokenizer="hf", tokenizer_dir=str(tmp_path))
    app = await asyncio.to_thread(build_app, config)
    async with TestClient(TestServer(app)) as client:
        body = {"messages": [{"role": "user", "content": "hello world"}]}
        rendered = await (await client.post("/v1/chat/completions/render", json=body)).json()
        assert rendered["token_ids"] == [3, 4, 1, 2]
        usage = await usage_of(client, {"prompt": "world hello x"})
        assert usage["prompt_tokens"] == 3


@pytest.mark.asyncio
async def test_without_a_tokenizer_render_is_not_implemented() -> None:
    async with TestClient(TestServer(build_app(SimConfig()))) as client:
        response = await client.post("/v1/completions/render", json={"prompt": "hi"})
        assert response.status == 501


def test_byte_tokenizer_renders_chatml() -> None:
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3, 0xA9]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "image_url", "image_url": {}},
                                          {"type": "text", "text": "b"}]}]
    assert tok.render_chat(parts) == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    assert tok.render_chat(parts, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_cli_cache_flags() -> None:
    parser = build_parser()
    config = config_from_args(parser.parse_args([
        "--tokenizer", "bytes", "--prefill-tokens-per-s", "1000", "--cpu-offload-blocks", "8",
        "--kv-events-port", "5557", "--kv-events-replay-port", "5558",
        "--kv-events-encoding", "map", "--kv-events-hash", "bytes", "--kv-events-drop-seq", "3",
    ]))
    assert (config.tokenizer, config.prefill_tokens_per_s, config.cpu_offload_blocks) == (
        "bytes", 1000, 8)
    assert config.kv_events == KVEventsConfig(5557, 5558, "map", "bytes", 3)
    defaults = config_from_args(parser.parse_args([]))
    assert (defaults.tokenizer, defaults.prefill_tokens_per_s) == ("qwen", 20_000)
    assert defaults.kv_events.enabled is False and defaults.enable_prefix_caching
    hf = config_from_args(parser.parse_args(["--tokenizer-dir", "/some/dir"]))
    assert (hf.tokenizer, hf.tokenizer_dir) == ("hf", "/some/dir")
    for argv, message in [
        (["--tokenizer", "bytes", "--tokenizer-dir", "d"], "not both"),
        (["--kv-events-replay-port", "5558"], "needs a kv_events port"),
        (["--kv-events-port", "5557", "--no-enable-prefix-caching"], "enable_prefix_caching"),
        (["--prefill-tokens-per-s", "-1"], "prefill_tokens_per_s"),
        (["--cpu-offload-blocks", "-1"], "cpu_offload_blocks"),
    ]:
        with pytest.raises(ValueError, match=message):
            config_from_args(parser.parse_args(argv))
