"""vLLM's KV events over ZMQ, as ``vllm/distributed/kv_events.py`` publishes them.

- PUB socket bound on ``port``; every message is three frames ``[topic, seq, payload]``:
  topic ``kv@<ip:port>@<model>``, ``seq`` the 8-byte big-endian batch number (from 0 per
  process), payload a msgpack batch ``[ts, [events...], data_parallel_rank]``.
- ``encoding="array"`` (vLLM before 0.26): the batch and every event are positional
  arrays, events tagged by their first element (``["BlockStored", ...]``), all fields
  written. ``encoding="map"`` (0.26 on): the batch is ``{"ts", "events",
  "data_parallel_rank"}`` and events are ``{"type": "BlockStored", ...}`` maps without the
  optional fields whose value is the default (None), as msgspec's ``omit_defaults`` does.
- Block hashes are uint64 ints (vLLM's default: the digest's last 8 bytes, big-endian) or
  the 32-byte digests (``hash_form="bytes"``).
- Optional ROUTER replay socket: a request ``[identity, b"", start_seq]`` is answered with
  ``[identity, b"", seq, payload]`` for every buffered batch with ``seq >= start_seq``
  (the last ``REPLAY_BUFFER_BATCHES``), then ``[identity, b"", 0xFF x 8, b""]``.

Events are batched: a batch goes out ``flush_ms`` after the first event of it, about one
engine step as vLLM publishes once per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from epp.sim.kvcache import AllBlocksCleared, BlockRemoved, BlockStored, CacheEvent

ENCODINGS = ("array", "map")
HASH_FORMS = ("uint64", "bytes")
REPLAY_BUFFER_BATCHES = 10_000  # vLLM's buffer_steps
END_OF_REPLAY = (2**64 - 1).to_bytes(8, "big")  # vLLM's END_SEQ, (-1) as 8 signed bytes
# vLLM publishes once per engine step; a GPU decode step takes ~5-30 ms, so 5 ms keeps
# the sim's batches at about one step of events.
DEFAULT_FLUSH_MS = 5.0
# Data parallel rank 0: one engine per sim pod.
DATA_PARALLEL_RANK = 0
# What vLLM reports for an ordinary model's only KV cache group.
KV_CACHE_GROUP = 0
KV_CACHE_SPEC_KIND = "full_attention"

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """Where and how to publish KV events; ``port`` 0 turns publishing off."""

    port: int = 0
    replay_port: int = 0  # 0: no replay socket
    encoding: str = "array"
    hash_form: str = "uint64"
    drop_seq: int | None = None  # testing aid: never send this batch live (replay has it)
    flush_ms: float = DEFAULT_FLUSH_MS

    def __post_init__(self) -> None:
        for name in ("port", "replay_port"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= 65535:
                raise ValueError(f"kv_events {name} must be an integer in [0, 65535]")
        if self.replay_port and not self.port:
            raise ValueError("a kv_events replay_port needs a kv_events port")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"kv_events encoding must be one of {ENCODINGS}")
        if self.hash_form not in HASH_FORMS:
            raise ValueError(f"kv_events hash_form must be one of {HASH_FORMS}")
        if self.drop_seq is not None and (not _is_int(self.drop_seq) or self.drop_seq < 0):
            raise ValueError("kv_events drop_seq must be an integer >= 0")
        if not isinstance(self.flush_ms, (int, float)) or not 0 <= self.flush_ms < 60_000:
            raise ValueError("kv_events flush_ms must be a number in [0, 60000)")

    @property
    def enabled(self) -> bool:
        """Whether events are published at all."""
        return self.port != 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def uint64_hash(digest: bytes) -> int:
    """vLLM's integer form of a block hash: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big")


