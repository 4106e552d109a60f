"""Pending picks and the index's self-correction: a routed request's blocks count for its
endpoint until the engine confirms, expires or refutes them; responses' cached tokens
correct what the index credits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from epp.api.openai import LLMRequest
from epp.api.usage import Usage
from epp.config.picker_config import load_picker_config
from epp.datastore import Endpoint, EndpointPool, ServerMetrics
from epp.kvcache.feedback import (
    DEFAULT_PENDING_TTL_S,
    MAX_PENDING_TTL_S,
    MIN_PENDING_TTL_S,
    PENDING_PICK_KEY,
    SERVED_ENDPOINT_KEY,
    IndexFeedback,
    pending_ttl,
)
from epp.kvcache.index import BlockIndex
from epp.kvcache.keys import chain_keys
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.kvcache.producer import PreciseProducer
from epp.kvcache.types import AllBlocksCleared, BlockRemoved
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from tests.unit.test_kv_index import BS, TOKENS, batch, request_keys, stored


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def index_with_clock() -> tuple[BlockIndex, Clock]:
    clock = Clock()
    return BlockIndex(model="m", clock=clock), clock


def test_a_pending_pick_steers_routing_but_is_not_held() -> None:
    index, _ = index_with_clock()
    keys = request_keys(index, TOKENS)
    index.add_pending("a", keys, ttl_s=2.0)
    m = index.match(keys, ["a", "b"])
    assert (m["a"].blocks, m["a"].gpu_blocks, m["a"].expected_blocks) == (0, 0, 6)
    assert m["a"].weighted() == 6.0
    assert m["b"].expected_blocks == 0
    assert index.pending_entries == 6 and index.pending_of("a") == 6


def test_pending_blocks_extend_what_the_engine_confirmed() -> None:
    index, _ = index_with_clock()
    keys = request_keys(index, TOKENS)
    index.apply_batch("a", batch(stored([1, 2], None, TOKENS[:8])))
    pick = index.add_pending("a", keys, ttl_s=2.0)
    assert len(pick.keys) == 4  # the two held blocks are not pending
    m = index.match(keys, ["a"])["a"]
    assert (m.blocks, m.expected_blocks) == (2, 6)


def test_the_engines_store_confirms_a_pending_block() -> None:
    index, clock = index_with_clock()
    keys = request_keys(index, TOKENS)
    index.add_pending("a", keys, ttl_s=2.0)
    index.apply_batch("a", batch(stored([1, 2, 3], None, TOKENS[:12])))
    assert index.pending_of("a") == 3 and index.pending_confirmed == 3
    clock.now += 10  # the rest expire; the stored blocks stay
    m = index.match(keys, ["a"])["a"]
    assert (m.blocks, m.expected_blocks) == (3, 3)
    assert index.pending_entries == 0 and index.pending_expired == 3


def test_pending_blocks_expire() -> None:
    index, clock = index_with_clock()
    keys = request_keys(index, TOKENS)
    index.add_pending("a", keys, ttl_s=2.0)
    clock.now += 1.9
    assert index.match(keys, ["a"])["a"].expected_blocks == 6
    clock.now += 0.2
    assert index.match(keys, ["a"])["a"].expected_blocks == 0
    assert index.pending_entries == 0


def test_a_failed_request_takes_back_its_pending_blocks_but_not_a_later_picks() -> None:
    index, _ = index_with_clock()
    keys = request_keys(index, TOKENS)
    first = index.add_pending("a", keys[:3], ttl_s=2.0)
    index.add_pending("a", keys, ttl_s=3.0)  # a sibling renews the first three
    other = index.add_pending("b", keys, ttl_s=2.0)
    index.drop_pending(first)
    assert index.match(keys, ["a"])["a"].expected_blocks == 6
    index.drop_pending(other)
    assert index.match(keys, ["b"])["b"].expected_blocks == 0
    assert index.pending_entries == 6


def test_removal_and_clearing_drop_pending_blocks() -> None:
    index, _ = index_with_clock()
    keys = request_keys(index, TOKENS)
    index.apply_batch("a", batch(stored([1], None, TOKENS[:4])))
    index.add_pending("a", keys, ttl_s=2.0)
    index.add_pending("b", keys, ttl_s=2.0)
    index.apply_batch("a", batch(stored([2], 1, TOKENS[4:8])))  # confirms key 1
    index.add_pending("a", keys, ttl_s=2.0)  # (nothing new: keys 0-1 are held)
    index.apply_batch("a", batch(BlockRemoved((2,))))
    assert index.match(keys, ["a"])["a"].expected_blocks == 1  # a gap at block 1
    index.apply_batch("a", batch(AllBlocksCleared()))
    assert index.pending_of("a") == 0
    assert index.match(keys, ["b"])["b"].expected_blocks == 6  # b's untouched
    index.clear_endpoint("b")
    assert index.pending_entries == 0


def test_pending_entries_are_bounded() -> None:
    clock = Clock()
    index = BlockIndex(model="m", clock=clock, max_pending=10)
    for i in range(5):
        index.add_pending("a", chain_keys(list(range(i * 100, i * 100 + 16)), BS, 7), 1.0 + i)
    assert index.pending_entries <= 10
    # The soonest-expiring picks went first: the last pick is whole.
    last = chain_keys(list(range(400, 416)), BS, 7)
    assert index.match(last, ["a"])["a"].expected_blocks == 4


def test_forget_takes_blocks_off_one_endpoint_in_every_tier() -> None:
    index, _ = index_with_clock()
    keys = request_keys(index, TOKENS)
    index.apply_batch("a", batch(stored([1, 2, 3, 4], None, TOKENS[:16])))
    index.apply_batch("b", batch(stored([1, 2, 3, 4], None, TOKENS[:16])))
    index.apply_batch("a", batch(stored([5], 4, TOKENS[16:20], medium="CPU")))
    assert index.forget("a", keys[2:5]) == 3
    assert index.match(keys, ["a", "b"])["a"].blocks == 2
    assert index.match(keys, ["a", "b"])["b"].blocks == 4
    assert index.corrected_blocks == 3
    # The engine's later removal of a forgotten block is harmless.
    index.apply_batch("a", batch(BlockRemoved((3,))))
    assert index.match(keys, ["a"])["a"].blocks == 2


@pytest.mark.parametrize(("outstanding", "own", "rate", "expected"), [
    (0, 1000, None, DEFAULT_PENDING_TTL_S),
    (0, 1000, 0.0, DEFAULT_PENDING_TTL_S),
    (3000, 1000, 4000.0, 1.5 * 1.0 + 0.25),
    (0, 10, 1e6, MIN_PENDING_TTL_S),
    (10**9, 1000, 1000.0, MAX_PENDING_TTL_S),
])
def test_the_pending_ttl_follows_the_endpoints_prefill(outstanding: int, own: int,
                                                       rate: float | None,
                                                       expected: float) -> None:
    assert pending_ttl(outstanding, own, rate) == pytest.approx(expected)


# -- the hooks ----------------------------------------------------------------------


@dataclass
class Profile:
    endpoints: list[Endpoint]


@dataclass
class Result:
    profiles: dict[str, Profile]
    primary: str = "p"

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.profiles[self.primary].endpoints


@dataclass
class Ctx:
    cycle: dict[str, Any] = field(default_factory=dict)


def precise_match(index: BlockIndex, endpoints: Sequence[str]) -> PrefixMatch:
    keys = request_keys(index, TOKENS)
    return PrefixMatch(True, len(TOKENS) + 1, BS, len(keys), index.match(keys, endpoints),
                       keys=keys)


def test_the_hook_pends_with_a_ttl_from_the_learned_prefill_rate() -> None:
    index, clock = index_with_clock()
    a = Endpoint("a", "10.0.0.1:8000")
    for _ in range(8):
        a.state.prefill.observe(1000, 0.1)  # 10,000 tokens/s
    a.state.load.add(5000, 5000)  # 0.5 s of prefill queued ahead
    ctx = Ctx({PREFIX_MATCH_KEY: precise_match(index, ["a"])})
    IndexFeedback(index).pre_request(ctx, Result({"p": Profile([a])}), None)
    pick = ctx.cycle[PENDING_PICK_KEY]
    assert pick.expires - clock.now == pytest.approx(pending_ttl(5000, 25, 10_000))
    assert len(pick.keys) == 6


def test_pending_picks_can_be_turned_off_and_skip_disaggregated_requests() -> None:
    index, _ = index_with_clock()
    a, b = Endpoint("a", "10.0.0.1:8000"), Endpoint("b", "10.0.0.2:8000")
    ctx = Ctx({PREFIX_MATCH_KEY: precise_match(index, ["a"])})
    IndexFeedback(index, pending=False).pre_request(ctx, Result({"p": Profile([a])}), None)
    IndexFeedback(index).pre_request(
        ctx, Result({"p": Profile([a]), "prefill": Profile([b])}), None)
    assert index.pending_entries == 0


@pytest.mark.parametrize(("status", "served", "kept"), [
    (200, "a", True), (0, "a", False), (503, "a", False), (200, "b", False)])
def test_a_request_that_did_not_prefill_there_drops_its_pick(status: int, served: str,
                                                            kept: bool) -> None:
    index, _ = index_with_clock()
    a = Endpoint("a", "10.0.0.1:8000")
    hook = IndexFeedback(index)
    ctx = Ctx({PREFIX_MATCH_KEY: precise_match(index, ["a"])})
    result = Result({"p": Profile([a])})
    hook.pre_request(ctx, result, None)
    ctx.cycle[SERVED_ENDPOINT_KEY] = served
    hook.response_complete(ctx, result, status, None)
    assert (index.pending_of("a") == 6) is kept


def test_a_response_showing_evicted_blocks_corrects_the_index() -> None:
    index, _ = index_with_clock()
    index.apply_batch("a", batch(stored([1, 2, 3, 4, 5, 6], None, TOKENS)))
    a = Endpoint("a", "10.0.0.1:8000")
    hook = IndexFeedback(index, pending=False)
    ctx = Ctx({PREFIX_MATCH_KEY: precise_match(index, ["a"]), SERVED_ENDPOINT_KEY: "a"})
    hook.response_complete(ctx, Result({"p": Profile([a])}), 200,
                           Usage(len(TOKENS) + 1, 1, cached_tokens=2 * BS))
    assert index.match(request_keys(index, TOKENS), ["a"])["a"].blocks == 2
    assert hook.counts.evicted_corrections == 1 and index.corrected_blocks == 4


def test_a_response_showing_blocks_no_event_told_of_asks_for_a_replay() -> None:
    index, _ = index_with_clock()
    asked: list[str] = []
    a = Endpoint("a", "10.0.0.1:8000")
    hook = IndexFeedback(index, pending=False, resync=lambda name: asked.append(name) or True)
    ctx = Ctx({PREFIX_MATCH_KEY: precise_match(index, ["a"]), SERVED_ENDPOINT_KEY: "a"})
    result = Result({"p": Profile([a])})
    hook.response_complete(ctx, result, 200, Usage(len(TOKENS) + 1, 1, cached_tokens=3 * BS))
    assert asked == ["a"] and hook.counts.lost_store_signals == 1
    assert hook.counts.resyncs_requested == 1
    # Within a block of the prediction (here: nothing cached): nothing to do.
    hook.response_complete(ctx, result, 200, Usage(len(TOKENS) + 1, 1, cached_tokens=0))
    assert asked == ["a"] and index.corrected_blocks == 0


def test_blocks_a_pending_pick_predicted_are_neither_a_loss_nor_a_replay() -> None:
    index, _ = index_with_clock()
    asked: list[str] = []
    a = Endpoint("a", "10.0.0.1:8000")
    index.add_pending("a", request_keys(index, TOKENS), 2.0)
    hook = IndexFeedback(index, resync=lambda name: asked.append(name) or True)
    ctx = Ctx({PREFIX_MATCH_KEY: precise_match(index, ["a"]), SERVED_ENDPOINT_KEY: "a"})
    hook.response_complete(ctx, Result({"p": Profile([a])}), 200,
                           Usage(len(TOKENS) + 1, 1, cached_tokens=6 * BS))
    assert asked == [] and hook.counts.lost_store_signals == 0


# -- through the director: siblings follow the first pick ---------------------------------


class FixedTokens:
    """Every request's prompt is ``TOKENS`` (what a tokenizer would give)."""

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]:
        return list(TOKENS) + [1]


