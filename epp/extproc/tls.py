"""TLS for the lean HTTP/2 ext_proc server, terminated inside the connection's protocol.

Why not ``loop.create_server(..., ssl=context)``: asyncio (and uvloop) swallow a failed
handshake — the application protocol never hears of the connection, and the error is
logged only in debug mode. A gateway misconfigured to speak cleartext h2c to the TLS
port would then fail every request with nothing in the EPP's log. Here each connection
drives an ``ssl.SSLObject`` over memory BIOs (what asyncio's own SSL transport does), so
a failed handshake is logged with the peer and the reason — and a cleartext client is
named as such — while the server goes on serving everyone else.

The certificate lives in one shared ``SSLContext``: loading a rotated certificate into
it changes what new handshakes present; established connections keep their session.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from epp.supervise import LogLimiter

log = logging.getLogger(__name__)

# A peer that has not finished its handshake after this long is gone or hostile: five
# times the reference Envoy config's connect_timeout (2 s), which in Envoy includes the
# TLS handshake, so a slow but live gateway is never cut off.
HANDSHAKE_TIMEOUT_S = 10.0
# Plaintext read per SSLObject.read call: sixteen maximum-size TLS records.
READ_CHUNK = 256 * 1024
# The first byte of every TLS record a client opens with (content type "handshake").
_TLS_HANDSHAKE_RECORD = 0x16
_H2C_PREFACE = b"PRI * HTTP/2.0"


def describe_cleartext(first: bytes) -> str | None:
    """Name what a client that opened with ``first`` speaks, if it is not TLS."""
    if not first or first[0] == _TLS_HANDSHAKE_RECORD:
        return None
    if first.startswith(_H2C_PREFACE[:len(first)]):
        return "cleartext HTTP/2 (h2c)"
    if first[:1].isalpha():
        return "cleartext HTTP/1"
    return "something other than TLS"


class _PlaintextTransport(asyncio.Transport):
    """What the HTTP/2 protocol sees: writes are encrypted, close sends close_notify."""

    def __init__(self, tls: TlsServerProtocol) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write_plaintext(bytes(data))

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._tls.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls.ssl_object
        return self._tls.raw_extra_info(name, default)


class TlsServerProtocol(asyncio.Protocol):
    """One TLS connection: handshakes, then passes decrypted bytes to ``inner`` (which
    sees a transport whose writes are encrypted). A failed handshake is logged
    (rate-limited per reason through ``logs``) and closes only this connection."""

    def __init__(self, context: ssl.SSLContext, inner: asyncio.Protocol, logs: LogLimiter,
                 *, handshaking: set[TlsServerProtocol] | None = None,
                 on_failure: Callable[[str], None] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        self._context = context
        self._inner = inner
        self._logs = logs
        self._handshaking = handshaking if handshaking is not None else set()
        self._on_failure = on_failure
        self._handshake_timeout = handshake_timeout
        self._raw: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object: ssl.SSLObject | None = None
        self._plain = _PlaintextTransport(self)
        self._established = False
        self._first = True
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._peer = "?"

    # -- asyncio.Protocol (the raw socket side) --------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = f"{peer[0]}:{peer[1]}"
        self.ssl_object = self._context.wrap_bio(self._incoming, self._outgoing,
                                                 server_side=True)
        self._handshaking.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            self._handshake_timeout, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._established:
            if self._first:
                self._first = False
                spoken = describe_cleartext(data)
                if spoken is not None:
                    self._fail(spoken, f"{spoken} on the TLS ext_proc port from %s: configure "
                               "the gateway to dial the endpoint picker with TLS (Envoy: an "
                               "UpstreamTlsContext transport_socket on its cluster), or run "
                               "the EPP with --secure-serving=false", self._peer)
                    return
            self._incoming.write(data)
            if not self._handshake():
                return
        else:
            self._incoming.write(data)
        self._read()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._stop_handshake_clock()
        if self._established:
            self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return None  # half-closed by the peer: close our side too

    def pause_writing(self) -> None:
        if self._established:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._established:
            self._inner.resume_writing()

    # -- TLS --------------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Advance the handshake; True once it has completed."""
        assert self.ssl_object is not None
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as exc:
            self._flush()  # the alert tells the peer why
            reason = exc.reason or type(exc).__name__
            self._fail(f"handshake {reason}", "TLS handshake with %s on the ext_proc port "
                       "failed: %s", self._peer, exc.reason or exc)
            return False
        self._flush()
        self._established = True
        self._stop_handshake_clock()
        self._inner.connection_made(self._plain)
        return True

    def _read(self) -> None:
        """Decrypt everything received and hand it over in one piece: OpenSSL returns one
        TLS record (at most 16 KiB) per read, and passing each on alone would cost the
        HTTP/2 protocol one parse-and-flush (and a socket write) per record instead of
        one per socket read, as in cleartext."""
        assert self.ssl_object is not None
        sslobj = self.ssl_object
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                chunk = sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                ended = True
                break
            except ssl.SSLError as exc:
                self._logs.warning(f"read {exc.reason}", "TLS error from %s on the ext_proc "
                                   "port, closing its connection: %s", self._peer, exc)
                self.abort()
                return
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
            # Nothing left to decrypt: skip the read that would only raise SSLWantReadError.
            if not self._incoming.pending and not sslobj.pending():
                break
        if chunks and not self._closing:
            self._inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended:
            self.close()
            return
        self._flush()

    def write_plaintext(self, data: bytes) -> None:
        """Encrypt and send (called by the inner protocol)."""
        if self._closing or self.ssl_object is None or not data:
            return
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            self._logs.warning(f"write {exc.reason}", "TLS error writing to %s, closing its "
                               "connection: %s", self._peer, exc)
            self.abort()
            return
        self._flush()

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._outgoing.read())

    # -- endings ----------------------------------------------------------------------

    def _fail(self, key: str, msg: str, *args: object) -> None:
        if self._on_failure is not None:
            self._on_failure(key)
        self._logs.warning(key, msg, *args)
        self.abort()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self._established and not self._closing:
            self._fail("handshake timeout", "TLS handshake with %s on the ext_proc port did "
                       "not finish within %.0f s; closing", self._peer,
                       self._handshake_timeout)

    def _stop_handshake_clock(self) -> None:
        self._handshaking.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Send close_notify and close the socket once written."""
        if self._closing:
            return
        self._closing = True
        if self._established and self.ssl_object is not None:
            try:
                self.ssl_object.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: our close_notify is written, the peer's not awaited
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        """Drop the connection now."""
        self._closing = True
        self._stop_handshake_clock()
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        """True once closing has begun on either side."""
        return self._closing or self._raw is None or self._raw.is_closing()

    def raw_extra_info(self, name: str, default: Any = None) -> Any:
        """The socket transport's extra info (peername, sockname, ...)."""
        return self._raw.get_extra_info(name, default) if self._raw is not None else default


__all__ = ["HANDSHAKE_TIMEOUT_S", "TlsServerProtocol", "describe_cleartext"]
