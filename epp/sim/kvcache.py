"""The simulated pod's prefix cache: vLLM-like block hashing, reference counts and LRU.

Blocks are keyed by a hash chained over full blocks of prompt token ids, as vLLM's
``hash_block_tokens`` does: ``H(parent digest or NONE_HASH, block tokens, extra keys)``
with ``H`` = SHA-256 over the block's canonical msgpack encoding (so values are stable
across processes, like vLLM with a pinned ``PYTHONHASHSEED``). LoRA requests add the
adapter name as an extra key, so the same tokens under different adapters never share
blocks.

A request that starts prefill takes references on its cached prefix and stores its new
full blocks; when it finishes the references drop and the blocks become evictable, the
tail of each request first (vLLM frees blocks in reverse order). Only full prompt blocks
occupy the pool; partial and decode blocks are not modelled. An optional CPU tier
receives blocks evicted from the GPU tier and serves prefix hits, like vLLM's CPU
offloading connector.

Every change is reported to listeners as ``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared`` records in the order it happened, hashes as 32-byte digests; the
KV events publisher turns them into vLLM's wire format.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
# The parent "hash" of every first block: a fixed seed, as vLLM derives NONE_HASH from
# PYTHONHASHSEED when it is set.
NONE_HASH = hashlib.sha256(b"epp-sim").digest()

_encode = msgspec.msgpack.Encoder().encode

ExtraKeys = tuple[str, ...] | None


def hash_block(parent: bytes | None, tokens: Sequence[int], extra_keys: ExtraKeys) -> bytes:
    """The 32-byte digest of one full block chained onto ``parent`` (None: first block)."""
    return hashlib.sha256(_encode((parent or NONE_HASH, tuple(tokens), extra_keys))).digest()


@dataclass(frozen=True, slots=True)
class BlockStored:
    """New full blocks in one medium; ``token_ids`` holds all their tokens in order."""

    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None
    medium: str
    lora_name: str | None
    extra_keys: tuple[ExtraKeys, ...]  # one entry per block


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks evicted from one medium."""

    block_hashes: tuple[bytes, ...]
    medium: str


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (``POST /reset_prefix_cache``)."""


CacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
CacheListener = Callable[[Sequence[CacheEvent]], None]


@dataclass(eq=False, slots=True)
class _Block:
    hash: bytes
    parent: bytes | None
    tokens: tuple[int, ...]
    lora: str | None
    ref: int = 0  # running requests holding the block (GPU tier only)


@dataclass(frozen=True, slots=True)
class CacheLease:
    """What a running request holds: its cached token count and its GPU blocks."""

    cached_tokens: int
    blocks: tuple[_Block, ...] = field(repr=False)


class PrefixCache:
    """A fixed pool of ``num_gpu_blocks`` blocks (plus ``cpu_blocks`` on the CPU tier)."""

    def __init__(
        self,
        *,
        block_size: int,
        num_gpu_blocks: int,
        cpu_blocks: int = 0,
        lora_ids: Mapping[str, int] | None = None,
    ) -> None:
        if block_size < 1 or num_gpu_blocks < 1 or cpu_blocks < 0:
            raise ValueError("block_size and num_gpu_blocks must be >= 1, cpu_blocks >= 0")
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.cpu_blocks = cpu_blocks
        self._lora_ids = dict(lora_ids or {})
        self._gpu: dict[bytes, _Block] = {}
        self._free: OrderedDict[bytes, _Block] = OrderedDict()  # ref == 0, LRU first
        self._cpu: OrderedDict[bytes, _Block] = OrderedDict()  # LRU first
        self._listeners: list[CacheListener] = []
        self._referenced = 0  # GPU blocks with ref > 0

    def subscribe(self, listener: CacheListener) -> None:
        """Call ``listener(events)`` after every change, events in the order they happened."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: CacheListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    @property
    def referenced_blocks(self) -> int:
        """GPU blocks held by running requests, each counted once however many share it
        (what vLLM's KV usage counts; cached blocks nobody holds are free to evict)."""
        return self._referenced

    @property
    def gpu_block_hashes(self) -> frozenset[bytes]:
        """Digests of the blocks cached on the GPU tier."""
        return frozenset(self._gpu)

    @property
    def cpu_block_hashes(self) -> frozenset[bytes]:
        """Digests of the blocks cached on the CPU tier."""
        return frozenset(self._cpu)

    def block_hashes(self, token_ids: Sequence[int], lora: str | None = None) -> list[bytes]:
        """Chained digests of every full block of ``token_ids``."""
        size = self.block_size
        extra = (lora,) if lora is not None else None
        hashes: list[bytes] = []
        parent: bytes | None = None
        for start in range(0, len(token_ids) - size + 1, size):
            parent = hash_block(parent, token_ids[start:start + size], extra)
            hashes.append(parent)
        return hashes

    def lookup(self, token_ids: Sequence[int], lora: str | None = None) -> int:
        """Cached tokens a request for ``token_ids`` would get now (nothing changes)."""
        hits = 0
        for digest in self.block_hashes(token_ids, lora):
            if digest not in self._gpu and digest not in self._cpu:
                break
            hits += 1
        return self._reported(hits, len(token_ids))

    def start(self, token_ids: Sequence[int], lora: str | None = None) -> CacheLease:
        """A request starts prefill: reference its cached prefix, store its new blocks."""
        size = self.block_size
        hashes = self.block_hashes(token_ids, lora)
        held: list[_Block] = []
        for digest in hashes:  # the GPU-resident prefix
            block = self._gpu.get(digest)
            if block is None:
                break
            self._take(block)
            held.append(block)
        hits = len(held)
        for digest in hashes[hits:]:  # continued on the CPU tier: loaded back below
            if digest not in self._cpu:
                break
            self._cpu.move_to_end(digest)
            hits += 1
        # Evictions come before the stores they make room for, as in vLLM (allocation,
        # then caching).
        events: list[CacheEvent] = []
        run: list[_Block] = []  # consecutive new blocks: one BlockStored
        for index in range(len(held), len(hashes)):
            block = self._gpu.get(hashes[index])
            if block is not None:  # a block that outlived its evicted parent ends the run
                self._take(block)
                if run:
                    events.append(self._stored(run, MEDIUM_GPU))
                    run = []
            elif self._make_room(events):
                parent = hashes[index - 1] if index else None
                tokens = tuple(token_ids[index * size:(index + 1) * size])
                block = _Block(hashes[index], parent, tokens, lora, ref=1)
                self._gpu[block.hash] = block
                self._referenced += 1
                run.append(block)
            else:
                break  # every block is held by running requests: the rest stays uncached
            held.append(block)
        if run:
            events.append(self._stored(run, MEDIUM_GPU))
        self._emit(_coalesce(events))
        # CPU hits count only when they made it back onto the GPU.
        return CacheLease(self._reported(min(hits, len(held)), len(token_ids)), tuple(held))

    def finish(self, lease: CacheLease) -> None:
        """The request finished: its blocks become evictable, its tail first."""
        for block in reversed(lease.blocks):
            if self._gpu.get(block.hash) is not block:
                continue  # dropped by a reset while the request ran
            block.ref -= 1
            if block.ref == 0:
                self._free[block.hash] = block
                self._referenced -= 1

    def reset(self) -> None:
        """Drop every cached block on every tier (vLLM's ``reset_prefix_cache``)."""
        self._gpu.clear()
        self._free.clear()
        self._cpu.clear()
        self._referenced = 0
        self._emit([AllBlocksCleared()])

    def _take(self, block: _Block) -> None:
        if block.ref == 0:
            del self._free[block.hash]
            self._referenced += 1
        block.ref += 1

    def _reported(self, hit_blocks: int, prompt_tokens: int) -> int:
        # vLLM always recomputes the last prompt token (it needs its logits), so a fully
        # cached prompt reports one block less.
        if prompt_tokens == 0:
            return 0
        limit = (prompt_tokens - 1) // self.block_size
        return min(hit_blocks, limit) * self.block_size

    def _make_room(self, events: list[CacheEvent]) -> bool:
        """Free one GPU slot, evicting the least recently used unreferenced block."""
        if len(self._gpu) < self.num_gpu_blocks:
            return True
        if not self._free:
            return False
        digest, block = self._free.popitem(last=False)
        del self._gpu[digest]
        events.append(BlockRemoved((digest,), MEDIUM_GPU))
        if self.cpu_blocks:
            self._offload(block, events)
        return True

    def _offload(self, block: _Block, events: list[CacheEvent]) -> None:
        if block.hash in self._cpu:
            self._cpu.move_to_end(block.hash)
            return
        if len(self._cpu) >= self.cpu_blocks:
            evicted, _ = self._cpu.popitem(last=False)
            events.append(BlockRemoved((evicted,), MEDIUM_CPU))
        self._cpu[block.hash] = block
        events.append(self._stored([block], MEDIUM_CPU))

    def _stored(self, blocks: Sequence[_Block], medium: str) -> BlockStored:
        lora = blocks[0].lora
        extra = (lora,) if lora is not None else None
        return BlockStored(
            block_hashes=tuple(b.hash for b in blocks),
            parent_block_hash=blocks[0].parent,
            token_ids=tuple(t for b in blocks for t in b.tokens),
            block_size=self.block_size,
            lora_id=self._lora_ids.get(lora) if lora is not None else None,
            medium=medium,
            lora_name=lora,
            extra_keys=(extra,) * len(blocks),
        )

    def _emit(self, events: Sequence[CacheEvent]) -> None:
        if events:
            for listener in self._listeners:
                listener(events)


def _coalesce(events: list[CacheEvent]) -> list[CacheEvent]:
    """Merge adjacent removals from the same medium into one event."""
    out: list[CacheEvent] = []
    for event in events:
        last = out[-1] if out else None
        if (isinstance(event, BlockRemoved) and isinstance(last, BlockRemoved)
                and last.medium == event.medium):
            out[-1] = BlockRemoved(last.block_hashes + event.block_hashes, event.medium)
        else:
            out.append(event)
    return out
