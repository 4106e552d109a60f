"""A lean gRPC-over-HTTP/2 server for the one method Envoy calls:
``envoy.service.ext_proc.v3.ExternalProcessor/Process`` (bidirectional streaming).

Why not grpc.aio: its per-message cost in Python (a poller thread handing each read to
the event loop, a future and a task hop per message) dominated the EPP's CPU on the
request path — an ext_proc exchange is about eleven messages per HTTP request. Here
each connection is an asyncio protocol driving the ``h2`` state machine: a message is
parsed and answered in the same callback that read it; only the message that completes
a request (the one that routes, which may await tokenization) runs in a task.

Scope: HTTP/2 cleartext (h2c) with prior knowledge, as Envoy's gRPC client speaks it;
uncompressed gRPC messages; unknown methods are answered with UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import GoAwayFrame

from epp.extproc import messages as msg
from epp.extproc.stream import DEFAULT_MAX_BODY_BYTES, Director, ProtocolStream

log = logging.getLogger(__name__)

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# Flow-control windows we grant Envoy: large, so a 62 KB body chunk never waits for a
# WINDOW_UPDATE round trip; we acknowledge consumed bytes as we go.
RECEIVE_WINDOW = 16 * 1024 * 1024
STREAM_WINDOW_BOOST = 4 * 1024 * 1024 - 65_535  # per stream, on top of the default 64 KiB
# A gRPC message larger than this is refused (Envoy sends body chunks of at most ~64 KB).
MAX_MESSAGE = 32 * 1024 * 1024
_GRPC_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]
_PREFIX = struct.Struct(">BI")


class _Stream:
    """One gRPC call: an ext_proc ProtocolStream plus framing and ordering state."""

    __slots__ = ("protocol", "buffer", "queue", "busy", "ended", "closed", "headers_sent")

    def __init__(self, protocol: ProtocolStream) -> None:
        self.protocol = protocol
        self.buffer = bytearray()
        self.queue: deque[msg.ProcessingRequest] = deque()  # waiting behind a routing task
        self.busy = False
        self.ended = False  # client half-closed
        self.closed = False
        self.headers_sent = False


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy."""

    def __init__(self, server: H2ExtProcServer) -> None:
        self._server = server
        self._h2 = h2.connection.H2Connection(server.h2_config)
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, deque[bytes]] = {}  # data waiting for flow-control window
        self._tasks: set[asyncio.Task[None]] = set()

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
        for task in self._tasks:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from the proxy: %s", exc)
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
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
                if self._transport is not None:
                    self._transport.close()
        self._flush()

    # -- events -----------------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        path = next((v for k, v in event.headers or () if k == b":path"), b"")
        if path != PROCESS_PATH or self._server.draining:
            status = b"12" if path != PROCESS_PATH else b"14"  # UNIMPLEMENTED / UNAVAILABLE
            self._h2.send_headers(sid, [*_GRPC_HEADERS, (b"grpc-status", status)],
                                  end_stream=True)
            return
        self._streams[sid] = _Stream(ProtocolStream(
            self._server.director, max_body_bytes=self._server.max_body_bytes))
        self._h2.increment_flow_control_window(STREAM_WINDOW_BOOST, stream_id=sid)
        self._server.active_streams += 1

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        if event.flow_controlled_length:
            self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
        stream = self._streams.get(sid)
        if stream is None or stream.closed:
            return
        buf = stream.buffer
        buf += event.data
        while len(buf) >= 5:
            compressed, length = _PREFIX.unpack_from(buf)
            if compressed or length > MAX_MESSAGE:
                self._fail(sid, stream, b"13", b"compressed or oversized message")
                return
            if len(buf) < 5 + length:
                break
            request = msg.ProcessingRequest.FromString(bytes(buf[5:5 + length]))
            del buf[:5 + length]
            self._dispatch(sid, stream, request)

    def _on_end(self, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        stream.ended = True
        if not stream.busy:
            self._finish(sid, stream)

    def _on_reset(self, sid: int) -> None:
        stream = self._streams.pop(sid, None)
        self._pending.pop(sid, None)
        if stream is not None:
            self._close_stream(stream)

    # -- message handling -------------------------------------------------------------

    def _dispatch(self, sid: int, stream: _Stream, request: msg.ProcessingRequest) -> None:
        if stream.busy:
            stream.queue.append(request)
            return
        if stream.protocol.needs_routing(request):
            stream.busy = True
            task = asyncio.get_running_loop().create_task(self._route(sid, stream, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._send(sid, stream, stream.protocol.handle_now(request))

    async def _route(self, sid: int, stream: _Stream, request: msg.ProcessingRequest) -> None:
        try:
            responses = await stream.protocol.handle(request)
        except asyncio.CancelledError:
            return
        if stream.closed:
            return
        self._send(sid, stream, responses)
        stream.busy = False
        while stream.queue and not stream.busy:
            self._dispatch(sid, stream, stream.queue.popleft())
        if stream.ended and not stream.busy:
            self._finish(sid, stream)
        self._flush()

    def _send(self, sid: int, stream: _Stream, responses: list[msg.ProcessingResponse]) -> None:
        if not responses or stream.closed:
            return
        if not stream.headers_sent:
            self._h2.send_headers(sid, _GRPC_HEADERS)
            stream.headers_sent = True
        parts = []
        for response in responses:
            payload = response.SerializeToString()
            parts.append(_PREFIX.pack(0, len(payload)))
            parts.append(payload)
        self._send_data(sid, b"".join(parts))

    def _send_data(self, sid: int, data: bytes) -> None:
        pending = self._pending.get(sid)
        if pending:
            pending.append(data)
            return
        sent = self._write_window(sid, data)
        if sent < len(data):
            self._pending.setdefault(sid, deque()).append(data[sent:])

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
            while queue:
                data = queue[0]
                try:
                    sent = self._write_window(sid, data)
                except h2.exceptions.StreamClosedError:
                    queue.clear()
                    break
                if sent < len(data):
                    queue[0] = data[sent:]
                    break
                queue.popleft()
            if not queue:
                del self._pending[sid]
                stream = self._streams.get(sid)
                if stream is not None and stream.ended and not stream.busy:
                    self._finish(sid, stream)

    def _finish(self, sid: int, stream: _Stream) -> None:
        if sid in self._pending:
            return  # trailers follow the data once the window opens
        self._streams.pop(sid, None)
        if not stream.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                if stream.headers_sent:
                    self._h2.send_headers(sid, _OK_TRAILERS, end_stream=True)
                else:
                    self._h2.send_headers(sid, [*_GRPC_HEADERS, *_OK_TRAILERS], end_stream=True)
        self._close_stream(stream)

    def _fail(self, sid: int, stream: _Stream, status: bytes, message: bytes) -> None:
        self._streams.pop(sid, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            headers = [] if stream.headers_sent else list(_GRPC_HEADERS)
            self._h2.send_headers(sid, [*headers, (b"grpc-status", status),
                                        (b"grpc-message", message)], end_stream=True)
        self._close_stream(stream)

    def _close_stream(self, stream: _Stream) -> None:
        if not stream.closed:
            stream.closed = True
            self._server.active_streams -= 1
            stream.protocol.close()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

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


class H2ExtProcServer:
    """Serves ext_proc streams on one TCP port."""

    def __init__(self, director: Director, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
                 ) -> None:
        self.director = director
        self.max_body_bytes = max_body_bytes
        self.h2_config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            validate_outbound_headers=False, normalize_inbound_headers=False,
            normalize_outbound_headers=False)
        self.connections: set[_Connection] = set()
        self.active_streams = 0
        self.draining = False
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                reuse_address=True)
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, let open streams finish within
        ``grace`` seconds, then drop what is left."""
        self.draining = True
        if self._server is not None:
            self._server.close()
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


__all__ = ["H2ExtProcServer", "PROCESS_PATH"]
