"""Decode vLLM KV-event payloads (msgpack) into :class:`~epp.kvcache.types.KVEventBatch`.

Wire facts (``vllm/distributed/kv_events.py``): a batch is ``[ts, events, dp_rank]`` or
a map with those names; an event is a tagged union, either a positional array
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
medium, lora_name, extra_keys, group_idx, ...]`` or a map ``{"type": "BlockStored",
...}`` with default-valued fields omitted (arrays always carry every field their
version declares). Fields were appended across versions, so missing tail fields take
defaults and extra ones are ignored. Hashes are uint64 ints or digest bytes (folded to
their last 8 bytes, big-endian).

Two paths, one set of types. The fast path decodes straight into typed Structs, so
msgspec validates every token id in C: 1.1-1.4x the throughput of decoding to plain
objects and converting those (``benchmarks/kv_ingest.py``, "generic path"). msgspec
cannot put array-like and map-like Structs in one union, nor skip an unknown tag, so
when the fast path rejects a payload the generic path decodes it to plain objects and
converts event by event onto the same Structs: it skips unknown event types and
words the error when the payload really is malformed.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from epp.kvcache.types import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
)

__all__ = ["KVEventDecodeError", "decode_batch"]

_U64_MASK = (1 << 64) - 1
_HASH_BYTES = 8  # vLLM's int form is the digest's last 8 bytes, big-endian

_Hash = int | bytes
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class KVEventDecodeError(ValueError):
    """A KV-event payload that is not a batch we can read."""


# --- wire Structs: vLLM's field order; fields the index does not use are not declared
# (kv_cache_spec_*), so msgspec skips them unvalidated.


class _StoredArray(msgspec.Struct, array_like=True, tag="BlockStored", gc=False):
    block_hashes: tuple[_Hash, ...]
    parent_block_hash: _Hash | None
    token_ids: tuple[int, ...] | None  # None from some connectors: no tokens
    block_size: _NonNegative
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Any = None
    group_idx: int | None = None


class _RemovedArray(msgspec.Struct, array_like=True, tag="BlockRemoved", gc=False):
    block_hashes: tuple[_Hash, ...]
    medium: str | None = None
    group_idx: int | None = None


class _ClearedArray(msgspec.Struct, array_like=True, tag="AllBlocksCleared", gc=False):
    pass


class _StoredMap(msgspec.Struct, tag="BlockStored", tag_field="type", gc=False):
    block_hashes: tuple[_Hash, ...]
    token_ids: tuple[int, ...] | None
    block_size: _NonNegative
    parent_block_hash: _Hash | None = None
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: Any = None
    group_idx: int | None = None


class _RemovedMap(msgspec.Struct, tag="BlockRemoved", tag_field="type", gc=False):
    block_hashes: tuple[_Hash, ...]
    medium: str | None = None
    group_idx: int | None = None


class _ClearedMap(msgspec.Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    pass


_ArrayEvent = _StoredArray | _RemovedArray | _ClearedArray
_MapEvent = _StoredMap | _RemovedMap | _ClearedMap


class _BatchArrayOfArrays(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: int | None = None


class _BatchArrayOfMaps(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: int | None = None


class _BatchMapOfArrays(msgspec.Struct, gc=False):
    ts: float
    events: list[_ArrayEvent]
    data_parallel_rank: int | None = None


class _BatchMapOfMaps(msgspec.Struct, gc=False):
    ts: float
    events: list[_MapEvent]
    data_parallel_rank: int | None = None


class _BatchArrayAny(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _BatchMapAny(msgspec.Struct, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


_TypedEvent = _StoredArray | _RemovedArray | _ClearedArray | _StoredMap | _RemovedMap | _ClearedMap

# Typed decoders to try, by the batch's own form; the likelier event form first
# (array batches come from engines that also send array events, map from >= 0.26).
_ARRAY_BATCH_DECODERS = (msgspec.msgpack.Decoder(_BatchArrayOfArrays),
                         msgspec.msgpack.Decoder(_BatchArrayOfMaps))
_MAP_BATCH_DECODERS = (msgspec.msgpack.Decoder(_BatchMapOfMaps),
                       msgspec.msgpack.Decoder(_BatchMapOfArrays))
_ANY_DECODER = msgspec.msgpack.Decoder()

_ARRAY_EVENTS: dict[str, type[_TypedEvent]] = {
    "BlockStored": _StoredArray, "BlockRemoved": _RemovedArray,
    "AllBlocksCleared": _ClearedArray,
}
_MAP_EVENTS: dict[str, type[_TypedEvent]] = {
    "BlockStored": _StoredMap, "BlockRemoved": _RemovedMap, "AllBlocksCleared": _ClearedMap,
}


def _msgpack_container(first_byte: int) -> str | None:
    """``"array"`` or ``"map"`` from a msgpack header byte (fix, 16- and 32-bit forms)."""
    if 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD):
        return "array"
    if 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF):
        return "map"
    return None


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one published KV-event payload.

    Events of unknown types are skipped and counted in ``unknown_events``; anything
    else that does not fit raises :class:`KVEventDecodeError`.
    """
    kind = _msgpack_container(payload[0]) if payload else None
    if kind is not None:
        for decoder in _ARRAY_BATCH_DECODERS if kind == "array" else _MAP_BATCH_DECODERS:
            try:
                typed = decoder.decode(payload)
            except msgspec.ValidationError:
                continue  # another form, an unknown event type, or malformed
            except msgspec.DecodeError as exc:
                raise KVEventDecodeError(f"payload is not valid msgpack: {exc}") from None
            return KVEventBatch(typed.ts, _convert_events(typed.events),
                                typed.data_parallel_rank)
    return _decode_generic(payload)


