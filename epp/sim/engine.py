"""The request-processing model of the simulated vLLM pod, free of any HTTP concerns.

The HTTP layer turns OpenAI requests into ``GenerationRequest``s, asks the engine to
``plan`` each one (what it will answer) and then to ``generate`` it (spending the
configured time-to-first-token and inter-token latency).

A request that starts running first looks its prompt up in the prefix cache (when one
is configured): prefill of the uncached tokens takes ``1 / prefill_tokens_per_s`` each
before the first token, on top of ``ttft_ms``. Prefills queue for the pod's accelerator
one after another, in chunks that slow the decode steps of running requests
(``epp.sim.timeline``). A request whose prompt a remote prefill pod computed
(``Completion.remote_tokens``, P/D disaggregation) instead receives the KV of the tokens
it does not hold yet, at ``kv_transfer_us_per_token`` each, and recomputes only the rest
of the last block within a decode step.

A small service model makes queues real: at most ``max_num_seqs`` sequences run at once
(and at most ``max_loras`` distinct LoRA adapters among them); the rest wait in FIFO
order, as in vLLM's scheduler. Running sequences hold KV cache for their prompt and the
tokens generated so far. A decode step lasts ``itl_ms`` plus ``itl_ms_per_seq`` per
running sequence plus ``itl_us_per_kv_token`` per token of KV they hold, so a fuller
batch decodes slower. ``time_scale`` runs every duration that many times faster on the
wall clock. ``EngineStats`` holds what ``/metrics`` reports.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from epp.sim.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KV_CAPACITY_TOKENS,
    DEFAULT_MAX_LORAS,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    SimConfig,
)
from epp.sim.kvcache import CacheLease, PrefixCache
from epp.sim.timeline import ComputeTimeline

TokenCounter = Callable[[str], int]


def estimate_prompt_tokens(text: str) -> int:
    """Estimate the token count of ``text`` (~4 characters per token, at least 1).

    Kept as a single function so a real tokenizer can replace it.
    """
    return max(1, math.ceil(len(text) / 4))


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message reduced to what the chat template needs."""

    role: str
    text: str


