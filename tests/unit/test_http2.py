"""Frame-level tests of the server-side HTTP/2 layer (epp/extproc/http2.py, RFC 9113).

Frames are built by hand with ``struct`` (independently of the module's own header
packer) or produced by the ``h2`` package acting as a real client; what the server queues
is parsed back by hand or fed to that client, which validates it strictly."""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.extproc import http2
from epp.extproc.http2 import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    EV_DATA,
    EV_END,
    EV_GOAWAY,
    EV_REQUEST,
    EV_RESET,
    EV_WINDOW,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    ServerConnection,
    StreamGoneError,
)

FAST = settings(deadline=None, derandomize=True, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_WINDOW = 2**31 - 1
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"),
           (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
           (b":authority", b"epp"), (b"content-type", b"application/grpc"),
           (b"te", b"trailers")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0")]

Frame = tuple[int, int, int, bytes]  # (type, flags, stream id, payload)


# -- helpers -------------------------------------------------------------------------


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame, its header packed here rather than by the module under test."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, sid) + payload


def parse(data: bytes) -> list[Frame]:
    """Split what the server sent into frames (it must be whole frames)."""
    out, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 9, "a truncated frame header"
        length = int.from_bytes(data[pos:pos + 3], "big")
        kind, flags, sid = struct.unpack_from(">BBI", data, pos + 3)
        assert len(data) - pos - 9 >= length, "a truncated frame payload"
        out.append((kind, flags, sid & 0x7FFFFFFF, data[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return out


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in pairs))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", increment))


def rst(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">L", code))


def goaway_of(f: Frame) -> tuple[int, int]:
    assert f[0] == GOAWAY and f[2] == 0
    last, code = struct.unpack(">LL", f[3][:8])
    return last, code


def block(headers: list[tuple[bytes, bytes]], encoder: hpack.Encoder | None = None) -> bytes:
    return (encoder or hpack.Encoder()).encode(headers)


def headers_frame(sid: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False,
                  encoder: hpack.Encoder | None = None) -> bytes:
    flags = END_HEADERS | (END_STREAM if end_stream else 0)
    return frame(HEADERS, flags, sid, block(headers, encoder))


def new_server(*, max_concurrent_streams: int = 100, initial_stream_window: int = 1 << 20,
               connection_window: int = 4 << 20, **kw: Any) -> ServerConnection:
    """A server past the preface and the first SETTINGS exchange, output drained."""
    conn = ServerConnection(max_concurrent_streams=max_concurrent_streams,
                            initial_stream_window=initial_stream_window,
                            connection_window=connection_window, **kw)
    conn.initiate_connection()
    conn.data_to_send()
    assert conn.receive_data(PREFACE + settings_frame()) == []
    assert parse(conn.data_to_send()) == [(SETTINGS, ACK, 0, b"")]
    return conn


def connection_error(conn: ServerConnection, data: bytes, code: int) -> None:
    """``data`` is a connection error with ``code``: raised, and GOAWAY(code) queued last."""
    with pytest.raises(http2.ConnectionError) as info:
        conn.receive_data(data)
    assert info.value.code == code
    frames = parse(conn.data_to_send())
    assert frames, "no GOAWAY queued"
    assert goaway_of(frames[-1])[1] == code


def open_stream(conn: ServerConnection, sid: int = 1) -> None:
    assert conn.receive_data(headers_frame(sid, REQUEST)) == [(EV_REQUEST, sid, REQUEST)]


class Pair:
    """The server wired to an ``h2`` client in memory."""

    def __init__(self, **kw: Any) -> None:
        self.server = ServerConnection(**{"max_concurrent_streams": 100,
                                          "initial_stream_window": 1 << 20,
                                          "connection_window": 4 << 20, **kw})
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.server.initiate_connection()
        self.client.initiate_connection()
        self.server_events: list[tuple[Any, ...]] = []
        self.client_events: list[h2.events.Event] = []
        self.moved = False
        self.exchange()

    def to_server(self) -> list[tuple[Any, ...]]:
        """Deliver the client's bytes; the server's events."""
        data = self.client.data_to_send()
        self.moved = bool(data)
        events = self.server.receive_data(data)
        self.server_events += events
        return events

    def to_client(self) -> list[h2.events.Event]:
        """Deliver the server's bytes; the client's events (it acknowledges all data)."""
        data = self.server.data_to_send()
        self.moved = bool(data)
        events = self.client.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.client.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
        self.client_events += events
        return events

    def exchange(self) -> list[tuple[Any, ...]]:
        """Deliver bytes both ways until neither side has anything to say; the server's
        events on the way."""
        events: list[tuple[Any, ...]] = []
        for _ in range(10):
            events += self.to_server()
            moved = self.moved
            self.to_client()
            if not (moved or self.moved):
                return events
        raise AssertionError("the peers never went quiet")


# -- preface and SETTINGS ------------------------------------------------------------


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET",
                                  PREFACE[:-1] + b"X" + settings_frame()])
def test_a_wrong_preface_is_a_protocol_error(data: bytes) -> None:
    conn = ServerConnection(max_concurrent_streams=10, initial_stream_window=65_535,
                            connection_window=65_535)
    conn.initiate_connection()
    conn.data_to_send()
    with pytest.raises(http2.ConnectionError) as info:
        conn.receive_data(data)
    assert info.value.code == PROTOCOL_ERROR
    assert [goaway_of(f) for f in parse(conn.data_to_send())] == [(0, PROTOCOL_ERROR)]


def test_a_preface_split_across_reads_is_accepted() -> None:
    conn = ServerConnection(max_concurrent_streams=10, initial_stream_window=65_535,
                            connection_window=65_535)
    conn.initiate_connection()
    conn.data_to_send()
    for byte in PREFACE:
        assert conn.receive_data(bytes((byte,))) == []
        assert conn.data_to_send() == b""
    assert conn.receive_data(settings_frame()) == []
    assert parse(conn.data_to_send()) == [(SETTINGS, ACK, 0, b"")]


