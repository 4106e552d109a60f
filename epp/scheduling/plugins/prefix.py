"""Prefix-cache scorers. Neither computes anything itself: a producer (run by the
director before scheduling) stores the match in the cycle state; scorers read it.

- ``precise-prefix-cache-scorer``: what the engines report holding (vLLM KV events),
  over the exact prompt tokens; GPU blocks weigh 1.0, offloaded ones 0.8.
- ``prefix-cache-scorer``: GIE's approximate scorer, from this EPP's own routing
  history over ~4-character-per-token blocks of text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from epp.datastore import DEFAULT_KV_EVENTS_PORT, Endpoint
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.kvcache.producer import ApproximateProducer, PreciseProducer, record_routing
from epp.kvcache.settings import DEFAULT_BLOCK_SIZE, KVCacheSettings
from epp.scheduling.registry import PluginDeps, PluginParams
from epp.scheduling.types import HeaderChanges, SchedulingContext, SchedulingResult


def _scores(match: PrefixMatch | None, endpoints: Sequence[Endpoint], weighted: bool
            ) -> list[float]:
    if match is None or match.total_blocks == 0:
        return [0.0] * len(endpoints)
    total = match.total_blocks
    if weighted:
        return [match.of(e.name).weighted() / total for e in endpoints]
    return [match.of(e.name).blocks / total for e in endpoints]


class TokenizerParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    """``mode``: local (in-process) or render (the pods' render endpoints);
    ``source``: a built-in tokenizer name (qwen3.6) or a directory with tokenizer.json."""

    mode: Literal["local", "render"] = "local"
    source: str = "qwen3.6"


class KVEventsParams(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    """Where engines publish: ``port`` on each pod (unless the endpoint names its own
    address), replay ROUTER at ``port + replayPortOffset`` (null: none), or ``bind`` an
    address for central mode (engines connect to the EPP)."""

    port: int = DEFAULT_KV_EVENTS_PORT
    replay_port_offset: int | None = 1
    bind: str | None = None
    topic_filter: bool = True


class PreciseParams(PluginParams):
    """Parameters of ``precise-prefix-cache-scorer``."""

    model_name: str = ""
    block_size: int | None = None
    max_prefix_blocks: int = 8192
    index_capacity_blocks: int | None = None
    tokenizer: TokenizerParams = TokenizerParams()
    kv_events: KVEventsParams = KVEventsParams()
    # A routed request's blocks count as held by its endpoint (pending) until the engine
    # confirms them, so requests sharing its prefix follow it meanwhile.
    pending_picks: bool = True


class PrecisePrefixCacheScorer:
    """Matched (tier-weighted) blocks / prompt blocks, from the engines' KV events.

    The scorer only reads the match; the machinery that computes it (index, event
    subscribers, tokenizer) is built by the runner from ``kv_settings``, so scheduling
    owns no sockets or services.
    """

    type_name = "precise-prefix-cache-scorer"
    Params = PreciseParams

    def __init__(self, name: str, kv_settings: KVCacheSettings) -> None:
        self.name = name
        self.kv_settings = kv_settings

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        p: PreciseParams = params
        if p.block_size is not None and p.block_size < 1:
            raise ValueError("blockSize must be at least 1")
        if p.max_prefix_blocks < 1:
            raise ValueError("maxPrefixBlocks must be at least 1")
        if not 0 < p.kv_events.port < 65536:
            raise ValueError("kvEvents.port must be a TCP port")
        settings = KVCacheSettings(
            model=p.model_name, block_size=p.block_size, max_prefix_blocks=p.max_prefix_blocks,
            capacity_blocks=p.index_capacity_blocks, tokenizer_mode=p.tokenizer.mode,
            tokenizer=p.tokenizer.source, kv_events_port=p.kv_events.port,
            replay_port_offset=p.kv_events.replay_port_offset, kv_events_bind=p.kv_events.bind,
            topic_filter=p.kv_events.topic_filter, pending_picks=p.pending_picks)
        return cls(name, settings)

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        match = ctx.cycle.get(PreciseProducer.name)
        if match is None:
            # The tokens did not come in time: the KV cache's fallback (where this EPP
            # sent similar text before) keeps the request with its prefix.
            fallback = ctx.cycle.get(PREFIX_MATCH_KEY)
            return _scores(fallback, endpoints, weighted=False)
        return _scores(match, endpoints, weighted=True)


class ApproximateParams(PluginParams):
    """GIE's parameters: tokens per block, blocks matched, per-endpoint LRU size."""

    block_size: int = DEFAULT_BLOCK_SIZE
    max_prefix_blocks_to_match: int = 256
    # H100 80 GB - 16 GB weights = 64 GB of KV / 128 KiB per token / 16 tokens per block.
    lru_capacity_per_server: int = 31_250


class PrefixCacheScorer:
    """Matched blocks / prompt blocks, from where this EPP sent similar prompts before.
    Also a pre-request hook: it records each routing decision."""

    type_name = "prefix-cache-scorer"
    Params = ApproximateParams

    def __init__(self, name: str, producer: ApproximateProducer) -> None:
        self.name = name
        self.producer = producer

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        p: ApproximateParams = params
        if min(p.block_size, p.max_prefix_blocks_to_match, p.lru_capacity_per_server) < 1:
            raise ValueError("blockSize, maxPrefixBlocksToMatch and lruCapacityPerServer "
                             "must be at least 1")
        return cls(name, ApproximateProducer(
            block_size=p.block_size, max_blocks=p.max_prefix_blocks_to_match,
            capacity_per_endpoint=p.lru_capacity_per_server))

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        return _scores(ctx.cycle.get(self.producer.name), endpoints, weighted=False)

    def pre_request(self, ctx: SchedulingContext, result: SchedulingResult,
                    headers: HeaderChanges) -> None:
        """Remember that the primary endpoint now holds this prompt's blocks."""
        if result.endpoints:
            record_routing(self.producer, ctx.cycle.get(self.producer.name),
                           result.endpoints[0])
