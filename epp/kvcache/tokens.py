"""Prompt tokens equal to the engine's, for block keys.

Two sources: *local* (an HF ``tokenizers`` tokenizer plus the model's chat template, run
in this process) and *render* (vLLM's ``/v1/completions/render`` and
``/v1/chat/completions/render`` on a pod: exact by construction, one HTTP call).

Local tokenization caches the tokens of prompt segments. A rendered chat prompt is cut
at special tokens (``<|im_start|>`` ...): BPE never merges across them, so the tokens of
the whole equal the tokens of the pieces, and a 6k-token system prompt repeated on every
request is tokenized once. Long uncached text is encoded in a worker thread, off the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

import aiohttp

from epp.api.openai import ChatPrompt, LLMRequest, TextPrompt, TokenPrompt
from epp.datastore import Endpoint

log = logging.getLogger(__name__)

# Segments cached (LRU). A segment is a chat message or a completion prompt; 8,192 of
# them at ~2 KB of text each is ~16 MB of strings plus their token lists.
DEFAULT_SEGMENT_CACHE = 8192
# Uncached text longer than this is encoded in a thread: ~4,000 characters is ~1,000
# tokens, about 1 ms of HF tokenizers time, the longest we let the event loop stall.
DEFAULT_OFFLOAD_CHARS = 4000
# Segments shorter than this are not worth a cache entry (user turns, role headers).
MIN_CACHED_SEGMENT_CHARS = 256


class TokenizationError(Exception):
    """The prompt could not be tokenized; the request is routed without prefix data."""


class TextTokenizer(Protocol):
    """What the local mode needs from a tokenizer (``epp.tokenization.LocalTokenizer``)."""

    special_token_pattern: re.Pattern[str]

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True) -> str: ...


class PromptTokenizer(Protocol):
    """Turns a request into the token ids the engine will see."""

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]: ...


def _token_prompt(request: LLMRequest) -> list[int] | None:
    if isinstance(request.prompt, TokenPrompt):
        return list(request.prompt.sequences[0])  # batched prompts: route on the first
    return None


class LocalPromptTokenizer:
    """In-process tokenization with a segment cache."""

    def __init__(self, tokenizer: TextTokenizer, *, executor: Executor | None = None,
                 cache_size: int = DEFAULT_SEGMENT_CACHE,
                 offload_chars: int = DEFAULT_OFFLOAD_CHARS) -> None:
        self._tok = tokenizer
        self._executor = executor
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._offload_chars = offload_chars
        self.cache_hits = 0
        self.cache_misses = 0

    def prompt_text(self, request: LLMRequest) -> str:
        """The text the engine tokenizes (chat: the rendered template)."""
        prompt = request.prompt
        if isinstance(prompt, TextPrompt):
            return prompt.texts[0]
        if isinstance(prompt, ChatPrompt):
            try:
                return self._tok.render_chat([m.raw for m in prompt.messages],
                                             list(prompt.tools) or None, True)
            except Exception as exc:  # a template error is the request's problem
                raise TokenizationError(f"chat template failed: {exc}") from None
        raise TokenizationError("request has no prompt to tokenize")

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]:
        """Token ids of the request's (first) prompt."""
        given = _token_prompt(request)
        if given is not None:
            return given
        return await self.encode(self.prompt_text(request))

    def _segments(self, text: str) -> list[str]:
        parts: list[str] = []
        last = 0
        for m in self._tok.special_token_pattern.finditer(text):
            if m.start() > last:
                parts.append(text[last:m.start()])
            parts.append(m.group(0))
            last = m.end()
        if last < len(text):
            parts.append(text[last:])
        return parts

    async def encode(self, text: str) -> list[int]:
        """Encode ``text``, reusing cached segments."""
        segments = self._segments(text)
        cache = self._cache
        found: list[list[int] | None] = []
        missing: list[str] = []
        for seg in segments:
            hit = cache.get(seg) if len(seg) >= MIN_CACHED_SEGMENT_CHARS else None
            if hit is not None:
                cache.move_to_end(seg)
                self.cache_hits += 1
            else:
                missing.append(seg)
            found.append(hit)
        if missing:
            self.cache_misses += 1
            if sum(len(s) for s in missing) > self._offload_chars:
                loop = asyncio.get_running_loop()
                encoded = await loop.run_in_executor(self._executor, self._tok.encode_batch,
                                                     missing)
            else:
                encoded = self._tok.encode_batch(missing)
            it = iter(encoded)
            for i, hit in enumerate(found):
                if hit is None:
                    fresh = next(it)
                    found[i] = fresh
                    if len(segments[i]) >= MIN_CACHED_SEGMENT_CHARS:
                        cache[segments[i]] = fresh
            while len(cache) > self._cache_size:
                cache.popitem(last=False)
        out: list[int] = []
        for ids in found:
            assert ids is not None
            out.extend(ids)
        return out


class RenderPromptTokenizer:
    """Asks a candidate pod's vLLM render endpoint for the prompt's token ids."""

    def __init__(self, session_factory: Any = aiohttp.ClientSession, timeout_s: float = 2.0
                 ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._factory = session_factory
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]:
        """Token ids from the first candidate that answers."""
        given = _token_prompt(request)
        if given is not None:
            return given
        if self._session is None:
            self._session = self._factory()
        path = request.path.split("?", 1)[0].rstrip("/") + "/render"
        last_error = "no candidates"
        for endpoint in candidates[:2]:  # a second try, then give up: routing must not wait
            try:
                async with self._session.post(f"http://{endpoint.address}{path}",
                                              data=request.raw_body,
                                              headers={"content-type": "application/json"},
                                              timeout=self._timeout) as resp:
                    if resp.status != 200:
                        last_error = f"{endpoint.address}: HTTP {resp.status}"
                        continue
                    return parse_render_response(await resp.json(content_type=None))
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last_error = f"{endpoint.address}: {type(exc).__name__} {exc}"
        raise TokenizationError(f"render failed: {last_error}")


def parse_render_response(obj: Any) -> list[int]:
    """Token ids from a render response (vLLM returns the engine prompt, or a list of them
    for batched completions)."""
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, dict):
        for key in ("prompt_token_ids", "token_ids"):
            ids = obj.get(key)
            if isinstance(ids, list) and all(type(t) is int for t in ids):
                return ids
        inner = obj.get("engine_prompt") or obj.get("prompt")
        if isinstance(inner, dict):
            return parse_render_response(inner)
    raise ValueError("render response has no prompt_token_ids")