def test_initiate_connection_sends_our_settings_and_widens_the_connection_window() -> None:
    conn = ServerConnection(max_concurrent_streams=77, initial_stream_window=123_456,
                            connection_window=1_000_000, max_header_list_size=9_999)
    conn.initiate_connection()
    frames = parse(conn.data_to_send())
    assert [f[:3] for f in frames] == [(SETTINGS, 0, 0), (WINDOW_UPDATE, 0, 0)]
    payload = frames[0][3]
    sent = dict(struct.unpack_from(">HL", payload, i) for i in range(0, len(payload), 6))
    assert sent == {0x3: 77, 0x4: 123_456, 0x5: http2.LOCAL_MAX_FRAME, 0x6: 9_999}
    assert struct.unpack(">L", frames[1][3])[0] == 1_000_000 - 65_535

    # A real client reads them so: it may now send that much on the connection.
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.receive_data(b"".join(frame(k, fl, s, p) for k, fl, s, p in frames))
    assert client.outbound_flow_control_window == 1_000_000
    assert client.remote_settings.max_concurrent_streams == 77
    assert client.remote_settings.initial_window_size == 123_456
    assert client.max_outbound_frame_size == http2.LOCAL_MAX_FRAME


def test_no_window_update_when_the_connection_window_is_the_default() -> None:
    conn = ServerConnection(max_concurrent_streams=1, initial_stream_window=65_535,
                            connection_window=65_535)
    conn.initiate_connection()
    assert [f[0] for f in parse(conn.data_to_send())] == [SETTINGS]


def test_every_peer_settings_frame_is_acknowledged() -> None:
    conn = new_server()
    conn.receive_data(settings_frame((0x1, 0)) + settings_frame() + settings_frame((0x2, 0)))
    assert parse(conn.data_to_send()) == [(SETTINGS, ACK, 0, b"")] * 3
    # An ACK of our SETTINGS is not answered.
    assert conn.receive_data(frame(SETTINGS, ACK, 0)) == []
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("data", "code"), [
    (frame(SETTINGS, ACK, 0, b"\x00" * 6), FRAME_SIZE_ERROR),
    (frame(SETTINGS, 0, 0, b"\x00" * 5), FRAME_SIZE_ERROR),
    (frame(SETTINGS, 0, 0, b"\x00" * 13), FRAME_SIZE_ERROR),
    (frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
    (settings_frame((0x4, 2**31)), FLOW_CONTROL_ERROR),
    (settings_frame((0x5, 16_383)), PROTOCOL_ERROR),
    (settings_frame((0x5, 2**24)), PROTOCOL_ERROR),
], ids=["ack-with-payload", "length-5", "length-13", "on-a-stream", "window-2^31",
        "max-frame-too-small", "max-frame-too-large"])
def test_malformed_settings_are_connection_errors(data: bytes, code: int) -> None:
    connection_error(new_server(), data, code)


def test_initial_window_size_changes_adjust_open_streams_send_windows() -> None:
    conn = new_server()
    open_stream(conn, 1)
    conn.receive_data(window_update(0, 1 << 20))  # the connection is not the limit here
    assert conn.send_window(1) == 65_535
    assert conn.receive_data(settings_frame((0x4, 100_000))) == [(EV_WINDOW,)]
    assert conn.send_window(1) == 100_000
    assert conn.receive_data(settings_frame((0x4, 1_000))) == []  # shrank: nothing to resume
    conn.data_to_send()
    assert conn.send_data(1, b"x" * 5_000) == 1_000
    # A shrink below what is in flight makes the window negative (RFC 9113 §6.9.2)...
    conn.receive_data(settings_frame((0x4, 500)))
    assert conn.send_window(1) == -500
    conn.data_to_send()
    assert conn.send_data(1, b"x") == 0
    assert conn.data_to_send() == b""
    # ...and growing it back counts from there.
    conn.receive_data(settings_frame((0x4, 2_000)))
    assert conn.send_window(1) == 1_000
    # A stream opened now starts with the new initial window.
    open_stream(conn, 3)
    assert conn.send_window(3) == 2_000


def test_an_initial_window_change_that_overflows_a_stream_window_is_a_flow_control_error(
) -> None:
    # RFC 9113 §6.9.2: a SETTINGS_INITIAL_WINDOW_SIZE change that makes any flow-control
    # window exceed 2^31-1 is a connection error of type FLOW_CONTROL_ERROR.
    conn = new_server()
    open_stream(conn, 1)
    conn.receive_data(window_update(1, MAX_WINDOW - 65_535))
    conn.data_to_send()
    connection_error(conn, settings_frame((0x4, 65_536)), FLOW_CONTROL_ERROR)


@pytest.mark.parametrize(("max_frame", "sizes"), [
    (None, [16_384, 16_384, 16_384, 848]),
    (20_000, [20_000, 20_000, 10_000]),
    (2**24 - 1, [50_000]),
])
def test_the_peers_max_frame_size_decides_how_data_is_split(max_frame: int | None,
                                                           sizes: list[int]) -> None:
    conn = new_server()
    open_stream(conn, 1)
    updates = window_update(0, 1 << 20) + window_update(1, 1 << 20)
    if max_frame is not None:
        updates += settings_frame((0x5, max_frame))
    conn.receive_data(updates)
    conn.data_to_send()
    payload = bytes(range(256)) * 195 + b"0123456789" * 8  # 50,000 bytes
    assert conn.send_data(1, payload) == 50_000
    frames = parse(conn.data_to_send())
    assert [(f[0], f[1], f[2]) for f in frames] == [(DATA, 0, 1)] * len(sizes)
    assert [len(f[3]) for f in frames] == sizes
    assert b"".join(f[3] for f in frames) == payload


# -- PING ----------------------------------------------------------------------------


def test_ping_is_answered_with_an_ack_carrying_the_same_bytes() -> None:
    conn = new_server()
    assert conn.receive_data(frame(PING, 0, 0, b"12345678")) == []
    assert parse(conn.data_to_send()) == [(PING, ACK, 0, b"12345678")]


