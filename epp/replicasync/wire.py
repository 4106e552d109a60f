"""The messages EPP replicas exchange, and their encoding (msgspec msgpack).

Every message is a msgpack array ``[version, kind, replica, ...]``:

- ``Route``  ``[1, 1, replica, request, endpoint, keys, ttl_s, uncached, cold]``:
  ``replica`` routed request ``request`` (a random 64-bit key) to ``endpoint``; ``keys``
  are the block keys it entered as pending there, packed as little-endian uint64s; they
  and the ``uncached`` prompt tokens it will prefill count for ``ttl_s`` seconds at most;
  ``cold`` (appended, false when absent): no pod held any of the request.
- ``Done``   ``[1, 2, replica, request, failed]``: that request ended; ``failed``: no
  prefill happened where it was routed (no answer, an error, served elsewhere).
- ``Prefilled`` ``[1, 5, replica, request]``: that request's first response bytes
  came: its uncached tokens no longer count as prefill load (the request still counts
  until its ``Done``).
- ``Beat``   ``[1, 3, replica]``: the replica is alive (sent every few seconds).
- ``Bye``    ``[1, 4, replica]``: the replica is stopping; forget what it routed.

Within a version, fields are only ever appended (an older decoder ignores a longer
array); any other change takes a new version, which an older replica counts and drops.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from typing import Annotated

import msgspec
from msgspec import Meta

from epp.kvcache.feedback import MAX_PENDING_TTL_S

WIRE_VERSION = 1
KIND_ROUTE = 1
KIND_DONE = 2
KIND_BEAT = 3
KIND_BYE = 4
KIND_PREFILLED = 5
KIND_NAMES = {KIND_ROUTE: "route", KIND_DONE: "done", KIND_BEAT: "beat", KIND_BYE: "bye",
              KIND_PREFILLED: "prefilled"}

# Block keys one message carries at most: the precise producer's longest prefix
# (DEFAULT_MAX_PREFIX_BLOCKS, 8,192 blocks = 128k tokens at 16 a block) twice over; a
# longer pick is sent as its first MAX_KEYS keys (a prefix is still a valid pick).
MAX_KEYS = 16_384
KEY_BYTES = 8  # one uint64
# Largest message accepted or sent: MAX_KEYS keys (128 KiB) plus the other fields, with
# room to spare; a quarter of NATS's default max_payload (1 MiB).
MAX_MESSAGE_BYTES = 256 * 1024
# A replica id, an endpoint name: Kubernetes names are at most 253 characters, plus a rank.
MAX_NAME_CHARS = 300
# The longest TTL a route may claim: what a pending pick can last here.
MAX_TTL_S = MAX_PENDING_TTL_S
# More uncached prompt tokens than any model's context holds: a bogus value.
MAX_UNCACHED_TOKENS = 10_000_000

_Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]


class DecodeFailure(ValueError):
    """A message that cannot be used; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Head(msgspec.Struct, array_like=True):
    version: int
    kind: int


class Route(msgspec.Struct, array_like=True, frozen=True):
    """A peer routed a request (see the module docstring)."""

    version: int
    kind: int
    replica: _Name
    request: int
    endpoint: _Name
    keys: Annotated[bytes, Meta(max_length=MAX_KEYS * KEY_BYTES)]
    ttl_s: Annotated[float, Meta(ge=0.0, le=MAX_TTL_S)]
    uncached: Annotated[int, Meta(ge=0, le=MAX_UNCACHED_TOKENS)]
    # Appended in version 1: no pod held any of the request (a cold placement).
    cold: bool = False


class Done(msgspec.Struct, array_like=True, frozen=True):
    """A peer's request ended."""

    version: int
    kind: int
    replica: _Name
    request: int
    failed: bool


class Prefilled(msgspec.Struct, array_like=True, frozen=True):
    """A peer's request sent its first response bytes: its prefill is done."""

    version: int
    kind: int
    replica: _Name
    request: int


class Presence(msgspec.Struct, array_like=True, frozen=True):
    """A peer is alive (``KIND_BEAT``) or leaving (``KIND_BYE``)."""

    version: int
    kind: int
    replica: _Name


Message = Route | Done | Prefilled | Presence

_encoder = msgspec.msgpack.Encoder()
_head = msgspec.msgpack.Decoder(_Head)
_decoders: dict[int, msgspec.msgpack.Decoder[Route] | msgspec.msgpack.Decoder[Done]
                | msgspec.msgpack.Decoder[Prefilled] | msgspec.msgpack.Decoder[Presence]] = {
    KIND_ROUTE: msgspec.msgpack.Decoder(Route),
    KIND_DONE: msgspec.msgpack.Decoder(Done),
    KIND_PREFILLED: msgspec.msgpack.Decoder(Prefilled),
    KIND_BEAT: msgspec.msgpack.Decoder(Presence),
    KIND_BYE: msgspec.msgpack.Decoder(Presence),
}


def pack_keys(keys: Sequence[int]) -> bytes:
    """Block keys as little-endian uint64s (the first ``MAX_KEYS``)."""
    packed = array("Q", keys[:MAX_KEYS])
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack_keys(data: bytes) -> list[int]:
    """The inverse of :func:`pack_keys`; raises :class:`DecodeFailure` on a ragged tail."""
    if len(data) % KEY_BYTES:
        raise DecodeFailure("malformed", f"{len(data)} key bytes is not a multiple of 8")
    packed = array("Q")
    packed.frombytes(data)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


def route(replica: str, request: int, endpoint: str, keys: Sequence[int], ttl_s: float,
          uncached: int, cold: bool = False) -> bytes:
    """Encode a route message (TTL and tokens clamped into their valid ranges)."""
    ttl = min(MAX_TTL_S, max(0.0, ttl_s)) if math.isfinite(ttl_s) else 0.0
    return _encoder.encode(Route(WIRE_VERSION, KIND_ROUTE, replica, request, endpoint,
                                 pack_keys(keys), ttl,
                                 min(MAX_UNCACHED_TOKENS, max(0, uncached)), cold))


def done(replica: str, request: int, failed: bool) -> bytes:
    """Encode a completion message."""
    return _encoder.encode(Done(WIRE_VERSION, KIND_DONE, replica, request, failed))


def prefilled(replica: str, request: int) -> bytes:
    """Encode a first-bytes message."""
    return _encoder.encode(Prefilled(WIRE_VERSION, KIND_PREFILLED, replica, request))


def presence(replica: str, kind: int) -> bytes:
    """Encode a heartbeat (``KIND_BEAT``) or a farewell (``KIND_BYE``)."""
    return _encoder.encode(Presence(WIRE_VERSION, kind, replica))


def decode(data: bytes) -> Message:
    """Decode one message. Raises :class:`DecodeFailure` with reason ``oversized``,
    ``version`` (another wire version: counted apart, since it means replicas of
    different releases share the subject) or ``malformed``."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeFailure("oversized", f"{len(data)} bytes")
    try:
        head = _head.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeFailure("malformed", str(exc)) from None
    if head.version != WIRE_VERSION:
        raise DecodeFailure("version", f"wire version {head.version}")
    decoder = _decoders.get(head.kind)
    if decoder is None:
        raise DecodeFailure("malformed", f"unknown kind {head.kind}")
    try:
        message: Message = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeFailure("malformed", str(exc)) from None
    if isinstance(message, Route) and len(message.keys) % KEY_BYTES:
        raise DecodeFailure("malformed", "ragged key bytes")
    return message