PRECISE_AND_LOAD = """\
plugins:
- type: precise-prefix-cache-scorer
  parameters: {blockSize: 4}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: precise-prefix-cache-scorer, weight: 6}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: max-score-picker}
"""


def director(pending: bool) -> tuple[Director, EndpointPool, EppMetrics]:
    pool = EndpointPool()
    pool.replace_all(Endpoint(f"e{i}", f"10.0.0.{i + 1}:8000") for i in range(3))
    for e in pool.snapshot():  # fresh, equal metrics: the queue scorer spreads by routing
        e.state.update_metrics(ServerMetrics(scraped_at=time.monotonic()))
    config = load_picker_config(PRECISE_AND_LOAD)
    index = BlockIndex(model="m")
    feedback = IndexFeedback(index, pending=pending)
    metrics = EppMetrics()
    d = Director(pool, config.scheduler, Admission({}, SaturationDetector(5, 0.8, 0.5)),
                 metrics, producers=[PreciseProducer(index, FixedTokens(), block_size=BS)],
                 pre_request=[feedback], response_complete=[feedback])
    return d, pool, metrics


BODY = json.dumps({"model": "m", "prompt": "x"}).encode()


@pytest.mark.asyncio
@pytest.mark.parametrize("pending", [True, False])
async def test_siblings_in_flight_together_follow_the_first_pick(pending: bool) -> None:
    d, _, _ = director(pending)
    handles = []
    for _ in range(6):  # routed before any engine event could arrive
        handles.append(await asyncio.create_task(d.route({":path": "/v1/completions"},
                                                         BODY, None)))
    picked = {h.destination for h in handles}
    if pending:
        assert len(picked) == 1
    else:  # the load scorers spread them: the prefix is duplicated on every pod
        assert len(picked) == 3


