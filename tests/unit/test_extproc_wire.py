"""The hand-written ext_proc body messages (epp/extproc/wire.py) against protobuf: byte for
byte, at every varint boundary of the body and of the messages nesting it."""

from __future__ import annotations

import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.extproc import messages as msg
from epp.extproc.wire import encode_request_body_chunk, encode_response_body_echo

# Body sizes where a varint grows a byte (1, 2, 3 and 4 bytes), and GIE's chunk size.
BOUNDARIES = [0, 1, 127, 128, 16_383, 16_384, 2**21 - 1, 2**21, msg.MAX_BODY_CHUNK]
# The nested lengths cross the same boundaries a few bytes later than the body does.
NEAR = 8

FAST = settings(deadline=None, derandomize=True, max_examples=150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def body(size: int, pattern: bytes = b"\x00\xff\x7f\x80data") -> bytes:
    """``size`` bytes, not all alike (so a misplaced slice shows)."""
    return (pattern * (size // len(pattern) + 1))[:size]


def request_chunk(data: bytes, end: bool) -> ProcessingResponse:
    """The protobuf request_body chunk, through the public builder (one chunk)."""
    [chunk] = msg.streamed_body_chunks(data, end_of_stream=end, chunk_size=max(len(data), 1))
    return chunk


def check(data: bytes, end: bool) -> None:
    echo = encode_response_body_echo(data, end)
    assert echo == msg.response_body_echo(data, end).SerializeToString()
    parsed = ProcessingResponse.FromString(echo)
    assert parsed.WhichOneof("response") == "response_body"
    streamed = parsed.response_body.response.body_mutation.streamed_response
    assert (streamed.body, streamed.end_of_stream) == (data, end)

    chunk = encode_request_body_chunk(data, end)
    assert chunk == request_chunk(data, end).SerializeToString()
    parsed = ProcessingResponse.FromString(chunk)
    assert parsed.WhichOneof("response") == "request_body"
    streamed = parsed.request_body.response.body_mutation.streamed_response
    assert (streamed.body, streamed.end_of_stream) == (data, end)


@pytest.mark.parametrize("end", [False, True])
@pytest.mark.parametrize("size", BOUNDARIES)
def test_boundary_sizes_match_protobuf(size: int, end: bool) -> None:
    check(body(size), end)


@FAST
@given(size=st.one_of(
    st.builds(lambda b, d: max(0, b + d), st.sampled_from(BOUNDARIES), st.integers(-NEAR, NEAR)),
    st.integers(0, 70_000)),
    end=st.booleans(), pattern=st.binary(min_size=1, max_size=8))
def test_any_body_matches_protobuf(size: int, end: bool, pattern: bytes) -> None:
    check(body(size, pattern), end)


def test_an_empty_final_chunk_is_only_the_flag() -> None:
    # proto3 leaves out the empty body; the two differ in one field tag only.
    assert encode_response_body_echo(b"", True)[0] == 0x22
    assert encode_request_body_chunk(b"", True)[0] == 0x1A
    assert encode_response_body_echo(b"", True).endswith(b"\x10\x01")
    assert encode_response_body_echo(b"", True)[1:] == encode_request_body_chunk(b"", True)[1:]
