"""vLLM's KV-event framing on ZMQ: live and replay frames, topics, addresses, and a
cheap receive for queued messages. No state: the sequence logic is in ``stream``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import zmq
import zmq.asyncio

from epp.datastore import parse_address

SEQ_BYTES = 8
END_OF_REPLAY = b"\xff" * SEQ_BYTES  # vLLM's end marker: seq -1 as signed 8 bytes
END_SEQ = int.from_bytes(END_OF_REPLAY, "big")
TOPIC_PREFIX = "kv@"


async def recv_frames(sock: zmq.asyncio.Socket, raw: zmq.Socket[bytes],
                      timeout_ms: int | None = None) -> list[bytes] | None:
    """Next message; None after ``timeout_ms`` without one.

    Queued messages are taken through ``raw``, a blocking-API shadow of the same
    socket, with NOBLOCK: pyzmq's asyncio ``recv_multipart`` makes a Future per
    message and costs about 5x as much (28 vs 6 us per message, measured). Only an
    empty queue waits on the asyncio socket.
    """
    while True:
        try:
            return raw.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            if not await sock.poll(timeout_ms):  # POLLIN
                return None


async def live_messages(sock: zmq.asyncio.Socket, on_malformed: Callable[[int], None]
                        ) -> AsyncIterator[tuple[bytes, int, bytes]]:
    """Live messages from a SUB socket as ``(topic, seq, payload)``, forever; a message
    with the wrong frames is passed to ``on_malformed`` (its frame count) and skipped."""
    raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
    while True:
        frames = await recv_frames(sock, raw)
        assert frames is not None  # no timeout
        parsed = parse_live(frames)
        if parsed is None:
            on_malformed(len(frames))
            continue
        yield parsed


def parse_live(frames: list[bytes]) -> tuple[bytes, int, bytes] | None:
    """``[topic, seq, payload]`` -> its parts, or None when malformed."""
    if len(frames) != 3 or len(frames[1]) != SEQ_BYTES:
        return None
    return frames[0], int.from_bytes(frames[1], "big"), frames[2]


def parse_replay(frames: list[bytes]) -> tuple[int, bytes] | None:
    """A ROUTER reply as a DEALER sees it: ``[b"", seq, payload]`` or, from newer vLLM,
    ``[b"", topic, seq, payload]``. The end marker has ``seq == END_SEQ``."""
    if frames and not frames[0]:
        frames = frames[1:]
    if len(frames) == 3:
        frames = frames[1:]
    if len(frames) != 2 or len(frames[0]) != SEQ_BYTES:
        return None
    return int.from_bytes(frames[0], "big"), frames[1]


def topic_address(topic: bytes) -> tuple[str, int] | None:
    """``kv@<ip>:<port>@<model>`` -> ``(ip, port)``, IPv6 with or without brackets."""
    try:
        text = topic.decode()
    except UnicodeDecodeError:
        return None
    if not text.startswith(TOPIC_PREFIX):
        return None
    try:
        return parse_address(text[len(TOPIC_PREFIX):].partition("@")[0])
    except ValueError:
        return None


def with_port(address: str, port_offset: int) -> str | None:
    """``tcp://host:port`` with the port moved by ``port_offset``; None if not tcp."""
    scheme, sep, rest = address.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not (port.isascii() and port.isdigit()):
        return None
    return f"{scheme}://{host}:{int(port) + port_offset}"


def zmq_host(ip: str) -> str:
    """An IP as a ZMQ tcp address wants it (IPv6 in brackets)."""
    return f"[{ip}]" if ":" in ip else ip