@pytest.mark.asyncio
async def test_pending_hits_count_as_predicted_in_the_accuracy_metric() -> None:
    d, _, metrics = director(True)
    first = await asyncio.create_task(d.route({":path": "/v1/completions"}, BODY, None))
    second = await asyncio.create_task(d.route({":path": "/v1/completions"}, BODY, None))
    for handle, cached in ((first, 0), (second, 6 * BS)):
        handle.on_response_headers(200, {"content-type": "application/json"})
        handle.usage = Usage(len(TOKENS) + 1, 1, cached_tokens=cached)
        handle.on_done(True)
    sample = metrics.registry.get_sample_value
    assert sample("epp_kv_index_predictions_total", {"outcome": "exact"}) == 1
    assert sample("epp_kv_index_predictions_total", {"outcome": "pending"}) == 1
    assert sample("epp_kv_index_prediction_accuracy") == 1.0
    third = await asyncio.create_task(d.route({":path": "/v1/completions"}, BODY, None))
    third.on_response_headers(200, {"content-type": "application/json"})
    third.usage = Usage(len(TOKENS) + 1, 1, cached_tokens=6 * BS + 4 * BS)  # impossible
    third.on_done(True)
    assert sample("epp_kv_index_mispredictions_total", {"direction": "under"}) == 1
    assert sample("epp_kv_index_prediction_accuracy") == pytest.approx(2 / 3)


