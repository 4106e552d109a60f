"""``no-hit-lru-scorer``: llm-d's spreader of cold prompts.

A request that no candidate holds any prefix of ("cold") creates a full prompt's worth of
new KV blocks wherever it goes. Sending cold requests to the endpoint that least recently
received one spreads that cache growth (and the full prefills) across the pool instead
of piling them where the load scorers happen to tie. Warm requests get a neutral 0.5
everywhere, leaving them to the prefix scorers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from epp.datastore import Endpoint
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import HeaderChanges, SchedulingContext, SchedulingResult

# llm-d's default: endpoints remembered; far more than a pool has, so in practice only
# departed endpoints are ever evicted.
DEFAULT_LRU_SIZE = 1024
NEUTRAL_SCORE = 0.5
# llm-d also records the pick of the profile with this name (P/D: the prefill pod does
# the cold prefill).
PREFILL_PROFILE = "prefill"

# An endpoint as remembered here: a new pod under an old name has never been given a
# cold request, so the address is part of the identity.
_Key = tuple[str, str]


def _key(e: Endpoint) -> _Key:
    return (e.name, e.address)


class NoHitLRUParams(PluginParams):
    """llm-d's parameters. ``prefixPluginType``/``prefixPluginName`` are deprecated
    upstream and never read there either; ``prefixMatchInfoProducerName`` is accepted as
    given: the request's one prefix match is read."""

    prefix_plugin_type: str = "prefix-cache-scorer"
    prefix_plugin_name: str = "prefix-cache-scorer"
    lru_size: int = DEFAULT_LRU_SIZE
    prefix_match_info_producer_name: str = ""


class NoHitLRUScorer:
    """For a cold request: endpoints never given a cold request first (in candidate
    order), then the others from least to most recently given one; the i-th of n scores
    ``1 - i / (n - 1)``. For a warm request: 0.5 each. A request is cold when no
    candidate has a cached token of it (no prefix match at all counts as cold).

    Also a pre-request hook: a cold request's primary endpoint (and the ``prefill``
    profile's, with P/D) becomes the most recently used. At most ``lruSize`` endpoints
    are remembered, oldest dropped first. With replica sync, other replicas' cold
    placements (``peer_cold_pick_at``) count as well, so replicas take turns together.
    """

    type_name = "no-hit-lru-scorer"
    Params = NoHitLRUParams

    def __init__(self, name: str, lru_size: int = DEFAULT_LRU_SIZE) -> None:
        if lru_size < 1:
            raise ValueError(f"lruSize must be at least 1, got {lru_size}")
        self.name = name
        self.lru_size = lru_size
        # Endpoint -> (time, sequence number) of its last cold request; oldest first.
        self._lru: OrderedDict[_Key, tuple[float, int]] = OrderedDict()
        self._seq = 0
        # Per-request note from score() to pre_request(): was this request cold?
        self._cold_key = f"{self.type_name}/{name}"

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name, params.lru_size)

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        match: PrefixMatch | None = ctx.cycle.get(PREFIX_MATCH_KEY)
        cold = match is None or not any(match.cached_tokens(e.name) > 0 for e in endpoints)
        ctx.cycle[self._cold_key] = cold
        n = len(endpoints)
        if not cold:
            return [NEUTRAL_SCORE] * n
        if n == 1:
            return [1.0]
        # Never used before used; used by when they last got a cold request; the
        # candidate order breaks ties among the never used.
        keys = []
        for i, e in enumerate(endpoints):
            last = self._last(e)
            keys.append((0, 0.0, 0, i) if last is None else (1, last[0], last[1], i))
        order = sorted(range(n), key=keys.__getitem__)
        scores = [0.0] * n
        for rank, i in enumerate(order):
            scores[i] = 1.0 - rank / (n - 1)
        return scores

    def pre_request(self, ctx: SchedulingContext, result: SchedulingResult,
                    headers: HeaderChanges) -> None:
        """Record which endpoint got this cold request."""
        if ctx.cycle.get(self._cold_key) is not True:
            return
        for profile in dict.fromkeys((result.primary, PREFILL_PROFILE)):
            picked = result.profiles.get(profile)
            if picked is not None and picked.endpoints:
                self._touch(_key(picked.endpoints[0]), ctx.now)

    def _last(self, e: Endpoint) -> tuple[float, int] | None:
        """When ``e`` last got a cold request, from this replica or (replica sync)
        another one."""
        own = self._lru.get(_key(e))
        peer = e.state.peer_cold_pick_at
        if peer <= 0.0:
            return own
        return (peer, 0) if own is None else max(own, (peer, 0))

    def _touch(self, key: _Key, now: float) -> None:
        self._seq += 1
        self._lru[key] = (now, self._seq)
        self._lru.move_to_end(key)
        while len(self._lru) > self.lru_size:
            self._lru.popitem(last=False)

    def on_pool_change(self, endpoints: Iterable[Endpoint]) -> None:
        """Forget endpoints no longer in the pool (a pool listener's signature)."""
        present = {_key(e) for e in endpoints}
        for key in [k for k in self._lru if k not in present]:
            del self._lru[key]

    def __len__(self) -> int:
        """Endpoints remembered."""
        return len(self._lru)
