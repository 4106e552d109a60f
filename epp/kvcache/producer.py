"""Prefix-match producers: run once per request before scheduling, store a
:class:`PrefixMatch` in the cycle state for scorers, the P/D decider and metrics."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import xxhash

from epp.api.openai import ChatPrompt, LLMRequest, TextPrompt, TokenPrompt
from epp.datastore import Endpoint
from epp.kvcache.index import BlockIndex, EndpointMatch
from epp.kvcache.keys import chain_keys
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.kvcache.settings import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PREFIX_BLOCKS
from epp.kvcache.tokenizing import PromptTokenizer, TokenizationError

log = logging.getLogger(__name__)

# Approximate routing history, all endpoints together. A key costs ~128 B in an
# OrderedDict (int object, hash slot, link; measured), so GIE's 31,250 keys per server
# are ~4 MB each; 2M keys (~256 MiB) hold 64 servers at full per-server capacity.
DEFAULT_MAX_HISTORY_KEYS = 2_000_000


class PreciseProducer:
    """Tokens -> block keys -> the block index (engine KV events)."""

    name = "precise-prefix-match"

    def __init__(self, index: BlockIndex, tokenizer: PromptTokenizer, *,
                 block_size: int | Callable[[Sequence[Endpoint]], int] = DEFAULT_BLOCK_SIZE,
                 max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self._block_size = block_size
        self.max_blocks = max_blocks
        self.failures = 0

    def block_size(self, candidates: Sequence[Endpoint]) -> int:
        """The configured block size, or the one the engines report."""
        bs = self._block_size
        return bs(candidates) if callable(bs) else bs

    async def produce(self, request: LLMRequest | None, candidates: Sequence[Endpoint]
                      ) -> PrefixMatch | None:
        """Compute the match, or None when the request has no prompt to match."""
        if request is None or request.prompt is None:
            return None
        try:
            tokens = await self.tokenizer.tokens(request, candidates)
        except TokenizationError as exc:
            self.failures += 1
            log.warning("routing without prefix data: %s", exc)
            return None
        bs = self.block_size(candidates)
        lora = request.model if request.model in self.index.known_loras else None
        try:
            keys = chain_keys(tokens, bs, self.index.root(lora), self.max_blocks)
        except ValueError as exc:  # non-int tokens from a render answer, a bad block size
            self.failures += 1
            log.warning("routing without prefix data: %s", exc)
            return None
        matches = self.index.match(keys, [e.name for e in candidates])
        return PrefixMatch(True, len(tokens), bs, len(keys), matches, keys=keys)


def approximate_text(request: LLMRequest) -> str:
    """The text the approximate scorer hashes (no chat template: it has none)."""
    prompt = request.prompt
    if isinstance(prompt, TextPrompt):
        return prompt.texts[0]
    if isinstance(prompt, ChatPrompt):
        return "".join(f"<{m.role}>{m.text}" for m in prompt.messages)
    if isinstance(prompt, TokenPrompt):
        return ",".join(map(str, prompt.sequences[0]))
    return ""


class RoutingHistory:
    """Per-endpoint LRU of the approximate block hashes routed there (GIE semantics),
    bounded per endpoint and in total, and only for endpoints in the pool.

    ``retain`` (called on every pool change) drops the history of endpoints that left;
    once it has been called, routing recorded for an endpoint no longer in the pool (a
    request scheduled just before its pod left) is ignored, so nothing of a departed
    pod is kept. Over ``max_total_keys``, the endpoint holding the most keys loses its
    oldest ones first, so a large pool shares the budget evenly.
    """

    def __init__(self, capacity_per_endpoint: int,
                 max_total_keys: int = DEFAULT_MAX_HISTORY_KEYS) -> None:
        self.capacity = capacity_per_endpoint
        self.max_total_keys = max_total_keys
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._pool: frozenset[str] | None = None  # None until the first pool snapshot
        self.total_keys = 0

    def record(self, endpoint: str, keys: Sequence[int]) -> None:
        """The request with these keys was routed to ``endpoint``."""
        if self._pool is not None and endpoint not in self._pool:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        before = len(lru)
        for k in keys:
            lru[k] = None
            lru.move_to_end(k)
        while len(lru) > self.capacity:
            lru.popitem(last=False)
        self.total_keys += len(lru) - before
        if self.total_keys > self.max_total_keys:
            self._shrink()

    def _shrink(self) -> None:
        """Evict the oldest keys of the largest histories until within the total."""
        while self.total_keys > self.max_total_keys:
            largest = max(self._lru.values(), key=len)
            excess = min(self.total_keys - self.max_total_keys, len(largest))
            for _ in range(excess):
                largest.popitem(last=False)
            self.total_keys -= excess

    def forget(self, endpoint: str) -> None:
        """Drop an endpoint's history (it left the pool)."""
        lru = self._lru.pop(endpoint, None)
        if lru is not None:
            self.total_keys -= len(lru)

    def retain(self, endpoints: Iterable[str]) -> None:
        """Keep history only for ``endpoints`` (the pool now); forget every other."""
        self._pool = frozenset(endpoints)
        for name in [n for n in self._lru if n not in self._pool]:
            self.forget(name)

    def endpoints(self) -> list[str]:
        """Endpoints with recorded history."""
        return list(self._lru)

    def match(self, keys: Sequence[int], endpoint: str) -> int:
        """Consecutive leading keys found in the endpoint's history."""
        lru = self._lru.get(endpoint)
        if not lru:
            return 0
        n = 0
        for k in keys:
            if k not in lru:
                break
            n += 1
        return n


