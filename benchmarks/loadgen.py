"""A lean closed-loop HTTP/1.1 POST load generator (uvloop + raw asyncio protocols), and
the result type the benchmarks share.

Each of N connections sends the next request as soon as the previous answer is fully
read. Requests are pre-formatted bytes and answers are parsed just enough to find their
end (``Content-Length`` or chunked), so the client costs a fraction of what an HTTP
library does: on a small box the client shares the cores with the proxy it measures.
With ``count_events`` the whole body of every answer is kept and its Server-Sent Events
(``data:`` lines) are counted, so a streamed answer that came back short is an error::

    python benchmarks/loadgen.py http://127.0.0.1:8081/v1/completions \\
        --body-file bodies.jsonl --concurrency 16 --duration 5 [--expect-events 202]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import uvloop

_HEAD_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_SSE_EVENT = b"data:"
_WATCHDOG_S = 0.5  # how often stuck requests are looked for


@dataclass(frozen=True)
class LoadResult:
    """What one measured window produced."""

    generator: str
    requests: int  # completed requests (any status)
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int  # completed with a status outside 2xx
    socket_errors: int  # connection errors and timeouts
    short_streams: int = 0  # 2xx answers whose SSE event count was not the expected one
    events_min: int | None = None  # fewest / most SSE events in one 2xx answer
    events_max: int | None = None

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        """Non-2xx answers, transport errors and short streams."""
        return self.non_2xx + self.socket_errors + self.short_streams


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values; NaN if empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class ResponseError(Exception):
    """The server sent something this client cannot parse as an HTTP/1.1 answer."""


class ResponseParser:
    """Incremental HTTP/1.1 response framing: status, then a ``Content-Length`` or chunked
    body. ``feed()`` returns True when one answer is complete; bytes past its end (there
    are none in a closed loop) are an error."""

    __slots__ = ("_buf", "_state", "_remaining", "status", "body", "_keep_body")

    def __init__(self, keep_body: bool) -> None:
        self._keep_body = keep_body
        self.reset()

    def reset(self) -> None:
        """Expect a new answer."""
        self._buf = b""
        self._state = "head"
        self._remaining = 0
        self.status = 0
        self.body = bytearray()

    def feed(self, data: bytes) -> bool:
        """Consume ``data``; True once the answer is complete."""
        buf = self._buf + data if self._buf else data
        while True:
            state = self._state
            if state == "head":
                end = buf.find(_HEAD_END)
                if end < 0:
                    self._buf = buf
                    return False
                self._parse_head(buf[:end])
                buf = buf[end + 4:]
            elif state == "length":
                take = buf[:self._remaining]
                if self._keep_body:
                    self.body += take
                self._remaining -= len(take)
                buf = buf[len(take):]
                if self._remaining == 0:
                    return self._finish(buf)
                self._buf = b""
                return False
            elif state == "size":
                end = buf.find(_CRLF)
                if end < 0:
                    self._buf = buf
                    return False
                size = int(buf[:end].split(b";", 1)[0], 16)
                buf = buf[end + 2:]
                self._remaining = size
                self._state = "data" if size else "trailers"
            elif state == "data":
                take = buf[:self._remaining]
                if self._keep_body:
                    self.body += take
                self._remaining -= len(take)
                buf = buf[len(take):]
                if self._remaining:
                    self._buf = b""
                    return False
                self._state = "data-end"
            elif state == "data-end":  # the CRLF after a chunk's data
                if len(buf) < 2:
                    self._buf = buf
                    return False
                if buf[:2] != _CRLF:
                    raise ResponseError("chunk data not followed by CRLF")
                buf = buf[2:]
                self._state = "size"
            else:  # trailers: lines until an empty one
                end = buf.find(_CRLF)
                if end < 0:
                    self._buf = buf
                    return False
                line, buf = buf[:end], buf[end + 2:]
                if not line:
                    return self._finish(buf)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(_CRLF)
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ResponseError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        length = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            self._state = "size"
        elif length is not None:
            self._state = "length"
            self._remaining = length
        else:
            raise ResponseError("answer without Content-Length or chunked encoding")

    def _finish(self, rest: bytes) -> bool:
        if rest:
            raise ResponseError(f"{len(rest)} bytes after the end of an answer")
        self._buf = b""
        self._state = "done"
        return True


@dataclass
class _Tally:
    """Outcomes shared by every connection of one window."""

    latencies: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    non_2xx: int = 0
    socket_errors: int = 0
    short_streams: int = 0


class _Connection(asyncio.Protocol):
    """One keep-alive connection running requests back to back until the deadline."""

    def __init__(self, requests: Sequence[bytes], start_index: int, deadline: float,
                 tally: _Tally, expect_events: int | None, count_events: bool,
                 done: asyncio.Future[None]) -> None:
        self._requests = requests
        self._index = start_index
        self._deadline = deadline
        self._tally = tally
        self._expect_events = expect_events
        self._count_events = count_events or expect_events is not None
        self._parser = ResponseParser(keep_body=self._count_events)
        self._done = done
        self._transport: asyncio.Transport | None = None
        self.sent_at: float | None = None  # perf_counter of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        now = time.perf_counter()
        if now >= self._deadline:
            self._close()
            return
        request = self._requests[self._index % len(self._requests)]
        self._index += 1
        self._parser.reset()
        self.sent_at = now
        assert self._transport is not None
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            complete = self._parser.feed(data)
        except (ResponseError, ValueError):
            self._fail()
            return
        if not complete:
            return
        assert self.sent_at is not None
        tally = self._tally
        tally.latencies.append(time.perf_counter() - self.sent_at)
        self.sent_at = None
        status = self._parser.status
        if not 200 <= status < 300:
            tally.non_2xx += 1
        elif self._count_events:
            events = self._parser.body.count(_SSE_EVENT)
            tally.events.append(events)
            if self._expect_events is not None and events != self._expect_events:
                tally.short_streams += 1
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent_at is not None:  # the server closed with an answer outstanding
            self.sent_at = None
            self._tally.socket_errors += 1
        if not self._done.done():
            self._done.set_result(None)

    def timed_out(self, now: float, timeout_s: float) -> bool:
        """Abort the connection if its request has waited longer than ``timeout_s``."""
        if self.sent_at is not None and now - self.sent_at > timeout_s:
            self._fail()
            return True
        return False

    def _fail(self) -> None:
        self.sent_at = None
        self._tally.socket_errors += 1
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def format_request(url: str, body: bytes) -> bytes:
    """A complete HTTP/1.1 POST of ``body`` (JSON) to ``url``, ready to write."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def _connection_loop(host: str, port: int, requests: Sequence[bytes], start_index: int,
                           deadline: float, tally: _Tally, expect_events: int | None,
                           count_events: bool, timeout_s: float,
                           live: set[_Connection]) -> None:
    """Keep one connection's worth of requests going until ``deadline``, reconnecting
    after errors."""
    loop = asyncio.get_running_loop()
    index = start_index
    while time.perf_counter() < deadline:
        done: asyncio.Future[None] = loop.create_future()
        conn = _Connection(requests, index, deadline, tally, expect_events, count_events,
                           done)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, host, port),
                                   timeout_s)
        except (OSError, TimeoutError):
            tally.socket_errors += 1
            await asyncio.sleep(0.05)
            continue
        live.add(conn)
        try:
            await done
        finally:
            live.discard(conn)
        index += 997  # a failed connection resumes elsewhere in the body list


