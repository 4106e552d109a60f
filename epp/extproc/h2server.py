"""A lean gRPC-over-HTTP/2 server for the one method Envoy calls:
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` (bidirectional streaming).

Why not grpc.aio: its per-message cost in Python (a poller thread handing each read to
the event loop, a future and a task hop per message) dominated the EPP's CPU on the
request path — an ext_proc exchange is about eleven messages per HTTP request. Here
each connection is an asyncio protocol driving the ``h2`` state machine: a message is
parsed and answered in the same callback that read it; only the message that completes
a request (the one that routes, which may await tokenization) runs in a task.

Invariants (each has a test in ``tests/unit/test_h2_faults.py``):

- A stream-level event (reset, end, an undecodable or oversized message, any exception
  while handling it) ends only that stream, with a gRPC status or ``RST_STREAM``; the
  connection and the other requests multiplexed on it go on.
- A stream over the concurrency limit is refused with ``REFUSED_STREAM`` (RFC 9113
  §5.1.2), never a connection error, including before the peer has our SETTINGS.
- A reset or connection loss at any phase cancels the stream's routing and settles its
  request exactly once (see ``ProtocolStream.close``).
- Flow control is end to end: when Envoy stops reading a stream, we stop acknowledging
  that stream's data, so Envoy stops sending it; bytes held per stream and per
  connection are bounded.
- A peer GOAWAY lets open streams finish.

Scope: HTTP/2 over TLS (ALPN ``h2``, terminated per connection by
:mod:`epp.extproc.tls`) or cleartext with prior knowledge (h2c), as Envoy's gRPC client
speaks them; uncompressed gRPC messages; unknown methods are answered with UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from google.protobuf.message import DecodeError
from hyperframe.frame import GoAwayFrame

from epp.errors import RequestError
from epp.extproc import messages as msg
from epp.extproc.stream import DEFAULT_MAX_BODY_BYTES, Director, ProtocolError, ProtocolStream
from epp.extproc.tls import TlsServerProtocol
from epp.extproc.tls import log as tls_log
from epp.supervise import LogLimiter

log = logging.getLogger(__name__)

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# Flow-control windows we grant Envoy: large, so a 62 KB body chunk never waits for a
# WINDOW_UPDATE round trip; we acknowledge consumed bytes as we go.
RECEIVE_WINDOW = 16 * 1024 * 1024
STREAM_WINDOW_BOOST = 4 * 1024 * 1024 - 65_535  # per stream, on top of the default 64 KiB
# Concurrent streams per connection. gRPC servers advertise no limit; Envoy's default
# circuit breaker admits 1,024 requests per cluster, and an ext_proc stream is one
# request, so 10,000 is never the bottleneck for one Envoy yet still bounds a hostile
# peer (each idle stream costs ~2 KB here).
DEFAULT_MAX_CONCURRENT_STREAMS = 10_000
# Echoed bytes we hold for a stream whose reader (Envoy, for a slow client) stopped
# granting window: past this we stop acknowledging its inbound data. 1 MiB is ~16 body
# chunks, enough to ride out a short stall without a round trip of backpressure.
STREAM_SEND_BUFFER = 1024 * 1024
# Bytes held per connection — echoed bytes waiting for window, partial gRPC messages and
# request bodies collected until they are complete. 256 MiB is sixteen maximum-size
# bodies (16 MiB each) in flight at once on one connection; past it new data is refused.
CONNECTION_BUFFER = 256 * 1024 * 1024
# The largest gRPC message accepted: a maximum-size request body (BUFFERED mode sends it
# in one message) plus headers and framing.
MESSAGE_OVERHEAD = 1024 * 1024
_GRPC_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]
_PREFIX = struct.Struct(">BI")
# gRPC status codes used here.
_INVALID_ARGUMENT = b"3"
_RESOURCE_EXHAUSTED = b"8"
_UNIMPLEMENTED = b"12"
_INTERNAL = b"13"
_UNAVAILABLE = b"14"
# Every h2 error a send on a stream the peer already closed can raise.
_STREAM_GONE = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError)


class _AdvertisedSettings(h2.settings.Settings):
    """Local settings that advertise our stream limit but leave enforcing it to us:
    h2 treats one stream over the limit as a connection error, which would fail every
    request on the connection; we refuse just that stream with REFUSED_STREAM."""

    @property
    def max_concurrent_streams(self) -> int:
        return 2**31 - 1

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = value


class _Stream:
    """One gRPC call: an ext_proc ProtocolStream plus framing and ordering state."""

    __slots__ = ("protocol", "buffer", "queue", "busy", "ended", "closed", "headers_sent",
                 "task", "unacked", "pending_bytes", "body_held")

    def __init__(self, protocol: ProtocolStream) -> None:
        self.protocol = protocol
        self.buffer = bytearray()  # a partially received gRPC message
        self.queue: deque[msg.ProcessingRequest] = deque()  # waiting behind a routing task
        self.busy = False
        self.ended = False  # client half-closed
        self.closed = False
        self.headers_sent = False
        self.task: asyncio.Task[None] | None = None
        self.unacked = 0  # inbound bytes not yet acknowledged (stream-level backpressure)
        self.pending_bytes = 0  # outbound bytes waiting for the peer's window
        self.body_held = 0  # request body bytes the protocol stream holds (last seen)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy."""

    def __init__(self, server: H2ExtProcServer) -> None:
        self._server = server
        self._h2 = h2.connection.H2Connection(server.h2_config)
        self._h2.local_settings = _AdvertisedSettings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE:
                self._h2.DEFAULT_MAX_HEADER_LIST_SIZE,
        })
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, deque[bytes]] = {}  # data waiting for flow-control window
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = 0  # bytes held for all streams (see CONNECTION_BUFFER)
        self._conn_unacked = 0  # inbound bytes not acknowledged at connection level
        self._write_paused = False
        self._peer_goaway = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._server.connections.add(self)
        # Windows are widened with WINDOW_UPDATE frames (valid at once), not SETTINGS
        # (valid only after the peer's ACK, which races its first data frames).
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(RECEIVE_WINDOW)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for stream in self._streams.values():
            self._close_stream(stream)
        self._streams.clear()
        self._pending.clear()
        for task in self._tasks:
            task.cancel()

    def pause_writing(self) -> None:
        # The socket's send buffer is full: Envoy is not reading this connection.
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_backpressure()
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from the proxy, closing its connection: %s",
                        exc)
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            try:
                self._on_event(event)
            except Exception:
                sid = getattr(event, "stream_id", None)
                if not sid:
                    raise
                # One stream's fault stays in that stream.
                log.exception("ext_proc stream %d failed handling %s", sid,
                              type(event).__name__)
                self._abort(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._flush()

    def _on_event(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.DataReceived:
            self._on_data(event)  # type: ignore[arg-type]
        elif kind is h2.events.RequestReceived:
            self._on_request(event)  # type: ignore[arg-type]
        elif kind is h2.events.StreamEnded:
            self._on_end(event.stream_id)  # type: ignore[attr-defined]
        elif kind is h2.events.StreamReset:
            self._on_reset(event.stream_id)  # type: ignore[attr-defined]
        elif kind is h2.events.WindowUpdated:
            self._resume_sends()
        elif kind is h2.events.ConnectionTerminated:
            self._on_goaway(event)  # type: ignore[arg-type]

    # -- events -----------------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        path = next((v for k, v in event.headers or () if k == b":path"), b"")
        if path != PROCESS_PATH or self._server.draining:
            status = _UNIMPLEMENTED if path != PROCESS_PATH else _UNAVAILABLE
            self._send_headers(sid, [*_GRPC_HEADERS, (b"grpc-status", status)],
                               end_stream=True)
            return
        if len(self._streams) >= self._server.max_concurrent_streams:
            self._reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        protocol = ProtocolStream(self._server.director,
                                  max_body_bytes=self._server.max_body_bytes)
        self._streams[sid] = _Stream(protocol)
        self._server.active_streams += 1
        # The stream may already be closed by a RST_STREAM read in the same batch; its
        # StreamReset event follows and releases it.
        with contextlib.suppress(*_STREAM_GONE):
            self._h2.increment_flow_control_window(STREAM_WINDOW_BOOST, stream_id=sid)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        size = event.flow_controlled_length
        stream = self._streams.get(sid)
        if stream is None or stream.closed:
            if size:
                self._h2.acknowledge_received_data(size, sid)
            return
        self._ack(sid, stream, size)
        buf = stream.buffer
        before = len(buf)
        buf += event.data
        self._held += len(buf) - before
        while len(buf) >= 5:
            compressed, length = _PREFIX.unpack_from(buf)
            if compressed or length > self._server.max_message:
                self._fail(sid, stream, _RESOURCE_EXHAUSTED if length > self._server.max_message
                           else _UNIMPLEMENTED,
                           b"compressed or oversized message")
                return
            if len(buf) < 5 + length:
                break
            raw = bytes(buf[5:5 + length])
            del buf[:5 + length]
            self._held -= 5 + length
            try:
                request = msg.ProcessingRequest.FromString(raw)
            except DecodeError:
                self._fail(sid, stream, _INVALID_ARGUMENT, b"undecodable ProcessingRequest")
                return
            self._dispatch(sid, stream, request)
            if stream.closed:
                return
            self._sync_body(stream)
        if self._held > self._server.connection_buffer and stream.protocol.routed is None:
            # Only requests still collecting a body are refused: echoed bytes of routed
            # ones are bounded by the windows we stopped granting (see _ack).
            self._overflow(sid, stream)

    def _on_end(self, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        stream.ended = True
        if not stream.busy:
            self._finish(sid, stream)

    def _on_reset(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        self._drop_pending(sid)
        if stream is not None:
            self._close_stream(stream)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """The peer will open no more streams. Open ones may finish (RFC 9113 §6.8):
        h2 closes its state machine on any GOAWAY, so reopen it for the streams we
        still owe answers, and close the connection once they are done."""
        self._peer_goaway = True
        if event.error_code != h2.errors.ErrorCodes.NO_ERROR:
            log.warning("the proxy sent GOAWAY with error %s", event.error_code)
        if self._streams:
            self._h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN

    # -- message handling -------------------------------------------------------------

    def _dispatch(self, sid: int, stream: _Stream, request: msg.ProcessingRequest) -> None:
        if stream.busy:
            stream.queue.append(request)
            return
        if stream.protocol.needs_routing(request):
            stream.busy = True
            task = asyncio.get_running_loop().create_task(self._route(sid, stream, request))
            stream.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            responses = stream.protocol.handle_now(request)
        except ProtocolError as exc:
            self._protocol_error(sid, stream, exc)
            return
        self._send(sid, stream, responses)

    async def _route(self, sid: int, stream: _Stream, request: msg.ProcessingRequest) -> None:
        try:
            responses = await stream.protocol.handle(request)
        except asyncio.CancelledError:
            return
        except ProtocolError as exc:
            self._protocol_error(sid, stream, exc)
            self._flush()
            return
        stream.task = None
        if stream.closed:
            return
        self._sync_body(stream)
        try:
            self._send(sid, stream, responses)
            stream.busy = False
            while stream.queue and not stream.busy and not stream.closed:
                self._dispatch(sid, stream, stream.queue.popleft())
            if stream.ended and not stream.busy and not stream.closed:
                self._finish(sid, stream)
        except Exception:
            log.exception("ext_proc stream %d failed after routing", sid)
            self._abort(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._flush()

    def _protocol_error(self, sid: int, stream: _Stream, exc: ProtocolError) -> None:
        log.warning("ext_proc stream %d: %s", sid, exc)
        self._fail(sid, stream, _INVALID_ARGUMENT, str(exc).encode()[:200])

    def _send(self, sid: int, stream: _Stream, responses: list[msg.ProcessingResponse]) -> None:
        if not responses or stream.closed:
            return
        if not stream.headers_sent:
            if not self._send_headers(sid, _GRPC_HEADERS):
                return
            stream.headers_sent = True
        parts = []
        for response in responses:
            payload = response.SerializeToString()
            parts.append(_PREFIX.pack(0, len(payload)))
            parts.append(payload)
        self._send_data(sid, stream, b"".join(parts))

    def _send_data(self, sid: int, stream: _Stream, data: bytes) -> None:
        pending = self._pending.get(sid)
        if pending:
            pending.append(data)
            stream.pending_bytes += len(data)
            self._held += len(data)
            return
        try:
            sent = self._write_window(sid, data)
        except _STREAM_GONE:
            return  # the peer reset it; its StreamReset event follows
        if sent < len(data):
            self._pending.setdefault(sid, deque()).append(data[sent:])
            stream.pending_bytes += len(data) - sent
            self._held += len(data) - sent

    def _write_window(self, sid: int, data: bytes) -> int:
        """Send as much of ``data`` as flow control allows; returns bytes sent."""
        h2c = self._h2
        sent = 0
        while sent < len(data):
            window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if window <= 0:
                break
            chunk = data[sent:sent + window]
            h2c.send_data(sid, chunk)
            sent += len(chunk)
        return sent

    def _resume_sends(self) -> None:
        for sid in list(self._pending):
            queue = self._pending[sid]
            stream = self._streams.get(sid)
            while queue:
                data = queue[0]
                try:
                    sent = self._write_window(sid, data)
                except _STREAM_GONE:
                    self._drop_pending(sid)
                    break
                if stream is not None:
                    stream.pending_bytes -= sent
                self._held -= sent
                if sent < len(data):
                    queue[0] = data[sent:]
                    break
                queue.popleft()
            if sid in self._pending and not queue:
                del self._pending[sid]
            if stream is not None and sid not in self._pending and stream.ended \
                    and not stream.busy and not stream.closed:
                self._finish(sid, stream)
        self._release_backpressure()

    def _drop_pending(self, sid: int) -> None:
        queue = self._pending.pop(sid, None)
        if queue:
            dropped = sum(len(d) for d in queue)
            self._held -= dropped
            stream = self._streams.get(sid)
            if stream is not None:
                stream.pending_bytes -= dropped

    # -- flow control -----------------------------------------------------------------

    def _ack(self, sid: int, stream: _Stream, size: int) -> None:
        """Acknowledge inbound bytes unless the stream's or the connection's reader is
        stalled: then hold the acknowledgement, which stops the peer sending."""
        if not size:
            return
        if self._write_paused or self._held > self._server.connection_buffer:
            self._conn_unacked += size
            stream.unacked += size
        elif stream.unacked or stream.pending_bytes > STREAM_SEND_BUFFER:
            # Only this stream waits; the connection window stays open for the others.
            self._h2.increment_flow_control_window(size)
            stream.unacked += size
        else:
            self._h2.acknowledge_received_data(size, sid)

    def _release_backpressure(self) -> None:
        if self._write_paused or self._held > self._server.connection_buffer:
            return
        if self._conn_unacked:
            self._h2.increment_flow_control_window(self._conn_unacked)
            self._conn_unacked = 0
        for sid, stream in self._streams.items():
            if stream.unacked and stream.pending_bytes <= STREAM_SEND_BUFFER:
                with contextlib.suppress(*_STREAM_GONE):
                    self._h2.increment_flow_control_window(stream.unacked, stream_id=sid)
                stream.unacked = 0

    def _sync_body(self, stream: _Stream) -> None:
        """Count the request body the protocol stream holds against the connection."""
        held = stream.protocol.buffered_bytes
        self._held += held - stream.body_held
        stream.body_held = held

    def _overflow(self, sid: int, stream: _Stream) -> None:
        """The connection holds too much: refuse the request that grew it last."""
        log.warning("ext_proc connection holds more than %d bytes; refusing stream %d",
                    self._server.connection_buffer, sid)
        if stream.protocol.routed is None and not stream.headers_sent:
            error = RequestError("the endpoint picker is buffering too much request data; "
                                 "retry later", status=429)
            self._send(sid, stream, [stream.protocol.refuse(error)])
            self._finish(sid, stream, force=True)
        else:
            self._fail(sid, stream, _RESOURCE_EXHAUSTED, b"connection buffer exceeded")

    # -- endings ----------------------------------------------------------------------

    def _finish(self, sid: int, stream: _Stream, *, force: bool = False) -> None:
        if sid in self._pending and not force:
            return  # trailers follow the data once the window opens
        self._streams.pop(sid, None)
        if not stream.closed:
            if stream.headers_sent:
                self._send_headers(sid, _OK_TRAILERS, end_stream=True)
            else:
                self._send_headers(sid, [*_GRPC_HEADERS, *_OK_TRAILERS], end_stream=True)
        self._close_stream(stream)

    def _fail(self, sid: int, stream: _Stream, status: bytes, message: bytes) -> None:
        """End one stream with a gRPC error status."""
        self._streams.pop(sid, None)
        self._drop_pending(sid)
        if not stream.closed:
            headers = [] if stream.headers_sent else list(_GRPC_HEADERS)
            self._send_headers(sid, [*headers, (b"grpc-status", status),
                                     (b"grpc-message", message)], end_stream=True)
        self._close_stream(stream)

    def _abort(self, sid: int, code: h2.errors.ErrorCodes) -> None:
        """End one stream with RST_STREAM, whatever state it is in."""
        stream = self._streams.pop(sid, None)
        self._drop_pending(sid)
        if stream is not None:
            self._close_stream(stream)
        self._reset(sid, code)

    def _reset(self, sid: int, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(*_STREAM_GONE):
            self._h2.reset_stream(sid, code)

    def _send_headers(self, sid: int, headers: list[tuple[bytes, bytes]], *,
                      end_stream: bool = False) -> bool:
        """Send headers or trailers; False when the peer has closed the stream."""
        try:
            self._h2.send_headers(sid, headers, end_stream=end_stream)
        except _STREAM_GONE:
            return False
        return True

    def _close_stream(self, stream: _Stream) -> None:
        if not stream.closed:
            stream.closed = True
            self._server.active_streams -= 1
            self._held -= len(stream.buffer) + stream.body_held
            stream.buffer = bytearray()
            stream.body_held = 0
            if stream.task is not None:
                stream.task.cancel()  # routing for a stream nobody waits for
                stream.task = None
            stream.protocol.close()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if self._peer_goaway and not self._streams:
            transport.close()  # the proxy said goodbye and nothing is owed any more

    # -- shutdown ---------------------------------------------------------------------

    def goaway(self) -> None:
        """Tell Envoy to open no new streams here; open ones finish. The GOAWAY frame is
        written directly: h2's close_connection() would also stop the state machine,
        and with it the streams we are letting finish."""
        self._flush()
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = self._h2.highest_inbound_stream_id
        frame.error_code = 0
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame.serialize())

    def abort(self) -> None:
        """Drop the connection now."""
        if self._transport is not None:
            self._transport.close()

    @property
    def idle(self) -> bool:
        return not self._streams

    @property
    def held_bytes(self) -> int:
        """Bytes this connection holds: partial messages, request bodies, echoes."""
        return self._held


class H2ExtProcServer:
    """Serves ext_proc streams on one TCP port."""

    def __init__(self, director: Director, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
                 connection_buffer: int = CONNECTION_BUFFER,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
        self.director = director
        self.max_body_bytes = max_body_bytes
        self.max_message = max_body_bytes + MESSAGE_OVERHEAD
        self.max_concurrent_streams = max_concurrent_streams
        self.connection_buffer = connection_buffer
        self.h2_config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            validate_outbound_headers=False, normalize_inbound_headers=False,
            normalize_outbound_headers=False)
        self.connections: set[_Connection] = set()
        self.active_streams = 0
        self.draining = False
        # TLS when set (the context's certificate may be replaced while serving: new
        # handshakes present the new one); cleartext h2c otherwise.
        self.ssl_context = ssl_context
        self.tls_failures = 0  # connections that failed their handshake (or spoke cleartext)
        self.on_tls_failure: Callable[[str], None] | None = None  # a metric, by kind
        self._tls_logs = LogLimiter(tls_log)
        self._handshaking: set[TlsServerProtocol] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks one)."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = lambda: _Connection(self)  # noqa: E731
        if self.ssl_context is not None:
            context = self.ssl_context
            factory = lambda: TlsServerProtocol(  # noqa: E731
                context, _Connection(self), self._tls_logs, handshaking=self._handshaking,
                on_failure=self._count_tls_failure)
        self._server = await loop.create_server(factory, host, port, reuse_address=True)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def _count_tls_failure(self, reason: str) -> None:
        self.tls_failures += 1
        if self.on_tls_failure is not None:
            # A bounded label: OpenSSL's reason strings stay in the log line.
            if reason == "handshake timeout":
                kind = "timeout"
            elif reason.startswith("handshake"):
                kind = "handshake_error"
            else:
                kind = "cleartext"
            self.on_tls_failure(kind)

    async def stop(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, let open streams finish within
        ``grace`` seconds, then drop what is left."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for pending in list(self._handshaking):
            pending.abort()  # no streams yet: nothing to let finish
        for conn in list(self.connections):
            conn.goaway()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.active_streams > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()


__all__ = ["DEFAULT_MAX_CONCURRENT_STREAMS", "H2ExtProcServer", "PROCESS_PATH"]
