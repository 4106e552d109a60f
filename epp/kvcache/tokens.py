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
import random
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from epp.api.openai import ChatPrompt, LLMRequest, TextPrompt, TokenPrompt
from epp.datastore import Endpoint
from epp.kvcache.tokenizing import TokenizationError

log = logging.getLogger(__name__)

# Bytes of segments cached (LRU by bytes, estimated by ``segment_bytes``). A segment is
# a chat message or a completion prompt. A 32k-token prompt costs ~1.3 MB (32k x 36 B of
# token list plus ~128 KB of text), so 256 MiB holds ~200 of those, or ~30,000 typical
# 2 KB system prompts; an entry count could not bound memory (8,192 long prompts: ~11 GB).
DEFAULT_SEGMENT_CACHE_BYTES = 256 * 1024 * 1024
# A segment bigger than this share of the budget is not cached: one huge prompt that may
# never return would flush many that do (1/16 of 256 MiB: a ~400k-token segment).
MAX_SEGMENT_SHARE = 1 / 16
# A cached token costs a list slot (8 B) and its int object (28 B; ids below 257 are
# shared small ints, so this over-counts them slightly).
BYTES_PER_CACHED_TOKEN = 8 + 28
# Per entry: the list header (56 B) and the OrderedDict's hash slot and link (~100 B).
CACHE_ENTRY_OVERHEAD_BYTES = 56 + 100
# Uncached text longer than this is encoded in a thread: ~4,000 characters is ~1,000
# tokens, about 1 ms of HF tokenizers time, the longest we let the event loop stall.
DEFAULT_OFFLOAD_CHARS = 4000
# Segments shorter than this are not worth a cache entry (user turns, role headers).
MIN_CACHED_SEGMENT_CHARS = 256


class TextTokenizer(Protocol):
    """What the local mode needs from a tokenizer (``epp.tokenization.LocalTokenizer``)."""

    special_token_pattern: re.Pattern[str]

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = True) -> str: ...


def _token_prompt(request: LLMRequest) -> list[int] | None:
    if isinstance(request.prompt, TokenPrompt):
        return list(request.prompt.sequences[0])  # batched prompts: route on the first
    return None


def segment_bytes(segment: str, tokens: Sequence[int]) -> int:
    """Estimated memory of one cached segment: its text, its token list, the entry."""
    return (sys.getsizeof(segment) + BYTES_PER_CACHED_TOKEN * len(tokens)
            + CACHE_ENTRY_OVERHEAD_BYTES)


class LocalPromptTokenizer:
    """In-process tokenization with a segment cache bounded in (estimated) bytes."""

    def __init__(self, tokenizer: TextTokenizer, *, executor: Executor | None = None,
                 cache_bytes: int = DEFAULT_SEGMENT_CACHE_BYTES,
                 max_segment_share: float = MAX_SEGMENT_SHARE,
                 offload_chars: int = DEFAULT_OFFLOAD_CHARS) -> None:
        self._tok = tokenizer
        self._executor = executor
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self.cache_budget = cache_bytes
        self._max_segment_bytes = int(cache_bytes * max_segment_share)
        self.cache_bytes = 0  # estimated bytes held now (``segment_bytes`` of each entry)
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
                        self._remember(segments[i], fresh)
        out: list[int] = []
        for ids in found:
            assert ids is not None
            out.extend(ids)
        return out

    def _remember(self, segment: str, tokens: list[int]) -> None:
        """Cache a segment, evicting least recently used ones to stay within budget."""
        size = segment_bytes(segment, tokens)
        cache = self._cache
        # Already present: a concurrent encode of the same segment cached it first.
        if size > self._max_segment_bytes or segment in cache:
            return
        cache[segment] = tokens
        self.cache_bytes += size
        while self.cache_bytes > self.cache_budget:
            old, old_tokens = cache.popitem(last=False)
            self.cache_bytes -= segment_bytes(old, old_tokens)


# A render call to a healthy pod: vLLM applies the chat template and tokenizes in its API
# server (~1-5 ms for a few thousand tokens) plus an in-cluster round trip; 20 ms is
# several times that, so the hedge fires for a stalled pod, not for a busy one, and
# bounds what one stalled pod adds to a request at ~20 ms plus the second answer.
RENDER_HEDGE_DELAY_S = 0.02
# Bound of one render call for callers without their own deadline (the director caps the
# whole prefix step far below it); a 128k-token prompt renders in well under a second.
RENDER_TIMEOUT_S = 2.0
# Recent latency per pod is an EWMA; 0.3 follows a change within ~3 calls.
RENDER_LATENCY_ALPHA = 0.3
# Remembered latency halves every 2 s without new calls, so a pod that was slow a while
# ago is tried again rather than shunned for good.
RENDER_LATENCY_HALF_LIFE_S = 2.0
# A pod that stalled (a first choice beaten by its hedge, a failed call, a call still
# silent when the caller gave up) is not asked for this long, doubling per consecutive
# stall up to the maximum; an answer resets it. Retrying a stalled pod costs one request
# one hedge delay, so 5 s keeps that under 1% of requests at 20 req/s, and the 60 s cap
# still notices a recovered pod within a minute.
RENDER_STALL_COOLDOWN_S = 5.0
RENDER_MAX_COOLDOWN_S = 60.0


