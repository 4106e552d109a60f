"""Compact hash tables for the block index: 64-bit keys in typed arrays, not dicts of ints.

A dict from one 64-bit int to another costs ~110 B an entry in CPython (two int objects
of 32-36 B and a hash-table entry of ~40 B amortized), and the index holds millions. These
tables keep keys in ``array('Q')`` (8 B) and find them through an open-addressing table
of 4-byte positions:

- linear probing, at most 0.7 full, so a hit takes ~2 probes and a miss ~6;
- homes no one can aim at: block keys are uniform but anyone can compute them (a prompt
  can be ground until its keys collide), so a block table reads its home from a window
  of the key's bits at a random offset; engine hashes may have any structure
  (sequential), so an engine-hash map uses multiply-shift hashing with a random odd
  multiplier;
- growth rebuilds the probe table, amortized as a dict's resize is.

Pure Python over ``array`` costs several times a dict per operation, so the index's hot
loops probe through a table's ``view`` themselves rather than call a method per key: a
probe starts at the key's home slot and steps by one.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Iterator
from itertools import compress, islice

# Probe-table fill bound: linear probing's expected probes at load a are (1 + 1/(1-a))/2
# for a hit and (1 + 1/(1-a)^2)/2 for a miss: 2.2 and 6 at 0.7. Tables double past it,
# so the load stays between 0.35 and 0.7 (4 B a slot: 6-11 B an entry).
MAX_LOAD_NUM, MAX_LOAD_DEN = 7, 10
MIN_SLOTS = 8
# A block table's home window starts at a random bit offset up to this, so it fits in a
# 64-bit key for tables of up to 2**32 slots; grinding keys that collide in every window
# means colliding in all 64 bits.
MAX_WINDOW_OFFSET = 32
# An engine-hash map rebuilds its log once dead entries outnumber live ones by this many:
# the log stays under about twice its entries, each rebuild paid for by as many removals.
MIN_DEAD_TO_REBUILD = 32
U64_MASK = (1 << 64) - 1


def slots_for(entries: int) -> int:
    """Smallest power-of-two probe table that holds ``entries`` within the load bound."""
    n = MIN_SLOTS
    while entries * MAX_LOAD_DEN > n * MAX_LOAD_NUM:
        n *= 2
    return n


class _ProbeTable:
    """The probe table both structures share: ``slots[i]`` is a position (from 1) in the
    owner's arrays, 0 for empty."""

    __slots__ = ("slots", "mask", "_limit")

    def _alloc(self, n: int) -> None:
        self.slots = array("I", bytes(4 * n))
        self.mask = n - 1
        self._limit = n * MAX_LOAD_NUM // MAX_LOAD_DEN

    @property
    def capacity(self) -> int:
        """Slots in the probe table."""
        return self.mask + 1


