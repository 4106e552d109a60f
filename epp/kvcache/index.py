"""The block index: which endpoint holds which block, in which tier.

Layout, chosen for memory and for O(blocks) prefix lookups over all endpoints at once:

- ``_holders``: block key -> an int bitmask; endpoint slot ``s`` owns bit ``2s`` (GPU)
  and bit ``2s + 1`` (CPU and other offload tiers).
- per endpoint, engine hash -> block key: how ``BlockRemoved`` (which names vLLM's hashes)
  finds our key, and the endpoint's reverse set, so clearing one pod is O(its blocks).
  Every entry names a key the endpoint holds in ``_holders``: capacity eviction goes
  through these maps, so they are bounded by the index's capacity too.

Longest-prefix lookup walks the request's keys once, AND-ing the bitmasks: every
endpoint's match length falls out of one pass, however many endpoints there are.

**Pending blocks.** A request routed to an endpoint will store its prompt's blocks there
within its prefill time, but the engine's ``BlockStored`` events come only then: a sibling
request routed meanwhile (same prefix, in flight together) would see nothing. So the
routing decision itself enters the request's keys for the chosen endpoint as *pending*
(``_pending``: key -> GPU-bit mask, beside ``_holders``), with an expiry. A pending entry
is confirmed (and leaves the pending tier) by the engine's ``BlockStored`` for that key
(a later ``BlockRemoved`` then removes the stored block as any other); it is dropped by
the endpoint's ``AllBlocksCleared``, by the request failing
(:meth:`BlockIndex.drop_pending`) or at its expiry. Lookups report the prefix with
pending blocks separately from the confirmed one, so pending blocks steer routing but
never count as what the engine holds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

from epp.kvcache.keys import chain_keys, root_key
from epp.kvcache.types import (
    MEDIUM_GPU,
    AllBlocksCleared,
    ApplyResult,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

log = logging.getLogger(__name__)

# Default bound on distinct blocks when the fleet's size is unknown. Derivation: an H100
# 80 GB serving an 8B model keeps ~64 GB for KV; at 128 KiB per token and 16 tokens per
# block that is 31,250 blocks per pod; 64 pods -> 2M blocks. Engines report evictions, so
# the bound only matters when removal events are lost.
DEFAULT_CAPACITY_BLOCKS = 2_000_000
# Capacity eviction frees this fraction of the capacity beyond the overflow, so the
# search for the endpoint to evict from runs once per 1/64 of capacity stored, not once
# per stored block; 1/64 keeps at least 98 % of the capacity in use.
EVICTION_HEADROOM_DIVISOR = 64
# Offloaded blocks are worth less than GPU-resident ones: loading them back costs time.
GPU_WEIGHT = 1.0
CPU_WEIGHT = 0.8
# A pending block is on its way to the GPU tier of the endpoint a request was sent to.
PENDING_WEIGHT = 1.0
# Bound on pending (key, endpoint) entries: each is ~200 B (a key in two dicts and the
# expiry heap's share). 1M entries hold 4,000 concurrent requests of 256 blocks (4k
# tokens at 16 per block); past it the soonest-expiring picks go first.
DEFAULT_MAX_PENDING = 1_000_000


@dataclass(slots=True)
class _EndpointBlocks:
    slot: int
    by_engine_hash: dict[int, int] = field(default_factory=dict)  # engine hash -> our key
    bits: tuple[int, int] = (0, 0)  # (GPU bit, offload bit), shared int objects
    pending: dict[int, float] = field(default_factory=dict)  # key -> expiry (monotonic)

    def __post_init__(self) -> None:
        self.bits = (1 << (2 * self.slot), 1 << (2 * self.slot + 1))


@dataclass(frozen=True, slots=True)
class EndpointMatch:
    """How much of a request's prefix one endpoint holds."""

    blocks: int  # consecutive leading blocks present in any tier (engine-confirmed)
    gpu_blocks: int  # consecutive leading blocks present on the GPU (engine-confirmed)
    # Consecutive leading blocks present in any tier or pending (a request routed there
    # will have stored them by its prefill's end); 0 or less than ``blocks``: none pending.
    with_pending: int = 0

    @property
    def expected_blocks(self) -> int:
        """Leading blocks the endpoint is expected to hold by the time it prefills:
        the confirmed ones and the pending ones after them."""
        return max(self.blocks, self.with_pending)

    def weighted(self) -> float:
        """Blocks weighted by tier (GPU 1.0, offloaded 0.8, pending 1.0)."""
        return (self.gpu_blocks * GPU_WEIGHT + (self.blocks - self.gpu_blocks) * CPU_WEIGHT
                + (self.expected_blocks - self.blocks) * PENDING_WEIGHT)


