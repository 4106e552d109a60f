"""Block keys and the block index: events in, prefix matches out."""

from __future__ import annotations

from epp.kvcache.index import BlockIndex, EndpointMatch
from epp.kvcache.keys import chain_keys, root_key
from epp.kvcache.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

BS = 4


def batch(*events: object) -> KVEventBatch:
    return KVEventBatch(0.0, tuple(events))  # type: ignore[arg-type]


def stored(hashes: list[int], parent: int | None, tokens: list[int], medium: str | None = None,
           lora: str | None = None) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(tokens), BS, medium=medium, lora_name=lora)


TOKENS = list(range(100, 124))  # 6 blocks of 4


def request_keys(index: BlockIndex, tokens: list[int], lora: str | None = None) -> list[int]:
    return chain_keys(tokens, BS, index.root(lora))


def test_keys_chain_and_ignore_partial_blocks() -> None:
    root = root_key("m", None)
    keys = chain_keys(TOKENS + [1, 2], BS, root)
    assert len(keys) == 6
    # Chained: the same block after a different prefix gets a different key.
    assert chain_keys(TOKENS[4:8], BS, keys[0]) == [keys[1]]
    assert chain_keys(TOKENS[4:8], BS, root) != [keys[1]]
    assert root_key("m", "lora-a") != root and root_key("other", None) != root
    assert chain_keys(TOKENS, BS, root, max_blocks=2) == keys[:2]


def test_events_split_across_batches_match_request_keys() -> None:
    idx = BlockIndex(model="m")
    # The engine stores 2 blocks, then 3 more chained on its own hash 0xB.
    idx.apply_batch("a", batch(stored([0xA, 0xB], None, TOKENS[:8])))
    r = idx.apply_batch("a", batch(stored([0xC, 0xD, 0xE], 0xB, TOKENS[8:20])))
    assert r.stored == 3 and r.missing_parent == 0
    keys = request_keys(idx, TOKENS)
    assert idx.match(keys, ["a", "b"]) == {"a": EndpointMatch(5, 5), "b": EndpointMatch(0, 0)}


def test_longest_consecutive_prefix_per_endpoint() -> None:
    idx = BlockIndex(model="m")
    idx.apply_batch("a", batch(stored([1, 2, 3, 4], None, TOKENS[:16])))
    idx.apply_batch("b", batch(stored([9], None, TOKENS[:4])))
    idx.apply_batch("c", batch(stored([1, 2, 3, 4, 5, 6], None, TOKENS)))
    idx.apply_batch("a", batch(BlockRemoved((2,))))  # a hole at block 1
    got = idx.match(request_keys(idx, TOKENS), ["a", "b", "c"])
    assert got == {"a": EndpointMatch(1, 1), "b": EndpointMatch(1, 1), "c": EndpointMatch(6, 6)}


def test_unknown_parent_is_reported_not_guessed() -> None:
    idx = BlockIndex(model="m")
    r = idx.apply_batch("a", batch(stored([7], 0xDEAD, TOKENS[4:8])))
    assert r.missing_parent == 1 and r.stored == 0
    assert idx.blocks_of("a") == 0


def test_tiers_gpu_and_cpu() -> None:
    idx = BlockIndex(model="m")
    idx.apply_batch("a", batch(stored([1, 2], None, TOKENS[:8]),
                               stored([3, 4], 2, TOKENS[8:16], medium="CPU")))
    m = idx.match(request_keys(idx, TOKENS), ["a"])["a"]
    assert m == EndpointMatch(4, 2)
    assert m.weighted() == 2 * 1.0 + 2 * 0.8
    # The GPU copy of block 0 goes; the chain on the GPU is broken from block 0.
    idx.apply_batch("a", batch(BlockRemoved((1,), "GPU")))
    assert idx.match(request_keys(idx, TOKENS), ["a"])["a"] == EndpointMatch(0, 0)