def test_a_ping_ack_is_not_answered() -> None:
    conn = new_server()
    assert conn.receive_data(frame(PING, ACK, 0, b"12345678")) == []
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(("data", "code"), [
    (frame(PING, 0, 0, b"1234567"), FRAME_SIZE_ERROR),
    (frame(PING, 0, 0, b"123456789"), FRAME_SIZE_ERROR),
    (frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
])
def test_malformed_ping_is_a_connection_error(data: bytes, code: int) -> None:
    connection_error(new_server(), data, code)


# -- HEADERS and CONTINUATION --------------------------------------------------------


def test_headers_with_end_stream_yield_the_request_then_its_end() -> None:
    conn = new_server()
    events = conn.receive_data(headers_frame(1, REQUEST, end_stream=True))
    assert events == [(EV_REQUEST, 1, REQUEST), (EV_END, 1)]
    assert conn.open_streams == 1  # we have not answered yet
    conn.send_headers(1, RESPONSE, end_stream=True)
    assert conn.open_streams == 0


@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_a_header_block_split_over_continuations_decodes_the_same(pieces: int) -> None:
    headers = [*REQUEST, (b"x-long", b"v" * 300)]
    encoded = block(headers)
    cuts = [len(encoded) * i // pieces for i in range(pieces + 1)]
    parts = [encoded[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    data = frame(HEADERS, END_STREAM, 1, parts[0])
    for i, part in enumerate(parts[1:], start=1):
        data += frame(CONTINUATION, END_HEADERS if i == pieces - 1 else 0, 1, part)
    conn = new_server()
    assert conn.receive_data(data) == [(EV_REQUEST, 1, headers), (EV_END, 1)]


def test_an_empty_continuation_chain_still_needs_end_headers() -> None:
    conn = new_server()
    encoded = block(REQUEST)
    assert conn.receive_data(frame(HEADERS, 0, 1, encoded)) == []
    assert conn.receive_data(frame(CONTINUATION, 0, 1, b"")) == []
    assert conn.receive_data(frame(CONTINUATION, END_HEADERS, 1, b"")) == [
        (EV_REQUEST, 1, REQUEST)]


@pytest.mark.parametrize("flags", [PADDED, PRIORITY_FLAG, PADDED | PRIORITY_FLAG])
def test_padded_and_priority_headers_decode_the_same(flags: int) -> None:
    encoded = block(REQUEST)
    pad = 9
    payload = encoded
    if flags & PRIORITY_FLAG:
        payload = struct.pack(">LB", 0x80000000 | 0, 200) + payload  # exclusive on 0
    if flags & PADDED:
        payload = bytes((pad,)) + payload + b"\x00" * pad
    conn = new_server()
    data = frame(HEADERS, flags | END_HEADERS | END_STREAM, 1, payload)
    assert conn.receive_data(data) == [(EV_REQUEST, 1, REQUEST), (EV_END, 1)]
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("payload", [b"", b"\x05abcd", b"\x01"])
def test_headers_padding_longer_than_the_frame_is_a_protocol_error(payload: bytes) -> None:
    connection_error(new_server(), frame(HEADERS, PADDED | END_HEADERS, 1, payload),
                     PROTOCOL_ERROR)


@pytest.mark.parametrize("intruder", [
    frame(PING, 0, 0, b"12345678"),
    frame(DATA, 0, 1, b"x"),
    frame(HEADERS, END_HEADERS, 3, block(REQUEST)),
    frame(0xFA, 0, 0, b"unknown"),  # even an unknown type may not interrupt a block
    frame(CONTINUATION, END_HEADERS, 3, b""),  # a continuation of another stream
])
def test_an_interrupted_header_block_is_a_protocol_error(intruder: bytes) -> None:
    conn = new_server()
    assert conn.receive_data(frame(HEADERS, 0, 1, block(REQUEST)[:5])) == []
    connection_error(conn, intruder, PROTOCOL_ERROR)


def test_a_continuation_without_an_open_header_block_is_a_protocol_error() -> None:
    connection_error(new_server(), frame(CONTINUATION, END_HEADERS, 1, block(REQUEST)),
                     PROTOCOL_ERROR)


def test_a_continuation_flood_is_enhance_your_calm() -> None:
    conn = new_server()
    chunk = b"\x00" * http2.LOCAL_MAX_FRAME
    # Exactly MAX_HEADER_BLOCK bytes are tolerated (still waiting for END_HEADERS)...
    assert conn.receive_data(frame(HEADERS, 0, 1, chunk)) == []
    for _ in range(http2.MAX_HEADER_BLOCK // len(chunk) - 1):
        assert conn.receive_data(frame(CONTINUATION, 0, 1, chunk)) == []
    assert conn.data_to_send() == b""
    # ...one byte more is a flood.
    connection_error(conn, frame(CONTINUATION, 0, 1, b"\x00"), ENHANCE_YOUR_CALM)


@pytest.mark.parametrize("garbage", [b"\x80", b"\xbf\xff\xff\xff\x0f", b"\x00\x85abc",
                                     b"\x82\x3f\xe1\x1f"])
def test_hpack_garbage_is_a_compression_error(garbage: bytes) -> None:
    # index 0; an index past both tables; a literal whose name is cut short; a dynamic
    # table size update after a header field (RFC 7541 §4.2).
    connection_error(new_server(), frame(HEADERS, END_HEADERS, 1, garbage), COMPRESSION_ERROR)


def test_a_header_list_over_our_limit_is_enhance_your_calm() -> None:
    conn = new_server(max_header_list_size=1_000)
    connection_error(conn, headers_frame(1, [*REQUEST, (b"x-big", b"v" * 2_000)]),
                     ENHANCE_YOUR_CALM)


@pytest.mark.parametrize("data", [
    headers_frame(2, REQUEST),
    headers_frame(0, REQUEST),
], ids=["even", "zero"])
def test_headers_on_a_stream_a_client_cannot_open_are_a_protocol_error(data: bytes) -> None:
    connection_error(new_server(), data, PROTOCOL_ERROR)


def test_an_even_stream_id_below_the_highest_is_still_a_protocol_error() -> None:
    # RFC 9113 §5.1.1: a client opens odd streams only; stream 2 was never a stream of
    # its own that could now be closed.
    conn = new_server()
    open_stream(conn, 5)
    connection_error(conn, headers_frame(2, REQUEST), PROTOCOL_ERROR)


def test_trailers_end_an_open_stream() -> None:
    conn = new_server()
    data = (headers_frame(1, REQUEST) + frame(DATA, 0, 1, b"body")
            + headers_frame(1, [(b"x-trailer", b"t")], end_stream=True))
    assert conn.receive_data(data) == [(EV_REQUEST, 1, REQUEST), (EV_DATA, 1, b"body", 4),
                                       (EV_END, 1)]
    conn.send_headers(1, RESPONSE + TRAILERS, end_stream=True)
    assert conn.open_streams == 0


def test_trailers_without_end_stream_reset_the_stream() -> None:
    conn = new_server()
    open_stream(conn, 1)
    assert conn.receive_data(headers_frame(1, [(b"x-trailer", b"t")])) == [
        (EV_RESET, 1, PROTOCOL_ERROR)]
    assert parse(conn.data_to_send()) == [(RST_STREAM, 0, 1, struct.pack(">L", PROTOCOL_ERROR))]
    assert conn.open_streams == 0


def test_headers_after_end_stream_reset_the_stream_with_stream_closed() -> None:
    conn = new_server()
    conn.receive_data(headers_frame(1, REQUEST, end_stream=True))
    assert conn.receive_data(headers_frame(1, [(b"x", b"y")], end_stream=True)) == [
        (EV_RESET, 1, STREAM_CLOSED)]
    assert parse(conn.data_to_send()) == [(RST_STREAM, 0, 1, struct.pack(">L", STREAM_CLOSED))]


def test_headers_reusing_a_closed_stream_reset_it_and_keep_the_hpack_table_in_sync() -> None:
    pair = Pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, REQUEST, end_stream=True)
    pair.exchange()
    pair.server.send_headers(sid, RESPONSE + TRAILERS, end_stream=True)
    pair.exchange()
    assert pair.server.open_streams == 0

    # The client's encoder (its dynamic table already holds REQUEST) adds x-session to
    # its table on the stale stream; stream 3 then refers to it by index.
    encoder = pair.client.encoder
    fresh = [*REQUEST, (b"x-session", b"abcdefghijklmnop")]
    stale = encoder.encode(fresh)
    indexed = encoder.encode(fresh)
    assert len(indexed) < len(stale) and len(indexed) == len(fresh)  # all indexed
    server = pair.server
    assert server.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, sid, stale)) == []
    assert parse(server.data_to_send()) == [(RST_STREAM, 0, sid,
                                             struct.pack(">L", STREAM_CLOSED))]
    assert server.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, sid + 2, indexed)) == [
        (EV_REQUEST, sid + 2, fresh), (EV_END, sid + 2)]
    assert server.open_streams == 1