def _decode_generic(payload: bytes) -> KVEventBatch:
    """The tolerant path: plain objects first, then each event onto its Struct."""
    if not payload:
        raise KVEventDecodeError("empty payload")
    try:
        obj = _ANY_DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise KVEventDecodeError(f"payload is not valid msgpack: {exc}") from None
    envelope: _BatchArrayAny | _BatchMapAny
    try:
        if isinstance(obj, list):
            envelope = msgspec.convert(obj, _BatchArrayAny)
        elif isinstance(obj, dict):
            envelope = msgspec.convert(obj, _BatchMapAny)
        else:
            raise KVEventDecodeError(
                f"batch must be an array or a map, got {type(obj).__name__}")
    except msgspec.ValidationError as exc:
        raise KVEventDecodeError(f"bad batch: {exc}") from None

    known: list[_TypedEvent] = []
    positions: list[int] = []  # index in the payload, for error messages
    unknown = 0
    for i, raw in enumerate(envelope.events):
        if isinstance(raw, list):
            tag = raw[0] if raw else None
            table = _ARRAY_EVENTS
        elif isinstance(raw, dict):
            tag = raw.get("type")
            table = _MAP_EVENTS
        else:
            raise KVEventDecodeError(
                f"event {i}: must be an array or a map, got {type(raw).__name__}")
        if not isinstance(tag, str):
            raise KVEventDecodeError(f"event {i}: missing or non-string type tag {tag!r}")
        struct = table.get(tag)
        if struct is None:
            unknown += 1
            continue
        try:
            known.append(msgspec.convert(raw, struct))
            positions.append(i)
        except msgspec.ValidationError as exc:
            raise KVEventDecodeError(f"event {i} ({tag}): {exc}") from None
    return KVEventBatch(envelope.ts, _convert_events(known, positions),
                        envelope.data_parallel_rank, unknown_events=unknown)


def _convert_events(events: list[Any], positions: list[int] | None = None
                    ) -> tuple[KVEvent, ...]:
    """Typed wire events -> the index's event types (shared by both paths).

    The hot loop of ingest (one iteration per event): error positions are worked
    out only when needed, and hashes that are already uint64 ints are kept as they are.
    """
    out: list[KVEvent] = []
    for n, ev in enumerate(events):
        cls = type(ev)
        if cls is _StoredArray or cls is _StoredMap:
            tokens = ev.token_ids or ()
            size = ev.block_size
            # block_size 0 with no tokens: a placeholder store (e.g. CPU offloading)
            if (len(tokens) % size) if size else tokens:
                raise KVEventDecodeError(
                    f"event {_position(n, positions)} (BlockStored): {len(tokens)} token "
                    f"ids do not fill whole blocks of block_size {size}")
            parent = ev.parent_block_hash
            if parent.__class__ is bytes and parent:
                parent = int.from_bytes(parent[-_HASH_BYTES:], "big")
            elif parent is not None and (parent.__class__ is not int or parent < 0):
                parent = _one_hash(parent, _position(n, positions))
            out.append(BlockStored(_hashes(ev.block_hashes, n, positions), parent, tokens,
                                   size, ev.lora_id, ev.medium, ev.lora_name,
                                   _extra_keys(ev.extra_keys), ev.group_idx or 0))
        elif cls is _RemovedArray or cls is _RemovedMap:
            out.append(BlockRemoved(_hashes(ev.block_hashes, n, positions), ev.medium,
                                    ev.group_idx or 0))
        else:
            out.append(AllBlocksCleared())
    return tuple(out)


def _extra_keys(value: Any) -> tuple[Any, ...] | None:
    """Per-block extra keys (LoRA, multimodal hashes, cache salt), None when absent."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and any(v is not None for v in value):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return None


def _position(n: int, positions: list[int] | None) -> int:
    return n if positions is None else positions[n]


def _hashes(values: tuple[_Hash, ...], n: int, positions: list[int] | None
            ) -> tuple[int, ...]:
    if values and values[0].__class__ is int:
        try:  # all non-negative ints, checked in C; a bytes one makes min() raise
            if min(values) >= 0:  # type: ignore[operator]
                return values  # type: ignore[return-value]
        except TypeError:
            pass
    index = _position(n, positions)
    return tuple([int.from_bytes(v[-_HASH_BYTES:], "big")
                  if v.__class__ is bytes and v else _one_hash(v, index) for v in values])


def _one_hash(value: _Hash, index: int) -> int:
    """Fold a hash to uint64: digest bytes by their last 8 bytes big-endian, a signed
    int64 (some non-vLLM publishers) by two's complement, so all forms compare equal."""
    if isinstance(value, int):
        return value & _U64_MASK
    if not value:
        raise KVEventDecodeError(f"event {index}: empty block hash")
    return int.from_bytes(value[-_HASH_BYTES:], "big")