# -- property: the bitmask walk agrees with a plain model of the tiers -----------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ENDPOINTS = ("a", "b", "c")
CHAINS = [list(range(base, base + 6 * BS)) for base in (100, 100_000)]

op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(ENDPOINTS), st.integers(0, 1),
              st.integers(1, 6), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(ENDPOINTS), st.integers(0, 1),
              st.integers(0, 5)),
    st.tuples(st.just("pend"), st.sampled_from(ENDPOINTS), st.integers(0, 1),
              st.integers(1, 6), st.floats(0.5, 5.0)),
    st.tuples(st.just("clear"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=30))
def test_matches_agree_with_a_plain_model(ops: list[tuple[Any, ...]]) -> None:
    index, clock = index_with_clock()
    keys = [request_keys(index, chain) for chain in CHAINS]
    held: dict[str, set[int]] = {e: set() for e in ENDPOINTS}  # confirmed keys
    pending: dict[str, dict[int, float]] = {e: {} for e in ENDPOINTS}
    for o in ops:
        kind = o[0]
        if kind == "store":
            _, e, c, n, cpu = o
            # Engine hashes unique per (chain, block): 1000 * chain + block + 1.
            hashes = [1000 * c + i + 1 for i in range(n)]
            index.apply_batch(e, batch(stored(hashes, None, CHAINS[c][:n * BS],
                                              medium="CPU" if cpu else None)))
            for k in keys[c][:n]:
                held[e].add(k)
                pending[e].pop(k, None)
        elif kind == "remove":
            _, e, c, i = o
            for medium in (None, "CPU"):
                index.apply_batch(e, batch(BlockRemoved((1000 * c + i + 1,), medium=medium)))
            if keys[c][i] in held[e]:
                held[e].discard(keys[c][i])
                pending[e].pop(keys[c][i], None)
        elif kind == "pend":
            _, e, c, n, ttl = o
            index.add_pending(e, keys[c][:n], ttl)
            for k in keys[c][:n]:
                if k not in held[e]:
                    pending[e][k] = clock.now + ttl
        elif kind == "clear":
            index.apply_batch(o[1], batch(AllBlocksCleared()))
            held[o[1]].clear()
            pending[o[1]].clear()
        else:
            clock.now += o[1]
        for e in ENDPOINTS:
            pending[e] = {k: t for k, t in pending[e].items() if t > clock.now}
        for c in (0, 1):
            got = index.match(keys[c], ENDPOINTS)
            for e in ENDPOINTS:
                confirmed = next((i for i, k in enumerate(keys[c]) if k not in held[e]),
                                 len(keys[c]))
                expected = next((i for i, k in enumerate(keys[c])
                                 if k not in held[e] and k not in pending[e]), len(keys[c]))
                assert got[e].blocks == confirmed, (o, e, c)
                assert got[e].expected_blocks == expected, (o, e, c)
    assert index.pending_entries == sum(len(p) for p in pending.values())