def test_a_repeated_block_of_table_references_decodes_against_the_current_table() -> None:
    # b"\xbe" is "indexed, 62": the newest dynamic entry, whichever that is now.
    encoder = hpack.Encoder()
    conn = new_server()
    first = [*REQUEST, (b"x-a", b"1")]
    conn.receive_data(headers_frame(1, first, encoder=encoder, end_stream=True))
    newest = b"\xbe"
    assert conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 3, newest)) == [
        (EV_REQUEST, 3, [(b"x-a", b"1")]), (EV_END, 3)]
    assert conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 5, newest)) == [
        (EV_REQUEST, 5, [(b"x-a", b"1")]), (EV_END, 5)]
    conn.receive_data(headers_frame(7, [(b"x-b", b"2")], encoder=encoder, end_stream=True))
    assert conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 9, newest)) == [
        (EV_REQUEST, 9, [(b"x-b", b"2")]), (EV_END, 9)]
    # An index past the table is still refused, however often a valid one was seen.
    connection_error(conn, frame(HEADERS, END_HEADERS, 11, b"\xff\x7f"), COMPRESSION_ERROR)


def test_trailers_in_flight_on_a_stream_we_reset_are_dropped() -> None:
    # E.g. a stream refused over the concurrency limit while the peer was still sending.
    encoder = hpack.Encoder()
    conn = new_server()
    conn.receive_data(headers_frame(1, REQUEST, encoder=encoder))
    conn.reset_stream(1, http2.REFUSED_STREAM)
    conn.data_to_send()
    trailers = [(b"x-trailer", b"t")]
    assert conn.receive_data(headers_frame(1, trailers, end_stream=True,
                                           encoder=encoder)) == []
    assert all(f[0] == RST_STREAM and f[2] == 1 for f in parse(conn.data_to_send()))
    # The decoder saw that block: the next one, which indexes into it, decodes.
    assert conn.receive_data(headers_frame(3, [*REQUEST, *trailers], encoder=encoder)) == [
        (EV_REQUEST, 3, [*REQUEST, *trailers])]


# -- DATA ----------------------------------------------------------------------------


def test_data_is_delivered_with_its_flow_controlled_length() -> None:
    conn = new_server()
    open_stream(conn, 1)
    assert conn.receive_data(frame(DATA, 0, 1, b"hello")) == [(EV_DATA, 1, b"hello", 5)]
    padded = bytes((10,)) + b"abc" + b"\x00" * 10
    assert conn.receive_data(frame(DATA, PADDED | END_STREAM, 1, padded)) == [
        (EV_DATA, 1, b"abc", 14), (EV_END, 1)]


@pytest.mark.parametrize("payload", [b"", b"\x04abc", b"\x09"])
def test_data_padding_longer_than_the_frame_is_a_protocol_error(payload: bytes) -> None:
    conn = new_server()
    open_stream(conn, 1)
    connection_error(conn, frame(DATA, PADDED, 1, payload), PROTOCOL_ERROR)


@pytest.mark.parametrize("sid", [0, 3])
def test_data_on_stream_zero_or_an_idle_stream_is_a_protocol_error(sid: int) -> None:
    conn = new_server()
    open_stream(conn, 1)
    connection_error(conn, frame(DATA, 0, sid, b"x"), PROTOCOL_ERROR)


def test_data_beyond_the_connection_window_is_a_flow_control_error() -> None:
    conn = new_server(connection_window=65_535)
    open_stream(conn, 1)
    open_stream(conn, 3)
    exact = [frame(DATA, 0, 1, b"a" * 16_384)] * 2 + [frame(DATA, 0, 3, b"b" * 32_767)]
    assert len(conn.receive_data(b"".join(exact))) == 3  # exactly the window: fine
    connection_error(conn, frame(DATA, 0, 3, b"c"), FLOW_CONTROL_ERROR)


