"""A lean gRPC-over-HTTP/2 server for the one method Envoy calls:
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` (bidirectional streaming).

Why not grpc.aio: its per-message cost in Python (a poller thread handing each read to
the event loop, a future and a task hop per message) dominated the EPP's CPU on the
request path — an ext_proc exchange is about eleven messages per HTTP request, plus one
per streamed response chunk. Here each connection is an asyncio protocol driving our own
HTTP/2 framing (:mod:`epp.extproc.http2`): a message is parsed and answered in the same
callback that read it; only the message that completes a request (the one that routes,
which may await tokenization) runs in a task.

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
import logging
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from epp.errors import RequestError
from epp.extproc import http2
from epp.extproc import messages as msg
from epp.extproc.stream import DEFAULT_MAX_BODY_BYTES, Director, ProtocolError, ProtocolStream
from epp.extproc.tls import TlsServerProtocol
from epp.extproc.tls import log as tls_log
from epp.supervise import LogLimiter

log = logging.getLogger(__name__)

PROCESS_PATH = f"/{msg.SERVICE_NAME}/{msg.METHOD_NAME}".encode()
# Flow-control windows we grant Envoy: large, so a 62 KB body chunk never waits for a
# WINDOW_UPDATE round trip; we acknowledge consumed bytes as we go.
RECEIVE_WINDOW = 16 * 1024 * 1024
STREAM_WINDOW = 4 * 1024 * 1024  # per stream, advertised in our SETTINGS
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
# Events about one stream: an exception handling one fails that stream only.
_STREAM_EVENTS = (http2.EV_REQUEST, http2.EV_DATA, http2.EV_END, http2.EV_RESET)
# The HPACK blocks we send most, encoded once (the encoder is stateless).
_GRPC_HEADERS_BLOCK = http2.encode_headers(_GRPC_HEADERS)
_OK_TRAILERS_BLOCK = http2.encode_headers(_OK_TRAILERS)
_OK_TRAILERS_ONLY_BLOCK = http2.encode_headers([*_GRPC_HEADERS, *_OK_TRAILERS])


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
        # The stream limit is advertised but enforced here, one stream at a time (see
        # _on_request): a stream over it is refused, the connection carries on.
        self._h2 = http2.ServerConnection(
            max_concurrent_streams=server.max_concurrent_streams,
            initial_stream_window=STREAM_WINDOW, connection_window=RECEIVE_WINDOW)
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, deque[bytes]] = {}  # data waiting for flow-control window
        self._tasks: set[asyncio.Task[None]] = set()
        self._held = 0  # bytes held for all streams (see CONNECTION_BUFFER)
        self._conn_unacked = 0  # inbound bytes not acknowledged at connection level
        self._write_paused = False
        self._peer_goaway = False
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._server.connections.add(self)
        self._h2.initiate_connection()
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
        except http2.ConnectionError as exc:
            log.warning("HTTP/2 protocol error from the proxy, closing its connection: %s",
                        exc)
            self._write_out()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            try:
                self._on_event(event)
            except Exception:
                if event[0] not in _STREAM_EVENTS:
                    raise
                # One stream's fault stays in that stream.
                log.exception("ext_proc stream %d failed handling event %d", event[1],
                              event[0])
                self._abort(event[1], http2.INTERNAL_ERROR)
        self._flush()

    def _on_event(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == http2.EV_DATA:
            self._on_data(event[1], event[2], event[3])
        elif kind == http2.EV_REQUEST:
            self._on_request(event[1], event[2])
        elif kind == http2.EV_END:
            self._on_end(event[1])
        elif kind == http2.EV_RESET:
            self._on_reset(event[1])
        elif kind == http2.EV_WINDOW:
            self._resume_sends()
        elif kind == http2.EV_GOAWAY:
            self._on_goaway(event[1])

    # -- events -----------------------------------------------------------------------

    def _on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        path = next((v for k, v in headers if k == b":path"), b"")
        if path != PROCESS_PATH or self._server.draining:
            status = _UNIMPLEMENTED if path != PROCESS_PATH else _UNAVAILABLE
            self._send_headers(sid, [*_GRPC_HEADERS, (b"grpc-status", status)],
                               end_stream=True)
            return
        if len(self._streams) >= self._server.max_concurrent_streams:
            self._reset(sid, http2.REFUSED_STREAM)
            return
        protocol = ProtocolStream(self._server.director,
                                  max_body_bytes=self._server.max_body_bytes)
        self._streams[sid] = _Stream(protocol)
        self._server.active_streams += 1

    def _on_data(self, sid: int, data: bytes, size: int) -> None:
        stream = self._streams.get(sid)
        if stream is None or stream.closed:
            if size:
                self._h2.acknowledge(sid, size)
            return
        self._ack(sid, stream, size)
        if stream.buffer:
            stream.buffer += data
            self._held += len(data)
            view: bytes | bytearray = stream.buffer
        else:
            view = data  # the common case: parse straight from the frame, no copy
        pos = 0
        end = len(view)
        max_message = self._server.max_message
        while end - pos >= 5:
            compressed, length = _PREFIX.unpack_from(view, pos)
            if compressed or length > max_message:
                self._fail(sid, stream, _RESOURCE_EXHAUSTED if length > max_message
                           else _UNIMPLEMENTED, b"compressed or oversized message")
                return
            if end - pos - 5 < length:
                break
            raw = view[pos + 5:pos + 5 + length]
            pos += 5 + length
            try:
                request = msg.ProcessingRequest.FromString(raw)
            except DecodeError:
                self._fail(sid, stream, _INVALID_ARGUMENT, b"undecodable ProcessingRequest")
                return
            self._dispatch(sid, stream, request)
            if stream.closed:
                return
            self._sync_body(stream)
        if view is stream.buffer:
            del stream.buffer[:pos]
            self._held -= pos
        elif pos < end:
            stream.buffer += view[pos:]  # a partial message waits for its next frame
            self._held += end - pos
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

    def _on_goaway(self, error_code: int) -> None:
        """The peer will open no more streams. Open ones may finish (RFC 9113 §6.8);
        the connection closes once they are done."""
        self._peer_goaway = True
        if error_code != http2.NO_ERROR:
            log.warning("the proxy sent GOAWAY with error %s", error_code)

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
            self._abort(sid, http2.INTERNAL_ERROR)
        self._flush()

    def _protocol_error(self, sid: int, stream: _Stream, exc: ProtocolError) -> None:
        log.warning("ext_proc stream %d: %s", sid, exc)
        self._fail(sid, stream, _INVALID_ARGUMENT, str(exc).encode()[:200])

    def _send(self, sid: int, stream: _Stream, responses: list[msg.Answer]) -> None:
        if not responses or stream.closed:
            return
        if not stream.headers_sent:
            if not self._send_headers(sid, _GRPC_HEADERS, block=_GRPC_HEADERS_BLOCK):
                return
            stream.headers_sent = True
        parts = []
        for response in responses:
            payload = response if type(response) is bytes else \
                response.SerializeToString()  # type: ignore[union-attr]
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
            sent = self._h2.send_data(sid, data)
        except http2.StreamGoneError:
            return  # the peer reset it; its reset event follows
        if sent < len(data):
            self._pending.setdefault(sid, deque()).append(data[sent:])
            stream.pending_bytes += len(data) - sent
            self._held += len(data) - sent

    def _resume_sends(self) -> None:
        for sid in list(self._pending):
            queue = self._pending[sid]
            stream = self._streams.get(sid)
            while queue:
                data = queue[0]
                try:
                    sent = self._h2.send_data(sid, data)
                except http2.StreamGoneError:
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
            self._h2.acknowledge_connection(size)
            stream.unacked += size
        else:
            self._h2.acknowledge(sid, size)

    def _release_backpressure(self) -> None:
        if self._write_paused or self._held > self._server.connection_buffer:
            return
        if self._conn_unacked:
            self._h2.acknowledge_connection(self._conn_unacked)
            self._conn_unacked = 0
        for sid, stream in self._streams.items():
            if stream.unacked and stream.pending_bytes <= STREAM_SEND_BUFFER:
                self._h2.open_stream_window(sid, stream.unacked)
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
                self._send_headers(sid, _OK_TRAILERS, end_stream=True, block=_OK_TRAILERS_BLOCK)
            else:
                self._send_headers(sid, [*_GRPC_HEADERS, *_OK_TRAILERS], end_stream=True,
                                   block=_OK_TRAILERS_ONLY_BLOCK)
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

    def _abort(self, sid: int, code: int) -> None:
        """End one stream with RST_STREAM, whatever state it is in."""
        stream = self._streams.pop(sid, None)
        self._drop_pending(sid)
        if stream is not None:
            self._close_stream(stream)
        self._reset(sid, code)

    def _reset(self, sid: int, code: int) -> None:
        self._h2.reset_stream(sid, code)

    def _send_headers(self, sid: int, headers: list[tuple[bytes, bytes]], *,
                      end_stream: bool = False, block: bytes | None = None) -> bool:
        """Send headers or trailers; False when the peer has closed the stream."""
        try:
            self._h2.send_headers(sid, headers, end_stream=end_stream, block=block)
        except http2.StreamGoneError:
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
        """Write what is queued at the end of this event-loop iteration: answers to every
        stream that made progress in it (reads, finished routing tasks) share one socket
        write, and over TLS one record, instead of one each."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_scheduled = False
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
        """Tell Envoy to open no new streams here; open ones finish."""
        self._write_out()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._h2.goaway_frame())

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

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; returns the bound port (``port`` 0 picks one). ``reuse_port`` shares
        the port with sibling processes (SO_REUSEPORT), as ``epp --workers`` does."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = self.connection_factory
        if self.ssl_context is not None:
            context = self.ssl_context
            factory = lambda: TlsServerProtocol(  # noqa: E731
                context, self.connection_factory(), self._tls_logs,
                handshaking=self._handshaking,
                on_failure=self._count_tls_failure)
        self._server = await loop.create_server(factory, host, port, reuse_address=True,
                                                reuse_port=reuse_port)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def connection_factory(self) -> _Connection:
        """The protocol for one cleartext HTTP/2 connection (TLS wraps it)."""
        return _Connection(self)

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