@dataclass(frozen=True, slots=True)
class PendingPick:
    """The pending entries one routing decision added (to drop them if it fails)."""

    endpoint: str
    keys: tuple[int, ...]
    expires: float


class BlockIndex:
    """Implements the subscribers' ``EventSink``; read by the prefix-match producer."""

    def __init__(self, *, model: str = "", capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be at least 1")
        if max_pending < 0:
            raise ValueError("max_pending must not be negative")
        self.model = model
        self.capacity_blocks = capacity_blocks
        self.max_pending = max_pending
        self._clock = clock
        self._holders: dict[int, int] = {}
        # Pending tier: key -> GPU-bit mask; expiries in a heap of (expires, seq, name, keys).
        self._pending: dict[int, int] = {}
        self._pending_heap: list[tuple[float, int, str, tuple[int, ...]]] = []
        self._pending_count = 0
        self._pending_seq = itertools.count()
        # Counters (exported as metrics).
        self.pending_added = 0
        self.pending_confirmed = 0
        self.pending_expired = 0
        self.pending_dropped = 0
        self.corrected_blocks = 0
        self._endpoints: dict[str, _EndpointBlocks] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self.known_loras: set[str] = set()
        self.evicted_by_capacity = 0

    # -- sizes ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._holders)

    def blocks_of(self, endpoint: str) -> int:
        """Blocks an endpoint holds (any tier)."""
        eb = self._endpoints.get(endpoint)
        return len(eb.by_engine_hash) if eb is not None else 0

    def endpoints(self) -> list[str]:
        """Endpoints with index state."""
        return list(self._endpoints)

    @property
    def pending_entries(self) -> int:
        """(key, endpoint) pairs in the pending tier."""
        return self._pending_count

    def pending_of(self, endpoint: str) -> int:
        """Blocks pending on an endpoint."""
        eb = self._endpoints.get(endpoint)
        return len(eb.pending) if eb is not None else 0

    def root(self, lora_name: str | None) -> int:
        """Root key for a request or event on this index's model."""
        return root_key(self.model, lora_name)

    # -- writes (EventSink) ---------------------------------------------------------

    def _slot(self, endpoint: str) -> _EndpointBlocks:
        eb = self._endpoints.get(endpoint)
        if eb is None:
            slot = self._free_slots.pop() if self._free_slots else self._next_slot
            if slot == self._next_slot:
                self._next_slot += 1
            eb = self._endpoints[endpoint] = _EndpointBlocks(slot)
        return eb

    def apply_batch(self, endpoint: str, batch: KVEventBatch) -> ApplyResult:
        """Apply one batch of an endpoint's events, in order."""
        result = ApplyResult()
        eb = self._slot(endpoint)
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(eb, event, result)
            elif isinstance(event, BlockRemoved):
                self._removed(eb, event, result)
            elif isinstance(event, AllBlocksCleared):
                self._clear(eb)
        return result

    def _stored(self, eb: _EndpointBlocks, ev: BlockStored, result: ApplyResult) -> None:
        if ev.group_idx != 0 or ev.block_size <= 0 or not ev.token_ids:
            # Hybrid models: group 0 (full attention) decides prefix reuse; placeholder
            # stores (block_size 0, no tokens) carry nothing to key.
            result.skipped += 1
            return
        if ev.parent_block_hash is None:
            parent = self.root(ev.lora_name)
        else:
            found = eb.by_engine_hash.get(ev.parent_block_hash)
            if found is None:
                result.missing_parent += 1
                return
            parent = found
        if ev.lora_name:
            self.known_loras.add(ev.lora_name)
        keys = (chain_keys(ev.token_ids, ev.block_size, parent) if ev.extra_keys is None
                else _keys_with_extras(ev, parent))
        bit = eb.bits[0 if ev.medium in (None, MEDIUM_GPU) else 1]
        holders = self._holders
        by_engine = eb.by_engine_hash
        pending = eb.pending
        for engine_hash, key in zip(ev.block_hashes, keys):
            if pending and key in pending:
                self._unpend(eb, key)
                self.pending_confirmed += 1
            previous = by_engine.get(engine_hash)
            if previous is not None and previous != key:
                # The engine reuses a hash for other tokens (it restarted unseen): the
                # old key must not stay held with no entry that could ever remove it.
                self._release(previous, eb.slot)
            by_engine[engine_hash] = key
            old = holders.get(key)
            # Reuse the endpoint's bit object for blocks only it holds: ~28 B saved each.
            holders[key] = bit if old is None or old == bit else old | bit
        result.stored += len(keys)
        if len(holders) > self.capacity_blocks:
            self._evict()

    def _removed(self, eb: _EndpointBlocks, ev: BlockRemoved, result: ApplyResult) -> None:
        if ev.group_idx != 0:
            result.skipped += 1
            return
        bit = 1 << (2 * eb.slot + (0 if ev.medium in (None, MEDIUM_GPU) else 1))
        holders = self._holders
        by_engine = eb.by_engine_hash
        both = 0b11 << (2 * eb.slot)
        for engine_hash in ev.block_hashes:
            key = by_engine.get(engine_hash)
            if key is None:
                result.unknown_removed += 1
                continue
            mask = holders.get(key, 0) & ~bit
            if mask:
                holders[key] = mask
            else:
                holders.pop(key, None)
            if not mask & both:  # gone from every tier of this endpoint
                del by_engine[engine_hash]
            result.removed += 1

    def _clear(self, eb: _EndpointBlocks) -> None:
        self.pending_dropped += len(eb.pending)
        for key in list(eb.pending):
            self._unpend(eb, key)
        clear = ~(0b11 << (2 * eb.slot))
        holders = self._holders
        for key in eb.by_engine_hash.values():
            mask = holders.get(key)
            if mask is None:
                continue
            mask &= clear
            if mask:
                holders[key] = mask
            else:
                del holders[key]
        eb.by_engine_hash.clear()

    def clear_endpoint(self, endpoint: str) -> None:
        """Forget everything an endpoint holds (restart, cleared cache, left the pool)."""
        eb = self._endpoints.pop(endpoint, None)
        if eb is None:
            return
        self._clear(eb)
        self._free_slots.append(eb.slot)

    def _release(self, key: int, slot: int) -> bool:
        """Take both tiers' bits of ``slot`` off ``key``; drop the key when no one holds
        it (then True)."""
        holders = self._holders
        mask = holders.get(key)
        if mask is None:
            return False
        mask &= ~(0b11 << (2 * slot))
        if mask:
            holders[key] = mask
            return False
        del holders[key]
        return True

    def _evict(self) -> None:
        """Shrink to the capacity (less headroom) by evicting the oldest entries of the
        endpoint that holds the most: its engine-hash entries go with its bits, so no
        map keeps entries for blocks the index no longer holds."""
        holders = self._holders
        target = self.capacity_blocks - self.capacity_blocks // EVICTION_HEADROOM_DIVISOR
        while len(holders) > target:
            largest = max(self._endpoints.values(), key=lambda e: len(e.by_engine_hash),
                          default=None)
            if largest is None or not largest.by_engine_hash:
                self._evict_unowned(len(holders) - target)
                return
            by_engine = largest.by_engine_hash
            # At most the overflow from one endpoint before looking again: several
            # endpoints holding the same blocks share the eviction.
            count = min(len(holders) - target, len(by_engine))
            for engine_hash, key in list(itertools.islice(by_engine.items(), count)):
                del by_engine[engine_hash]
                self.evicted_by_capacity += self._release(key, largest.slot)

    def _evict_unowned(self, count: int) -> None:
        # Keys no endpoint entry names (none are expected: every store writes an entry
        # and every overwrite releases the old key); oldest-inserted first.
        holders = self._holders
        victims = list(itertools.islice(holders, count))
        for key in victims:
            del holders[key]
        self.evicted_by_capacity += len(victims)

    # -- pending picks -----------------------------------------------------------------

    def add_pending(self, endpoint: str, keys: Sequence[int], ttl_s: float) -> PendingPick:
        """A request with these block keys was routed to ``endpoint``: until the engine
        confirms them, they are pending there for ``ttl_s`` seconds. Keys the endpoint
        already holds are left out; a key already pending there gets the later expiry."""
        now = self._clock()
        self._expire(now)
        eb = self._slot(endpoint)
        expires = now + ttl_s
        gpu = eb.bits[0]
        both = 0b11 << (2 * eb.slot)
        holders, pending_tier, mine = self._holders, self._pending, eb.pending
        added = []
        for key in keys:
            if holders.get(key, 0) & both:
                continue
            if key not in mine:
                pending_tier[key] = pending_tier.get(key, 0) | gpu
                self._pending_count += 1
            mine[key] = expires
            added.append(key)
        pick = PendingPick(endpoint, tuple(added), expires)
        if added:
            self.pending_added += len(added)
            heapq.heappush(self._pending_heap,
                           (expires, next(self._pending_seq), endpoint, pick.keys))
            if self._pending_count > self.max_pending:
                self._expire(math.inf, limit=self._pending_count - self.max_pending)
        return pick

    def drop_pending(self, pick: PendingPick) -> None:
        """The request behind ``pick`` failed: its pending entries go, unless a later
        pick of the same keys on the same endpoint renewed them."""
        eb = self._endpoints.get(pick.endpoint)
        if eb is None:
            return
        mine = eb.pending
        for key in pick.keys:
            if mine.get(key) == pick.expires:
                self._unpend(eb, key)
                self.pending_dropped += 1

    def _unpend(self, eb: _EndpointBlocks, key: int) -> None:
        del eb.pending[key]
        self._pending_count -= 1
        mask = self._pending.get(key, 0) & ~eb.bits[0]
        if mask:
            self._pending[key] = mask
        else:
            self._pending.pop(key, None)

    def _expire(self, now: float, limit: int | None = None) -> None:
        """Drop pending entries whose expiry has passed (or, with ``limit``, that many
        entries from the soonest-expiring picks on)."""
        heap = self._pending_heap
        dropped = 0
        while heap and (heap[0][0] <= now) and (limit is None or dropped < limit):
            expires, _, name, keys = heapq.heappop(heap)
            eb = self._endpoints.get(name)
            if eb is None:
                continue
            mine = eb.pending
            for key in keys:
                if mine.get(key) == expires:
                    self._unpend(eb, key)
                    dropped += 1
        if limit is None:
            self.pending_expired += dropped
        else:
            self.pending_dropped += dropped

    def forget(self, endpoint: str, keys: Iterable[int]) -> int:
        """The engine showed it no longer holds these blocks (its ``cached_tokens`` fell
        short of what the index credited): take them off the endpoint in every tier.
        Returns how many it held. The engine-hash entries that named them are removed by
        the engine's own ``BlockRemoved`` when it comes, or by capacity eviction."""
        eb = self._endpoints.get(endpoint)
        if eb is None:
            return 0
        both = 0b11 << (2 * eb.slot)
        holders = self._holders
        forgotten = 0
        for key in keys:
            mask = holders.get(key, 0)
            if not mask & both:
                continue
            forgotten += 1
            mask &= ~both
            if mask:
                holders[key] = mask
            else:
                del holders[key]
        self.corrected_blocks += forgotten
        return forgotten

    # -- reads ----------------------------------------------------------------------

    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> dict[str, EndpointMatch]:
        """Longest consecutive prefix of ``keys`` each endpoint holds (confirmed, on the
        GPU, and with pending blocks)."""
        if self._pending_heap:
            self._expire(self._clock())
        slots = {}
        for name in endpoints:
            eb = self._endpoints.get(name)
            if eb is not None and (eb.by_engine_hash or eb.pending):
                slots[name] = eb.slot
        out = {name: EndpointMatch(0, 0) for name in endpoints}
        if not slots or not keys:
            return out
        want_any = 0
        for slot in slots.values():
            want_any |= 1 << (2 * slot)
        holders = self._holders
        pending = self._pending
        alive_any = want_any  # GPU-bit positions of endpoints still matching (any tier)
        alive_gpu = want_any
        alive_exp = want_any if pending else 0  # ... any tier or pending
        end_any: dict[int, int] = {}
        end_gpu: dict[int, int] = {}
        end_exp: dict[int, int] = {}
        n = len(keys)
        for i, key in enumerate(keys):
            m = holders.get(key, 0)
            present_any = (m | (m >> 1)) & want_any
            present_gpu = m & want_any
            if alive_gpu & ~present_gpu:
                _record(alive_gpu & ~present_gpu, i, end_gpu)
                alive_gpu &= present_gpu
            if alive_any & ~present_any:
                _record(alive_any & ~present_any, i, end_any)
                alive_any &= present_any
            if alive_exp:
                missing = alive_exp & ~present_any
                if missing:  # only then can pending blocks matter
                    missing &= ~pending.get(key, 0)
                    if missing:
                        _record(missing, i, end_exp)
                        alive_exp &= ~missing
            if not alive_any and not alive_exp:
                break
        if alive_any:
            _record(alive_any, n, end_any)
        if alive_gpu:
            _record(alive_gpu, n, end_gpu)
        if alive_exp:
            _record(alive_exp, n, end_exp)
        for name, slot in slots.items():
            bitpos = 2 * slot
            blocks = end_any.get(bitpos, 0)
            out[name] = EndpointMatch(blocks, min(blocks, end_gpu.get(bitpos, 0)),
                                      end_exp.get(bitpos, 0))
        return out


def _keys_with_extras(ev: BlockStored, parent: int) -> list[int]:
    """Keys of a stored event's blocks. A block that vLLM hashed with extra keys other
    than its LoRA name (multimodal inputs, cache_salt) gets a key no plain-token request
    can produce, so such blocks are never credited to the wrong request."""
    extras = ev.extra_keys
    own = (ev.lora_name,) if ev.lora_name else None
    if not extras or all(x is None or tuple(x) == own for x in extras):
        return chain_keys(ev.token_ids, ev.block_size, parent)
    keys = []
    bs = ev.block_size
    for i, extra in enumerate(extras[: len(ev.token_ids) // bs]):
        key = chain_keys(ev.token_ids[i * bs:(i + 1) * bs], bs, parent)[0]
        if extra is not None and tuple(extra) != own:
            key = xxhash.xxh3_64_intdigest(repr(tuple(extra)).encode(), key)
        keys.append(key)
        parent = key
    return keys


def _record(mask: int, length: int, ends: dict[int, int]) -> None:
    """For every set bit of ``mask``, remember that its match ended at ``length``."""
    while mask:
        low = mask & -mask
        ends[low.bit_length() - 1] = length
        mask ^= low