def test_data_beyond_a_stream_window_resets_only_that_stream() -> None:
    conn = new_server(initial_stream_window=1_000, connection_window=65_535)
    open_stream(conn, 1)
    assert conn.receive_data(frame(DATA, 0, 1, b"a" * 1_000)) == [(EV_DATA, 1, b"a" * 1_000,
                                                                 1_000)]
    open_stream(conn, 3)
    assert conn.receive_data(frame(DATA, 0, 3, b"b" * 16_384)) == [
        (EV_RESET, 3, FLOW_CONTROL_ERROR)]
    # The refused bytes go back to the connection window (16,384 is a quarter of it).
    assert sorted(parse(conn.data_to_send())) == [
        (RST_STREAM, 0, 3, struct.pack(">L", FLOW_CONTROL_ERROR)),
        (WINDOW_UPDATE, 0, 0, struct.pack(">L", 16_384))]
    # The connection and stream 1 carry on.
    open_stream(conn, 5)
    assert conn.receive_data(frame(DATA, END_STREAM, 1, b"")) == [(EV_DATA, 1, b"", 0),
                                                                 (EV_END, 1)]
    conn.send_headers(1, RESPONSE, end_stream=True)
    assert conn.open_streams == 1  # stream 5


def test_data_after_end_stream_resets_the_stream_with_stream_closed() -> None:
    conn = new_server(connection_window=65_535)
    conn.receive_data(headers_frame(1, REQUEST, end_stream=True))
    assert conn.receive_data(frame(DATA, 0, 1, b"x" * 16_384)) == [(EV_RESET, 1, STREAM_CLOSED)]
    assert sorted(parse(conn.data_to_send())) == [
        (RST_STREAM, 0, 1, struct.pack(">L", STREAM_CLOSED)),
        (WINDOW_UPDATE, 0, 0, struct.pack(">L", 16_384))]
    assert conn.open_streams == 0


def test_a_frame_over_our_max_frame_size_is_a_frame_size_error() -> None:
    conn = new_server()
    open_stream(conn, 1)
    largest = frame(DATA, 0, 1, b"z" * http2.LOCAL_MAX_FRAME)
    assert conn.receive_data(largest) == [(EV_DATA, 1, b"z" * http2.LOCAL_MAX_FRAME,
                                           http2.LOCAL_MAX_FRAME)]
    # Refused on its header alone: the payload need not arrive.
    too_large = frame(DATA, 0, 1, b"z" * (http2.LOCAL_MAX_FRAME + 1))[:9]
    connection_error(conn, too_large, FRAME_SIZE_ERROR)


# -- byte splits: any split of a valid sequence gives the same events ----------------


def _conversation() -> bytes:
    """A client's bytes exercising most frame kinds, as one sequence."""
    enc = hpack.Encoder()
    encoded = enc.encode([*REQUEST, (b"x-long", b"q" * 100)])
    return b"".join((
        PREFACE, settings_frame((0x4, 100_000), (0x5, 20_000)),
        frame(HEADERS, 0, 1, encoded[:10]), frame(CONTINUATION, 0, 1, encoded[10:50]),
        frame(CONTINUATION, END_HEADERS, 1, encoded[50:]),
        frame(DATA, 0, 1, b"first"), frame(PING, 0, 0, b"pingpong"),
        frame(DATA, PADDED, 1, b"\x04second\x00\x00\x00\x00"),
        frame(HEADERS, END_HEADERS | END_STREAM, 3, enc.encode(REQUEST)),
        frame(PRIORITY, 0, 1, b"\x00\x00\x00\x03\x10"), frame(0xFA, 0xFF, 7, b"ext"),
        window_update(0, 1_000), window_update(1, 2_000),
        frame(HEADERS, END_HEADERS | END_STREAM, 1, enc.encode([(b"x-trailer", b"t")])),
        rst(3, CANCEL), frame(GOAWAY, 0, 0, struct.pack(">LL", 0, NO_ERROR) + b"debug"),
    ))


def _feed(chunks: list[bytes]) -> tuple[list[tuple[Any, ...]], bytes, int]:
    conn = ServerConnection(max_concurrent_streams=10, initial_stream_window=65_535,
                            connection_window=1 << 20)
    events: list[tuple[Any, ...]] = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
    return events, conn.data_to_send(), conn.open_streams


def test_the_conversation_decodes_to_the_expected_events() -> None:
    events, out, open_streams = _feed([_conversation()])
    headers = [*REQUEST, (b"x-long", b"q" * 100)]
    assert events == [
        (EV_WINDOW,), (EV_REQUEST, 1, headers), (EV_DATA, 1, b"first", 5),
        (EV_DATA, 1, b"second", 11), (EV_REQUEST, 3, REQUEST), (EV_END, 3),
        (EV_WINDOW,), (EV_WINDOW,), (EV_END, 1), (EV_RESET, 3, CANCEL), (EV_GOAWAY, NO_ERROR)]
    assert [f[0] for f in parse(out)] == [SETTINGS, PING]
    assert open_streams == 1  # stream 1: the peer is done, we have not answered


def test_byte_by_byte_reads_give_the_same_events() -> None:
    data = _conversation()
    assert _feed([data[i:i + 1] for i in range(len(data))]) == _feed([data])


