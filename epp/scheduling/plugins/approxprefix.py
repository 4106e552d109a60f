"""``approx-prefix-cache-producer``: llm-d's routing-history prefix producer as a plugin of
its own. llm-d's sticky guide lists it with ``prefix-cache-affinity-filter`` and no
prefix scorer: the filter reads the match it produces.

It owns an :class:`~epp.kvcache.producer.ApproximateProducer` (the machinery
``prefix-cache-scorer`` owns too): the director runs it before scheduling, its match is
the request's prefix match unless a precise one exists, and its pre-request hook records
where the request went. The runner drops the history of endpoints that leave the pool.
"""

from __future__ import annotations

from typing import Any

from epp.kvcache.producer import ApproximateProducer, record_routing
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import HeaderChanges, SchedulingContext, SchedulingResult

# llm-d's defaults (requestcontrol/dataproducer/approximateprefix).
DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 2048
# 128K tokens: the context window of large production models (llm-d's reasoning).
DEFAULT_MAX_PREFIX_TOKENS = 131_072
# H100 80 GB - 16 GB weights = 64 GB of KV / 128 KiB per token / 16 tokens per block.
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250
# llm-d raises any smaller block size to this at request time: one history entry per
# (pod, block), so 16-token blocks would cost ~64x the memory of 64-token ones.
MIN_BLOCK_SIZE_TOKENS = 64
# Both caps 0 means the whole prompt (bounded anyway by the request body size).
UNLIMITED_BLOCKS = 1 << 30
# llm-d also records the pick of the profile with this name (P/D: the prefill pod).
PREFILL_PROFILE = "prefill"


class ApproxPrefixParams(PluginParams):
    """llm-d's parameters, names and defaults (``blockSize`` is its deprecated alias)."""

    auto_tune: bool = True
    block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS
    block_size: int = 0
    max_prefix_blocks_to_match: int = DEFAULT_MAX_PREFIX_BLOCKS
    max_prefix_tokens_to_match: int = DEFAULT_MAX_PREFIX_TOKENS
    lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER


class ApproxPrefixCacheProducer:
    """Matches prompts against this EPP's routing history in blocks of
    ``max(blockSizeTokens, 64)`` tokens (about 4 characters a token), at most
    ``maxPrefixTokensToMatch`` tokens (``maxPrefixBlocksToMatch`` blocks when that is 0;
    the whole prompt when both are), remembering ``lruCapacityPerServer`` blocks per
    endpoint.

    ``autoTune`` is accepted; llm-d uses it to take the engines' block size (which only
    matters above the 64-token floor) and each pod's GPU block count as its capacity.
    Here the history keeps the configured block size and capacity.
    """

    type_name = "approx-prefix-cache-producer"
    Params = ApproxPrefixParams

    def __init__(self, name: str, producer: ApproximateProducer) -> None:
        self.name = name
        self.producer = producer

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        p: ApproxPrefixParams = params
        block_size = p.block_size_tokens
        if p.block_size > 0 and block_size == DEFAULT_BLOCK_SIZE_TOKENS:
            block_size = p.block_size  # llm-d's mapping of the deprecated name
        if not p.auto_tune and block_size <= 0:
            raise ValueError(f"blockSizeTokens must be > 0 when autoTune is disabled, got "
                             f"{block_size}")
        if p.max_prefix_tokens_to_match < 0:
            raise ValueError("maxPrefixTokensToMatch must be >= 0, got "
                             f"{p.max_prefix_tokens_to_match}")
        if p.max_prefix_blocks_to_match < 0:
            raise ValueError("maxPrefixBlocksToMatch must be >= 0, got "
                             f"{p.max_prefix_blocks_to_match}")
        if p.lru_capacity_per_server < 1:
            raise ValueError("lruCapacityPerServer must be at least 1, got "
                             f"{p.lru_capacity_per_server}")
        block_size = max(block_size, MIN_BLOCK_SIZE_TOKENS)
        if p.max_prefix_tokens_to_match > 0:
            max_blocks = p.max_prefix_tokens_to_match // block_size
        else:
            max_blocks = p.max_prefix_blocks_to_match or UNLIMITED_BLOCKS
        producer = ApproximateProducer(block_size=block_size, max_blocks=max_blocks,
                                       capacity_per_endpoint=p.lru_capacity_per_server)
        # Its own cycle-state key: a prefix-cache-scorer's producer may run beside it.
        producer.name = f"{cls.type_name}/{name}"
        return cls(name, producer)

    def pre_request(self, ctx: SchedulingContext, result: SchedulingResult,
                    headers: HeaderChanges) -> None:
        """Remember that the picked endpoints now hold this prompt's blocks."""
        match = ctx.cycle.get(self.producer.name)
        for profile in dict.fromkeys((result.primary, PREFILL_PROFILE)):
            picked = result.profiles.get(profile)
            if picked is not None and picked.endpoints:
                record_routing(self.producer, match, picked.endpoints[0])