class BatchEncoder:
    """Encodes batches of cache events into one of vLLM's wire forms."""

    def __init__(self, encoding: str = "array", hash_form: str = "uint64") -> None:
        self._maps = encoding == "map"
        self._hash: Callable[[bytes], int | bytes] = (
            uint64_hash if hash_form == "uint64" else bytes
        )
        self._msgpack = msgspec.msgpack.Encoder()

    def encode(self, ts: float, events: Sequence[CacheEvent]) -> bytes:
        """The msgpack payload of one batch."""
        encoded = [self._event(e) for e in events]
        if self._maps:
            batch: Any = {"ts": ts, "events": encoded, "data_parallel_rank": DATA_PARALLEL_RANK}
        else:
            batch = [ts, encoded, DATA_PARALLEL_RANK]
        return self._msgpack.encode(batch)

    def _event(self, event: CacheEvent) -> Any:
        # (name, value, required): vLLM's declared field order; optional fields default None.
        fields: list[tuple[str, Any, bool]]
        if isinstance(event, BlockStored):
            parent = event.parent_block_hash
            fields = [
                ("block_hashes", [self._hash(h) for h in event.block_hashes], True),
                ("parent_block_hash", None if parent is None else self._hash(parent), True),
                ("token_ids", event.token_ids, True),
                ("block_size", event.block_size, True),
                ("lora_id", event.lora_id, True),
                ("medium", event.medium, True),
                ("lora_name", event.lora_name, True),
                ("extra_keys", event.extra_keys, False),
                ("group_idx", KV_CACHE_GROUP, False),
                ("kv_cache_spec_kind", KV_CACHE_SPEC_KIND, False),
                ("kv_cache_spec_sliding_window", None, False),
            ]
        elif isinstance(event, BlockRemoved):
            fields = [
                ("block_hashes", [self._hash(h) for h in event.block_hashes], True),
                ("medium", event.medium, True),
                ("group_idx", KV_CACHE_GROUP, False),
            ]
        else:
            assert isinstance(event, AllBlocksCleared)
            fields = []
        tag = type(event).__name__
        if self._maps:
            body = {name: value for name, value, required in fields
                    if required or value is not None}
            return {"type": tag, **body}
        return [tag, *(value for _, value, _ in fields)]


class KVEventPublisher:
    """Publishes cache events in batches on a PUB socket, with an optional replay socket.

    ``publish()`` is synchronous (the engine calls it); a task sends the batches.
    """

    def __init__(
        self,
        config: KVEventsConfig,
        *,
        host: str,
        topic: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._host = f"[{host}]" if ":" in host else host  # ZMQ wants IPv6 in brackets
        self._topic = topic.encode()
        self._clock = clock
        self._encoder = BatchEncoder(config.encoding, config.hash_form)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BUFFER_BATCHES)
        self._pending: list[CacheEvent] = []
        self._wake = asyncio.Event()
        self._next_seq = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will carry."""
        return self._next_seq

    async def start(self) -> None:
        """Bind the sockets and start sending."""
        self._ctx = zmq.asyncio.Context()
        try:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.bind(f"tcp://{self._host}:{self._config.port}")
            if self._config.replay_port:
                self._router = self._ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self._router.bind(f"tcp://{self._host}:{self._config.replay_port}")
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self._tasks.append(asyncio.create_task(self._send_loop(), name="kv-events-send"))
        if self._router is not None:
            self._tasks.append(asyncio.create_task(self._replay_loop(), name="kv-events-replay"))

    def publish(self, events: Sequence[CacheEvent]) -> None:
        """Queue events for the next batch."""
        self._pending.extend(events)
        self._wake.set()

    async def close(self) -> None:
        """Send what is queued, stop the tasks and close the sockets."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._pending and self._pub is not None:
            await self._send_batch()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _send_loop(self) -> None:
        flush_s = self._config.flush_ms / 1000.0
        while True:
            await self._wake.wait()
            if flush_s:
                await asyncio.sleep(flush_s)  # gather the rest of this step's events
            self._wake.clear()
            try:
                await self._send_batch()
            except zmq.ZMQError:
                _log.exception("epp-sim: publishing KV events failed")

    async def _send_batch(self) -> None:
        events, self._pending = self._pending, []
        if not events:
            return
        seq = self._next_seq
        self._next_seq += 1
        payload = self._encoder.encode(self._clock(), events)
        self._buffer.append((seq, payload))
        if seq == self._config.drop_seq:
            return  # a gap subscribers must repair through the replay socket
        assert self._pub is not None
        await self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])

    async def _replay_loop(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                _log.warning("epp-sim: ignoring a malformed KV events replay request")
                continue
            identity, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await router.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
            await router.send_multipart([identity, b"", END_OF_REPLAY, b""])