@FAST
@given(st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_of_a_valid_sequence_gives_the_same_events(cuts: list[int]) -> None:
    data = _conversation()
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert _feed(chunks) == _feed([data])


# -- acknowledging inbound data -------------------------------------------------------


def test_acknowledgements_are_batched_by_a_quarter_window() -> None:
    conn = new_server(initial_stream_window=40_000, connection_window=200_000)
    open_stream(conn, 1)
    conn.receive_data(frame(DATA, 0, 1, b"x" * 30_000))
    conn.acknowledge(1, 9_999)
    assert conn.data_to_send() == b""  # under a quarter of either window
    conn.acknowledge(1, 1)
    assert parse(conn.data_to_send()) == [(WINDOW_UPDATE, 0, 1, struct.pack(">L", 10_000))]
    conn.acknowledge(1, 20_000)
    assert parse(conn.data_to_send()) == [(WINDOW_UPDATE, 0, 1, struct.pack(">L", 20_000))]
    # Connection: 30,000 consumed of 200,000; a quarter is 50,000.
    conn.acknowledge_connection(19_999)
    assert conn.data_to_send() == b""
    conn.acknowledge_connection(1)
    assert parse(conn.data_to_send()) == [(WINDOW_UPDATE, 0, 0, struct.pack(">L", 50_000))]


def test_acknowledging_a_stream_the_peer_finished_returns_only_the_connection_window(
) -> None:
    conn = new_server(initial_stream_window=40_000, connection_window=65_535)
    open_stream(conn, 1)
    conn.receive_data(frame(DATA, END_STREAM, 1, b"x" * 16_384))
    conn.acknowledge(1, 16_384)
    assert parse(conn.data_to_send()) == [(WINDOW_UPDATE, 0, 0, struct.pack(">L", 16_384))]


def test_open_stream_window_grants_at_once() -> None:
    conn = new_server()
    open_stream(conn, 1)
    conn.open_stream_window(1, 5)
    assert parse(conn.data_to_send()) == [(WINDOW_UPDATE, 0, 1, struct.pack(">L", 5))]
    conn.open_stream_window(1, 0)
    conn.open_stream_window(9, 5)  # no such stream
    assert conn.data_to_send() == b""


@settings(FAST, max_examples=100)
@given(stream_window=st.integers(1, 200_000), connection_window=st.integers(1, 150_000),
       steps=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 300_000),
                                st.booleans()), min_size=1, max_size=40))
def test_a_client_within_its_windows_never_trips_flow_control(
        stream_window: int, connection_window: int,
        steps: list[tuple[int, int, bool]]) -> None:
    pair = Pair(initial_stream_window=stream_window, connection_window=connection_window)
    sids = []
    for _ in range(3):
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_headers(sid, REQUEST)
        sids.append(sid)
    pair.exchange()
    for sid in sids:
        pair.server.send_headers(sid, RESPONSE)
    held: dict[int, int] = {}  # acknowledgements the server holds back (a slow reader)
    delivered = 0
    for index, size, hold in steps:
        sid = sids[index]
        left = size  # the client sends all it may, up to ``size``
        while left and (window := min(pair.client.local_flow_control_window(sid),
                                      pair.client.max_outbound_frame_size, left)):
            pair.client.send_data(sid, b"d" * window)
            left -= window
        pair.server.send_data(sid, b"r" * min(size, 20_000))  # within the server's windows
        for event in pair.exchange():
            if event[0] == EV_DATA:
                delivered += event[3]
                held[event[1]] = held.get(event[1], 0) + event[3]
        if not hold:
            for held_sid, amount in held.items():
                pair.server.acknowledge(held_sid, amount)
            held.clear()
            pair.exchange()
        assert not [e for e in pair.server_events if e[0] == EV_RESET]
        assert not [e for e in pair.client_events if isinstance(e, h2.events.StreamReset)]
    assert delivered  # the exchange did carry data
    for sid in sids:
        pair.client.end_stream(sid)
        pair.exchange()
        pair.server.send_headers(sid, TRAILERS, end_stream=True)
    pair.exchange()
    assert pair.server.open_streams == 0


# -- WINDOW_UPDATE -------------------------------------------------------------------


def test_window_update_grows_the_send_windows_and_says_so() -> None:
    conn = new_server()
    open_stream(conn, 1)
    conn.receive_data(settings_frame((0x4, 10)))
    assert conn.send_window(1) == 10
    assert conn.receive_data(window_update(1, 90)) == [(EV_WINDOW,)]
    assert conn.send_window(1) == 100
    assert conn.receive_data(window_update(0, 1)) == [(EV_WINDOW,)]


def test_a_zero_window_update_on_the_connection_is_a_protocol_error() -> None:
    connection_error(new_server(), window_update(0, 0), PROTOCOL_ERROR)


def test_a_zero_window_update_on_a_stream_resets_that_stream() -> None:
    conn = new_server()
    open_stream(conn, 1)
    open_stream(conn, 3)
    assert conn.receive_data(window_update(1, 0)) == [(EV_RESET, 1, PROTOCOL_ERROR)]
    assert parse(conn.data_to_send()) == [(RST_STREAM, 0, 1, struct.pack(">L", PROTOCOL_ERROR))]
    assert conn.is_open(3) and not conn.is_open(1)


def test_a_connection_window_overflow_is_a_flow_control_error() -> None:
    conn = new_server()
    assert conn.receive_data(window_update(0, MAX_WINDOW - 65_535)) == [(EV_WINDOW,)]
    connection_error(conn, window_update(0, 1), FLOW_CONTROL_ERROR)


def test_a_stream_window_overflow_resets_that_stream() -> None:
    conn = new_server()
    open_stream(conn, 1)
    assert conn.receive_data(window_update(1, MAX_WINDOW - 65_535)) == [(EV_WINDOW,)]
    assert conn.receive_data(window_update(1, 1)) == [(EV_RESET, 1, FLOW_CONTROL_ERROR)]
    assert parse(conn.data_to_send()) == [
        (RST_STREAM, 0, 1, struct.pack(">L", FLOW_CONTROL_ERROR))]