@dataclass(slots=True)
class RenderStats:
    """Render outcomes since start (for tests and benchmarks)."""

    calls: int = 0  # HTTP calls started (hedges included)
    hedges: int = 0  # second calls started because the first was slow or failed
    hedge_wins: int = 0  # requests the second call answered
    failures: int = 0  # calls that failed (HTTP error, refused, timeout, bad body)
    skipped_unreachable: int = 0  # candidates passed over as unreachable


@dataclass(slots=True)
class _Latency:
    value: float | None = None  # EWMA of answered calls; None: never answered
    at: float = 0.0  # time.monotonic() of the last answer
    stalls: int = 0  # consecutive stalls
    cool_until: float = 0.0  # not asked before this time.monotonic()


class _RenderFailure(Exception):
    """One render call failed; the message names the pod and why."""


def _retrieve(task: asyncio.Task[list[int]]) -> None:
    """Done-callback of abandoned calls: consume their outcome so nothing is reported."""
    if not task.cancelled():
        task.exception()


class RenderPromptTokenizer:
    """Asks candidate pods' vLLM render endpoints for the prompt's token ids.

    The first choice is the faster of two random reachable candidates by recent latency
    (so calls spread over the pool instead of piling on the first pods by name); if it
    has not answered within ``hedge_delay_s`` (or failed), the best other pod is asked
    too. The first answer wins and the other call is cancelled. Pods judged unreachable
    are skipped; pods that stalled sit out a cooldown; pods whose metrics cannot be
    scraped are asked only when nothing better is left.
    """

    def __init__(self, session_factory: Any = aiohttp.ClientSession,
                 timeout_s: float = RENDER_TIMEOUT_S, *,
                 hedge_delay_s: float = RENDER_HEDGE_DELAY_S, seed: int | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._factory = session_factory
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._hedge_delay_s = hedge_delay_s
        self._latency: dict[str, _Latency] = {}  # by address; pruned to the candidates
        self._rng = random.Random(seed)
        self._abandoned: set[asyncio.Task[list[int]]] = set()  # cancelled, not yet done
        self.stats = RenderStats()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def latency(self, endpoint: Endpoint, now: float | None = None) -> float:
        """The pod's remembered render latency in seconds (decayed; 0 when unknown)."""
        entry = self._latency.get(endpoint.address)
        if entry is None or entry.value is None:
            return 0.0
        age = (time.monotonic() if now is None else now) - entry.at
        return entry.value * 0.5 ** (max(age, 0.0) / RENDER_LATENCY_HALF_LIFE_S)

    def rank(self, endpoint: Endpoint, now: float) -> int:
        """0: answered before; 1: not asked yet; 2: its metrics cannot be scraped (maybe
        wedged); 3: stalled recently (cooling down). Lower is asked first."""
        entry = self._latency.get(endpoint.address)
        if entry is not None and entry.cool_until > now:
            return 3
        if endpoint.state.scrape_error is not None:
            return 2
        return 1 if entry is None or entry.value is None else 0

    def choose(self, candidates: Sequence[Endpoint]) -> tuple[Endpoint | None, Endpoint | None]:
        """The first pod to ask and the one to hedge with (either may be None)."""
        usable = [e for e in candidates if e.state.unreachable is None]
        self.stats.skipped_unreachable += len(candidates) - len(usable)
        if not usable:  # all unreachable: the scheduler fails open, so try them anyway
            usable = list(candidates)
        if len(usable) < 2:
            return (usable[0] if usable else None), None
        now = time.monotonic()
        ranks = {e.address: self.rank(e, now) for e in usable}
        # The first choice: the faster of two random pods among those answering or not
        # yet asked (unknown pods score 0 ms, so each gets explored).
        good = [e for e in usable if ranks[e.address] <= 1]
        if len(good) >= 2:
            a, b = self._rng.sample(good, 2)
            first = a if self.latency(a, now) <= self.latency(b, now) else b
        else:
            first = min(usable, key=lambda e: (ranks[e.address], self._rng.random()))
        # The hedge: the best other pod, preferring ones known to answer.
        rnd = self._rng.random
        hedge = min((e for e in usable if e is not first),
                    key=lambda e: (ranks[e.address], self.latency(e, now), rnd()))
        return first, hedge

    def _entry(self, endpoint: Endpoint, candidates: Sequence[Endpoint]) -> _Latency:
        entry = self._latency.get(endpoint.address)
        if entry is None:
            if len(self._latency) >= 2 * len(candidates) + 16:  # forget departed pods
                keep = {e.address for e in candidates}
                self._latency = {a: v for a, v in self._latency.items() if a in keep}
            entry = self._latency[endpoint.address] = _Latency()
        return entry

    def _answered(self, endpoint: Endpoint, seconds: float, candidates: Sequence[Endpoint]
                  ) -> None:
        entry = self._entry(endpoint, candidates)
        now = time.monotonic()
        if entry.value is None:
            entry.value = seconds
        else:
            current = self.latency(endpoint, now)
            entry.value = current + RENDER_LATENCY_ALPHA * (seconds - current)
        entry.at = now
        entry.stalls = 0
        entry.cool_until = 0.0

    def _stalled(self, endpoint: Endpoint, candidates: Sequence[Endpoint]) -> None:
        entry = self._entry(endpoint, candidates)
        cooldown = min(RENDER_STALL_COOLDOWN_S * 2 ** entry.stalls, RENDER_MAX_COOLDOWN_S)
        entry.stalls += 1
        entry.cool_until = time.monotonic() + cooldown

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]:
        """Token ids from the first pod that answers (hedged, see the class docstring)."""
        given = _token_prompt(request)
        if given is not None:
            return given
        first, hedge = self.choose(candidates)
        if first is None:
            raise TokenizationError("render failed: no candidates")
        if self._session is None:
            self._session = self._factory()
        path = request.path.split("?", 1)[0].rstrip("/") + "/render"
        return await self._hedged(first, hedge, path, request.raw_body, candidates)

    async def _hedged(self, first: Endpoint, hedge: Endpoint | None, path: str, body: bytes,
                      candidates: Sequence[Endpoint]) -> list[int]:
        loop = asyncio.get_running_loop()
        pending: dict[asyncio.Task[list[int]], tuple[Endpoint, float]] = {}

        def start(endpoint: Endpoint) -> None:
            self.stats.calls += 1
            task = loop.create_task(self._call(endpoint, path, body, candidates))
            pending[task] = (endpoint, loop.time())

        start(first)
        errors: list[str] = []
        hedged = hedge is None
        try:
            while pending:
                wait = None if hedged else self._hedge_delay_s
                done, _ = await asyncio.wait(pending, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    endpoint, _started = pending.pop(task)
                    exc = task.exception()
                    if exc is None:
                        if endpoint is not first:
                            self.stats.hedge_wins += 1
                            if pending:  # the first choice is stalled: rank it last
                                self._stalled(first, candidates)
                        return task.result()
                    errors.append(str(exc))
                if not hedged and (not done or not pending):
                    # The first choice is slow (or failed): ask the next best pod too.
                    assert hedge is not None
                    hedged = True
                    self.stats.hedges += 1
                    start(hedge)
        except asyncio.CancelledError:
            # The caller gave up (the prefix deadline): calls stalled past the hedge
            # delay are evidence against their pods.
            now = loop.time()
            for endpoint, started in pending.values():
                if now - started >= self._hedge_delay_s:
                    self._stalled(endpoint, candidates)
            raise
        finally:
            for task in pending:  # the loser (or all, on cancellation)
                task.cancel()
                task.add_done_callback(_retrieve)
                self._abandoned.add(task)
                task.add_done_callback(self._abandoned.discard)
        raise TokenizationError(f"render failed: {'; '.join(errors)}")

    async def _call(self, endpoint: Endpoint, path: str, body: bytes,
                    candidates: Sequence[Endpoint]) -> list[int]:
        session = self._session
        assert session is not None
        started = time.monotonic()
        try:
            async with session.post(f"http://{endpoint.address}{path}", data=body,
                                    headers={"content-type": "application/json"},
                                    timeout=self._timeout) as resp:
                if resp.status != 200:
                    if resp.status >= 500:  # the pod's fault, not the request's
                        self._stalled(endpoint, candidates)
                    raise _RenderFailure(f"{endpoint.address}: HTTP {resp.status}")
                ids = parse_render_response(await resp.json(content_type=None))
        except _RenderFailure:
            self.stats.failures += 1
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.stats.failures += 1
            self._stalled(endpoint, candidates)
            if isinstance(exc, aiohttp.ClientConnectorError):  # nothing listens there
                endpoint.state.report_unreachable(f"render: cannot connect: {exc}")
            raise _RenderFailure(f"{endpoint.address}: {type(exc).__name__} {exc}") from None
        self._answered(endpoint, time.monotonic() - started, candidates)
        return ids


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
