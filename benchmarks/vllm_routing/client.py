"""The load generator: ``concurrency`` closed-loop workers take the workload's requests in
order, stream each answer (chat completions, ``stream_options.include_usage``) and record
the time to the first content byte and the usage. A multi-turn request waits for the
previous turn of its conversation to finish (its answer would be part of the prompt)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence

import aiohttp
import msgspec

from benchmarks.vllm_routing.measure import Sample
from benchmarks.vllm_routing.workload import BenchRequest

CHAT_PATH = "/v1/chat/completions"
REQUEST_TIMEOUT_S = 120.0
PROGRESS_EVERY_S = 10.0

# Picks the base URL for a request: (request, sequence number of the send) -> (url,
# server index if the client chose it).
Target = Callable[[BenchRequest, int], tuple[str, int | None]]
# Which server answered, from the response header the router adds (None: not known).
ServerOf = Callable[[str], int | None]


def chat_body(model: str, request: BenchRequest, max_tokens: int) -> bytes:
    """A streamed chat request that always generates ``max_tokens`` tokens (the random
    weights would otherwise stop at an early end-of-sequence token now and then)."""
    return msgspec.json.encode({
        "model": model, "messages": request.openai_messages(), "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})


async def run_requests(requests: Sequence[BenchRequest], target: Target, *, model: str,
                       max_tokens: int, concurrency: int, label: str,
                       upstream_header: str = "", server_of: ServerOf | None = None
                       ) -> list[Sample]:
    """Send every request with ``concurrency`` workers; returns the samples in order."""
    samples = [Sample(r.index, r.tenant) for r in requests]
    finished = {r.index: asyncio.Event() for r in requests}
    queue = list(requests)
    sent = 0
    started = last_report = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal sent, last_report
            while queue:
                request = queue.pop(0)
                if request.after is not None:
                    await finished[request.after].wait()
                url, server = target(request, sent)
                sent += 1
                sample = samples[request.index]
                sample.server = server
                upstream = await _one(session, url + CHAT_PATH,
                                      chat_body(model, request, max_tokens), sample,
                                      upstream_header)
                if sample.server is None and upstream and server_of is not None:
                    sample.server = server_of(upstream)
                finished[request.index].set()
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY_S:
                    last_report = now
                    done = sum(e.is_set() for e in finished.values())
                    print(f"  {label}: {done}/{len(requests)} in {now - started:.0f} s",
                          file=sys.stderr, flush=True)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return samples


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, sample: Sample,
               upstream_header: str) -> str:
    """Send one request into ``sample``; returns the upstream header's value ("": none)."""
    sent = time.monotonic()
    upstream = ""
    try:
        async with session.post(url, data=body,
                                headers={"content-type": "application/json"}) as resp:
            sample.status = resp.status
            upstream = resp.headers.get(upstream_header, "") if upstream_header else ""
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}"
                await resp.read()
                return upstream
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = msgspec.json.decode(line[6:])
                if sample.ttft_s is None and _has_content(chunk):
                    sample.ttft_s = time.monotonic() - sent
                usage = chunk.get("usage")
                if usage:
                    sample.prompt_tokens = usage.get("prompt_tokens") or 0
                    sample.completion_tokens = usage.get("completion_tokens") or 0
                    details = usage.get("prompt_tokens_details") or {}
                    sample.cached_tokens = details.get("cached_tokens") or 0
            sample.e2e_s = time.monotonic() - sent
            if sample.ttft_s is None:
                sample.error = "no content"
    except (TimeoutError, aiohttp.ClientError) as exc:
        sample.error = type(exc).__name__
    return upstream


def _has_content(chunk: dict[str, object]) -> bool:
    """Whether a stream chunk carries generated text (not only the role or the usage)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if (isinstance(delta, dict) and delta.get("content")) or choice.get("text"):
            return True
    return False
