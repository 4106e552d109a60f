"""A raw HTTP/2 gRPC client on the ``h2`` state machine, for frame-level tests of the
ext_proc transports: it can coalesce frames, reset streams at any phase, open streams
before reading the server's SETTINGS, and stop granting flow-control window."""

from __future__ import annotations

import asyncio
import ssl
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from epp.extproc import messages as msg

PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
_PREFIX = struct.Struct(">BI")


def frame(message: msg.ProcessingRequest | bytes) -> bytes:
    """One gRPC length-prefixed message."""
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    return _PREFIX.pack(0, len(payload)) + payload


def grpc_headers(path: str = PROCESS_PATH) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "epp"), ("content-type", "application/grpc"), ("te", "trailers")]


@dataclass
class StreamResult:
    """What the server sent on one stream."""

    data: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None  # RST_STREAM error code from the server
    ended: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def grpc_status(self) -> bytes | None:
        return self.trailers.get(b"grpc-status")

    def messages(self) -> list[msg.ProcessingResponse]:
        out, view, pos = [], bytes(self.data), 0
        while pos + 5 <= len(view):
            _, length = _PREFIX.unpack_from(view, pos)
            out.append(msg.ProcessingResponse.FromString(view[pos + 5:pos + 5 + length]))
            pos += 5 + length
        return out

    def kinds(self) -> list[str]:
        return [m.WhichOneof("response") or "" for m in self.messages()]


class H2Client:
    """One HTTP/2 connection to an ext_proc server."""

    def __init__(self, *, window: int | None = None) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.results: dict[int, StreamResult] = {}
        self.no_ack: set[int] = set()  # streams whose data we never acknowledge
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.error: Exception | None = None  # why the connection ended, if it failed
        self._window = window
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self, port: int, *, send_preface: bool = True,
                      tls: ssl.SSLContext | None = None) -> None:
        """Connect (over TLS when ``tls`` is given, for the name localhost)."""
        self._reader, self._writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None)
        if self._window is not None:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._window})
        self.conn.initiate_connection()
        if send_preface:
            self.flush()
        self._task = asyncio.get_running_loop().create_task(self._read())

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def write_raw(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    def open(self, path: str = PROCESS_PATH, *, end_stream: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.results[sid] = StreamResult()
        self.conn.send_headers(sid, grpc_headers(path), end_stream=end_stream)
        return sid

    def send(self, sid: int, *messages: msg.ProcessingRequest | bytes,
             end_stream: bool = False) -> None:
        payload = b"".join(frame(m) for m in messages)
        self.send_bytes(sid, payload, end_stream=end_stream)

    def send_bytes(self, sid: int, payload: bytes, *, end_stream: bool = False) -> None:
        max_frame = self.conn.max_outbound_frame_size
        for i in range(0, len(payload), max_frame):
            last = i + max_frame >= len(payload)
            self.conn.send_data(sid, payload[i:i + max_frame], end_stream=end_stream and last)
        if not payload and end_stream:
            self.conn.end_stream(sid)

    async def write(self, sid: int, payload: bytes, *, end_stream: bool = False,
                    timeout: float = 10.0) -> None:
        """Send ``payload`` as flow control allows, waiting for window as a peer does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pos = 0
        while pos < len(payload):
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                if loop.time() > deadline:
                    raise TimeoutError(f"no flow-control window on stream {sid}")
                await asyncio.sleep(0.005)
                continue
            self.conn.send_data(sid, payload[pos:pos + window])
            pos += window
            self.flush()
        if end_stream:
            self.conn.end_stream(sid)
            self.flush()

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)

    async def wait(self, sid: int, timeout: float = 10.0) -> StreamResult:
        result = self.results[sid]
        await asyncio.wait_for(result.done.wait(), timeout)
        return result

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self._on_event(event)
                self.flush()
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError) as exc:
            self.error = exc
        finally:
            self.closed.set()
            for result in self.results.values():
                result.done.set()

    def _on_event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        result = self.results.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and result is not None:
            result.headers = list(event.headers)
            # A trailers-only answer carries grpc-status in the headers.
            for k, v in event.headers:
                if k == b"grpc-status" or k == b"grpc-message":
                    result.trailers[k] = v
        elif isinstance(event, h2.events.DataReceived):
            if result is not None:
                result.data += event.data
            size = event.flow_controlled_length
            if size and sid in self.no_ack:
                # A slow reader on one stream: the connection window still reopens.
                self.conn.increment_flow_control_window(size)
            elif size:
                self.conn.acknowledge_received_data(size, sid)
        elif isinstance(event, h2.events.TrailersReceived) and result is not None:
            result.trailers.update(dict(event.headers))
        elif isinstance(event, h2.events.StreamEnded) and result is not None:
            result.ended = True
            result.done.set()
        elif isinstance(event, h2.events.StreamReset) and result is not None:
            result.reset = event.error_code
            result.done.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except ConnectionError:
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