class BlockTable(_ProbeTable):
    """Block key (uint64) -> non-zero holder bitmask: the index's held blocks.

    Keys are in ``keys`` (``array('Q')``) and masks in ``masks`` (a list, so a mask held by
    one endpoint stays that endpoint's shared bit object), both at an id; a removed key's
    id is reused. ``masks[0]`` is 0 and no key has id 0; a free id's key is 0.

    Removing a key shifts the rest of its probe run back over the hole, so no tombstones
    pile up and only growth rebuilds the table: a rebuild of a million keys takes most of
    a second in Python, which growth pays a few times in the index's life and periodic
    tombstone clean-ups would pay for ever.

    A key's home is ``key >> offset & mask`` (block keys are uniform uint64).

    ``view`` is ``(slots, keys, masks, offset, mask)`` for loops that probe themselves; a
    new tuple after growth.
    """

    __slots__ = ("keys", "masks", "count", "offset", "view", "_free")

    def __init__(self) -> None:
        self.keys = array("Q", [0])
        self.masks: list[int] = [0]
        self.count = 0  # keys held
        self.offset = secrets.randbelow(MAX_WINDOW_OFFSET + 1)
        self._free = array("I")  # ids of removed keys
        self._alloc(MIN_SLOTS)

    def _alloc(self, n: int) -> None:
        super()._alloc(n)
        self.view = (self.slots, self.keys, self.masks, self.offset, self.mask)

    def home(self, key: int) -> int:
        """The slot where the probe for ``key`` starts."""
        return key >> self.offset & self.mask

    def _grow(self) -> None:
        self._alloc(2 * self.capacity)
        slots, keys, offset, mask = self.slots, self.keys, self.offset, self.mask
        for j in self._ids():
            i = keys[j] >> offset & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = j

    def __len__(self) -> int:
        return self.count

    # The probe loop is written out in the methods below: a call costs as much as it.

    def find(self, key: int) -> tuple[int, int]:
        """(slot, id) of ``key``, or (the empty slot that ends its probe run, 0)."""
        slots, keys, mask = self.slots, self.keys, self.mask
        i = key >> self.offset & mask
        while True:
            j = slots[i]
            if not j or keys[j] == key:
                return i, j
            i = (i + 1) & mask

    def get(self, key: int) -> int:
        """The key's mask, 0 when no one holds it."""
        slots, keys, mask = self.slots, self.keys, self.mask
        i = key >> self.offset & mask
        while True:
            j = slots[i]
            if not j or keys[j] == key:
                return self.masks[j]
            i = (i + 1) & mask

    def add(self, key: int, bits: int) -> int:
        """Set ``bits`` (non-zero) in the key's mask, adding the key if needed (then its
        mask is the caller's ``bits`` object). Returns the key's id."""
        slots, keys, mask = self.slots, self.keys, self.mask
        i = key >> self.offset & mask
        while True:
            j = slots[i]
            if not j:
                return self.insert_at(i, key, bits)
            if keys[j] == key:
                old = self.masks[j]
                if old | bits != old:
                    self.masks[j] = old | bits
                return j
            i = (i + 1) & mask

    def insert_at(self, i: int, key: int, bits: int) -> int:
        """Add ``key``, absent, with mask ``bits`` at the empty slot ``i`` that ended its
        probe run (for callers that probe themselves). Returns its id."""
        if self._free:
            j = self._free.pop()
            self.keys[j] = key
            self.masks[j] = bits
        else:
            j = len(self.masks)
            self.keys.append(key)
            self.masks.append(bits)
        self.slots[i] = j
        self.count += 1
        if self.count > self._limit:
            self._grow()
        return j

    def clear_bits(self, key: int, bits: int) -> int:
        """Clear ``bits`` in the key's mask, dropping the key when nothing is left. Returns
        the mask before (0 when the key was not held)."""
        i, j = self.find(key)
        masks = self.masks
        old = masks[j]
        if old & bits:
            new = old & ~bits
            if new:
                masks[j] = new
            else:
                self.remove_at(i, j)
        return old

    def remove_id(self, j: int) -> None:
        """Drop the key with id ``j``."""
        slots, mask = self.slots, self.mask
        i = self.keys[j] >> self.offset & mask
        while slots[i] != j:
            i = (i + 1) & mask
        self.remove_at(i, j)

    def remove_at(self, i: int, j: int) -> None:
        """Drop the key with id ``j``, found at slot ``i``: the rest of the probe run moves
        back over the hole, so every entry stays reachable from its home."""
        slots, keys, offset, mask = self.slots, self.keys, self.offset, self.mask
        hole = i
        while True:
            i = (i + 1) & mask
            p = slots[i]
            if not p:
                break
            if (i - (keys[p] >> offset & mask)) & mask >= (i - hole) & mask:
                slots[hole] = p  # its home is at or before the hole
                hole = i
        slots[hole] = 0
        self.masks[j] = 0
        keys[j] = 0
        self._free.append(j)
        self.count -= 1

    def discard_first(self, count: int) -> int:
        """Drop up to ``count`` keys, lowest ids first (no endpoint's order applies).
        Returns how many went."""
        victims = [self.keys[j] for j in islice(self._ids(), count)]
        for key in victims:
            self.remove_at(*self.find(key))
        return len(victims)

    def _ids(self) -> Iterator[int]:
        return compress(range(len(self.masks)), self.masks)

    def items(self) -> Iterator[tuple[int, int]]:
        """(key, mask) of every held key, in id order."""
        keys, masks = self.keys, self.masks
        return ((keys[j], masks[j]) for j in list(self._ids()))


