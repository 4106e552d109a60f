"""KV-event ingest throughput on one core: decode + deliver, in blocks per second.

Payloads are vLLM ``BlockStored`` batches of 16 blocks x 16 tokens, pre-encoded the way
vLLM encodes them (positional arrays before 0.26, maps from 0.26; int or digest-bytes
hashes), each block chained to the previous one of its request so the index finds
every parent. Two batch shapes:

- ``1x16``: one event of 16 blocks (a prefill of 256 tokens);
- ``16x1``: 16 events of one block each (16 running requests each filling a block:
  the steady decode case, and the costlier one per block).

Throughput is blocks per CPU-second of the ingesting thread (``time.thread_time``):
what one core sustains, and steady on a shared machine where wall time is not. Cells,
each run for ``--seconds`` of wall time:

- ``decode_batch`` to a no-op sink and to the real ``BlockIndex``; the payloads are
  cycled, so after the first round the index sees its blocks stored again (a replay);
- ``store+remove``: before each batch is stored again, a ``BlockRemoved`` batch takes its
  blocks out (decoded too), so every block is stored new and removed once, at a steady
  index size: what an engine that fills and evicts its cache sends;
- the generic decode path (plain msgpack objects, then per-event conversion) to a
  no-op sink: the alternative the fast typed path was measured against;
- end to end over loopback ZMQ (a publisher process, a ``KVEventSubscriber`` with its
  sequence tracking): receive + decode + deliver in the subscriber's thread, from its
  first delivery to its last (the publisher and ZMQ's I/O thread run elsewhere).

``--baseline-ref REF`` also loads ``epp/kvcache/index.py`` as of git revision ``REF`` and
runs the index cells against both, interleaved round by round (``--rounds``), with the
median ratio new/old: the way to compare two versions on a machine whose speed drifts.

    .venv/bin/python benchmarks/kv_ingest.py [--seconds 2] [--quick] [--no-zmq]
        [--baseline-ref REF [--rounds 5]]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import msgspec
import zmq
import zmq.asyncio

from epp.datastore import Endpoint
from epp.kvcache import events
from epp.kvcache.index import BlockIndex
from epp.kvcache.subscriber import KVEventsSettings, KVEventSubscriber
from epp.kvcache.types import ApplyResult, BlockStored, EventSink, KVEventBatch

BLOCK_SIZE = 16
BLOCKS_PER_BATCH = 16
BATCHES = 2_000  # distinct payloads, cycled: 32k blocks, a few MB
GOAL_BLOCKS_PER_S = 300_000
SHAPES = {"1x16": (1, 16), "16x1": (16, 1)}
TOPIC = "kv@127.0.0.1:8000@bench"


class NoopSink:
    def __init__(self) -> None:
        self.batches = 0

    def apply_batch(self, endpoint: str, batch: KVEventBatch) -> ApplyResult:
        self.batches += 1
        return ApplyResult()

    def clear_endpoint(self, endpoint: str) -> None:
        pass


def load_index_module(ref: str) -> ModuleType:
    """``epp/kvcache/index.py`` as of git revision ``ref``, loaded beside the current one
    (its own imports come from the working tree)."""
    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{ref}:epp/kvcache/index.py"], cwd=repo,
                            check=True, capture_output=True, text=True).stdout
    name = "baseline_index_" + "".join(c if c.isalnum() else "_" for c in ref)
    module = ModuleType(name)
    module.__file__ = f"{ref}:epp/kvcache/index.py"
    sys.modules[name] = module  # dataclasses look their module up by name
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def make_payloads(encoding: str, hash_form: str, shape: str, seed: int = 7) -> list[bytes]:
    """Chained BlockStored batches: ``events x blocks`` per batch, 16 requests in turn."""
    rng = random.Random(seed)
    n_events, n_blocks = SHAPES[shape]
    requests = 16
    last: list[bytes | int | None] = [None] * requests
    counter = 0
    out = []
    for b in range(BATCHES):
        evs: list[object] = []
        for e in range(n_events):
            r = (b * n_events + e) % requests
            hashes: list[bytes | int] = []
            for _ in range(n_blocks):
                digest = hashlib.sha256(counter.to_bytes(8, "big")).digest()
                counter += 1
                hashes.append(digest if hash_form == "bytes"
                              else int.from_bytes(digest[-8:], "big"))
            tokens = [rng.randrange(150_000) for _ in range(n_blocks * BLOCK_SIZE)]
            fields = [hashes, last[r], tokens, BLOCK_SIZE, None, "GPU", None, None, 0]
            last[r] = hashes[-1]
            if encoding == "array":
                evs.append(["BlockStored", *fields])
            else:
                names = ["block_hashes", "parent_block_hash", "token_ids", "block_size",
                         "lora_id", "medium", "lora_name"]
                evs.append({"type": "BlockStored", **dict(zip(names, fields)),
                            "group_idx": 0})
        batch: object = ([time.time(), evs, 0] if encoding == "array"
                         else {"ts": time.time(), "events": evs, "data_parallel_rank": 0})
        out.append(msgspec.msgpack.encode(batch))
    return out


def removal_payloads(payloads: list[bytes]) -> list[bytes]:
    """Per store batch, a ``BlockRemoved`` batch (GPU) naming the same blocks, encoded as
    vLLM before 0.26 encodes it."""
    out = []
    for p in payloads:
        batch = events.decode_batch(p)
        hashes = [h for ev in batch.events if isinstance(ev, BlockStored)
                  for h in ev.block_hashes]
        out.append(msgspec.msgpack.encode([time.time(), [["BlockRemoved", hashes, "GPU"]], 0]))
    return out


@dataclass
class Cell:
    path: str
    encoding: str
    hashes: str
    shape: str
    sink: str
    blocks_per_s: float
    us_per_batch: float


def run_direct(decode: Callable[[bytes], KVEventBatch], sink: EventSink,
               payloads: list[bytes], seconds: float) -> tuple[float, float]:
    for p in payloads[:200]:  # warm up
        sink.apply_batch("pod-0", decode(p))
    batches = 0
    deadline = time.perf_counter() + seconds
    cpu_start = time.thread_time()
    while time.perf_counter() < deadline:
        for p in payloads:
            sink.apply_batch("pod-0", decode(p))
        batches += len(payloads)
    cpu = time.thread_time() - cpu_start
    return batches * BLOCKS_PER_BATCH / cpu, cpu / batches * 1e6


def run_churn(decode: Callable[[bytes], KVEventBatch], sink: EventSink,
              payloads: list[bytes], removals: list[bytes], seconds: float
              ) -> tuple[float, float]:
    """Stored blocks per CPU-second when each batch's blocks are removed before it is
    stored again (the removals' decoding and application count)."""
    for p in payloads:  # fill: the index holds every batch once
        sink.apply_batch("pod-0", decode(p))
    batches = 0
    deadline = time.perf_counter() + seconds
    cpu_start = time.thread_time()
    while time.perf_counter() < deadline:
        for r, p in zip(removals, payloads):
            sink.apply_batch("pod-0", decode(r))
            sink.apply_batch("pod-0", decode(p))
        batches += len(payloads)
    cpu = time.thread_time() - cpu_start
    return batches * BLOCKS_PER_BATCH / cpu, cpu / batches * 1e6


def _publish(port: int, payloads: list[bytes], rounds: int) -> None:
    """Publisher process: wait for the subscription, then send every batch."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.sndhwm = 0
    pub.bind(f"tcp://127.0.0.1:{port}")
    pub.recv()  # the subscription
    topic = TOPIC.encode()
    seq = 0
    for _ in range(rounds):
        for p in payloads:
            pub.send_multipart([topic, seq.to_bytes(8, "big"), p])
            seq += 1
    pub.recv()  # the unsubscription: the subscriber is done
    pub.close(linger=0)
    ctx.term()


async def run_zmq(sink_factory: Callable[[], EventSink], payloads: list[bytes],
                  rounds: int) -> tuple[float, float]:
    """Batches per second from the first delivery to the last, timed in the sink."""
    probe = zmq.Context()
    sock = probe.socket(zmq.PUB)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(linger=0)
    probe.term()
    total = rounds * len(payloads)
    proc = multiprocessing.get_context("spawn").Process(
        target=_publish, args=(port, payloads, rounds), daemon=True)
    proc.start()
    ctx = zmq.asyncio.Context()
    counted = _Counting(sink_factory())
    sub = KVEventSubscriber(
        Endpoint("pod-0", "127.0.0.1:8000", kv_events=f"tcp://127.0.0.1:{port}"), counted,
        context=ctx, settings=KVEventsSettings(replay_port_offset=None, rcvhwm=0))
    sub.start()
    try:
        deadline = time.monotonic() + 60
        while counted.batches < total and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await sub.stop()
        ctx.destroy(linger=0)
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    if counted.batches < total:
        print(f"  warning: {total - counted.batches} of {total} batches not received")
    cpu = counted.cpu_last - counted.cpu_first  # this thread: receive, decode, deliver
    got = counted.batches - 1  # intervals between the first and the last delivery
    return got * BLOCKS_PER_BATCH / cpu, cpu / got * 1e6


class _Counting:
    """Counts and times deliveries on their way to the real sink."""

    def __init__(self, inner: EventSink) -> None:
        self.inner = inner
        self.batches = 0
        self.cpu_first = self.cpu_last = 0.0

    def apply_batch(self, endpoint: str, batch: KVEventBatch) -> ApplyResult:
        result = self.inner.apply_batch(endpoint, batch)
        self.cpu_last = time.thread_time()
        if not self.batches:
            self.cpu_first = self.cpu_last
        self.batches += 1
        return result

    def clear_endpoint(self, endpoint: str) -> None:
        self.inner.clear_endpoint(endpoint)


def new_index() -> BlockIndex:
    return BlockIndex(model="bench", capacity_blocks=10_000_000)


def compare_with_baseline(ref: str, rounds: int, seconds: float) -> None:
    """The index cells against the index of ``ref``, interleaved round by round."""
    baseline = load_index_module(ref)
    factories: dict[str, Callable[[], EventSink]] = {
        "new": new_index,
        "old": lambda: baseline.BlockIndex(model="bench", capacity_blocks=10_000_000)}
    print()
    print(f"Index against {ref} (median of {rounds} interleaved rounds of {seconds} s; "
          f"decode included, array encoding, int hashes)")
    print()
    print("| events x blocks | mode | old blocks/s | new blocks/s | new/old |")
    print("|---|---|---:|---:|---:|")
    for shape in SHAPES:
        ps = make_payloads("array", "int", shape)
        rs = removal_payloads(ps)
        for mode in ("stored again", "store+remove"):
            got: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(rounds):
                for name, factory in factories.items():
                    result = (run_direct(events.decode_batch, factory(), ps, seconds)
                              if mode == "stored again" else
                              run_churn(events.decode_batch, factory(), ps, rs, seconds))
                    got[name].append(result[0])
            ratio = statistics.median(n / o for n, o in zip(got["new"], got["old"]))
            print(f"| {shape} | {mode} | {statistics.median(got['old']):,.0f} | "
                  f"{statistics.median(got['new']):,.0f} | {ratio:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell")
    parser.add_argument("--quick", action="store_true", help="0.3 s per cell")
    parser.add_argument("--no-zmq", action="store_true", help="skip the end-to-end cells")
    parser.add_argument("--baseline-ref", metavar="REF",
                        help="also compare the index with epp/kvcache/index.py at git REF")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds per cell of the baseline comparison")
    args = parser.parse_args()
    seconds = 0.3 if args.quick else args.seconds

    cells: list[Cell] = []

    def add(path: str, encoding: str, hashes: str, shape: str, sink: str,
            result: tuple[float, float]) -> None:
        cells.append(Cell(path, encoding, hashes, shape, sink, *result))
        print(f"  {path:14} {encoding:5} {hashes:5} {shape:4} {sink:5} "
              f"{result[0]:>12,.0f} blocks/s", flush=True)

    payloads = {(enc, h, shape): make_payloads(enc, h, shape)
                for enc in ("array", "map") for h in ("int", "bytes") for shape in SHAPES}
    for shape in SHAPES:
        for enc, h in (("array", "int"), ("map", "int"), ("map", "bytes")):
            ps = payloads[(enc, h, shape)]
            add("decode_batch", enc, h, shape, "no-op",
                run_direct(events.decode_batch, NoopSink(), ps, seconds))
            add("decode_batch", enc, h, shape, "index",
                run_direct(events.decode_batch, new_index(), ps, seconds))
        ps = payloads[("array", "int", shape)]
        add("store+remove", "array", "int", shape, "index",
            run_churn(events.decode_batch, new_index(), ps, removal_payloads(ps), seconds))
        for enc in ("array", "map"):
            add("generic path", enc, "int", shape, "no-op",
                run_direct(events._decode_generic, NoopSink(),
                           payloads[(enc, "int", shape)], seconds))
    if not args.no_zmq:
        rounds = max(1, int(seconds * 60_000 / BATCHES))  # enough batches for ~seconds
        for shape in SHAPES:
            ps = payloads[("array", "int", shape)]
            add("zmq end-to-end", "array", "int", shape, "no-op",
                asyncio.run(run_zmq(NoopSink, ps, rounds)))
            add("zmq end-to-end", "array", "int", shape, "index",
                asyncio.run(run_zmq(new_index, ps, rounds)))

    print()
    print(f"KV-event ingest per CPU-second of one thread; {BLOCKS_PER_BATCH} blocks x "
          f"{BLOCK_SIZE} tokens per batch; goal >= {GOAL_BLOCKS_PER_S:,} blocks/s")
    print()
    print("| path | encoding | hashes | events x blocks | sink | blocks/s | CPU µs/batch "
          "| goal |")
    print("|---|---|---|---|---|---:|---:|---|")
    for c in cells:
        ok = "yes" if c.blocks_per_s >= GOAL_BLOCKS_PER_S else "no"
        print(f"| {c.path} | {c.encoding} | {c.hashes} | {c.shape} | {c.sink} | "
              f"{c.blocks_per_s:,.0f} | {c.us_per_batch:.1f} | {ok} |")
    if args.baseline_ref:
        compare_with_baseline(args.baseline_ref, args.rounds, seconds)


if __name__ == "__main__":
    main()
