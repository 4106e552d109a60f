"""Supervision for the KV-event background loops: a loop that dies is reported and
restarted after a capped, jittered exponential backoff; and a log limiter so a fault
that repeats per message is one line per interval, not a traceback storm."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

# First wait after a crash: long enough that a fault which repeats at once (a bad
# address, a socket error) costs two log lines a second at most, short enough that a
# one-off fault loses under a second of events (replay then fills the gap).
DEFAULT_RESTART_BACKOFF_S = 0.5
# Longest wait between restarts: a fault that persists (a mistyped address) is retried
# twice a minute, and an engine that comes back is followed within 30 s.
DEFAULT_RESTART_BACKOFF_MAX_S = 30.0
# +-20 % of each wait, at random: the subscribers of a whole fleet that failed together
# (the EPP's network blipped) do not retry in lockstep.
RESTART_JITTER = 0.2
# A loop that ran this long before failing was healthy: its next wait starts from the
# first step again instead of continuing to double. Twice the longest wait, so a loop
# that fails on every start never counts as healthy.
HEALTHY_RUN_S = 2 * DEFAULT_RESTART_BACKOFF_MAX_S
# At most one warning per kind per subscriber per interval.
LOG_INTERVAL_S = 10.0


class Backoff:
    """Exponential delays, doubling from ``initial`` to at most ``maximum``, jittered."""

    def __init__(self, initial: float = DEFAULT_RESTART_BACKOFF_S,
                 maximum: float = DEFAULT_RESTART_BACKOFF_MAX_S,
                 jitter: float = RESTART_JITTER,
                 rand: Callable[[], float] = random.random) -> None:
        if initial < 0 or maximum < initial:
            raise ValueError("backoff needs 0 <= initial <= maximum")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self._initial = initial
        self._maximum = maximum
        self._jitter = jitter
        self._rand = rand
        self._attempt = 0

    def next(self) -> float:
        """The next delay in seconds (and advance)."""
        base = min(self._maximum, self._initial * 2.0 ** min(self._attempt, 64))
        self._attempt += 1
        return base * (1.0 + self._jitter * (2.0 * self._rand() - 1.0))

    def reset(self) -> None:
        """Start again from ``initial``."""
        self._attempt = 0


class LogLimiter:
    """At most one log line per key per interval, reporting how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL_S) -> None:
        self._log = logger
        self._interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None if ``key`` logged recently (counted as held back), else the held count."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._next[key] = now + self._interval
        return self._held.pop(key, 0)

    def warning(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        """``logger.warning`` unless ``key`` logged within the interval."""
        held = self.allow(key)
        if held is None:
            return
        if held:
            msg += " (%d similar suppressed)"
            args = (*args, held)
        self._log.warning(msg, *args, exc_info=exc_info, stacklevel=2)


async def supervise(run: Callable[[], Awaitable[None]], backoff: Backoff,
                    on_failure: Callable[[Exception, float], None]) -> None:
    """Run ``run`` until it returns or is cancelled; after an exception, report it with
    the coming delay (``on_failure`` counts and logs) and start it again."""
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except Exception as exc:  # anything but cancellation: report and restart
            if time.monotonic() - started >= HEALTHY_RUN_S:
                backoff.reset()
            delay = backoff.next()
            on_failure(exc, delay)
        await asyncio.sleep(delay)
