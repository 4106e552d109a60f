"""CPU of the ext_proc transport per request and per streamed chunk, without sockets.

The lean HTTP/2 server's connection protocol is fed the exact bytes Envoy would send
(HTTP/2 frames carrying gRPC-framed ProcessingRequests, headers HPACK-encoded as Envoy
does) and its answers are collected from an in-memory transport. One connection, streams
one after another (c=1) or ``--concurrency`` interleaved; a real Director with the
built-in profile over 4 endpoints routes each request. The client side costs almost
nothing (every frame is built once, before the clock starts), so the process CPU time is
the server's: HTTP/2 framing, gRPC framing, protobuf, the stream state machine, routing,
usage parsing and the echo of every chunk. Cleartext only: TLS and the kernel come on
top (``benchmarks/overhead.py`` measures the whole path through Envoy).

    .venv/bin/python benchmarks/transport_path.py [--requests 2000] [--chunks 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time
from collections.abc import Sequence

import hpack

from epp.devtools import fake_envoy as fe
from epp.extproc.h2server import PROCESS_PATH, H2ExtProcServer
from epp.extproc.http2 import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_WINDOW,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    frame_header,
)

from request_path import build_director

_GRPC = struct.Struct(">BI")
BODY = json.dumps({"model": "qwen3", "prompt": "x" * 1000, "max_tokens": 200}).encode()
# Headers Envoy's ext_proc filter forwards for a typical client request.
ENVOY_HEADERS = {"user-agent": "python-httpx/0.28.1", "accept": "*/*",
                 "x-forwarded-proto": "http", "x-request-id": "0b5c3f4e-3a1d-4c7e-9f0a",
                 "x-envoy-expected-rq-timeout-ms": "300000", "content-length": str(len(BODY))}


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    """One HTTP/2 frame."""
    return frame_header(len(payload), kind, flags, sid) + payload


def grpc_data(sid: int, message: bytes, end_stream: bool = False) -> bytes:
    """A DATA frame carrying one gRPC message."""
    return frame(DATA, END_STREAM if end_stream else 0, sid,
                 _GRPC.pack(0, len(message)) + message)


class MemoryTransport:
    """Collects what the server writes; counts bytes only."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def sse_chunks(count: int) -> list[bytes]:
    """One vLLM-style SSE event per token, usage in the last one, then [DONE]."""
    events = [b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"qwen3",'
              b'"choices":[{"index":0,"text":" tok%d","logprobs":null,"finish_reason":null}]}'
              b"\n\n" % i for i in range(count - 1)]
    events.append(b'data: {"id":"cmpl-1","object":"text_completion","created":1,'
                  b'"model":"qwen3","choices":[],"usage":{"prompt_tokens":250,'
                  b'"completion_tokens":200,"total_tokens":450}}\n\ndata: [DONE]\n\n')
    return events


class Exchange:
    """The frames of one ext_proc stream, split into the request and response phases."""

    def __init__(self, sid: int, encoder: hpack.Encoder, chunks: int) -> None:
        grpc_headers = [(":method", "POST"), (":scheme", "http"), (":path", PROCESS_PATH.decode()),
                        (":authority", "epp"), ("content-type", "application/grpc"),
                        ("te", "trailers")]
        head = frame(HEADERS, END_HEADERS, sid, encoder.encode(grpc_headers))
        self.request = [
            head + grpc_data(sid, fe.request_headers(extra=ENVOY_HEADERS).SerializeToString()),
            grpc_data(sid, fe.request_body(BODY, True).SerializeToString()),
        ]
        streaming = chunks > 0
        content_type = "text/event-stream" if streaming else "application/json"
        response = [grpc_data(sid, fe.response_headers(content_type=content_type)
                              .SerializeToString())]
        if streaming:
            events = sse_chunks(chunks)
            response += [grpc_data(sid, fe.response_body(e, False).SerializeToString())
                         for e in events]
            response.append(grpc_data(sid, fe.response_body(b"", True).SerializeToString(),
                                      end_stream=True))
        else:
            body = json.dumps({"id": "x", "choices": [{"text": "a"}],
                               "usage": {"prompt_tokens": 250, "completion_tokens": 1}}).encode()
            response.append(grpc_data(sid, fe.response_body(body, True).SerializeToString(),
                                      end_stream=True))
        self.response = response


async def run(requests: int, chunks: int, concurrency: int) -> tuple[float, float]:
    """CPU µs per request for the request phase, and for the response phase."""
    server = H2ExtProcServer(build_director())
    conn = server.connection_factory()
    transport = MemoryTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, MAX_WINDOW))
                       + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65_535)))
    encoder = hpack.Encoder()
    exchanges = [Exchange(1 + 2 * i, encoder, chunks) for i in range(requests)]
    request_s = response_s = 0.0
    for start in range(0, requests, concurrency):
        batch: Sequence[Exchange] = exchanges[start:start + concurrency]
        t0 = time.process_time()
        for ex in batch:
            for data in ex.request:
                conn.data_received(data)
        while server.active_streams and any(conn._streams[s].busy  # noqa: SLF001
                                            for s in list(conn._streams)):  # noqa: SLF001
            await asyncio.sleep(0)
        t1 = time.process_time()
        for i in range(max(len(ex.response) for ex in batch)):
            for ex in batch:
                if i < len(ex.response):
                    conn.data_received(ex.response[i])
        t2 = time.process_time()
        request_s += t1 - t0
        response_s += t2 - t1
    if server.active_streams:
        raise RuntimeError(f"{server.active_streams} streams did not finish")
    return request_s / requests * 1e6, response_s / requests * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--chunks", type=int, default=200, help="SSE chunks per streamed response")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    asyncio.run(run(200, args.chunks, args.concurrency))  # warm-up
    req_us, resp_us = asyncio.run(run(args.requests, 0, args.concurrency))
    sreq_us, sresp_us = asyncio.run(run(args.requests // 4, args.chunks, args.concurrency))
    print(f"| transport path, c={args.concurrency}, in-process | CPU µs |")
    print("|---|--:|")
    print(f"| request phase (headers + 1 KB body, routed) | {req_us:.1f} |")
    print(f"| response phase, non-streaming (headers + JSON body) | {resp_us:.1f} |")
    print(f"| whole non-streaming exchange | {req_us + resp_us:.1f} |")
    print(f"| streamed response, {args.chunks} SSE chunks | {sresp_us:.0f} |")
    print(f"| per streamed chunk | {sresp_us / (args.chunks + 2):.1f} |")


if __name__ == "__main__":
    main()
