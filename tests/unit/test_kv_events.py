"""Golden wire-format tests for KV-event decoding (``epp.kvcache.events``).

Payloads are encoded the way vLLM encodes them: Structs below mirror the field order
and defaults of ``vllm/distributed/kv_events.py`` (``omit_defaults=True``, tagged
unions), once positional (``array_like=True``, before vLLM 0.26) and once as maps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from epp.kvcache import events as events_module
from epp.kvcache.events import KVEventDecodeError, decode_batch
from epp.kvcache.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

# --- vLLM's wire types, both encodings (field order and defaults as vLLM declares them)


class ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    pass


class ArrayBlockStored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class ArrayBlockRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class ArrayAllBlocksCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


class MapEvent(msgspec.Struct, omit_defaults=True, tag=True):
    pass


class MapBlockStored(MapEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class MapBlockRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class MapAllBlocksCleared(MapEvent, tag="AllBlocksCleared"):
    pass


class ArrayBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class MapBatch(msgspec.Struct, omit_defaults=True):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


ENCODINGS = {
    "array": (ArrayBatch, ArrayBlockStored, ArrayBlockRemoved, ArrayAllBlocksCleared),
    "map": (MapBatch, MapBlockStored, MapBlockRemoved, MapAllBlocksCleared),
}

encode = msgspec.msgpack.encode

# Both decoding paths must agree: the typed fast path and the tolerant generic one.
Decode = Callable[[bytes], KVEventBatch]
DECODERS = [pytest.param(decode_batch, id="fast"),
            pytest.param(events_module._decode_generic, id="generic")]


@pytest.fixture(params=DECODERS)
def decode(request: pytest.FixtureRequest) -> Decode:
    fn: Decode = request.param
    return fn


# --- a reference batch: what vLLM would publish for one request's prefill and an eviction

BLOCK = 4
TOKENS = list(range(100, 100 + 3 * BLOCK))
DIGESTS = [hashlib.sha256(f"block-{i}".encode()).digest() for i in range(4)]
INT_HASHES = [int.from_bytes(d[-8:], "big") for d in DIGESTS]  # vLLM's int form

EXPECTED = KVEventBatch(
    ts=1700000000.25,
    events=(
        BlockStored(block_hashes=tuple(INT_HASHES[1:4]), parent_block_hash=INT_HASHES[0],
                    token_ids=tuple(TOKENS), block_size=BLOCK, lora_id=None, medium="GPU",
                    lora_name=None),
        BlockStored(block_hashes=(INT_HASHES[0],), parent_block_hash=None,
                    token_ids=tuple(TOKENS[:BLOCK]), block_size=BLOCK, lora_id=3,
                    medium="CPU", lora_name="adapter-a"),
        BlockRemoved(block_hashes=(INT_HASHES[2], INT_HASHES[3]), medium="GPU"),
        AllBlocksCleared(),
    ),
    data_parallel_rank=0,
)


def vllm_payload(encoding: str, hashes: list[Any], *, batch_encoding: str | None = None,
                 dp_rank: int | None = 0) -> bytes:
    batch_cls = ENCODINGS[batch_encoding or encoding][0]
    _, stored, removed, cleared = ENCODINGS[encoding]
    return encode(batch_cls(
        ts=1700000000.25,
        events=[
            stored(block_hashes=hashes[1:4], parent_block_hash=hashes[0], token_ids=TOKENS,
                   block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None,
                   extra_keys=[None, None, None], group_idx=0,
                   kv_cache_spec_kind="full_attention"),
            stored(block_hashes=[hashes[0]], parent_block_hash=None,
                   token_ids=TOKENS[:BLOCK], block_size=BLOCK, lora_id=3, medium="CPU",
                   lora_name="adapter-a"),
            removed(block_hashes=[hashes[2], hashes[3]], medium="GPU", group_idx=0),
            cleared(),
        ],
        data_parallel_rank=dp_rank,
    ))


# --- golden tests


@pytest.mark.parametrize("encoding", ["array", "map"])
@pytest.mark.parametrize("hash_form", ["int", "bytes"])
def test_vllm_batches_decode_in_both_encodings_and_hash_forms(
        decode: Decode, encoding: str, hash_form: str) -> None:
    hashes = INT_HASHES if hash_form == "int" else DIGESTS
    assert decode(vllm_payload(encoding, list(hashes))) == EXPECTED


@pytest.mark.parametrize(("batch_encoding", "event_encoding"),
                         [("array", "map"), ("map", "array")])
def test_batch_and_event_encodings_mix(decode: Decode, batch_encoding: str,
                                       event_encoding: str) -> None:
    payload = vllm_payload(event_encoding, list(INT_HASHES), batch_encoding=batch_encoding)
    assert decode(payload) == EXPECTED


def test_bytes_hash_folds_to_the_int_vllm_would_send(decode: Decode) -> None:
    digest = bytes(range(32))
    payload = encode([0.0, [["BlockRemoved", [digest, 5], None]]])
    (event,) = decode(payload).events
    assert event == BlockRemoved(block_hashes=(int.from_bytes(digest[-8:], "big"), 5))
    assert int.from_bytes(digest[-8:], "big") == 0x18191A1B1C1D1E1F


def test_signed_int64_hash_folds_to_uint64(decode: Decode) -> None:
    payload = encode([0.0, [["BlockStored", [-1], -2, [], 0]]])
    (event,) = decode(payload).events
    assert isinstance(event, BlockStored)
    assert event.block_hashes == (2**64 - 1,)
    assert event.parent_block_hash == 2**64 - 2


def test_hex_golden_array_batch(decode: Decode) -> None:
    # [1.5, [["AllBlocksCleared"], ["BlockRemoved", [7], "GPU", None]], 0], byte by byte.
    # Positional Structs always carry every field: omit_defaults only drops map keys.
    payload = bytes.fromhex(
        "93"  # array(3): the batch
        "cb3ff8000000000000"  # float64 1.5
        "92"  # array(2): events
        "91" "b0" + b"AllBlocksCleared".hex()  # ["AllBlocksCleared"]
        + "94" "ac" + b"BlockRemoved".hex() + "9107" "a3" + b"GPU".hex() + "c0"
        + "00")  # data_parallel_rank 0
    assert payload == vllm_payload_small()
    assert decode(payload) == KVEventBatch(
        1.5, (AllBlocksCleared(), BlockRemoved((7,), "GPU")), 0)


def vllm_payload_small() -> bytes:
    return encode(ArrayBatch(1.5, [ArrayAllBlocksCleared(), ArrayBlockRemoved([7], "GPU")],
                             0))


def test_hex_golden_map_event(decode: Decode) -> None:
    # {"ts": 2, "events": [{"type": "BlockRemoved", "block_hashes": [9]}]}
    payload = bytes.fromhex(
        "82" "a2" + b"ts".hex() + "02"
        + "a6" + b"events".hex() + "91"
        + "82" "a4" + b"type".hex() + "ac" + b"BlockRemoved".hex()
        + "ac" + b"block_hashes".hex() + "9109")
    assert decode(payload) == KVEventBatch(2.0, (BlockRemoved((9,)),))


def test_extra_trailing_fields_and_unknown_keys_are_ignored(decode: Decode) -> None:
    stored = ["BlockStored", [1, 2], None, [1, 2, 3, 4], 2, None, "GPU", None,
              [None, None], 1, "sliding_window", 128, "a field from the future", {"x": 1}]
    removed = ["BlockRemoved", [1], "GPU", 1, "future"]
    cleared = ["AllBlocksCleared", "future"]
    array = decode(encode([3.0, [stored, removed, cleared], 1, "future batch field"]))
    as_map = decode(encode({"ts": 3.0, "data_parallel_rank": 1, "future": [1, 2],
                            "events": [
                                {"type": "BlockStored", "block_hashes": [1, 2],
                                 "parent_block_hash": None, "token_ids": [1, 2, 3, 4],
                                 "block_size": 2, "medium": "GPU", "group_idx": 1,
                                 "kv_cache_spec_kind": "sliding_window", "new": "x"},
                                {"type": "BlockRemoved", "block_hashes": [1],
                                 "medium": "GPU", "new": 1},
                                {"type": "AllBlocksCleared", "new": None}]}))
    stored_ev = BlockStored((1, 2), None, (1, 2, 3, 4), 2, medium="GPU", group_idx=1)
    assert array == KVEventBatch(3.0, (stored_ev, BlockRemoved((1,), "GPU", group_idx=1),
                                       AllBlocksCleared()), 1)
    assert as_map == KVEventBatch(3.0, (stored_ev, BlockRemoved((1,), "GPU"),
                                        AllBlocksCleared()), 1)


def test_missing_optional_fields_take_defaults(decode: Decode) -> None:
    # Older vLLM declared fewer fields (the first had four BlockStored fields and no
    # rank); maps (>= 0.26) omit default-valued fields.
    old = decode(encode([4.0, [["BlockStored", [1], 0, [5, 6], 2], ["BlockRemoved", [1]]]]))
    omitted = decode(encode({"ts": 4.0, "events": [
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": 0,
         "token_ids": [5, 6], "block_size": 2},
        {"type": "BlockRemoved", "block_hashes": [1]}]}))
    expected = KVEventBatch(4.0, (BlockStored((1,), 0, (5, 6), 2), BlockRemoved((1,))), None)
    assert old == expected
    assert omitted == expected


def test_rank_none_in_both_encodings(decode: Decode) -> None:
    for encoding in ENCODINGS:
        batch = decode(vllm_payload(encoding, list(INT_HASHES), dp_rank=None))
        assert batch.data_parallel_rank is None
        assert batch.events == EXPECTED.events


def test_placeholder_and_tokenless_stores(decode: Decode) -> None:
    # CPU offloading announces blocks without tokens (block_size 0); some connectors
    # send token_ids None.
    batch = decode(encode([0.0, [["BlockStored", [1], None, [], 0, None, "CPU"],
                                 ["BlockStored", [2], None, None, 16, None, "cpu"]]]))
    assert batch.events == (BlockStored((1,), None, (), 0, medium="CPU"),
                            BlockStored((2,), None, (), 16, medium="cpu"))


def test_unknown_event_types_are_counted_and_skipped(decode: Decode) -> None:
    array = decode(encode([5.0, [["CacheEviction", 1, 2], ["BlockRemoved", [1]],
                                 ["SomethingNew"], ["AllBlocksCleared"]], 0]))
    as_map = decode(encode({"ts": 5.0, "data_parallel_rank": 0, "events": [
        {"type": "CacheEviction", "x": 1}, {"type": "BlockRemoved", "block_hashes": [1]},
        {"type": "SomethingNew"}, {"type": "AllBlocksCleared"}]}))
    expected = KVEventBatch(5.0, (BlockRemoved((1,)), AllBlocksCleared()), 0,
                            unknown_events=2)
    assert array == expected
    assert as_map == expected


def test_empty_batch(decode: Decode) -> None:
    assert decode(encode([6, []])) == KVEventBatch(6.0, ())


GARBAGE = [
    pytest.param(b"", "empty payload", id="empty"),
    pytest.param(b"\xc1", "not valid msgpack", id="not-msgpack"),
    pytest.param(b"\x93\xcb\x3f", "not valid msgpack", id="truncated"),
    pytest.param(encode("BlockStored"), "must be an array or a map", id="string"),
    pytest.param(encode([1.0]), "bad batch", id="batch-too-short"),
    pytest.param(encode({"ts": 1.0}), "bad batch", id="map-without-events"),
    pytest.param(encode(["yesterday", []]), "bad batch", id="ts-not-a-number"),
    pytest.param(encode([1.0, {"a": 1}]), "bad batch", id="events-not-a-list"),
    pytest.param(encode([1.0, [], "rank"]), "bad batch", id="rank-not-an-int"),
    pytest.param(encode([1.0, [7]]), "event 0: must be an array or a map", id="event-int"),
    pytest.param(encode([1.0, [[]]]), "event 0: missing or non-string type tag",
                 id="event-empty"),
    pytest.param(encode([1.0, [{"block_hashes": [1]}]]), "non-string type tag",
                 id="map-event-untagged"),
    pytest.param(encode([1.0, [["BlockStored", [1], None, [1, 2, 3], 2]]]),
                 "3 token ids do not fill whole blocks of block_size 2", id="partial-block"),
    pytest.param(encode([1.0, [["BlockStored", [1], None, [1], 0]]]),
                 "block_size 0", id="tokens-without-block-size"),
    pytest.param(encode([1.0, [["BlockStored", [1], None, [1, 2], -2]]]), ">= 0",
                 id="negative-block-size"),
    pytest.param(encode([1.0, [["BlockStored", [1], None, [1, "x"], 2]]]),
                 "event 0 (BlockStored)", id="token-not-int"),
    pytest.param(encode([1.0, [["BlockStored", [1.5], None, [], 0]]]),
                 "event 0 (BlockStored)", id="hash-float"),
    pytest.param(encode([1.0, [["BlockStored", [b""], None, [], 0]]]), "empty block hash",
                 id="hash-empty-bytes"),
    pytest.param(encode([1.0, [["BlockStored", [1], None]]]), "event 0 (BlockStored)",
                 id="stored-too-short"),
    pytest.param(encode([1.0, [["AllBlocksCleared"], ["BlockRemoved", "abc"]]]),
                 "event 1 (BlockRemoved)", id="hashes-not-a-list"),
    pytest.param(encode({"ts": 1.0, "events": [{"type": "BlockStored", "block_hashes": [1],
                                                "block_size": 2}]}),
                 "token_ids", id="map-missing-required"),
    pytest.param(encode([1.0, [["Unknown"], ["BlockRemoved", [1], 5]]]),
                 "event 1 (BlockRemoved)", id="index-counts-skipped-events"),
]


@pytest.mark.parametrize(("payload", "message"), GARBAGE)
def test_garbage_raises_a_clear_decode_error(decode: Decode, payload: bytes,
                                             message: str) -> None:
    with pytest.raises(KVEventDecodeError, match=message.replace("(", r"\(").replace(
            ")", r"\)")):
        decode(payload)


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(KVEventDecodeError, ValueError)


def test_fast_path_handles_the_common_case_without_falling_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(payload: bytes) -> KVEventBatch:
        raise AssertionError("generic path used")

    monkeypatch.setattr(events_module, "_decode_generic", no_fallback)
    for encoding in ENCODINGS:
        for hashes in (INT_HASHES, DIGESTS):
            assert decode_batch(vllm_payload(encoding, list(hashes))) == EXPECTED
