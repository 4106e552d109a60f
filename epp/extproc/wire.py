"""The ext_proc messages that dominate a stream, read and written without protobuf objects.

Every output token of every streamed response crosses the picker twice: Envoy sends the
chunk as a ``ProcessingRequest{response_body: HttpBody{body, end_of_stream}}`` and we echo
it as a ``ProcessingResponse{response_body: BodyResponse{response: CommonResponse{
body_mutation: BodyMutation{streamed_response: StreamedBodyResponse{body, end_of_stream}}}}}``.
Both are a few bytes of framing around the same body, so they are parsed and built here
directly from the wire format. Anything this reader does not recognise exactly (another
field, a field twice, a flag we do not act on) returns None and the caller falls back to
the full protobuf parse, so the fast path can only be faster, never different; the tests
check both against ``xds-protos`` byte for byte.
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


def _streamed_body(response: bool, data: bytes, end: bool) -> bytes:
    # StreamedBodyResponse{body, end_of_stream}; proto3 omits an empty body and a false flag.
    inner_len = (1 + len(_len(len(data))) + len(data) if data else 0) + (2 if end else 0)
    mutation_len = 1 + len(_len(inner_len)) + inner_len  # BodyMutation{streamed_response}
    common_len = 1 + len(_len(mutation_len)) + mutation_len  # CommonResponse{body_mutation}
    body_len = 1 + len(_len(common_len)) + common_len  # BodyResponse{response}
    head = b"".join((
        b"\x22" if response else b"\x1a",  # ProcessingResponse.response_body (4) / request_body (3)
        _len(body_len), b"\x0a", _len(common_len), b"\x1a", _len(mutation_len),
        b"\x1a", _len(inner_len),
    ))
    if not data:
        return head + _END_TRUE if end else head
    parts = [head, b"\x0a", _len(len(data)), data]
    if end:
        parts.append(_END_TRUE)
    return b"".join(parts)


def encode_response_body_echo(data: bytes, end_of_stream: bool) -> bytes:
    """The serialized ProcessingResponse that passes a response chunk through unchanged
    (duplex mode); byte-identical to ``messages.response_body_echo(...).SerializeToString()``."""
    return _streamed_body(True, data, end_of_stream)


def encode_request_body_chunk(data: bytes, end_of_stream: bool) -> bytes:
    """The serialized ProcessingResponse that sends a request body chunk on (duplex mode);
    byte-identical to the protobuf ``request_body`` streamed response."""
    return _streamed_body(False, data, end_of_stream)