class EngineHashMap(_ProbeTable):
    """One endpoint's engine block hash (uint64) -> block key, iterated in insertion order
    like a dict (a hash put again keeps its place): how ``BlockRemoved``, which names the
    engine's hashes, finds our key, and the age order capacity eviction takes.

    Entries are appended to a log: ``hashes`` and ``keys`` (``array('Q')``), ``ids``
    (``array('I')``: the key's id in the ``BlockTable`` when put, a hint that saves a probe
    while that id still names the key) and a live flag; position 0 is unused. Removing
    an entry only clears its flag: its slot keeps pointing at the dead position, which
    probes step over, so a removal moves nothing. The log is rebuilt without its dead
    entries when they outnumber the live ones or would fill the probe table.

    A hash's home is ``h * mult >> shift & mask``: the top bits of the low 64 bits of
    ``h * mult``, so a hash and the same hash modulo 2**64 share a home.

    ``view`` is ``(slots, hashes, keys, ids, live, mask, mult, shift)`` for loops that
    probe themselves; a new tuple after a rebuild.
    """

    __slots__ = ("hashes", "keys", "ids", "live", "count", "mult", "shift", "view", "_head")

    def __init__(self) -> None:
        self.mult = secrets.randbits(64) | 1
        self._reset()

    def _reset(self) -> None:
        self.hashes = array("Q", [0])
        self.keys = array("Q", [0])
        self.ids = array("I", [0])
        self.live = bytearray(1)
        self.count = 0
        self._head = 1  # no live entry before this position
        self._alloc(MIN_SLOTS)

    def _alloc(self, n: int) -> None:
        super()._alloc(n)
        self.shift = 64 - (n.bit_length() - 1)
        self.view = (self.slots, self.hashes, self.keys, self.ids, self.live, self.mask,
                     self.mult, self.shift)

    def home(self, h: int) -> int:
        """The slot where the probe for ``h`` starts."""
        return h * self.mult >> self.shift & self.mask

    def __len__(self) -> int:
        return self.count

    def find(self, h: int) -> tuple[int, int]:
        """(slot, position) of the live entry for ``h``, or (the empty slot that ends its
        probe run, 0)."""
        slots, hashes, live, mask = self.slots, self.hashes, self.live, self.mask
        i = h * self.mult >> self.shift & mask
        while True:
            p = slots[i]
            if not p or hashes[p] == h and live[p]:
                return i, p
            i = (i + 1) & mask

    def get(self, h: int) -> int | None:
        """The key the engine's hash ``h`` names, None when unknown."""
        p = self.find(h)[1]
        if p:
            return self.keys[p]
        if 0 <= h <= U64_MASK:
            return None
        return self.get(h & U64_MASK)  # not a uint64: stored modulo 2**64

    def put(self, h: int, key: int, key_id: int = 0) -> int | None:
        """Map ``h`` to ``key`` (``key_id``: its id in the block table, 0 if unknown);
        returns the key it named before (None when new)."""
        i, p = self.find(h)
        if not p:
            return self.insert_at(i, h, key, key_id)
        old = self.keys[p]
        self.keys[p] = key
        self.ids[p] = key_id
        return old

    def insert_at(self, i: int, h: int, key: int, key_id: int) -> int | None:
        """Add ``h``, absent, at the empty slot ``i`` that ended its probe run (for callers
        that probe themselves); returns None, or for an ``h`` that is not a uint64, what
        ``put`` of it modulo 2**64 returns."""
        try:
            self.hashes.append(h)
        except OverflowError:
            return self.put(h & U64_MASK, key, key_id)
        self.keys.append(key)
        self.ids.append(key_id)
        live = self.live
        live.append(1)
        self.slots[i] = len(live) - 1
        self.count += 1
        if len(live) > self._limit:  # every log position holds a slot
            self._rebuild()
        return None

    def pop(self, h: int) -> int | None:
        """Remove ``h``; returns the key it named (None when unknown)."""
        p = self.find(h)[1]
        if not p:
            if 0 <= h <= U64_MASK:
                return None
            return self.pop(h & U64_MASK)
        key = self.keys[p]
        self.remove_at(p)
        return key

    def remove_at(self, p: int) -> None:
        """Remove the live entry at log position ``p`` (for callers that probe
        themselves). A rebuild replaces ``view``."""
        self.live[p] = 0
        self.count -= 1
        if len(self.live) - 1 > 2 * self.count + MIN_DEAD_TO_REBUILD:
            self._rebuild()

    def pop_oldest(self, count: int) -> list[int]:
        """Remove the ``count`` oldest entries; returns their keys, oldest first."""
        out: list[int] = []
        live, keys = self.live, self.keys
        p, end = self._head, len(live)
        while len(out) < count and p < end:
            if live[p]:
                out.append(keys[p])
                live[p] = 0
            p += 1
        self._head = p
        self.count -= len(out)
        if len(live) - 1 > 2 * self.count + MIN_DEAD_TO_REBUILD:
            self._rebuild()
        return out

    def _rebuild(self) -> None:
        """The log without its dead entries, and a probe table with room for half as many
        entries again before the next rebuild."""
        live = self.live
        hashes, keys, ids = array("Q", [0]), array("Q", [0]), array("I", [0])
        hashes.extend(compress(self.hashes, live))
        keys.extend(compress(self.keys, live))
        ids.extend(compress(self.ids, live))
        self.hashes, self.keys, self.ids = hashes, keys, ids
        n = self.count
        self.live = bytearray(1) + b"\x01" * n
        self._head = 1
        self._alloc(slots_for(n + n // 2))
        slots, mask, mult, shift = self.slots, self.mask, self.mult, self.shift
        for p in range(1, n + 1):
            i = hashes[p] * mult >> shift & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = p

    def values(self) -> Iterator[int]:
        """The keys, oldest entry first."""
        return compress(self.keys, self.live)

    def items(self) -> Iterator[tuple[int, int]]:
        """(hash, key) pairs, oldest first."""
        hashes, keys = self.hashes, self.keys
        return ((hashes[p], keys[p]) for p in compress(range(len(self.live)), self.live))

    def clear(self) -> None:
        self._reset()
