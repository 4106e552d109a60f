"""Poll every endpoint's ``/metrics`` and keep ``Endpoint.state.metrics`` fresh.

One asyncio task per endpoint, started and stopped by a pool listener as endpoints come
and go, all sharing one keep-alive ``aiohttp.ClientSession``. A slow or dead pod only
delays its own task. A failed scrape keeps the last good metrics (they age into staleness,
see ``MetricsScraper.is_stale``) and records a short reason in ``state.scrape_error``. A
refused connection also marks the endpoint unreachable (out of the candidate set); the
next successful scrape brings it back. Each task is supervised: one that dies of a bug is
counted (``on_task_failure("scraper")``), logged and restarted with backoff.

Pages are parsed inline on the event loop: ``parse_metrics`` takes about 50 µs for a
56 KB vLLM page (``benchmarks/scrape.py``); a round trip through a worker thread costs
~90 µs of CPU by itself and the parse would still hold the GIL, so offloading would only
add work. 64 pods at 10 Hz spend ~3% of a core parsing; the whole scrape (aiohttp GET +
parse) is ~270-330 µs of CPU (~18% of a core for 64 pods), and a 10 ms loop ticker is
~1.1-1.4 ms late at p99 (0.2-0.7 ms idle).

Pages are requested uncompressed: inflating a gzip page costs the picker ~70-150 µs more
per scrape and the pod's API server the compression, to save ~50 KB per scrape of
in-cluster traffic. ``accept_gzip=True`` flips that for very large (e.g. many-engine) pages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from epp.datalayer.parser import VLLM_METRICS, EngineMetrics, MetricsParseError, parse_metrics
from epp.datastore.endpoint import Endpoint
from epp.datastore.metrics import EndpointState
from epp.datastore.pool import EndpointPool
from epp.supervise import FailureCounter, LogLimiter, supervised

# vLLM's queue depth changes within a few decode steps (20-50 ms each), so a picker
# reading it should see values at most ~100 ms old. The Go endpoint picker refreshes
# every 50 ms; 100 ms halves the scrape load (64 pods: 640 requests/s) for one step of lag.
DEFAULT_SCRAPE_INTERVAL_S = 0.1
# A healthy vLLM answers /metrics in a few ms, but its API server is a Python event
# loop that can stall for hundreds of ms under heavy load; 1 s tells such a pod from a
# dead one and bounds how long one hanging connection is held.
DEFAULT_SCRAPE_TIMEOUT_S = 1.0
# Metrics older than 5 intervals (500 ms) are stale: that tolerates 4 missed or late polls
# (a GC pause, one slow /metrics) but, at 20-50 ms per decode step, 10-25 steps have
# passed, enough for the queue to turn over; past that the EPP's own in-flight counts are
# the better signal. (The Go picker's saturation detector likewise calls metrics stale
# after 4 of its 50 ms ticks.) It is shorter than the timeout on purpose: staleness is
# about age, the timeout only about freeing the connection.
STALE_AFTER_INTERVALS = 5
DEFAULT_STALE_AFTER_S = STALE_AFTER_INTERVALS * DEFAULT_SCRAPE_INTERVAL_S
# A vLLM page is 30-100 KB (it grows with histogram label sets); anything 40x beyond
# that is not a metrics page and must not be buffered whole.
MAX_PAGE_BYTES = 4 * 1024 * 1024
# The task kind of every poller in the background-failure count (not the endpoint: the
# label values must stay bounded).
SCRAPER_TASK = "scraper"

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScrapeStats:
    """Scrape outcomes since start (for the EPP's own metrics and benchmarks)."""

    succeeded: int = 0
    failed: int = 0


@dataclass(slots=True)
class _Poller:
    address: str
    state: EndpointState
    task: asyncio.Task[None]


class _ScrapeFailure(Exception):
    """A scrape that failed for a reason already phrased for ``scrape_error``."""


class MetricsScraper:
    """Keeps the metrics of every endpoint in ``pool`` fresh by polling ``path``.

    ``metric_names`` says which series to read (vLLM's by default).

    ``stale_after_s`` defaults to ``STALE_AFTER_INTERVALS * interval_s``. Call ``start()``
    and ``stop()`` on the event loop that mutates the pool (its listener creates tasks).
    """

    def __init__(
        self,
        pool: EndpointPool,
        *,
        interval_s: float = DEFAULT_SCRAPE_INTERVAL_S,
        timeout_s: float = DEFAULT_SCRAPE_TIMEOUT_S,
        path: str = "/metrics",
        scheme: str = "http",
        verify_tls: bool = False,
        stale_after_s: float | None = None,
        accept_gzip: bool = False,
        on_task_failure: FailureCounter | None = None,
        metric_names: EngineMetrics = VLLM_METRICS,
    ) -> None:
        if not interval_s > 0 or not timeout_s > 0:
            raise ValueError(
                f"interval_s and timeout_s must be > 0, got {interval_s} and {timeout_s}"
            )
        if stale_after_s is None:
            stale_after_s = STALE_AFTER_INTERVALS * interval_s
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        self._pool = pool
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._path = path
        self._names = metric_names
        self._scheme = scheme
        # https pods rarely carry certificates the picker can check (upstream's default
        # skips verification too); aiohttp verifies unless told False.
        self._ssl = verify_tls or scheme == "http"
        self._stale_after_s = stale_after_s
        self._headers = {
            "Accept": "text/plain",  # the 0.0.4 text format, not OpenMetrics
            "Accept-Encoding": "gzip" if accept_gzip else "identity",
        }
        self._rng = random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pollers: dict[str, _Poller] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # cancelled, not yet finished
        self._listening = False
        self._on_task_failure = on_task_failure
        self._logs = LogLimiter(log)
        self.stats = ScrapeStats()

    @property
    def stale_after_s(self) -> float:
        """Age in seconds beyond which an endpoint's metrics are not to be trusted."""
        return self._stale_after_s

    @property
    def polled_endpoints(self) -> frozenset[str]:
        """Names of the endpoints that currently have a polling task."""
        return frozenset(self._pollers)

    def is_stale(self, endpoint: Endpoint, now: float | None = None) -> bool:
        """Whether ``endpoint``'s metrics are older than ``stale_after_s`` (or never came)."""
        return endpoint.metrics_stale(time.monotonic() if now is None else now,
                                      self._stale_after_s)

    async def start(self) -> None:
        """Open the HTTP session and start polling every endpoint in the pool."""
        if self._session is not None:
            raise RuntimeError("MetricsScraper already started")
        self._loop = asyncio.get_running_loop()
        # limit=0: concurrency is already one request per endpoint; aiohttp's default cap
        # of 100 connections would queue scrapes behind each other in pools beyond 100.
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=self._headers,
            raise_for_status=False,
        )
        if not self._listening:  # the pool has no remove_listener; stop() mutes it instead
            self._pool.add_listener(self._on_pool_change)
            self._listening = True
        self._on_pool_change(self._pool.snapshot())

    async def __aenter__(self) -> MetricsScraper:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop every polling task, wait for them, and close the session."""
        session, self._session = self._session, None
        if session is None:
            return
        tasks = [poller.task for poller in self._pollers.values()] + list(self._retiring)
        self._pollers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._retiring.clear()
        await session.close()

    def _on_pool_change(self, snapshot: tuple[Endpoint, ...]) -> None:
        if self._session is None or self._loop is None:
            return
        wanted = {endpoint.name: endpoint for endpoint in snapshot}
        for name, poller in list(self._pollers.items()):
            endpoint = wanted.get(name)
            # A new address (or new state object) is a different server: restart its poller.
            if endpoint is None or endpoint.address != poller.address or (
                endpoint.state is not poller.state
            ):
                del self._pollers[name]
                poller.task.cancel()
                self._retiring.add(poller.task)
                poller.task.add_done_callback(self._retiring.discard)
        for name, endpoint in wanted.items():
            if name not in self._pollers:
                task = self._loop.create_task(
                    self._supervised_poll(endpoint.name, endpoint.address, endpoint.state),
                    name=f"scrape {endpoint.name}",
                )
                self._pollers[name] = _Poller(endpoint.address, endpoint.state, task)

    def _supervised_poll(self, name: str, address: str, state: EndpointState
                         ) -> Coroutine[Any, Any, None]:
        def on_restart(exc: Exception) -> None:
            # Visible in the endpoint's state until the restarted poller scrapes again.
            state.scrape_error = f"internal error: {type(exc).__name__}"

        return supervised(lambda: self._poll(name, address, state), task=SCRAPER_TASK,
                          what=f"poller of {name} ({address})", logs=self._logs,
                          count=self._on_task_failure, on_restart=on_restart)

    async def _poll(self, name: str, address: str, state: EndpointState) -> None:
        loop = asyncio.get_running_loop()
        url = f"{self._scheme}://{address}{self._path}"
        # A random phase per endpoint, so a pool that appears at once is not scraped in
        # lockstep; fixed-rate deadlines then keep the phases spread.
        await asyncio.sleep(self._rng.uniform(0.0, self._interval_s))
        deadline = loop.time()
        failing_since: float | None = None
        while True:
            was_unreachable = state.unreachable
            reason = await self._scrape(url, state)
            if reason is None:
                self.stats.succeeded += 1
                if was_unreachable is not None:
                    log.info("%s (%s) answered a scrape: routable again (was: %s)",
                             name, address, was_unreachable)
                if failing_since is not None:
                    log.info("metrics of %s (%s) recovered after %.1f s",
                             name, address, loop.time() - failing_since)
                    failing_since = None
            else:
                self.stats.failed += 1
                state.scrape_error = reason
                if failing_since is None:  # log the change of state, not every poll
                    log.warning("metrics of %s (%s) unavailable: %s", name, address, reason)
                    failing_since = loop.time()
            deadline += self._interval_s
            now = loop.time()
            if deadline < now:  # the scrape overran: skip the missed ticks, don't burst
                deadline = now
            await asyncio.sleep(deadline - now)

    async def _scrape(self, url: str, state: EndpointState) -> str | None:
        """One scrape; returns ``None`` on success, else a short reason."""
        session = self._session
        if session is None:
            return "scraper stopped"
        try:
            async with session.get(url, timeout=self._timeout, ssl=self._ssl) as response:
                if response.status != 200:
                    raise _ScrapeFailure(f"HTTP {response.status} {response.reason or ''}".strip())
                page = await _read_page(response)
            metrics = parse_metrics(page, scraped_at=time.monotonic(), names=self._names)
        except TimeoutError:
            return f"timed out after {self._timeout_s:g} s"
        except aiohttp.ClientConnectorCertificateError as exc:
            # A listening pod whose certificate we refuse: not evidence it is down (Envoy
            # still reaches it), only that its metrics cannot be trusted.
            return f"TLS certificate refused: {exc.certificate_error}"
        except aiohttp.ClientConnectorError as exc:
            # errno gives "Connection refused"; asyncio's own text repeats the address.
            reason = f"cannot connect: {os.strerror(exc.errno) if exc.errno else exc}"
            # Nothing listens there (a killed pod refuses at once): out of the candidate
            # set now, not after staleness. A timeout is not such evidence: a busy server
            # stalls too, and staleness already discounts its metrics.
            state.report_unreachable(reason)
            return reason
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except MetricsParseError as exc:
            return f"bad metrics page: {exc}"
        except _ScrapeFailure as exc:
            return str(exc)
        # Anything else is a bug: it ends the poller, whose supervisor counts, logs (rate-
        # limited, not every 100 ms) and restarts it with backoff.
        state.update_metrics(metrics)  # also clears scrape_error and load.since_scrape
        return None


async def _read_page(response: aiohttp.ClientResponse) -> bytes:
    """The body, refusing (without buffering) anything larger than ``MAX_PAGE_BYTES``."""
    length = response.content_length
    if length is not None and response.headers.get("Content-Encoding", "identity") == "identity":
        if length > MAX_PAGE_BYTES:
            raise _ScrapeFailure(f"page of {length} bytes exceeds {MAX_PAGE_BYTES}")
        return await response.read()  # the usual case, a little cheaper than chunks
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_PAGE_BYTES:
            raise _ScrapeFailure(f"page exceeds {MAX_PAGE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