def test_all_blocks_cleared_and_clear_endpoint_touch_only_that_endpoint() -> None:
    idx = BlockIndex(model="m")
    for ep in ("a", "b"):
        idx.apply_batch(ep, batch(stored([1, 2, 3], None, TOKENS[:12])))
    idx.apply_batch("a", batch(AllBlocksCleared()))
    keys = request_keys(idx, TOKENS)
    assert idx.match(keys, ["a", "b"]) == {"a": EndpointMatch(0, 0), "b": EndpointMatch(3, 3)}
    idx.clear_endpoint("b")
    assert len(idx) == 0 and idx.blocks_of("b") == 0
    # A new endpoint may reuse the freed slot without inheriting anything.
    idx.apply_batch("c", batch(stored([5], None, TOKENS[:4])))
    assert idx.match(keys, ["b", "c"]) == {"b": EndpointMatch(0, 0), "c": EndpointMatch(1, 1)}


def test_lora_blocks_do_not_match_base_model_requests() -> None:
    idx = BlockIndex(model="m")
    idx.apply_batch("a", batch(stored([1, 2], None, TOKENS[:8], lora="sql")))
    assert idx.match(request_keys(idx, TOKENS), ["a"])["a"] == EndpointMatch(0, 0)
    assert idx.match(request_keys(idx, TOKENS, "sql"), ["a"])["a"] == EndpointMatch(2, 2)
    assert "sql" in idx.known_loras


def test_capacity_evicts_oldest_blocks() -> None:
    idx = BlockIndex(model="m", capacity_blocks=4)
    idx.apply_batch("a", batch(stored([1, 2, 3, 4, 5, 6], None, TOKENS)))
    assert len(idx) == 4 and idx.evicted_by_capacity == 2
    # The two oldest (leading) blocks went, so the prefix match is now empty.
    assert idx.match(request_keys(idx, TOKENS), ["a"])["a"].blocks == 0


def test_blocks_with_foreign_extra_keys_never_match_plain_requests() -> None:
    idx = BlockIndex(model="m")
    salted = BlockStored((1, 2), None, tuple(TOKENS[:8]), BS,
                         extra_keys=(("salt-abc",), None))
    idx.apply_batch("a", batch(salted))
    assert idx.match(request_keys(idx, TOKENS), ["a"])["a"].blocks == 0
    # LoRA-only extra keys are what the root already encodes: they still match.
    lora = BlockStored((3, 4), None, tuple(TOKENS[:8]), BS, lora_name="sql",
                       extra_keys=(("sql",), ("sql",)))
    idx.apply_batch("b", batch(lora))
    assert idx.match(request_keys(idx, TOKENS, "sql"), ["b"])["b"].blocks == 2


def test_other_kv_groups_and_placeholder_stores_are_skipped() -> None:
    idx = BlockIndex(model="m")
    r = idx.apply_batch("a", batch(
        BlockStored((1,), None, tuple(TOKENS[:4]), BS, group_idx=1),
        BlockStored((2,), None, (), 0),
        BlockRemoved((1,), group_idx=1)))
    assert r.skipped == 3 and len(idx) == 0


def chain_of(n: int, start: int) -> list[BlockStored]:
    """``n`` one-block stores chained on the engine's own hashes, tokens unique to it."""
    events = []
    for i in range(n):
        h = start + i
        events.append(BlockStored((h,), h - 1 if i else None,
                                  tuple(range(h * BS, (h + 1) * BS)), BS))
    return events


def test_engine_hash_maps_stay_bounded_by_the_capacity() -> None:
    # Feeding far more blocks than the capacity used to leave every engine-hash entry
    # behind (only the block keys were evicted): memory grew with events, not capacity.
    capacity = 2048
    idx = BlockIndex(model="m", capacity_blocks=capacity)
    for start in range(0, 50_000, 500):  # each pod stores its own 500-block chains
        for pod in ("a", "b"):
            base = 1 + start + (0 if pod == "a" else 10_000_000)
            idx.apply_batch(pod, batch(*chain_of(500, base)))
    assert len(idx) <= capacity
    assert idx.blocks_of("a") + idx.blocks_of("b") <= capacity
    assert idx.blocks_of("a") > capacity // 4 and idx.blocks_of("b") > capacity // 4
    assert idx.evicted_by_capacity == 2 * 50_000 - len(idx)
    # What stayed is the newest: the last chain of each pod still matches in full.
    last = chain_of(500, 1 + 49_500)
    tokens = [t for ev in last for t in ev.token_ids]
    assert idx.match(request_keys(idx, tokens), ["a"])["a"].blocks == 500
    # A removal for an evicted block finds no entry: it was evicted with its key.
    r = idx.apply_batch("a", batch(BlockRemoved((1,))))
    assert (r.unknown_removed, r.removed) == (1, 0)