class ApproximateProducer:
    """Character blocks (block size x 4 characters) hashed in a chain seeded by the model;
    matched against what this EPP routed to each endpoint."""

    name = "approximate-prefix-match"
    # Run only when no precise match was produced (a fallback; see the director).
    fallback_only = False

    def __init__(self, *, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int = 256,
                 capacity_per_endpoint: int = 31_250,
                 max_total_keys: int = DEFAULT_MAX_HISTORY_KEYS,
                 name: str | None = None, fallback_only: bool = False) -> None:
        if name is not None:
            self.name = name
        self.fallback_only = fallback_only
        self.block_size = block_size
        self.chars_per_block = 4 * block_size  # ~4 characters per token
        self.max_blocks = max_blocks
        self.history = RoutingHistory(capacity_per_endpoint, max_total_keys)
        self._addresses: dict[str, str] = {}

    def on_pool_change(self, endpoints: Sequence[Endpoint]) -> None:
        """Pool listener: forget the routing history of endpoints that left, and of
        those now at another address (a new pod under the old name has an empty cache)."""
        addresses = {e.name: e.address for e in endpoints}
        for name, address in self._addresses.items():
            if addresses.get(name, address) != address:
                self.history.forget(name)
        self._addresses = addresses
        self.history.retain(addresses)

    def keys(self, request: LLMRequest) -> list[int]:
        """Chained hashes of the prompt's full character blocks."""
        text = approximate_text(request).encode("utf-8", "surrogatepass")
        salt = request.body.get("cache_salt")
        if not isinstance(salt, str):  # vLLM requires a string; anything else salts nothing
            salt = ""
        seed = xxhash.xxh3_64_intdigest(f"{request.model}\x00{salt}".encode())
        step = self.chars_per_block
        n = min(len(text) // step, self.max_blocks)
        keys = []
        view = memoryview(text)
        for off in range(0, n * step, step):
            seed = xxhash.xxh3_64_intdigest(view[off:off + step], seed)
            keys.append(seed)
        return keys

    async def produce(self, request: LLMRequest | None, candidates: Sequence[Endpoint]
                      ) -> PrefixMatch | None:
        """Match the request against routing history."""
        if request is None or request.prompt is None:
            return None
        keys = self.keys(request)
        matches = {}
        for e in candidates:
            n = self.history.match(keys, e.name)
            matches[e.name] = EndpointMatch(n, n)
        tokens_estimate = request.estimated_tokens()
        return PrefixMatch(False, tokens_estimate, self.block_size, len(keys), matches,
                           keys=tuple(keys))


def record_routing(producer: ApproximateProducer, match: PrefixMatch | None,
                   endpoint: Endpoint) -> None:
    """After routing: the chosen endpoint will hold this prompt's blocks."""
    if match is not None and not match.precise:
        producer.history.record(endpoint.name, match.keys)


__all__ = ["PREFIX_MATCH_KEY", "ApproximateProducer", "PreciseProducer", "RoutingHistory",
           "approximate_text", "record_routing"]
