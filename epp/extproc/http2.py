"""The server side of HTTP/2 (RFC 9113), as lean as one gRPC method needs it.

Why not the ``h2`` package: it builds several objects per frame (frame, flags, event,
state-machine transitions) and re-frames every send; at one DATA frame in and one out per
streamed token, that was most of the picker's CPU on a streaming response. Here a frame
is read with one ``struct`` call and dispatched on its type; events are tuples; a DATA
frame out is a 9-byte header joined to its payload.

What it implements: the connection preface; SETTINGS (and their ACKs), PING, GOAWAY,
WINDOW_UPDATE, RST_STREAM, PRIORITY (ignored), HEADERS with CONTINUATION and padding,
DATA with padding; flow control in both directions (inbound windows are checked, outbound
ones honoured); HPACK through the ``hpack`` package for what the peer sends, and a
stateless encoder (static table plus literals never added to the peer's table) for what
we send. What a server never needs is refused as the RFC says: PUSH_PROMISE from a
client, stream ids that go backwards or are even.

Errors: a connection error sends GOAWAY and raises :class:`ConnectionError` out of
:meth:`ServerConnection.receive_data`; a stream error resets that stream and is reported
as an ``EV_RESET`` event, as if the peer had reset it, so the caller releases it the same
way.

The caller owns the streams' meaning (here: gRPC ext_proc calls); this module owns only
framing, stream states and flow control.
"""

from __future__ import annotations

import struct
from typing import Any, cast

import hpack
from hpack.exceptions import HPACKError, OversizedHeaderListError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB
# Settings.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# Events returned by receive_data, as tuples whose first item is one of these.
EV_REQUEST = 1  # (EV_REQUEST, stream_id, [(name, value), ...])
EV_DATA = 2  # (EV_DATA, stream_id, data, flow_controlled_length)
EV_END = 3  # (EV_END, stream_id): the peer half-closed the stream
EV_RESET = 4  # (EV_RESET, stream_id, error_code): reset by the peer or by a stream error
EV_WINDOW = 5  # (EV_WINDOW,): send windows grew
EV_GOAWAY = 6  # (EV_GOAWAY, error_code): the peer will open no more streams

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = 2**24 - 1
# The largest frame we accept: the peer may send DATA up to this once it has our SETTINGS
# (a 62 KB body chunk then fits one frame). Before that it sends at most 16 KiB.
LOCAL_MAX_FRAME = 65_536
# A header block (HEADERS + CONTINUATION) larger than this is a flood, not a request.
MAX_HEADER_BLOCK = 256 * 1024
# Distinct all-indexed header blocks remembered per connection (see _only_indexed).
INDEXED_BLOCK_CACHE = 64
# Windows are acknowledged in batches: once a quarter of the granted window is consumed.
ACK_FRACTION = 4

_HEAD = struct.Struct(">BHBBL")  # length high byte, length low 16 bits, type, flags, stream
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")
_SID_MASK = 0x7FFFFFFF


class ConnectionError(Exception):  # noqa: A001 (the RFC's name; local to this module)
    """The peer broke the protocol; GOAWAY was queued and the connection must close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamGoneError(Exception):
    """A send on a stream that is closed or reset."""


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte frame header."""
    return _HEAD.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id)


def _only_indexed(block: bytes) -> bool:
    """Whether an HPACK block consists only of "indexed header field" representations
    (RFC 7541 §6.1), which read the tables but never change them."""
    i = 0
    end = len(block)
    while i < end:
        byte = block[i]
        if not byte & 0x80:
            return False
        i += 1
        if byte == 0xFF:  # the index continues in 7-bit groups
            while i < end and block[i] & 0x80:
                i += 1
            i += 1
    return i == end


# -- a stateless HPACK encoder --------------------------------------------------------

