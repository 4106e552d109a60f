"""Open-loop load through Envoy for fault tests: one request every 1/rate s from a thread
pool, whatever the answers do, each recorded with when it was sent and who served it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tests.integration.httputil import post

COMPLETION = {"model": "qwen3", "prompt": "hello", "max_tokens": 1}


@dataclass
class Sent:
    """One request of the load generator."""

    group: int
    sent: float
    done: float = 0.0
    status: int = 0
    pod: str | None = None  # x-sim-endpoint of the pod that answered
    error: str = ""


@dataclass
class Load:
    """Open-loop load: request ``n`` goes to ``path`` with ``body(group, n)``, where
    ``group = groups(n)`` (e.g. a tenant whose prefix it shares)."""

    url: str
    rate: float
    path: str = "/v1/completions"
    body: Callable[[int, int], dict[str, Any]] = lambda group, n: COMPLETION
    groups: Callable[[int], int] = lambda n: 0
    workers: int = 16
    results: list[Sent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.results

    def answered(self) -> list[Sent]:
        return [r for r in list(self.results) if r.done]

    def _one(self, item: Sent, n: int) -> None:
        try:
            reply = post(self.url + self.path, self.body(item.group, n))
            item.status, item.pod = reply.status, reply.headers.get("x-sim-endpoint")
            if reply.status != 200:
                item.error = reply.body[:200].decode(errors="replace")
        except OSError as exc:
            item.status, item.error = -1, repr(exc)
        item.done = time.monotonic()

    def _run(self) -> None:
        futures: list[Future[None]] = []
        with ThreadPoolExecutor(self.workers) as pool:
            n = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                item = Sent(self.groups(n), time.monotonic())
                self.results.append(item)
                futures.append(pool.submit(self._one, item, n))
                n += 1
                next_at += 1.0 / self.rate
                time.sleep(max(0.0, next_at - time.monotonic()))
            for f in futures:
                f.result()