def render_chat_prompt(
    messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """Render messages (and tool definitions) into one prompt string, Qwen-style.

    The rendering is deterministic so identical conversations share a prompt prefix,
    which a future prefix cache relies on.
    """
    parts: list[str] = []
    if tools:
        # sort_keys so the same tool list always renders to the same text.
        rendered_tools = "\n".join(json.dumps(tool, sort_keys=True) for tool in tools)
        parts.append(f"<|im_start|>system\n# Tools\n{rendered_tools}<|im_end|>\n")
    for message in messages:
        parts.append(f"<|im_start|>{message.role}\n{message.text}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One prompt to run: either text or token ids, plus the output budget."""

    prompt_text: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    max_tokens: int = 16

    def __post_init__(self) -> None:
        if (self.prompt_text is None) == (self.prompt_token_ids is None):
            raise ValueError("exactly one of prompt_text and prompt_token_ids must be set")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(slots=True)
class Completion:
    """What the engine answers for one ``GenerationRequest``.

    ``cached_tokens`` is filled in when the request starts prefill (mutable for that), as
    vLLM reports it: local prefix-cache hits plus KV received from a remote prefill.
    ``remote_tokens`` (set before ``generate``) are the prompt tokens whose KV a prefill
    pod holds for this request; ``transferred_tokens`` the part of them received because
    this pod did not hold them; ``kv_blocks`` the full prompt blocks this pod holds once
    prefill started (what a prefill pod offers its decode pod).
    """

    prompt_tokens: int
    tokens: tuple[str, ...]
    cached_tokens: int = 0
    finish_reason: str = "length"
    lora: str | None = None  # the LoRA adapter serving it, None for the base model
    prompt_token_ids: tuple[int, ...] | None = None  # None: a text prompt, no tokenizer
    remote_tokens: int = 0
    transferred_tokens: int = 0
    kv_blocks: int = 0

    @property
    def completion_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.tokens)

    @property
    def text(self) -> str:
        """The generated text: the concatenation of all token texts."""
        return "".join(self.tokens)


@dataclass(slots=True)
class EngineStats:
    """Live counters of one engine (mutable on purpose: they change per request)."""

    in_flight: int = 0  # running + waiting
    running: int = 0
    waiting: int = 0
    # Running (holding a batch slot) but not yet prefilling: their prefill queues behind
    # others'. vLLM keeps such requests waiting (no token budget left for them), so
    # /metrics reports them as waiting.
    queued_for_prefill: int = 0
    kv_tokens: int = 0  # KV cache held by running sequences (prompt + generated so far)
    requests_finished: int = 0  # including those cut short by a client disconnect
    requests_aborted: int = 0  # the cut-short ones (vLLM's finished_reason="abort")
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which cached
    kv_transfer_tokens: int = 0  # prompt tokens whose KV came from a remote prefill pod


def output_tokens(count: int) -> tuple[str, ...]:
    """Deterministic output: ``"tok0", " tok1", ...`` so the texts join to ``"tok0 tok1 ..."``."""
    return tuple(f"tok{i}" if i == 0 else f" tok{i}" for i in range(count))


@dataclass(eq=False, slots=True)
class _Sequence:
    lora: str | None
    running: bool = False
    admitted: asyncio.Future[None] | None = None  # set while waiting for a batch slot


class _PrefillWait:
    """Counts one request in ``queued_for_prefill`` until its prefill starts (or it ends)."""

    __slots__ = ("_handle", "_stats", "_waiting")

    def __init__(self, stats: EngineStats, loop: asyncio.AbstractEventLoop, start: float) -> None:
        self._stats = stats
        self._waiting = True
        stats.queued_for_prefill += 1
        self._handle = loop.call_at(start, self.end)

    def end(self) -> None:
        if self._waiting:
            self._waiting = False
            self._stats.queued_for_prefill -= 1
            self._handle.cancel()


@dataclass(slots=True)
class _Batch:
    """Admission in vLLM's way: a FIFO waiting queue in front of a bounded batch.

    A waiting sequence whose adapter would exceed ``max_loras`` in the batch is skipped
    (it keeps its place) and later ones may start, as vLLM's scheduler does.
    """

    max_num_seqs: int
    max_loras: int
    stats: EngineStats
    waiting: deque[_Sequence] = field(default_factory=deque)
    loras: Counter[str] = field(default_factory=Counter)  # adapter -> running sequences

    async def acquire(self, seq: _Sequence) -> None:
        self.waiting.append(seq)
        self.stats.waiting += 1
        self._schedule()
        if seq.running:  # a free slot: no await, so zero-latency runs never yield here
            return
        seq.admitted = asyncio.get_running_loop().create_future()
        try:
            await seq.admitted
        except asyncio.CancelledError:
            if seq.running:  # admitted, then cancelled before it could resume
                self.release(seq)
            else:
                self.waiting.remove(seq)
                self.stats.waiting -= 1
            raise

    def release(self, seq: _Sequence) -> None:
        seq.running = False
        self.stats.running -= 1
        if seq.lora is not None:
            self.loras[seq.lora] -= 1
            if not self.loras[seq.lora]:
                del self.loras[seq.lora]
        self._schedule()

    def lora_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        """Adapters of running and of waiting sequences."""
        waiting = frozenset(s.lora for s in self.waiting if s.lora is not None)
        return frozenset(self.loras), waiting

    def _schedule(self) -> None:
        for seq in list(self.waiting):
            if self.stats.running >= self.max_num_seqs:
                return
            lora = seq.lora
            if lora is not None and lora not in self.loras and len(self.loras) >= self.max_loras:
                continue
            self.waiting.remove(seq)
            self.stats.waiting -= 1
            self.stats.running += 1
            seq.running = True
            if lora is not None:
                self.loras[lora] += 1
            if seq.admitted is not None and not seq.admitted.done():
                seq.admitted.set_result(None)


class Engine:
    """A stand-in for vLLM's engine: deterministic output with configurable latency.

    ``in_flight`` counts admitted, unfinished requests: ``running`` ones are in the batch,
    ``waiting`` ones queue for a slot. Time to first token starts when a request starts
    running, so queueing shows up in the latency clients see.
    """

    def __init__(
        self,
        *,
        ttft_ms: float = 0.0,
        itl_ms: float = 0.0,
        count_tokens: TokenCounter = estimate_prompt_tokens,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        kv_capacity_tokens: int = DEFAULT_KV_CAPACITY_TOKENS,
        max_loras: int = DEFAULT_MAX_LORAS,
        prefill_tokens_per_s: float = 0.0,
        prefix_cache: PrefixCache | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        kv_transfer_us_per_token: float = 0.0,
        itl_ms_per_seq: float = 0.0,
        itl_us_per_kv_token: float = 0.0,
        time_scale: float = 1.0,
    ) -> None:
        if max_num_seqs < 1 or kv_capacity_tokens < 1 or max_loras < 1 or block_size < 1:
            raise ValueError(
                "max_num_seqs, kv_capacity_tokens, max_loras and block_size must be >= 1")
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        # Every duration on the wall clock is the fleet's divided by the time scale.
        wall = 1.0 / time_scale
        self._ttft_s = ttft_ms / 1000.0 * wall
        self._transfer_s_per_token = kv_transfer_us_per_token / 1e6 * wall
        self._step_base_s = itl_ms / 1000.0 * wall
        self._step_per_seq_s = itl_ms_per_seq / 1000.0 * wall
        self._step_per_kv_token_s = itl_us_per_kv_token / 1e6 * wall
        self._step_grows = bool(itl_ms_per_seq or itl_us_per_kv_token)
        self.timeline = ComputeTimeline(prefill_tokens_per_s=prefill_tokens_per_s * time_scale,
                                        chunk_tokens=max_num_batched_tokens,
                                        step_s=self._step_base_s)
        self.prefix_cache = prefix_cache
        self.block_size = prefix_cache.block_size if prefix_cache is not None else block_size
        self._count_tokens = count_tokens
        self.kv_capacity_tokens = kv_capacity_tokens
        self.stats = EngineStats()
        self._batch = _Batch(max_num_seqs, max_loras, self.stats)
        self._decoders = 0  # running requests that will decode (more than one output token)
        self._leased_tokens = 0  # running requests' tokens in prefix-cache blocks they hold

    @classmethod
    def from_config(cls, config: SimConfig) -> Engine:
        """Build the engine described by ``config``."""
        return cls(
            ttft_ms=config.ttft_ms,
            itl_ms=config.itl_ms,
            max_num_seqs=config.max_num_seqs,
            kv_capacity_tokens=config.kv_capacity_tokens,
            max_loras=config.max_loras,
            prefill_tokens_per_s=config.prefill_tokens_per_s,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            kv_transfer_us_per_token=config.kv_transfer_us_per_token,
            itl_ms_per_seq=config.itl_ms_per_seq,
            itl_us_per_kv_token=config.itl_us_per_kv_token,
            time_scale=config.time_scale,
            prefix_cache=PrefixCache(
                block_size=config.block_size,
                num_gpu_blocks=config.num_gpu_blocks,
                cpu_blocks=config.cpu_offload_blocks,
                lora_ids=config.lora_ids,
            ) if config.enable_prefix_caching else None,
        )

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache held by running sequences, clipped to 1.0 (the sim
        does not preempt on a full cache as vLLM would). Prefix-cache blocks several of
        them share count once, as in vLLM; cached blocks nobody runs on count as free."""
        used = self.stats.kv_tokens
        if self.prefix_cache is not None:
            used += self.prefix_cache.referenced_blocks * self.block_size - self._leased_tokens
        return min(1.0, max(0, used) / self.kv_capacity_tokens)

    def decode_step_s(self) -> float:
        """How long one decode step takes with the batch as it is now (wall clock)."""
        stats = self.stats
        decoding = stats.running - stats.queued_for_prefill
        return (self._step_base_s + self._step_per_seq_s * decoding
                + self._step_per_kv_token_s * stats.kv_tokens)

    def _queue_for_prefill(self, loop: asyncio.AbstractEventLoop, start: float) -> _PrefillWait:
        """Count a request as queued until its prefill starts at ``start``."""
        return _PrefillWait(self.stats, loop, start)

    def _update_step(self) -> None:
        if self._step_grows:
            self.timeline.step_s = self.decode_step_s()

    def lora_adapters(self) -> tuple[frozenset[str], frozenset[str]]:
        """LoRA adapters of the running and of the waiting requests."""
        return self._batch.lora_sets()

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Prompt length in tokens: exact for token ids, estimated for text."""
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        assert request.prompt_text is not None  # guaranteed by GenerationRequest
        return self._count_tokens(request.prompt_text)

    def plan(self, request: GenerationRequest, *, lora: str | None = None) -> Completion:
        """Decide the answer to ``request`` (served by adapter ``lora``) without spending time."""
        return Completion(
            prompt_tokens=self.count_prompt_tokens(request),
            tokens=output_tokens(request.max_tokens),
            lora=lora,
            prompt_token_ids=request.prompt_token_ids,
        )

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache (no-op without one)."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset()

    def remote_prefill_tokens(self, prompt_tokens: int, remote_blocks: int) -> int:
        """Prompt tokens a decode pod can take from ``remote_blocks`` full blocks a prefill
        pod computed: never the last prompt token, which the decode side recomputes for its
        logits (as with a fully cached prompt)."""
        usable = max(0, prompt_tokens - 1) // self.block_size
        return min(remote_blocks, usable) * self.block_size

    def _start_prefill(
        self, completion: Completion, now: float
    ) -> tuple[CacheLease | None, float, float]:
        """Look the prompt up in the prefix cache and queue its prefill (or its KV transfer);
        returns the lease, when its prefill starts and when the prompt's KV is complete."""
        lease = None
        cached = 0
        cache = self.prefix_cache
        if cache is not None and completion.prompt_token_ids is not None:
            # Stores the new full blocks too: computed here, or received from a prefill pod.
            lease = cache.start(completion.prompt_token_ids, completion.lora)
            cached = lease.cached_tokens
            completion.kv_blocks = len(lease.blocks)
            self.stats.prefix_cache_queries += completion.prompt_tokens
            self.stats.prefix_cache_hits += cached
        else:
            completion.kv_blocks = completion.prompt_tokens // self.block_size
        if completion.remote_tokens:
            transferred = max(0, completion.remote_tokens - cached)
            completion.transferred_tokens = transferred
            completion.cached_tokens = cached + transferred
            self.stats.kv_transfer_tokens += transferred
            # The tail after the transferred blocks (under a block) rides in a decode step.
            return lease, now, now + transferred * self._transfer_s_per_token
        completion.cached_tokens = cached
        self._update_step()
        # Decode slots between the chunks only when another request will use them.
        interleave = self._decoders > (completion.completion_tokens > 1)
        start, end = self.timeline.prefill_span(now, completion.prompt_tokens - cached,
                                                interleave=interleave)
        return lease, start, end

    async def generate(self, completion: Completion) -> AsyncGenerator[str, None]:
        """Wait for a batch slot, then yield the planned tokens in real time: the prompt's
        prefill (or KV transfer) plus ``ttft_ms`` first, then ``itl_ms`` each (longer while
        the pod prefills other requests).

        Close the iterator (e.g. ``contextlib.aclosing``) when stopping early so the slot
        and counters are released promptly.
        """
        stats = self.stats
        seq = _Sequence(completion.lora)
        stats.in_flight += 1
        emitted = held = 0
        lease: CacheLease | None = None
        queued: _PrefillWait | None = None
        leased = 0
        decoder = False
        try:
            await self._batch.acquire(seq)
            decoder = completion.completion_tokens > 1
            self._decoders += decoder
            loop = asyncio.get_running_loop()
            timeline = self.timeline
            lease, prefill_start, prefilled_at = self._start_prefill(completion, loop.time())
            if prefill_start > loop.time():
                queued = self._queue_for_prefill(loop, prefill_start)
            if lease is not None:
                leased = len(lease.blocks) * self.block_size
                self._leased_tokens += leased
            stats.prompt_tokens_total += completion.prompt_tokens
            held = completion.prompt_tokens
            stats.kv_tokens += held
            # Absolute deadlines so per-token scheduling overhead does not accumulate.
            deadline = previous = prefilled_at + self._ttft_s
            for index, token in enumerate(completion.tokens):
                if index:
                    previous = deadline
                    self._update_step()
                    deadline = timeline.decode_step_end(previous)
                # Zero-latency runs never yield to the loop here.
                while (delay := deadline - loop.time()) > 0:
                    await asyncio.sleep(delay)
                    if index:  # prefill queued meanwhile may have delayed this step
                        self._update_step()
                        deadline = timeline.decode_step_end(previous)
                stats.generation_tokens_total += 1
                stats.kv_tokens += 1
                held += 1
                emitted += 1
                yield token
        finally:
            self._decoders -= decoder
            self._leased_tokens -= leased
            if queued is not None:
                queued.end()
            if lease is not None and self.prefix_cache is not None:
                self.prefix_cache.finish(lease)
            stats.kv_tokens -= held
            if seq.running:
                self._batch.release(seq)
            stats.in_flight -= 1
            stats.requests_finished += 1
            if emitted < completion.completion_tokens:
                stats.requests_aborted += 1

    async def execute(self, completion: Completion) -> None:
        """Spend the time ``completion`` takes to generate, for non-streaming requests."""
        async with aclosing(self.generate(completion)) as stream:
            async for _ in stream:
                pass