_STATIC = hpack.table.HeaderTable.STATIC_TABLE
_STATIC_PAIR = {pair: i + 1 for i, pair in reversed(list(enumerate(_STATIC)))}
_STATIC_NAME = {name: i + 1 for i, (name, _) in reversed(list(enumerate(_STATIC)))}


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HPACK block that uses only the static table and literals "without indexing", so
    it changes no state at either end and the same headers always encode the same."""
    out = []
    for name, value in headers:
        index = _STATIC_PAIR.get((name, value))
        if index is not None:
            out.append(_hpack_int(index, 7, 0x80))
            continue
        name_index = _STATIC_NAME.get(name)
        if name_index is not None:
            out.append(_hpack_int(name_index, 4, 0x00))
        else:
            out.append(b"\x00")
            out.append(_hpack_int(len(name), 7, 0x00))
            out.append(name)
        out.append(_hpack_int(len(value), 7, 0x00))
        out.append(value)
    return b"".join(out)


# -- streams and the connection -------------------------------------------------------


class _StreamState:
    __slots__ = ("send_window", "recv_window", "recv_unacked", "remote_closed", "local_closed")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send before our next ack
        self.recv_unacked = 0  # consumed bytes not yet acknowledged with WINDOW_UPDATE
        self.remote_closed = False
        self.local_closed = False


class ServerConnection:
    """One server-side HTTP/2 connection: bytes in, events out; sends queue bytes that
    :meth:`data_to_send` hands to the socket."""

    def __init__(self, *, max_concurrent_streams: int, initial_stream_window: int,
                 connection_window: int, max_header_list_size: int = 65_536) -> None:
        self._streams: dict[int, _StreamState] = {}
        self._local_only: dict[int, None] = {}  # closed by us, still open by the peer
        self._out: list[bytes] = []
        self._buf = b""
        self._preface = False
        self.highest_inbound_stream_id = 0
        # Outbound: what the peer lets us send.
        self._send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME
        # Inbound: what we let the peer send.
        self._max_concurrent = max_concurrent_streams
        self._stream_window = initial_stream_window
        self._conn_granted = max(DEFAULT_WINDOW, connection_window)
        self._recv_window = DEFAULT_WINDOW
        self._recv_unacked = 0
        self._decoder = hpack.Decoder()
        # Header blocks made only of table references, decoded: they leave the table as
        # it is, so the same bytes decode the same until a block that is not one of them
        # (which may change the table) clears this. A gRPC client opening call after call
        # with the same headers sends the same such block every time.
        self._indexed_blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._decoder.max_header_list_size = max_header_list_size
        self._max_header_list = max_header_list_size
        self._header_sid = 0  # a header block is open on this stream (CONTINUATION follows)
        self._header_flags = 0
        self._header_block: list[bytes] = []
        self._header_size = 0

    # -- setup and output ---------------------------------------------------------------

    def initiate_connection(self) -> None:
        """Queue our SETTINGS and widen the connection window."""
        settings = b"".join((
            _SETTING.pack(SETTINGS_MAX_CONCURRENT_STREAMS, self._max_concurrent),
            _SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, self._stream_window),
            _SETTING.pack(SETTINGS_MAX_FRAME_SIZE, LOCAL_MAX_FRAME),
            _SETTING.pack(SETTINGS_MAX_HEADER_LIST_SIZE, self._max_header_list),
        ))
        self._out.append(frame_header(len(settings), SETTINGS, 0, 0) + settings)
        grant = self._conn_granted - self._recv_window
        if grant > 0:  # widen the connection window from the default to what we grant
            self._window_update(0, grant)
            self._recv_window += grant

    def data_to_send(self) -> bytes:
        """Everything queued for the socket since the last call."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[tuple[Any, ...]]:
        """Parse what the socket read; returns events in order. Raises
        :class:`ConnectionError` (GOAWAY queued) when the peer broke the protocol."""
        buf = self._buf + data if self._buf else data
        events: list[tuple[Any, ...]] = []
        pos = 0
        end = len(buf)
        if not self._preface:
            if end < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise self._connection_error(PROTOCOL_ERROR, "bad connection preface")
                self._buf = bytes(buf)
                return events
            if bytes(buf[:len(PREFACE)]) != PREFACE:
                raise self._connection_error(PROTOCOL_ERROR, "bad connection preface")
            self._preface = True
            pos = len(PREFACE)
        unpack = _HEAD.unpack_from
        while end - pos >= 9:
            high, low, kind, flags, sid = unpack(buf, pos)
            length = (high << 16) | low
            if length > LOCAL_MAX_FRAME:
                raise self._connection_error(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            start = pos + 9
            if end - start < length:
                break
            payload = buf[start:start + length]
            pos = start + length
            sid &= _SID_MASK
            if self._header_sid and kind != CONTINUATION:
                raise self._connection_error(PROTOCOL_ERROR, "header block interrupted")
            if kind == DATA:
                self._on_data(sid, flags, payload, events)
            elif kind == HEADERS:
                self._on_headers(sid, flags, payload, events)
            elif kind == CONTINUATION:
                self._on_continuation(sid, flags, payload, events)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(sid, payload, events)
            elif kind == RST_STREAM:
                self._on_rst(sid, payload, events)
            elif kind == SETTINGS:
                self._on_settings(sid, flags, payload, events)
            elif kind == PING:
                self._on_ping(sid, flags, payload)
            elif kind == GOAWAY:
                if sid:
                    raise self._connection_error(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise self._connection_error(FRAME_SIZE_ERROR, "short GOAWAY")
                events.append((EV_GOAWAY, _GOAWAY.unpack_from(payload)[1]))
            elif kind == PRIORITY:
                if sid == 0:
                    raise self._connection_error(PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self._stream_error(sid, FRAME_SIZE_ERROR, events)
            elif kind == PUSH_PROMISE:
                raise self._connection_error(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # Unknown frame types are ignored (RFC 9113 §4.1).
        self._buf = bytes(buf[pos:]) if pos < end else b""
        return events

    def _on_data(self, sid: int, flags: int, payload: bytes, events: list[tuple[Any, ...]]
                 ) -> None:
        if sid == 0:
            raise self._connection_error(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        if size > self._recv_window:
            raise self._connection_error(FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_window -= size
        if flags & PADDED:
            if not size or payload[0] >= size:
                raise self._connection_error(PROTOCOL_ERROR, "bad DATA padding")
            data = payload[1:size - payload[0]]
        else:
            data = payload
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            if sid > self.highest_inbound_stream_id:
                raise self._connection_error(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self.acknowledge_connection(size)  # never delivered: give the window back
            if stream is not None:  # data after END_STREAM
                self._stream_error(sid, STREAM_CLOSED, events)
            return
        if size > stream.recv_window:
            self.acknowledge_connection(size)
            self._stream_error(sid, FLOW_CONTROL_ERROR, events)
            return
        stream.recv_window -= size
        events.append((EV_DATA, sid, bytes(data), size))
        if flags & END_STREAM:
            self._remote_end(sid, stream, events)

    def _on_headers(self, sid: int, flags: int, payload: bytes,
                    events: list[tuple[Any, ...]]) -> None:
        if sid == 0:
            raise self._connection_error(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = payload
        if flags & PADDED:
            if not block or block[0] >= len(block):
                raise self._connection_error(PROTOCOL_ERROR, "bad HEADERS padding")
            block = block[1:len(block) - block[0]]
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise self._connection_error(FRAME_SIZE_ERROR, "short HEADERS priority")
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block_done(sid, flags, bytes(block), events)
            return
        self._header_sid = sid
        self._header_flags = flags
        self._header_block = [bytes(block)]
        self._header_size = len(block)

    def _on_continuation(self, sid: int, flags: int, payload: bytes,
                         events: list[tuple[Any, ...]]) -> None:
        if not self._header_sid or sid != self._header_sid:
            raise self._connection_error(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._header_size += len(payload)
        if self._header_size > MAX_HEADER_BLOCK:
            raise self._connection_error(ENHANCE_YOUR_CALM, "header block too large")
        self._header_block.append(bytes(payload))
        if flags & END_HEADERS:
            block = b"".join(self._header_block)
            first_flags = self._header_flags
            self._header_sid = 0
            self._header_block = []
            self._header_size = 0
            self._header_block_done(sid, first_flags, block, events)

    def _header_block_done(self, sid: int, flags: int, block: bytes,
                           events: list[tuple[Any, ...]]) -> None:
        headers = self._indexed_blocks.get(block)
        if headers is None:
            # Decode even for streams we refuse: the peer's HPACK table changes either way.
            try:
                headers = cast(list[tuple[bytes, bytes]], self._decoder.decode(block, raw=True))
            except OversizedHeaderListError:
                raise self._connection_error(ENHANCE_YOUR_CALM,
                                             "header list too large") from None
            except HPACKError as exc:
                raise self._connection_error(COMPRESSION_ERROR, f"HPACK: {exc}") from None
            if _only_indexed(block):
                if len(self._indexed_blocks) < INDEXED_BLOCK_CACHE:
                    self._indexed_blocks[block] = headers
            else:
                self._indexed_blocks.clear()  # the table may have changed
        stream = self._streams.get(sid)
        if stream is not None:  # trailers
            if stream.remote_closed or not flags & END_STREAM:
                self._stream_error(sid, PROTOCOL_ERROR if not stream.remote_closed
                                   else STREAM_CLOSED, events)
                return
            self._remote_end(sid, stream, events)
            return
        if not sid & 1:
            raise self._connection_error(PROTOCOL_ERROR, f"even stream id {sid} from a client")
        if sid <= self.highest_inbound_stream_id:
            # A closed stream (one we reset, or a reused id): nothing to deliver.
            self._out.append(frame_header(4, RST_STREAM, 0, sid) + _U32.pack(STREAM_CLOSED))
            return
        self.highest_inbound_stream_id = sid
        stream = _StreamState(self._peer_initial_window, self._stream_window)
        self._streams[sid] = stream
        events.append((EV_REQUEST, sid, headers))
        if flags & END_STREAM:
            self._remote_end(sid, stream, events)

    def _remote_end(self, sid: int, stream: _StreamState, events: list[tuple[Any, ...]]
                    ) -> None:
        stream.remote_closed = True
        events.append((EV_END, sid))
        if stream.local_closed:
            del self._streams[sid]
            self._local_only.pop(sid, None)

    def _on_window_update(self, sid: int, payload: bytes, events: list[tuple[Any, ...]]
                          ) -> None:
        if len(payload) != 4:
            raise self._connection_error(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _U32.unpack(payload)[0] & _SID_MASK
        if sid == 0:
            if not increment:
                raise self._connection_error(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise self._connection_error(FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            stream = self._streams.get(sid)
            if stream is None:
                if sid > self.highest_inbound_stream_id:
                    raise self._connection_error(PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
                return  # a closed stream: frames in flight
            if not increment:
                self._stream_error(sid, PROTOCOL_ERROR, events)
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self._stream_error(sid, FLOW_CONTROL_ERROR, events)
                return
        events.append((EV_WINDOW,))

    def _on_rst(self, sid: int, payload: bytes, events: list[tuple[Any, ...]]) -> None:
        if sid == 0:
            raise self._connection_error(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise self._connection_error(FRAME_SIZE_ERROR, "RST_STREAM length")
        if sid > self.highest_inbound_stream_id:
            raise self._connection_error(PROTOCOL_ERROR, "RST_STREAM on idle stream")
        self._local_only.pop(sid, None)
        stream = self._streams.pop(sid, None)
        if stream is not None and not stream.local_closed:
            events.append((EV_RESET, sid, _U32.unpack(payload)[0]))

    def _on_settings(self, sid: int, flags: int, payload: bytes,
                     events: list[tuple[Any, ...]]) -> None:
        if sid:
            raise self._connection_error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise self._connection_error(FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise self._connection_error(FRAME_SIZE_ERROR, "SETTINGS length")
        grew = False
        for offset in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, offset)
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise self._connection_error(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise self._connection_error(FLOW_CONTROL_ERROR,
                                                     "stream window overflow")
                grew = grew or delta > 0
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise self._connection_error(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.max_outbound_frame_size = value
            # Header table size: our encoder never uses the dynamic table. Others: unused.
        self._out.append(frame_header(0, SETTINGS, ACK, 0))
        if grew:
            events.append((EV_WINDOW,))

    def _on_ping(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise self._connection_error(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise self._connection_error(FRAME_SIZE_ERROR, "PING length")
        if not flags & ACK:
            self._out.append(frame_header(8, PING, ACK, 0) + bytes(payload))

    def _stream_error(self, sid: int, code: int, events: list[tuple[Any, ...]]) -> None:
        """Reset one stream and report it as reset, so its owner releases it."""
        self._local_only.pop(sid, None)
        stream = self._streams.pop(sid, None)
        self._out.append(frame_header(4, RST_STREAM, 0, sid) + _U32.pack(code))
        if stream is not None and not stream.local_closed:
            events.append((EV_RESET, sid, code))

    def _connection_error(self, code: int, message: str) -> ConnectionError:
        self._out.append(self.goaway_frame(code))
        return ConnectionError(code, message)

    # -- flow control (inbound) ---------------------------------------------------------

    def acknowledge(self, sid: int, size: int) -> None:
        """The caller consumed ``size`` bytes of a stream's DATA: give the window back
        (in batches of a quarter window)."""
        self.acknowledge_connection(size)
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed:
            return  # no more data comes on it: its window no longer matters
        stream.recv_unacked += size
        if stream.recv_unacked * ACK_FRACTION >= self._stream_window:
            self._window_update(sid, stream.recv_unacked)
            stream.recv_window += stream.recv_unacked
            stream.recv_unacked = 0

    def acknowledge_connection(self, size: int) -> None:
        """Give ``size`` bytes back to the connection window only (batched)."""
        self._recv_unacked += size
        if self._recv_unacked * ACK_FRACTION >= self._conn_granted:
            self._window_update(0, self._recv_unacked)
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0

    def open_stream_window(self, sid: int, size: int) -> None:
        """Grant a stream ``size`` more bytes now (after holding its acknowledgements)."""
        stream = self._streams.get(sid)
        if stream is None or stream.remote_closed or size <= 0:
            return
        self._window_update(sid, size)
        stream.recv_window += size

    def _window_update(self, sid: int, size: int) -> None:
        self._out.append(frame_header(4, WINDOW_UPDATE, 0, sid) + _U32.pack(size))

    # -- sending ------------------------------------------------------------------------

    def send_window(self, sid: int) -> int:
        """Bytes of DATA the peer accepts on ``sid`` now (0 if the stream is gone)."""
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            return 0
        return min(self._send_window, stream.send_window)

    def is_open(self, sid: int) -> bool:
        """Whether we may still send on ``sid``."""
        stream = self._streams.get(sid)
        return stream is not None and not stream.local_closed

    def send_headers(self, sid: int, headers: list[tuple[bytes, bytes]], *,
                     end_stream: bool = False, block: bytes | None = None) -> None:
        """Queue HEADERS (``block``: the headers already encoded). Raises
        :class:`StreamGoneError` when the stream is closed or reset."""
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            raise StreamGoneError(sid)
        if block is None:
            block = encode_headers(headers)
        flags = END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            self._out.append(frame_header(len(block), HEADERS, flags | END_HEADERS, sid) + block)
        else:
            self._out.append(frame_header(limit, HEADERS, flags, sid) + block[:limit])
            for i in range(limit, len(block), limit):
                piece = block[i:i + limit]
                last = END_HEADERS if i + limit >= len(block) else 0
                self._out.append(frame_header(len(piece), CONTINUATION, last, sid) + piece)
        if end_stream:
            self._local_end(sid, stream)

    def send_data(self, sid: int, data: bytes) -> int:
        """Queue as much of ``data`` as the windows allow, in frames of the peer's
        maximum size; returns the bytes queued. Raises :class:`StreamGoneError`."""
        stream = self._streams.get(sid)
        if stream is None or stream.local_closed:
            raise StreamGoneError(sid)
        size = len(data)
        window = min(self._send_window, stream.send_window)
        limit = self.max_outbound_frame_size
        if size <= window and size <= limit:  # the common case: one frame
            self._out.append(frame_header(size, DATA, 0, sid))
            self._out.append(data)
            self._send_window -= size
            stream.send_window -= size
            return size
        sent = 0
        out = self._out
        while sent < size and window > 0:
            piece = data[sent:sent + min(window, limit)]
            out.append(frame_header(len(piece), DATA, 0, sid))
            out.append(piece)
            sent += len(piece)
            window -= len(piece)
        self._send_window -= sent
        stream.send_window -= sent
        return sent

    def reset_stream(self, sid: int, code: int) -> None:
        """Queue RST_STREAM and forget the stream (no-op if already gone)."""
        self._local_only.pop(sid, None)
        if self._streams.pop(sid, None) is not None:
            self._out.append(frame_header(4, RST_STREAM, 0, sid) + _U32.pack(code))

    def _local_end(self, sid: int, stream: _StreamState) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self._streams[sid]
            return
        # We answered before the peer finished sending (a gRPC server may end a call
        # early). The peer closes its side in its own time; a peer that never does
        # cannot make us keep such streams without bound: past the limit the oldest is
        # reset with NO_ERROR, which RFC 9113 §8.1 allows after a complete response.
        self._local_only[sid] = None
        if len(self._local_only) > self._max_concurrent:
            oldest = next(iter(self._local_only))
            del self._local_only[oldest]
            if self._streams.pop(oldest, None) is not None:
                self._out.append(frame_header(4, RST_STREAM, 0, oldest) + _U32.pack(NO_ERROR))

    def goaway_frame(self, code: int = NO_ERROR) -> bytes:
        """A GOAWAY naming the last stream we accepted (not queued)."""
        return frame_header(8, GOAWAY, 0, 0) + _GOAWAY.pack(self.highest_inbound_stream_id,
                                                            code)

    @property
    def open_streams(self) -> int:
        """Streams not yet closed in both directions."""
        return len(self._streams)
