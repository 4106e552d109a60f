"""What other replicas routed: one entry per peer request, holding the load it put on
an endpoint and the pending picks it made in the local index, until the peer reports
completion or the entry's expiry passes (whichever first). Bounded by entries and by
an estimate of bytes; past a bound the soonest-expiring entries go first."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from epp.datastore.metrics import EndpointLoad
from epp.kvcache.index import PendingPick

# Entries live at most MAX_TTL_S (30 s), typically about one prefill (~1 s). A fleet
# routing 2,000 requests/s keeps ~2,000 of them; 65,536 holds that even at the longest
# TTL for a second of bursts, and beyond it only the soonest-expiring are dropped early.
DEFAULT_MAX_PEER_ENTRIES = 65_536
# Bytes estimate per entry: the entry object, its dict slot and tuple key, its heap
# item (~400 B); per block key held by its picks: a tuple slot and an int object (40 B).
ENTRY_BYTES = 400
PICK_KEY_BYTES = 40
# 64 MiB: ~6,500 entries of 256 blocks (4k-token prompts) at once, or 1.6M keys.
DEFAULT_MAX_PEER_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class PeerEntry:
    """One request another replica routed."""

    replica: str
    endpoint: str
    load: EndpointLoad  # the endpoint's load the tokens were added to
    uncached: int
    picks: tuple[PendingPick, ...]  # one per synced index
    expires: float
    seq: int
    size: int  # bytes estimate


class PeerTable:
    """Peer requests by (replica, request key). Owns the peer load it adds: every entry
    that leaves (completion, expiry, eviction, farewell) takes its load back."""

    def __init__(self, *, max_entries: int = DEFAULT_MAX_PEER_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_PEER_BYTES) -> None:
        if max_entries < 1 or max_bytes < ENTRY_BYTES:
            raise ValueError("the peer table needs room for at least one entry")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: dict[tuple[str, int], PeerEntry] = {}
        self._heap: list[tuple[float, int, tuple[str, int]]] = []
        self._seq = itertools.count()
        self.bytes = 0
        # Counters (exported as metrics).
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, replica: str, request: int, endpoint: str, load: EndpointLoad,
            uncached: int, picks: Sequence[PendingPick], expires: float) -> None:
        """Count a peer request until ``expires`` (monotonic seconds). A repeated key
        replaces the earlier entry."""
        key = (replica, request)
        self.pop(key)
        seq = next(self._seq)
        size = ENTRY_BYTES + PICK_KEY_BYTES * sum(len(p.keys) for p in picks)
        entry = PeerEntry(replica, endpoint, load, uncached, tuple(picks), expires, seq, size)
        self._entries[key] = entry
        self.bytes += size
        load.add_peer(uncached)
        heapq.heappush(self._heap, (expires, seq, key))
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self.evicted += self._pop_soonest()
        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._compact()

    def prefilled(self, key: tuple[str, int]) -> bool:
        """The request's first bytes came: its tokens stop counting as prefill load
        (the request itself counts until it completes)."""
        entry = self._entries.get(key)
        if entry is None or not entry.uncached:
            return False
        entry.load.peer_prefilled(entry.uncached)
        entry.uncached = 0
        return True

    def pop(self, key: tuple[str, int]) -> PeerEntry | None:
        """Remove an entry (its request completed) and take its load back."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._release(entry)
        return entry

    def expire(self, now: float) -> int:
        """Remove entries whose expiry has passed; returns how many."""
        heap, entries = self._heap, self._entries
        count = 0
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry.seq == seq:
                del entries[key]
                self._release(entry)
                count += 1
        self.expired += count
        return count

    def forget_replica(self, replica: str) -> int:
        """Remove every entry of a replica that left; returns how many."""
        gone = [k for k in self._entries if k[0] == replica]
        for key in gone:
            self.pop(key)
        return len(gone)

    def clear(self) -> None:
        """Remove every entry (the sync stops)."""
        for key in list(self._entries):
            self.pop(key)
        self._heap.clear()

    def next_expiry(self) -> float | None:
        """When the soonest entry expires (stale heap items may make it early)."""
        return self._heap[0][0] if self._heap else None

    def _pop_soonest(self) -> int:
        heap, entries = self._heap, self._entries
        while heap:
            _, seq, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry.seq == seq:
                del entries[key]
                self._release(entry)
                return 1
        return 0

    def _release(self, entry: PeerEntry) -> None:
        entry.load.release_peer(entry.uncached)
        self.bytes -= entry.size

    def _compact(self) -> None:
        # Items of entries that completed stay in the heap until they surface; rebuild
        # when they outnumber the live ones, so the heap stays O(entries).
        self._heap = [(e.expires, e.seq, k) for k, e in self._entries.items()]
        heapq.heapify(self._heap)

    # -- reads ----------------------------------------------------------------------

    def entries_of(self, replica: str) -> int:
        """Entries a replica holds (for tests and debugging)."""
        return sum(1 for k in self._entries if k[0] == replica)
