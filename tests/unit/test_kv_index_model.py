"""The block index against a plain-dict model of it (the layout it had before its compact
tables): any sequence of stores, replays, engine hashes reused for other tokens, removals
by tier, clears, departures, corrections and capacity evictions leaves both agreeing on
every match, size and counter."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.kvcache.index import EVICTION_HEADROOM_DIVISOR, BlockIndex
from epp.kvcache.keys import chain_keys, root_key
from epp.kvcache.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

BS = 2
BLOCKS = 6
ENDPOINTS = ("a", "b", "c")
CHAINS = [list(range(base, base + BLOCKS * BS)) for base in (100, 5_000, 90_000)]
CAPACITY = 10


class DictIndex:
    """Engine hash -> key dicts per endpoint and key -> bitmask, as the index was kept."""

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}
        self.engine: dict[str, dict[int, int]] = {}
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.next_slot = 0
        self.evicted = 0
        self.corrected = 0

    def slot(self, e: str) -> int:
        if e not in self.slots:
            s = self.free.pop() if self.free else self.next_slot
            if s == self.next_slot:
                self.next_slot += 1
            self.slots[e] = s
            self.engine[e] = {}
        return self.slots[e]

    def release(self, key: int, slot: int) -> bool:
        mask = self.holders.get(key)
        if mask is None:
            return False
        mask &= ~(0b11 << (2 * slot))
        if mask:
            self.holders[key] = mask
            return False
        del self.holders[key]
        return True

    def store(self, e: str, hashes: list[int], parent: int | None, tokens: list[int],
              tier: int) -> None:
        s = self.slot(e)
        by = self.engine[e]
        if parent is None:
            parent_key = root_key("m", None)
        elif parent in by:
            parent_key = by[parent]
        else:
            return  # missing parent
        bit = 1 << (2 * s + tier)
        for h, key in zip(hashes, chain_keys(tokens, BS, parent_key)):
            previous = by.get(h)
            if previous is not None and previous != key:
                self.release(previous, s)
            by[h] = key
            self.holders[key] = self.holders.get(key, 0) | bit
        if len(self.holders) > CAPACITY:
            self.evict()

    def evict(self) -> None:
        target = CAPACITY - CAPACITY // EVICTION_HEADROOM_DIVISOR
        while len(self.holders) > target:
            name = max(self.engine, key=lambda n: len(self.engine[n]))
            by = self.engine[name]
            count = min(len(self.holders) - target, len(by))
            for h, key in list(itertools.islice(by.items(), count)):
                del by[h]
                self.evicted += self.release(key, self.slots[name])

    def remove(self, e: str, hashes: list[int], tier: int) -> None:
        s = self.slot(e)
        by = self.engine[e]
        for h in hashes:
            if h not in by:
                continue
            mask = self.holders.get(by[h], 0) & ~(1 << (2 * s + tier))
            if mask:
                self.holders[by[h]] = mask
            else:
                self.holders.pop(by[h], None)
            if not mask & (0b11 << (2 * s)):
                del by[h]

    def clear(self, e: str) -> None:
        s = self.slot(e)
        for key in self.engine[e].values():
            self.release(key, s)
        self.engine[e].clear()

    def leave(self, e: str) -> None:
        if e in self.slots:
            self.clear(e)
            self.free.append(self.slots.pop(e))
            del self.engine[e]

    def forget(self, e: str, keys: list[int]) -> None:
        if e not in self.slots:
            return
        both = 0b11 << (2 * self.slots[e])
        for key in keys:
            mask = self.holders.get(key, 0)
            if mask & both:
                self.corrected += 1
                if mask & ~both:
                    self.holders[key] = mask & ~both
                else:
                    del self.holders[key]

    def match(self, keys: list[int], e: str) -> tuple[int, int]:
        if e not in self.slots:
            return 0, 0
        s = self.slots[e]
        held = [self.holders.get(k, 0) >> (2 * s) & 0b11 for k in keys]
        blocks = next((i for i, m in enumerate(held) if not m), len(keys))
        gpu = next((i for i, m in enumerate(held) if not m & 1), len(keys))
        return blocks, min(blocks, gpu)


def hashes_of(chain: int, start: int, n: int, reuse: bool) -> list[int]:
    # Reused hashes name the same blocks of every chain (an engine that restarted unseen).
    base = 0 if reuse else 1_000 * (chain + 1)
    return [base + b + 1 for b in range(start, start + n)]


op = st.one_of(
    # store blocks [start, start + n) of a chain, chained on the engine's hash of start - 1
    st.tuples(st.just("store"), st.sampled_from(ENDPOINTS), st.integers(0, 2),
              st.integers(0, BLOCKS - 1), st.integers(1, BLOCKS), st.integers(0, 1),
              st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(ENDPOINTS), st.integers(0, 2),
              st.integers(0, BLOCKS - 1), st.integers(1, 3), st.integers(0, 1),
              st.booleans()),
    st.tuples(st.just("clear"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("leave"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("forget"), st.sampled_from(ENDPOINTS), st.integers(0, 2),
              st.integers(0, BLOCKS - 1), st.integers(1, 3)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=40))
def test_the_index_agrees_with_a_dict_model(ops: list[tuple[Any, ...]]) -> None:
    index = BlockIndex(model="m", capacity_blocks=CAPACITY)
    model = DictIndex()
    root = index.root(None)
    keys = [chain_keys(chain, BS, root) for chain in CHAINS]
    for o in ops:
        kind = o[0]
        if kind == "store":
            _, e, c, start, n, tier, reuse = o
            n = min(n, BLOCKS - start)
            hashes = hashes_of(c, start, n, reuse)
            parent = hashes_of(c, start - 1, 1, reuse)[0] if start else None
            tokens = CHAINS[c][start * BS:(start + n) * BS]
            index.apply_batch(e, KVEventBatch(0.0, (BlockStored(
                tuple(hashes), parent, tuple(tokens), BS, medium="CPU" if tier else None),)))
            model.store(e, hashes, parent, tokens, tier)
        elif kind == "remove":
            _, e, c, start, n, tier, reuse = o
            hashes = hashes_of(c, start, min(n, BLOCKS - start), reuse)
            index.apply_batch(e, KVEventBatch(0.0, (BlockRemoved(
                tuple(hashes), "CPU" if tier else "GPU"),)))
            model.remove(e, hashes, tier)
        elif kind == "clear":
            index.apply_batch(o[1], KVEventBatch(0.0, (AllBlocksCleared(),)))
            model.clear(o[1])
        elif kind == "leave":
            index.clear_endpoint(o[1])
            model.leave(o[1])
        else:
            _, e, c, start, n = o
            index.forget(e, keys[c][start:start + n])
            model.forget(e, keys[c][start:start + n])
        assert len(index) == len(model.holders), o
        assert index.evicted_by_capacity == model.evicted, o
        assert index.corrected_blocks == model.corrected, o
        for e in ENDPOINTS:
            assert index.blocks_of(e) == len(model.engine.get(e, {})), (o, e)
        for c, chain_keys_ in enumerate(keys):
            got = index.match(chain_keys_, ENDPOINTS)
            for e in ENDPOINTS:
                assert (got[e].blocks, got[e].gpu_blocks) == model.match(chain_keys_, e), \
                    (o, e, c)
