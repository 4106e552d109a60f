"""The request-processing model of the simulated vLLM pod, free of any HTTP concerns.

The HTTP layer turns OpenAI requests into ``GenerationRequest``s, asks the engine to
``plan`` each one (what it will answer) and then to ``generate`` it (spending the
configured time-to-first-token and inter-token latency). The counters in
``EngineStats`` are the raw material for a future ``/metrics`` endpoint.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from epp.sim.config import SimConfig

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


@dataclass(frozen=True, slots=True)
class Completion:
    """What the engine answers for one ``GenerationRequest``."""

    prompt_tokens: int
    tokens: tuple[str, ...]
    cached_tokens: int = 0
    finish_reason: str = "length"

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

    in_flight: int = 0
    running: int = 0
    requests_finished: int = 0  # including those cut short by a client disconnect
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


def output_tokens(count: int) -> tuple[str, ...]:
    """Deterministic output: ``"tok0", " tok1", ...`` so the texts join to ``"tok0 tok1 ..."``."""
    return tuple(f"tok{i}" if i == 0 else f" tok{i}" for i in range(count))


class Engine:
    """A stand-in for vLLM's engine: deterministic output with configurable latency.

    ``in_flight`` counts admitted, unfinished requests; ``running`` counts those being
    computed. Without a batch-size limit both are equal; a scheduler queue will make
    ``in_flight - running`` the waiting count.
    """

    def __init__(
        self,
        *,
        ttft_ms: float = 0.0,
        itl_ms: float = 0.0,
        count_tokens: TokenCounter = estimate_prompt_tokens,
    ) -> None:
        self._ttft_s = ttft_ms / 1000.0
        self._itl_s = itl_ms / 1000.0
        self._count_tokens = count_tokens
        self.stats = EngineStats()

    @classmethod
    def from_config(cls, config: SimConfig) -> Engine:
        """Build the engine described by ``config``."""
        return cls(ttft_ms=config.ttft_ms, itl_ms=config.itl_ms)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Prompt length in tokens: exact for token ids, estimated for text."""
        if request.prompt_token_ids is not None:
            return len(request.prompt_token_ids)
        assert request.prompt_text is not None  # guaranteed by GenerationRequest
        return self._count_tokens(request.prompt_text)

    def plan(self, request: GenerationRequest) -> Completion:
        """Decide the answer to ``request`` without spending any time."""
        return Completion(
            prompt_tokens=self.count_prompt_tokens(request),
            tokens=output_tokens(request.max_tokens),
        )

    async def generate(self, completion: Completion) -> AsyncIterator[str]:
        """Yield the planned tokens in real time: ``ttft_ms`` first, then ``itl_ms`` each.

        Close the iterator (e.g. ``contextlib.aclosing``) when stopping early so the
        counters are released promptly.
        """
        stats = self.stats
        stats.in_flight += 1
        stats.running += 1
        stats.prompt_tokens_total += completion.prompt_tokens
        loop = asyncio.get_running_loop()
        # Absolute deadlines so per-token scheduling overhead does not accumulate.
        deadline = loop.time() + self._ttft_s
        try:
            for index, token in enumerate(completion.tokens):
                if index:
                    deadline += self._itl_s
                delay = deadline - loop.time()
                if delay > 0:  # zero-latency runs never yield to the loop here
                    await asyncio.sleep(delay)
                stats.generation_tokens_total += 1
                yield token
        finally:
            stats.running -= 1
            stats.in_flight -= 1
            stats.requests_finished += 1

    async def execute(self, completion: Completion) -> None:
        """Spend the time ``completion`` takes to generate, for non-streaming requests."""
        async with aclosing(self.generate(completion)) as stream:
            async for _ in stream:
                pass