def test_eviction_of_a_shared_block_takes_every_holders_entry() -> None:
    idx = BlockIndex(model="m", capacity_blocks=4)
    for pod in ("a", "b"):
        idx.apply_batch(pod, batch(*chain_of(4, 1)))
    idx.apply_batch("a", batch(*chain_of(2, 100)))  # two more: the oldest shared ones go
    assert len(idx) == 4
    assert idx.blocks_of("a") + idx.blocks_of("b") <= 2 * 4
    keys = request_keys(idx, [t for ev in chain_of(4, 1) for t in ev.token_ids])
    got = idx.match(keys, ["a", "b"])
    assert got["a"].blocks == got["b"].blocks == 0  # block 0 went from both pods


def test_an_engine_hash_stored_again_for_other_tokens_releases_the_old_block() -> None:
    idx = BlockIndex(model="m")
    idx.apply_batch("a", batch(stored([1, 2], None, TOKENS[:8])))
    idx.apply_batch("a", batch(stored([1, 2], None, TOKENS[8:16])))  # same hashes
    assert len(idx) == 2 and idx.blocks_of("a") == 2
    assert idx.match(request_keys(idx, TOKENS[:8]), ["a"])["a"].blocks == 0
    assert idx.match(request_keys(idx, TOKENS[8:16]), ["a"])["a"].blocks == 2
    idx.apply_batch("a", batch(BlockRemoved((1, 2))))
    assert len(idx) == 0  # nothing left that no removal could reach


def test_a_forgotten_blocks_engine_entry_never_touches_the_block_that_took_its_place() -> None:
    # Forgetting drops a block no one else holds while its engine entry stays; the table
    # then reuses the block's slot for the next new block. The entry must still name the
    # forgotten block, whether the engine removes it or stores it again.
    idx = BlockIndex(model="m")
    first = request_keys(idx, TOKENS[:4])
    other = request_keys(idx, TOKENS[4:8])  # the same tokens with no parent: a new block
    idx.apply_batch("a", batch(stored([1], None, TOKENS[:4])))
    assert idx.forget("a", first) == 1 and len(idx) == 0 and idx.blocks_of("a") == 1
    idx.apply_batch("a", batch(stored([2], None, TOKENS[4:8])))
    idx.apply_batch("a", batch(BlockRemoved((1,))))
    assert idx.match(other, ["a"])["a"].blocks == 1 and idx.blocks_of("a") == 1

    idx.apply_batch("a", batch(stored([1], None, TOKENS[:4])))
    assert idx.forget("a", first) == 1
    idx.apply_batch("b", batch(stored([7], None, TOKENS[8:12])))
    idx.apply_batch("a", batch(stored([1], None, TOKENS[:4])))  # the engine stores it again
    assert idx.match(first, ["a"])["a"].blocks == 1
    assert idx.match(request_keys(idx, TOKENS[8:12]), ["a", "b"]) == {
        "a": EndpointMatch(0, 0), "b": EndpointMatch(1, 1)}


def test_a_replayed_store_of_known_blocks_changes_nothing() -> None:
    idx = BlockIndex(model="m")
    events = batch(stored([1, 2, 3], None, TOKENS[:12]), stored([4], 3, TOKENS[12:16], "CPU"))
    idx.apply_batch("a", events)
    idx.apply_batch("b", events)
    before = idx.match(request_keys(idx, TOKENS), ["a", "b"])
    for _ in range(2):
        idx.apply_batch("a", events)
    assert idx.match(request_keys(idx, TOKENS), ["a", "b"]) == before
    assert before["a"] == EndpointMatch(4, 3) and len(idx) == 4 and idx.blocks_of("a") == 4
