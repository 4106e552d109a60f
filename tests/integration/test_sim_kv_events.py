"""KV events of a real epp-sim process over real ZMQ: the live stream in every wire form,
sequence numbers, gaps and replay. Payloads are decoded with plain msgpack, the way any
consumer of vLLM's events sees them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from epp.devtools.procs import Process, free_port, python_module
from tests.integration.httputil import post

pytestmark = pytest.mark.integration

BLOCK = 16  # the sim's default block size
END = b"\xff" * 8
FIELDS: dict[str, tuple[str, ...]] = {  # vLLM's declared field order
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
                    "kv_cache_spec_sliding_window"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}
REQUIRED = {"block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
            "lora_name"}
NONE_HASH = hashlib.sha256(b"epp-sim").digest()


@dataclass
class Sim:
    proc: Process
    url: str
    topic: bytes
    pub: str
    replay: str


@contextmanager
def running_sim(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 20.0) -> Iterator[Sim]:
    http, pub, replay = free_port(), free_port(), free_port()
    proc = Process(f"sim-{http}", python_module(
        "epp.sim", "--host", "127.0.0.1", "--port", str(http), "--kv-events-port", str(pub),
        "--kv-events-replay-port", str(replay), *args), tmp_path, env=env)
    try:
        proc.wait_for_log("listening", timeout=timeout)
        yield Sim(proc, f"http://127.0.0.1:{http}", f"kv@127.0.0.1:{http}@qwen3".encode(),
                  f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}")
    finally:
        proc.stop()


class Sockets:
    """A private ZMQ context whose sockets are all closed at the end."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.open: list[zmq.Socket[Any]] = []

    def socket(self, kind: int, address: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        self.open.append(sock)
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sock.connect(address)
        return sock


@contextmanager
def zmq_sockets() -> Iterator[Sockets]:
    sockets = Sockets()
    try:
        yield sockets
    finally:
        for sock in sockets.open:
            sock.close(linger=0)
        sockets.ctx.term()


class Subscriber:
    """A SUB socket that records every live batch by sequence number."""

    def __init__(self, sockets: Sockets, sim: Sim) -> None:
        self.sim = sim
        self.sock = sockets.socket(zmq.SUB, sim.pub)
        self.live: dict[int, bytes] = {}

    def recv(self, timeout_ms: int = 3000) -> tuple[int, bytes] | None:
        if not self.sock.poll(timeout_ms):
            return None
        topic, seq_bytes, payload = self.sock.recv_multipart()
        assert topic == self.sim.topic and len(seq_bytes) == 8
        seq = int.from_bytes(seq_bytes, "big")
        self.live[seq] = payload
        return seq, payload

    def next(self) -> tuple[int, bytes]:
        got = self.recv()
        assert got is not None, "no KV event batch within 3 s"
        return got

    def join(self) -> int:
        """Reset the cache until a batch arrives (a SUB misses what is sent before it is
        connected); returns the last sequence number seen."""
        for _ in range(50):
            assert post(self.sim.url + "/reset_prefix_cache", b"").status == 200
            if self.recv(100) is not None:
                while self.recv(100) is not None:  # resets still in flight
                    pass
                return max(self.live)
        raise AssertionError("the subscriber never received a batch")


def complete(sim: Sim, prompt: str) -> dict[str, Any]:
    reply = post(sim.url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert reply.status == 200, reply.body
    usage: dict[str, Any] = reply.json()["usage"]
    return usage


def decode(payload: bytes, encoding: str) -> list[dict[str, Any]]:
    """One batch's events as dicts (omitted optional fields as None), checking the shape."""
    raw = msgspec.msgpack.decode(payload)
    if encoding == "array":
        assert isinstance(raw, list) and len(raw) == 3
        ts, events, rank = raw
    else:
        assert isinstance(raw, dict) and list(raw) == ["ts", "events", "data_parallel_rank"]
        ts, events, rank = raw["ts"], raw["events"], raw["data_parallel_rank"]
    assert isinstance(ts, float) and rank == 0
    out = []
    for event in events:
        if encoding == "array":
            tag, *values = event
            assert len(values) == len(FIELDS[tag])  # every field written, in order
            fields = dict(zip(FIELDS[tag], values, strict=True))
        else:
            tag = event.pop("type")
            names = FIELDS[tag]
            assert list(event) == [n for n in names if n in event]  # declared order
            assert REQUIRED & set(names) <= set(event)
            assert all(event[n] is not None for n in set(event) - REQUIRED)  # defaults omitted
            fields = {n: event.get(n) for n in names}
        out.append({"type": tag, **fields})
    return out


def wire_hashes(token_ids: list[int], hash_form: str) -> list[int | bytes]:
    """Chained block hashes computed from the documented formula, in the wire form."""
    out: list[int | bytes] = []
    parent = NONE_HASH
    for start in range(0, len(token_ids) - BLOCK + 1, BLOCK):
        block = token_ids[start:start + BLOCK]
        parent = hashlib.sha256(msgspec.msgpack.encode([parent, block, None])).digest()
        out.append(parent if hash_form == "bytes" else int.from_bytes(parent[-8:], "big"))
    return out


def replay(sockets: Sockets, sim: Sim, start: int) -> list[tuple[int, bytes]]:
    """Ask the replay socket for every buffered batch from ``start`` on."""
    dealer = sockets.socket(zmq.DEALER, sim.replay)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    batches: list[tuple[int, bytes]] = []
    while True:
        assert dealer.poll(3000), "replay stalled"
        empty, seq, payload = dealer.recv_multipart()
        assert empty == b""
        if seq == END:
            assert payload == b""
            return batches
        batches.append((int.from_bytes(seq, "big"), payload))


@pytest.mark.parametrize("encoding", ["array", "map"])
@pytest.mark.parametrize("hash_form", ["uint64", "bytes"])
def test_live_events_then_replay(tmp_path: Path, encoding: str, hash_form: str) -> None:
    # 64 tokens of cache: four blocks, so the third prompt evicts.
    args = ["--tokenizer", "bytes", "--kv-capacity-tokens", "64",
            "--kv-events-encoding", encoding, "--kv-events-hash", hash_form]
    with running_sim(tmp_path, *args) as sim, zmq_sockets() as ctx:
        sub = Subscriber(ctx, sim)
        sub.join()
        first = min(sub.live)
        assert decode(sub.live[first], encoding) == [{"type": "AllBlocksCleared"}]
        last = max(sub.live)

        a = "A" * 20 + "a" * 20  # 40 tokens: two full blocks
        assert complete(sim, a)["prompt_tokens_details"]["cached_tokens"] == 0
        seq, payload = sub.next()
        assert seq == last + 1
        (stored,) = decode(payload, encoding)
        a_ids = list(a.encode())
        a_hashes = wire_hashes(a_ids, hash_form)
        assert stored == {
            "type": "BlockStored", "block_hashes": a_hashes, "parent_block_hash": None,
            "token_ids": a_ids[:2 * BLOCK], "block_size": BLOCK, "lora_id": None,
            "medium": "GPU", "lora_name": None, "extra_keys": [None, None], "group_idx": 0,
            "kv_cache_spec_kind": "full_attention", "kv_cache_spec_sliding_window": None,
        }
        if hash_form == "bytes":
            assert all(isinstance(h, bytes) and len(h) == 32 for h in a_hashes)

        longer = a + "b" * 30  # 70 tokens: four blocks, two of them cached
        assert complete(sim, longer)["prompt_tokens_details"]["cached_tokens"] == 2 * BLOCK
        seq2, payload = sub.next()
        assert seq2 == seq + 1
        (stored,) = decode(payload, encoding)
        longer_hashes = wire_hashes(list(longer.encode()), hash_form)
        assert stored["block_hashes"] == longer_hashes[2:]
        assert stored["parent_block_hash"] == a_hashes[-1]
        assert len(stored["token_ids"]) == 2 * BLOCK

        other = "Z" * 40  # needs two blocks: the longer prompt's tail is least recent
        complete(sim, other)
        seq3, payload = sub.next()
        assert seq3 == seq2 + 1
        removed, stored = decode(payload, encoding)
        assert removed == {"type": "BlockRemoved", "block_hashes": longer_hashes[:1:-1],
                           "medium": "GPU", "group_idx": 0}
        assert stored["block_hashes"] == wire_hashes(list(other.encode()), hash_form)

        replayed = replay(ctx, sim, first)
        assert [s for s, _ in replayed] == list(range(first, seq3 + 1))
        assert all(sub.live[s] == p for s, p in replayed)  # the very bytes sent live
        assert [s for s, _ in replay(ctx, sim, seq2)] == [seq2, seq3]
        assert replay(ctx, sim, seq3 + 1) == []  # nothing newer: only the end marker


def test_dropped_batch_is_a_gap_that_replay_fills(tmp_path: Path) -> None:
    drop = 20
    args = ["--tokenizer", "bytes", "--kv-events-drop-seq", str(drop)]
    with running_sim(tmp_path, *args) as sim, zmq_sockets() as ctx:
        sub = Subscriber(ctx, sim)
        next_seq = sub.join() + 1
        assert next_seq < drop, "joining took too many batches for this test"
        prompts: dict[int, str] = {}
        while next_seq <= drop + 1:  # one request, one new block, one batch
            prompts[next_seq] = f"{next_seq:04d} makes this prompt two blocks long"
            complete(sim, prompts[next_seq])
            if next_seq == drop:
                assert sub.recv(300) is None  # not sent live: the gap a subscriber sees
            else:
                assert sub.next()[0] == next_seq
            next_seq += 1
        assert drop not in sub.live and {drop - 1, drop + 1} <= set(sub.live)
        replayed = dict(replay(ctx, sim, drop))
        assert sorted(replayed) == [drop, drop + 1]  # the buffer kept the dropped batch
        (stored,) = decode(replayed[drop], "array")
        assert stored["token_ids"] == list(prompts[drop].encode())[:2 * BLOCK]
        assert replayed[drop + 1] == sub.live[drop + 1]


def test_default_tokenizer_is_qwen(tmp_path: Path) -> None:
    env = {"EPP_CACHE_DIR": str(tmp_path / "cache")}  # generated once here, not in $HOME
    with running_sim(tmp_path, env=env, timeout=90) as sim, zmq_sockets() as ctx:
        sub = Subscriber(ctx, sim)
        sub.join()
        body = {"messages": [{"role": "user", "content": "Hello, world! " * 4}]}
        rendered = post(sim.url + "/v1/chat/completions/render", body).json()
        ids = rendered["token_ids"]
        assert ids[0] == 248045  # <|im_start|> in the Qwen3.5/3.6 vocabulary
        reply = post(sim.url + "/v1/chat/completions", {**body, "max_tokens": 1})
        assert reply.json()["usage"]["prompt_tokens"] == len(ids)
        (stored,) = decode(sub.next()[1], "array")
        assert stored["token_ids"] == ids[:len(ids) // BLOCK * BLOCK]
