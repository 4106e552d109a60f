"""The load generator: an open-loop asyncio client that fires every request of a schedule
at its arrival time, streams the answer and records what it saw.

Per request: when it was sent, when the pod received it (the pod's ``x-sim-received-at``,
the host's monotonic clock, so the difference is the time spent getting through the
router), the first token chunk, the end, and the usage (prompt, cached and completion
tokens). Arrivals are fleet time divided by the time scale. The oracle routes here:
it asks every pod what it holds, then sends straight to the best one, and starts the
request's clock after that.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import msgspec

from benchmarks.compare.fleet import MODEL, Oracle
from benchmarks.workloads import BenchRequest, chat_body

CHAT_PATH = "/v1/chat/completions"
REQUEST_TIMEOUT_S = 300.0
PROGRESS_EVERY_S = 0.5
PROGRESS_EVERY_S_NO_TTY = 10.0
BAR_WIDTH = 24


@dataclass
class Sample:
    """What the client saw of one request (monotonic seconds, wall clock)."""

    index: int
    tag: str
    sent: float = 0.0
    status: int = 0
    error: str | None = None
    received_at_pod: float | None = None
    first_token: float | None = None
    done: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    pod: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token is not None and self.done is not None


class Progress:
    """A one-line progress bar on stderr (a line every 10 s when stderr is not a TTY)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.sent = self.done = self.failed = 0
        self.start = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        every = PROGRESS_EVERY_S if self._tty else PROGRESS_EVERY_S_NO_TTY
        if not force and now - self._last < every:
            return
        self._last = now
        filled = int(BAR_WIDTH * self.done / max(1, self.total))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = (f"  {self.label:<42} [{bar}] {self.done}/{self.total} done, "
                f"{self.sent - self.done} in flight, {self.failed} failed, "
                f"{now - self.start:5.1f} s")
        if self._tty:
            print("\r" + line, end="" if not force else "\n", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


async def run_schedule(requests: Sequence[BenchRequest], *, url: str | None,
                       oracle: Oracle | None, time_scale: float, label: str) -> list[Sample]:
    """Send every request at ``arrival_s / time_scale`` after the start; wait for all."""
    bodies = [msgspec.json.encode(chat_body(MODEL, r.messages, r.max_tokens)) for r in requests]
    progress = Progress(label, len(requests))
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()

        async def fire(request: BenchRequest, body: bytes) -> Sample:
            await asyncio.sleep(max(0.0, start + request.arrival_s / time_scale
                                    - time.monotonic()))
            sample = Sample(request.index, request.tag)
            target = url
            if oracle is not None:
                try:
                    target = (await oracle.pick(session, request.token_ids)).url
                except (TimeoutError, aiohttp.ClientError) as exc:
                    sample.error = f"oracle lookup: {type(exc).__name__}"
            progress.sent += 1
            if target is not None and sample.error is None:
                await _one(session, target + CHAT_PATH, body, sample)
            progress.done += 1
            progress.failed += not sample.ok
            progress.update()
            return sample

        async def ticker() -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY_S)
                progress.update()

        tick = asyncio.create_task(ticker())
        try:
            samples = await asyncio.gather(*(fire(r, b) for r, b in zip(requests, bodies,
                                                                        strict=True)))
        finally:
            tick.cancel()
        progress.update(force=True)
        return list(samples)


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, sample: Sample) -> None:
    sample.sent = time.monotonic()
    try:
        async with session.post(url, data=body,
                                headers={"content-type": "application/json"}) as resp:
            sample.status = resp.status
            sample.pod = resp.headers.get("x-sim-endpoint", "")
            received = resp.headers.get("x-sim-received-at")
            sample.received_at_pod = float(received) if received else None
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}"
                await resp.read()
                return
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                if sample.first_token is None:
                    chunk = msgspec.json.decode(line[6:])
                    if chunk.get("choices"):
                        sample.first_token = time.monotonic()
                elif b'"usage"' in line:
                    usage = msgspec.json.decode(line[6:]).get("usage")
                    if usage:
                        sample.prompt_tokens = usage.get("prompt_tokens", 0)
                        sample.completion_tokens = usage.get("completion_tokens", 0)
                        details = usage.get("prompt_tokens_details") or {}
                        sample.cached_tokens = details.get("cached_tokens") or 0
            sample.done = time.monotonic()
            if sample.first_token is None:
                sample.error = "no token"
    except (TimeoutError, aiohttp.ClientError) as exc:
        sample.error = type(exc).__name__