@pytest.mark.parametrize(("data", "code"), [
    (frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"), FRAME_SIZE_ERROR),
    (frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01\x00"), FRAME_SIZE_ERROR),
    (window_update(3, 1), PROTOCOL_ERROR),  # idle
])
def test_malformed_window_updates_are_connection_errors(data: bytes, code: int) -> None:
    conn = new_server()
    open_stream(conn, 1)
    connection_error(conn, data, code)


def test_a_window_update_on_a_closed_stream_is_ignored() -> None:
    conn = new_server()
    conn.receive_data(headers_frame(1, REQUEST, end_stream=True))
    conn.send_headers(1, RESPONSE, end_stream=True)
    conn.data_to_send()
    assert conn.receive_data(window_update(1, 100)) == []
    assert conn.data_to_send() == b""


# -- RST_STREAM, GOAWAY, PUSH_PROMISE, PRIORITY, unknown -----------------------------


def test_a_reset_from_the_peer_is_reported_and_the_stream_is_gone() -> None:
    conn = new_server()
    open_stream(conn, 1)
    assert conn.receive_data(rst(1, CANCEL)) == [(EV_RESET, 1, CANCEL)]
    assert conn.open_streams == 0 and not conn.is_open(1) and conn.send_window(1) == 0
    with pytest.raises(StreamGoneError):
        conn.send_headers(1, RESPONSE)
    with pytest.raises(StreamGoneError):
        conn.send_data(1, b"x")
    # Frames in flight on it are dropped, not errors.
    assert conn.receive_data(frame(DATA, 0, 1, b"late") + rst(1, CANCEL)) == []


@pytest.mark.parametrize(("data", "code"), [
    (rst(0, CANCEL), PROTOCOL_ERROR),
    (rst(3, CANCEL), PROTOCOL_ERROR),  # idle
    (frame(RST_STREAM, 0, 1, b"\x00\x00\x08"), FRAME_SIZE_ERROR),
    (frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08\x00"), FRAME_SIZE_ERROR),
])
def test_malformed_resets_are_connection_errors(data: bytes, code: int) -> None:
    conn = new_server()
    open_stream(conn, 1)
    connection_error(conn, data, code)


def test_a_peer_goaway_is_reported_and_open_streams_stay_usable() -> None:
    conn = new_server()
    open_stream(conn, 1)
    goaway = frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0x2) + b"bye")
    assert conn.receive_data(goaway) == [(EV_GOAWAY, 0x2)]
    assert conn.receive_data(frame(DATA, END_STREAM, 1, b"more")) == [
        (EV_DATA, 1, b"more", 4), (EV_END, 1)]
    conn.send_headers(1, RESPONSE)
    assert conn.send_data(1, b"answer") == 6
    conn.send_headers(1, TRAILERS, end_stream=True)
    frames = parse(conn.data_to_send())
    assert [(f[0], f[1]) for f in frames] == [(HEADERS, END_HEADERS), (DATA, 0),
                                              (HEADERS, END_HEADERS | END_STREAM)]
    assert conn.open_streams == 0


@pytest.mark.parametrize(("data", "code"), [
    (frame(GOAWAY, 0, 1, struct.pack(">LL", 0, 0)), PROTOCOL_ERROR),
    (frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">L", 2) + block(REQUEST)),
     PROTOCOL_ERROR),
], ids=["goaway-on-a-stream", "push-promise"])
def test_frames_a_client_may_not_send_are_connection_errors(data: bytes, code: int) -> None:
    conn = new_server()
    open_stream(conn, 1)
    connection_error(conn, data, code)


def test_unknown_frame_types_and_priority_are_ignored() -> None:
    conn = new_server()
    open_stream(conn, 1)
    data = (frame(0xFA, 0xFF, 0, b"whatever") + frame(0x10, 0, 1, b"")
            + frame(PRIORITY, 0, 1, struct.pack(">LB", 3, 16))
            + frame(PRIORITY, 0, 7, struct.pack(">LB", 1, 255)))  # idle: still fine
    assert conn.receive_data(data) == []
    assert conn.data_to_send() == b""
    assert conn.receive_data(frame(DATA, 0, 1, b"ok")) == [(EV_DATA, 1, b"ok", 2)]


def test_a_priority_frame_of_the_wrong_length_resets_its_stream() -> None:
    conn = new_server()
    open_stream(conn, 1)
    assert conn.receive_data(frame(PRIORITY, 0, 1, b"\x00" * 4)) == [
        (EV_RESET, 1, FRAME_SIZE_ERROR)]
    assert parse(conn.data_to_send()) == [(RST_STREAM, 0, 1, struct.pack(">L", FRAME_SIZE_ERROR))]


@pytest.mark.parametrize("payload", [struct.pack(">LB", 1, 16), b"\x00" * 4])
def test_priority_on_stream_zero_is_a_protocol_error(payload: bytes) -> None:
    # RFC 9113 §6.3; and never an RST_STREAM on stream 0 (§6.4).
    connection_error(new_server(), frame(PRIORITY, 0, 0, payload), PROTOCOL_ERROR)


# -- sending -------------------------------------------------------------------------

_NAMES = st.one_of(st.sampled_from([n for n, _ in hpack.table.HeaderTable.STATIC_TABLE]),
                   st.binary(max_size=40))
_VALUES = st.one_of(st.sampled_from([v for _, v in hpack.table.HeaderTable.STATIC_TABLE]),
                    st.binary(max_size=300))


@FAST
@given(st.lists(st.one_of(st.sampled_from(list(hpack.table.HeaderTable.STATIC_TABLE)),
                          st.tuples(_NAMES, _VALUES)), max_size=20))
def test_the_stateless_encoder_round_trips_and_leaves_the_peers_table_empty(
        headers: list[tuple[bytes, bytes]]) -> None:
    decoder = hpack.Decoder()
    for _ in range(2):  # the same headers twice: still nothing indexed
        encoded = http2.encode_headers(headers)
        assert decoder.decode(encoded, raw=True) == headers
        assert len(decoder.header_table.dynamic_entries) == 0
    assert http2.encode_headers(headers) == encoded  # deterministic


def test_the_encoder_uses_the_static_table() -> None:
    assert http2.encode_headers([(b":status", b"200")]) == b"\x88"
    # content-type is static index 31: literal without indexing, indexed name.
    assert http2.encode_headers([(b"content-type", b"application/grpc")]) == (
        b"\x0f\x10\x10application/grpc")


def test_send_headers_round_trip_through_a_real_client() -> None:
    pair = Pair()
    pair.client.send_headers(1, REQUEST)
    pair.exchange()
    extra = [(b"x-custom", b"value"), (b"grpc-message", b"a" * 200)]
    pair.server.send_headers(1, RESPONSE + extra)
    pair.server.send_data(1, b"payload")
    pair.server.send_headers(1, TRAILERS, end_stream=True)
    events = pair.to_client()
    kinds = [type(e) for e in events]
    assert kinds == [h2.events.ResponseReceived, h2.events.DataReceived,
                     h2.events.TrailersReceived, h2.events.StreamEnded]
    response, _, trailers, _ = events
    assert isinstance(response, h2.events.ResponseReceived)
    assert isinstance(trailers, h2.events.TrailersReceived)
    assert response.headers == RESPONSE + extra
    assert trailers.headers == TRAILERS
    assert len(pair.client.decoder.header_table.dynamic_entries) == 0
    pair.client.end_stream(1)
    pair.exchange()
    assert pair.server.open_streams == 0


