"""Supervision for the EPP's background loops (KV-event subscribers, metrics pollers,
Kubernetes watches, the endpoints-file watcher, the KV index resizer): a loop that dies
is reported and restarted after a capped, jittered exponential backoff; and a log
limiter so a fault that repeats per message is one line per interval, not a traceback
storm.

A leaf module: it imports nothing from ``epp``, so every layer may use it."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

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
# At most one warning per key (a kind of fault, of one task) per interval.
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


FailureCounter = Callable[[str], None]
"""Counts one unexpected failure of a background task, given its kind (``scraper``,
``endpoints-file``, ...): a small fixed set, so it can be a metric label."""


def supervised(run: Callable[[], Awaitable[None]], *, task: str, what: str,
               logs: LogLimiter, count: FailureCounter | None = None,
               backoff: Backoff | None = None,
               on_restart: Callable[[Exception], None] | None = None) -> Coroutine[Any, Any, None]:
    """:func:`supervise` ``run`` with the usual reporting: each unexpected exception is
    counted as ``count(task)``, logged (rate-limited per task and exception type, with
    ``what`` naming the endpoint or resource) and followed by ``on_restart(exc)`` (to drop
    state the dead loop may have left half-updated) before the backoff.

    The log key leaves out ``what``: one fault in many endpoints is one line per interval,
    and departed endpoints leave no keys behind."""
    def on_failure(exc: Exception, delay: float) -> None:
        if count is not None:
            count(task)
        if on_restart is not None:
            on_restart(exc)
        logs.warning(f"{task} {type(exc).__name__}",
                     "%s: %s died (%s: %s); restarting in %.1f s", task, what,
                     type(exc).__name__, exc, delay, exc_info=True)

    return supervise(run, backoff if backoff is not None else Backoff(), on_failure)
