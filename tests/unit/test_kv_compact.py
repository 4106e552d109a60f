"""The block index's compact tables against plain dicts: probing, deletion that shifts
probe runs back, growth, reused ids, dead log entries, rebuilds and insertion order."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.kvcache.compact import (
    MIN_DEAD_TO_REBUILD,
    U64_MASK,
    BlockTable,
    EngineHashMap,
    slots_for,
)


def reachable(table: BlockTable | EngineHashMap, keys: Any) -> None:
    """Every occupied slot is reached from its entry's home without crossing an empty
    slot (what linear probing needs of deletion), and nothing else is occupied."""
    mask = table.mask
    seen = 0
    for i, p in enumerate(table.slots):
        if not p:
            continue
        seen += 1
        k = table.home(keys[p])
        while k != i:
            assert table.slots[k], f"slot {i} unreachable from its home {table.home(keys[p])}"
            k = (k + 1) & mask
    assert seen == (table.count if isinstance(table, BlockTable) else len(table.live) - 1)


def colliding_keys(table: BlockTable, n: int, seed: int = 1) -> list[int]:
    """``n`` distinct keys that all start their probe at the same slot."""
    rng = random.Random(seed)
    target = table.home(rng.getrandbits(64))
    out: set[int] = set()
    while len(out) < n:
        key = rng.getrandbits(64)
        key = key & ~(table.mask << table.offset) | target << table.offset
        out.add(key)
    return sorted(out)


# -- BlockTable ------------------------------------------------------------------------


def test_block_table_add_get_clear() -> None:
    t = BlockTable()
    assert t.get(5) == 0 and t.clear_bits(5, 1) == 0 and len(t) == 0
    bit = 1 << 40
    t.add(5, bit)
    assert t.masks[t.find(5)[1]] is bit  # one holder: its shared bit object
    t.add(5, 4)
    assert t.get(5) == bit | 4 and len(t) == 1
    assert t.clear_bits(5, bit) == bit | 4 and t.get(5) == 4
    assert t.clear_bits(5, 4) == 4 and t.get(5) == 0 and len(t) == 0
    assert list(t.items()) == []


def test_block_table_deletion_keeps_a_collided_run_reachable() -> None:
    t = BlockTable()
    rng = random.Random(3)
    for _ in range(30):  # 64 slots: room for the run below without growing
        t.add(rng.getrandbits(64), 1)
    assert t.capacity == 64
    keys = colliding_keys(t, 8)
    for k in keys:
        t.add(k, 2)
    assert t.capacity == 64
    gone: set[int] = set()
    for k in (keys[0], keys[4], keys[7], keys[1]):  # the head, the middle, the tail
        t.clear_bits(k, 2)
        gone.add(k)
        reachable(t, t.keys)
        assert all(t.get(x) == (0 if x in gone else 2) for x in keys)
    assert len(t) == 30 + 8 - 4


def test_block_table_reuses_freed_ids_and_grows() -> None:
    t = BlockTable()
    t.add(10, 1)
    first = t.find(10)[1]
    t.clear_bits(10, 1)
    t.add(11, 1)
    assert t.find(11)[1] == first  # the freed id
    keys = [random.getrandbits(64) for _ in range(1000)]
    for k in keys:
        t.add(k, 2)
    assert t.capacity == slots_for(len(t)) and t.count == 1001
    reachable(t, t.keys)
    assert all(t.get(k) == 2 for k in keys)


def test_block_table_discard_first_drops_the_lowest_ids() -> None:
    t = BlockTable()
    for k in (7, 8, 9):
        t.add(k, 1)
    assert t.discard_first(2) == 2
    assert dict(t.items()) == {9: 1}
    assert t.discard_first(5) == 1 and len(t) == 0


block_ops = st.lists(st.tuples(st.sampled_from(["add", "clear"]), st.integers(0, 40),
                               st.sampled_from([1, 2, 4, 3, 1 << 70])), max_size=300)


@settings(max_examples=200, deadline=None)
@given(block_ops, st.integers(0, 2**32))
def test_block_table_agrees_with_a_dict(ops: list[tuple[str, int, int]], seed: int) -> None:
    rng = random.Random(seed)
    # Few distinct keys, some made to collide: long runs, deletions inside them.
    t = BlockTable()
    pool = colliding_keys(t, 20, seed) + [rng.getrandbits(64) for _ in range(21)]
    model: dict[int, int] = {}
    for op, k, bits in ops:
        key = pool[k]
        if op == "add":
            t.add(key, bits)
            model[key] = model.get(key, 0) | bits
        else:
            before = model.get(key, 0)
            assert t.clear_bits(key, bits) == before
            if before & ~bits:
                model[key] = before & ~bits
            else:
                model.pop(key, None)
    assert dict(t.items()) == model and len(t) == len(model)
    assert all(t.get(key) == model.get(key, 0) for key in pool)
    reachable(t, t.keys)


# -- EngineHashMap -----------------------------------------------------------------------


def test_engine_map_put_get_pop_in_dict_order() -> None:
    m = EngineHashMap()
    assert m.put(1, 100) is None and m.put(2, 200) is None and m.put(3, 300) is None
    assert m.put(1, 101) == 100  # a hash put again keeps its place
    assert m.get(1) == 101 and m.get(4) is None
    assert m.pop(2) == 200 and m.pop(2) is None and m.get(2) is None
    assert m.put(2, 201) is None  # back, at the end
    assert list(m.items()) == [(1, 101), (3, 300), (2, 201)]
    assert list(m.values()) == [101, 300, 201] and len(m) == 3
    assert m.pop_oldest(2) == [101, 300] and list(m.items()) == [(2, 201)]
    m.clear()
    assert len(m) == 0 and m.get(2) is None


def test_engine_map_takes_any_int_modulo_2_64() -> None:
    m = EngineHashMap()
    assert m.put(-1, 7) is None
    assert m.get(U64_MASK) == 7 and m.get(-1) == 7
    assert m.put(U64_MASK + 1 + 5, 8) is None and m.get(5) == 8
    assert m.put(U64_MASK, 9) == 7 and m.pop(-1) == 9 and m.get(U64_MASK) is None
    assert m.pop(2**64 + 5) == 8 and len(m) == 0


def test_engine_map_sequential_hashes_spread() -> None:
    # Engines (and tests) may send consecutive ints: multiply-shift spreads them.
    m = EngineHashMap()
    for h in range(10_000):
        m.put(h << 20, h)
    longest = run = 0
    for p in m.slots:
        run = run + 1 if p else 0
        longest = max(longest, run)
    assert longest < 200  # (all 10,000 in one run if the low bits picked the slot)
    assert all(m.get(h << 20) == h for h in range(0, 10_000, 7))


def test_engine_map_rebuilds_once_dead_entries_outnumber_live_ones() -> None:
    m = EngineHashMap()
    for h in range(200):
        m.put(h, h + 1000)
    for h in range(150):
        m.pop(h)
    # 150 dead against 50 live: rebuilt, the dead gone, the order kept.
    assert len(m.live) - 1 <= 2 * len(m) + MIN_DEAD_TO_REBUILD
    assert list(m.items()) == [(h, h + 1000) for h in range(150, 200)]
    reachable(m, m.hashes)
    assert m.get(10) is None and m.get(199) == 1199


def test_engine_map_stores_a_removed_hash_again_past_its_dead_entry() -> None:
    m = EngineHashMap()
    for h in range(5):
        m.put(h, h)
    m.pop(3)
    assert m.put(3, 33) is None  # a new live entry after the dead one
    assert m.get(3) == 33 and m.pop(3) == 33 and m.get(3) is None
    assert list(m.values()) == [0, 1, 2, 4]


engine_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 30), st.integers(0, 5)),
    st.tuples(st.just("pop"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("oldest"), st.integers(0, 4), st.just(0)),
), max_size=400)


@settings(max_examples=200, deadline=None)
@given(engine_ops)
def test_engine_map_agrees_with_a_dict(ops: list[tuple[str, int, int]]) -> None:
    m = EngineHashMap()
    model: dict[int, int] = {}
    for op, n, key in ops:
        h = n << 40  # structured hashes, all with the same low bits
        if op == "put":
            assert m.put(h, key) == model.get(h)
            model[h] = key
        elif op == "pop":
            assert m.pop(h) == model.pop(h, None)
        else:
            oldest = list(model)[:n]
            assert m.pop_oldest(n) == [model.pop(x) for x in oldest]
        assert len(m) == len(model)
    assert list(m.items()) == list(model.items())
    assert all(m.get(h << 40) == model.get(h << 40) for h in range(31))
    reachable(m, m.hashes)


@pytest.mark.parametrize(("entries", "slots"), [(0, 8), (5, 8), (6, 16), (716, 1024),
                                                (717, 2048)])
def test_slots_for_keeps_the_load_at_most_0_7(entries: int, slots: int) -> None:
    assert slots_for(entries) == slots