@pytest.mark.parametrize(("max_frame", "pieces"), [(None, 3), (25_000, 2)])
def test_a_header_block_over_the_peers_max_frame_size_uses_continuations(
        max_frame: int | None, pieces: int) -> None:
    pair = Pair()
    if max_frame is not None:
        pair.client.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame})
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.exchange()
    big = RESPONSE + [(b"x-big", b"b" * 40_000)]
    pair.server.send_headers(1, big, end_stream=True)
    out = pair.server.data_to_send()
    frames = parse(out)
    limit = max_frame or 16_384
    assert [f[0] for f in frames] == [HEADERS] + [CONTINUATION] * (pieces - 1)
    assert frames[0][1] == END_STREAM  # END_HEADERS only on the last piece
    assert [f[1] for f in frames[1:]] == [0] * (pieces - 2) + [END_HEADERS]
    assert all(len(f[3]) <= limit for f in frames)
    assert hpack.Decoder(max_header_list_size=1 << 20).decode(
        b"".join(f[3] for f in frames), raw=True) == big
    events = pair.client.receive_data(out)
    assert isinstance(events[0], h2.events.ResponseReceived) and events[0].headers == big
    assert pair.server.open_streams == 0


def test_send_data_honours_both_windows_and_returns_what_it_queued() -> None:
    conn = new_server()
    open_stream(conn, 1)
    open_stream(conn, 3)
    conn.receive_data(settings_frame((0x4, 40_000)))
    conn.data_to_send()
    assert conn.send_data(1, b"a" * 50_000) == 40_000  # the stream window
    assert conn.send_data(1, b"a") == 0
    assert conn.send_data(3, b"b" * 50_000) == 65_535 - 40_000  # the connection window
    assert conn.send_window(3) == 0
    frames = parse(conn.data_to_send())
    assert sum(len(f[3]) for f in frames if f[2] == 1) == 40_000
    assert sum(len(f[3]) for f in frames if f[2] == 3) == 25_535
    assert all(len(f[3]) <= 16_384 for f in frames)
    conn.receive_data(window_update(0, 1_000))
    assert conn.send_data(1, b"a" * 5_000) == 0  # the stream window is still closed
    assert conn.send_data(3, b"b" * 5_000) == 1_000


def test_sends_on_gone_streams_raise_stream_gone() -> None:
    conn = new_server()
    with pytest.raises(StreamGoneError):
        conn.send_data(1, b"x")  # never opened
    conn.receive_data(headers_frame(1, REQUEST))
    conn.send_headers(1, RESPONSE, end_stream=True)  # we are done, the peer is not
    with pytest.raises(StreamGoneError):
        conn.send_data(1, b"x")
    with pytest.raises(StreamGoneError):
        conn.send_headers(1, TRAILERS, end_stream=True)
    open_stream(conn, 3)
    conn.reset_stream(3, CANCEL)
    with pytest.raises(StreamGoneError):
        conn.send_headers(3, RESPONSE)


def test_reset_stream_sends_rst_once_and_forgets_the_stream() -> None:
    conn = new_server()
    open_stream(conn, 1)
    conn.reset_stream(1, CANCEL)
    conn.reset_stream(1, CANCEL)  # no-op
    assert parse(conn.data_to_send()) == [(RST_STREAM, 0, 1, struct.pack(">L", CANCEL))]
    assert conn.open_streams == 0
    # The peer's frames already in flight are dropped, without events.
    assert conn.receive_data(frame(DATA, END_STREAM, 1, b"late") + window_update(1, 5)) == []
    assert conn.receive_data(rst(1, CANCEL)) == []


def test_a_stream_we_end_first_stays_half_closed_until_the_peer_ends_it() -> None:
    conn = new_server()
    open_stream(conn, 1)
    conn.send_headers(1, RESPONSE + TRAILERS, end_stream=True)
    assert conn.open_streams == 1 and not conn.is_open(1)
    assert conn.receive_data(frame(DATA, 0, 1, b"more")) == [(EV_DATA, 1, b"more", 4)]
    assert conn.receive_data(frame(DATA, END_STREAM, 1, b"")) == [(EV_DATA, 1, b"", 0),
                                                                 (EV_END, 1)]
    assert conn.open_streams == 0
    # A peer that resets such a stream instead: nothing to report, it is gone.
    open_stream(conn, 3)
    conn.send_headers(3, RESPONSE + TRAILERS, end_stream=True)
    assert conn.receive_data(rst(3, CANCEL)) == []
    assert conn.open_streams == 0


def test_streams_ended_only_by_us_are_bounded_by_resetting_the_oldest() -> None:
    conn = new_server(max_concurrent_streams=3)
    sids = [1, 3, 5, 7, 9]
    for sid in sids:
        open_stream(conn, sid)
        conn.send_headers(sid, RESPONSE + TRAILERS, end_stream=True)
    frames = parse(conn.data_to_send())
    resets = [(f[2], struct.unpack(">L", f[3])[0]) for f in frames if f[0] == RST_STREAM]
    assert resets == [(1, NO_ERROR), (3, NO_ERROR)]
    assert conn.open_streams == 3
    # The reset ones are gone: their late end is dropped; the others still end normally.
    assert conn.receive_data(frame(DATA, END_STREAM, 1, b"")) == []
    for sid in (5, 7, 9):
        assert conn.receive_data(frame(DATA, END_STREAM, sid, b"")) == [
            (EV_DATA, sid, b"", 0), (EV_END, sid)]
    assert conn.open_streams == 0


def test_many_complete_exchanges_leave_no_stream_behind() -> None:
    pair = Pair(max_concurrent_streams=5)
    for _ in range(50):
        sid = pair.client.get_next_available_stream_id()
        pair.client.send_headers(sid, REQUEST)
        pair.client.send_data(sid, b"request", end_stream=True)
        pair.exchange()
        pair.server.send_headers(sid, RESPONSE)
        pair.server.send_data(sid, b"response")
        pair.server.send_headers(sid, TRAILERS, end_stream=True)
        pair.exchange()
    assert pair.server.open_streams == 0
    ended = [e for e in pair.client_events if isinstance(e, h2.events.StreamEnded)]
    assert len(ended) == 50
    assert not [e for e in pair.client_events if isinstance(e, h2.events.StreamReset)]