async def _watchdog(live: set[_Connection], timeout_s: float) -> None:
    while True:
        await asyncio.sleep(_WATCHDOG_S)
        now = time.perf_counter()
        for conn in list(live):
            conn.timed_out(now, timeout_s)


async def _closed_loop(url: str, bodies: Sequence[bytes], concurrency: int,
                       duration_s: float, timeout_s: float, expect_events: int | None,
                       count_events: bool) -> LoadResult:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [format_request(url, body) for body in bodies]
    tally = _Tally()
    live: set[_Connection] = set()
    watchdog = asyncio.create_task(_watchdog(live, timeout_s))
    start = time.perf_counter()
    deadline = start + duration_s
    try:
        await asyncio.gather(*(
            _connection_loop(host, port, requests, w * 7, deadline, tally, expect_events,
                             count_events, timeout_s, live)
            for w in range(concurrency)))
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - start
    ordered = sorted(tally.latencies)
    return LoadResult(
        generator="loadgen",
        requests=len(ordered),
        duration_s=elapsed,
        p50_ms=percentile(ordered, 50) * 1e3,
        p90_ms=percentile(ordered, 90) * 1e3,
        p99_ms=percentile(ordered, 99) * 1e3,
        non_2xx=tally.non_2xx,
        socket_errors=tally.socket_errors,
        short_streams=tally.short_streams,
        events_min=min(tally.events) if tally.events else None,
        events_max=max(tally.events) if tally.events else None,
    )


def run_closed_loop(url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float,
                    timeout_s: float = 10.0, *, expect_events: int | None = None,
                    count_events: bool = False) -> LoadResult:
    """Run ``concurrency`` keep-alive connections against ``url`` for ``duration_s``
    seconds, on a fresh uvloop event loop. Requests still in flight at the deadline are
    waited for and counted. With ``expect_events`` every 2xx answer must carry exactly
    that many SSE ``data:`` events (``count_events`` only records min/max)."""
    if not bodies:
        raise ValueError("no request bodies")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_closed_loop(url, bodies, concurrency, duration_s, timeout_s,
                                       expect_events, count_events))


def read_bodies(path: Path) -> list[bytes]:
    """Request bodies from a file, one per line (JSON bodies never contain newlines)."""
    return [line for line in path.read_bytes().splitlines() if line]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: one window of load, printed as a single summary line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--body-file", type=Path, required=True, help="one JSON body per line")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0, help="seconds")
    p.add_argument("--expect-events", type=int, default=None,
                   help="SSE data: events every 2xx answer must carry (streaming bodies)")
    args = p.parse_args(argv)
    result = run_closed_loop(args.url, read_bodies(args.body_file), args.concurrency,
                             args.duration, expect_events=args.expect_events)
    events = ("" if result.events_min is None
              else f", SSE events per answer {result.events_min}..{result.events_max}")
    print(f"{result.requests} requests in {result.duration_s:.2f}s: {result.rps:.0f} req/s, "
          f"p50 {result.p50_ms:.3f} ms, p90 {result.p90_ms:.3f} ms, "
          f"p99 {result.p99_ms:.3f} ms, errors {result.errors}{events}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
