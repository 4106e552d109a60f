"""The precise prefix-cache machinery of one EPP: block index, KV-event subscribers,
prompt tokenizer and the producer that ties them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint, EndpointPool
from epp.kvcache.feedback import IndexFeedback, fallback_producer
from epp.kvcache.index import DEFAULT_CAPACITY_BLOCKS, BlockIndex
from epp.kvcache.producer import PreciseProducer
from epp.kvcache.settings import DEFAULT_BLOCK_SIZE, KVCacheSettings
from epp.kvcache.manager import KVEventsManager
from epp.kvcache.tokenizing import PromptTokenizer, TokenizationError
from epp.kvcache.tokens import LocalPromptTokenizer, RenderPromptTokenizer
from epp.tokenization.local import LocalTokenizer
from epp.tokenization.qwen import ensure_qwen_tokenizer
from epp.supervise import FailureCounter, LogLimiter, supervised
from epp.tokenization.tiktoken_qwen import TiktokenQwenTokenizer

log = logging.getLogger(__name__)

BUILTIN_TOKENIZERS = ("qwen3.6",)
# How often the index bound follows the fleet's reported KV capacity.
CAPACITY_REFRESH_S = 5.0
# The resize loop's kind in the background-failure count.
RESIZE_TASK = "kv-index-resize"


class KVCacheService:
    """Owns the index and its feeders; the runner starts and stops it.

    Without a configured capacity, a supervised loop resizes the index every
    ``capacity_refresh_s`` to follow the fleet; if it dies it is counted
    (``on_task_failure``), logged and restarted with backoff.
    """

    def __init__(self, settings: KVCacheSettings, *,
                 capacity_refresh_s: float = CAPACITY_REFRESH_S,
                 on_task_failure: FailureCounter | None = None) -> None:
        self.settings = settings
        self._capacity_refresh_s = capacity_refresh_s
        self._on_task_failure = on_task_failure
        self._logs = LogLimiter(log)
        self.index = BlockIndex(model=settings.model,
                                capacity_blocks=settings.capacity_blocks or DEFAULT_CAPACITY_BLOCKS)
        self.tokenizer: PromptTokenizer | None = None
        self._render: RenderPromptTokenizer | None = None
        self.manager: KVEventsManager | None = None
        self._resizer: asyncio.Task[None] | None = None
        self.producer = PreciseProducer(self.index, self, block_size=self._block_size,
                                        max_blocks=settings.max_prefix_blocks)
        # Request hooks: pending picks, and corrections from the engines' cached_tokens.
        # Where prompts' text went: the match used when tokens miss the prefix deadline.
        self.fallback = fallback_producer()
        self.feedback = IndexFeedback(self.index, pending=settings.pending_picks,
                                      resync=self._request_resync, fallback=self.fallback)

    def _request_resync(self, endpoint: str) -> bool:
        return self.manager.request_resync(endpoint) if self.manager is not None else False

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]:
        """The producer's tokenizer: whichever mode is configured, once loaded."""
        if self.tokenizer is None:
            raise TokenizationError("tokenizer not loaded yet")
        return await self.tokenizer.tokens(request, candidates)

    def _block_size(self, candidates: Sequence[Endpoint]) -> int:
        if self.settings.block_size is not None:
            return self.settings.block_size
        for e in candidates:  # engines of one pool share a block size
            reported = e.state.metrics.block_size
            if reported:
                return reported
        return DEFAULT_BLOCK_SIZE

    async def start(self, pool: EndpointPool) -> None:
        """Load the tokenizer (in a thread: it takes seconds) and start subscribers."""
        s = self.settings
        if s.tokenizer_mode == "render":
            self._render = RenderPromptTokenizer()
            self.tokenizer = self._render
        else:
            self.tokenizer = await asyncio.to_thread(load_local_tokenizer, s.tokenizer)
        self.manager = KVEventsManager(
            pool, self.index, default_port=s.kv_events_port,
            replay_port_offset=s.replay_port_offset, topic_filter=s.topic_filter,
            bind=s.kv_events_bind)
        await self.manager.start()
        if s.capacity_blocks is None:
            self._resizer = asyncio.create_task(
                supervised(lambda: self._resize_loop(pool), task=RESIZE_TASK,
                           what="index resize loop", logs=self._logs,
                           count=self._on_task_failure),
                name="kv-index-size")

    async def _resize_loop(self, pool: EndpointPool) -> None:
        # The fleet's GPU capacity is the sum of its engines' num_gpu_blocks (from
        # vllm:cache_config_info); twice that leaves room for offloaded tiers and for
        # stores that arrive before the matching removals.
        while True:
            total = sum(e.state.metrics.num_gpu_blocks or 0 for e in pool.snapshot())
            if total:
                self.index.capacity_blocks = 2 * total
            await asyncio.sleep(self._capacity_refresh_s)

    def event_stats(self) -> dict[str, Any]:
        """Per-endpoint KV-event counters (for metrics); central mode adds the endpoint
        ``""`` for messages no pool endpoint claims. Departed endpoints are not listed."""
        return self.manager.stats() if self.manager is not None else {}

    async def stop(self) -> None:
        """Stop subscribers and close HTTP sessions."""
        if self._resizer is not None:
            self._resizer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resizer
        if self.manager is not None:
            await self.manager.stop()
        if self._render is not None:
            await self._render.close()


def load_local_tokenizer(source: str) -> LocalPromptTokenizer:
    """A built-in tokenizer by name, or an HF tokenizer directory (blocking: seconds)."""
    if source in BUILTIN_TOKENIZERS:
        # The built-in vocabulary is tiktoken-native: same ids, ~6x faster encoding.
        hf = LocalTokenizer.from_dir(ensure_qwen_tokenizer())
        return LocalPromptTokenizer(TiktokenQwenTokenizer(hf))
    return LocalPromptTokenizer(LocalTokenizer.from_dir(Path(source)))
