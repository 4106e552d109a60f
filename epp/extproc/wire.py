"""The ext_proc messages that dominate a stream, read and written without protobuf objects.

Every output token of every streamed response crosses the picker twice: Envoy sends the
chunk as a ``ProcessingRequest{response_body: HttpBody{body, end_of_stream}}`` and we echo
it as a ``ProcessingResponse{response_body: BodyResponse{response: CommonResponse{
body_mutation: BodyMutation{streamed_response: StreamedBodyResponse{body, end_of_stream}}}}}``.
The echo is a fixed nest of length prefixes around the same body, so it is written here
directly from the wire format instead of through four protobuf objects; the tests check
it byte for byte against ``xds-protos``. Reading stays with protobuf: its C parser
already reads a small message faster than Python could.
"""

from __future__ import annotations

_END_TRUE = b"\x10\x01"  # StreamedBodyResponse.end_of_stream = true (field 2, varint)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Small lengths are by far the most common (a token is a few dozen bytes of SSE).
_SMALL_VARINTS = tuple(_varint_bytes(n) for n in range(1 << 14))


def _len(value: int) -> bytes:
    return _SMALL_VARINTS[value] if value < 16384 else _varint_bytes(value)


def _streamed_body_head(response: bool, size: int, end: bool) -> bytes:
    """Everything of the serialized message that precedes the body's bytes."""
    # StreamedBodyResponse{body, end_of_stream}; proto3 omits an empty body and a false flag.
    inner_len = (1 + len(_len(size)) + size if size else 0) + (2 if end else 0)
    mutation_len = 1 + len(_len(inner_len)) + inner_len  # BodyMutation{streamed_response}
    common_len = 1 + len(_len(mutation_len)) + mutation_len  # CommonResponse{body_mutation}
    body_len = 1 + len(_len(common_len)) + common_len  # BodyResponse{response}
    head = b"".join((
        b"\x22" if response else b"\x1a",  # ProcessingResponse.response_body (4) / request_body (3)
        _len(body_len), b"\x0a", _len(common_len), b"\x1a", _len(mutation_len),
        b"\x1a", _len(inner_len),
    ))
    return head + b"\x0a" + _len(size) if size else head


# Heads of echoes up to this size are kept: a streamed token is a few dozen to a few
# hundred bytes of SSE, so a handful of sizes covers nearly every chunk (at most
# 2 x 2 x 4,096 entries of ~12 bytes).
_HEAD_CACHE_MAX_SIZE = 4096
_heads: dict[tuple[bool, int, bool], bytes] = {}


def _streamed_body(response: bool, data: bytes, end: bool) -> bytes:
    size = len(data)
    if size <= _HEAD_CACHE_MAX_SIZE:
        key = (response, size, end)
        head = _heads.get(key)
        if head is None:
            head = _heads[key] = _streamed_body_head(response, size, end)
    else:
        head = _streamed_body_head(response, size, end)
    return head + data + _END_TRUE if end else head + data


def encode_response_body_echo(data: bytes, end_of_stream: bool) -> bytes:
    """The serialized ProcessingResponse that passes a response chunk through unchanged
    (duplex mode); byte-identical to ``messages.response_body_echo(...).SerializeToString()``."""
    return _streamed_body(True, data, end_of_stream)


def encode_request_body_chunk(data: bytes, end_of_stream: bool) -> bytes:
    """The serialized ProcessingResponse that sends a request body chunk on (duplex mode);
    byte-identical to the protobuf ``request_body`` streamed response."""
    return _streamed_body(False, data, end_of_stream)

