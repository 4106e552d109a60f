"""The director: parse -> candidates -> schedule -> hooks, for one request at a time.

The ext_proc layer calls :meth:`Director.route` with raw headers and body; the director
returns a :class:`RequestHandle` that carries the destination and follows the response
(usage, duration) until the stream ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from epp.api.openai import LLMRequest, parse_request
from epp.api.usage import Usage, UsageParser
from epp.datastore import Endpoint, parse_address
from epp.errors import NoEndpointsError, RequestError, UnschedulableError
from epp.observability.metrics import EppMetrics

log = logging.getLogger(__name__)

# Gateway control headers: they steer the EPP and must not reach model servers.
CONTROL_HEADERS = (
    "x-gateway-inference-objective",
    "x-gateway-inference-fairness-id",
    "x-gateway-model-name-rewrite",
)


class EndpointSource(Protocol):
    """Where candidates come from (the datastore's pool)."""

    def snapshot(self) -> tuple[Endpoint, ...]: ...


class Scheduler(Protocol):
    """Picks endpoints for a request: primary first, then fallbacks."""

    def schedule(
        self, request: LLMRequest | None, candidates: Sequence[Endpoint]
    ) -> Sequence[Endpoint]: ...


def _subset_ips(subset: Sequence[str]) -> set[str]:
    """IPs named by the subset hint; entries are ``ip:port`` but the match is on IP."""
    ips = set()
    for item in subset:
        try:
            ips.add(parse_address(item)[0])
        except ValueError:
            ips.add(item.strip().strip("[]"))  # a bare IP
    return ips


class RequestHandle:
    """A routed request: its destination and what happens to its response."""

    __slots__ = ("request", "endpoints", "destination", "set_headers", "remove_headers",
                 "status", "usage", "_metrics", "_model", "_start", "_parser", "_done")

    def __init__(self, request: LLMRequest | None, endpoints: Sequence[Endpoint],
                 remove_headers: Sequence[str], metrics: EppMetrics) -> None:
        self.request = request
        self.endpoints = tuple(endpoints)
        self.destination = ",".join(e.address for e in self.endpoints)
        self.set_headers: dict[str, str] = {}
        self.remove_headers = tuple(remove_headers)
        self.status = 0
        self.usage: Usage | None = None
        self._metrics = metrics
        self._model = request.model if request is not None else ""
        self._start = time.perf_counter()
        self._parser: UsageParser | None = None
        self._done = False

    def on_response_headers(self, status: int, headers: Mapping[str, str]) -> None:
        """Upstream answered: remember the status, prepare to read usage."""
        self.status = status
        if self.request is not None:
            self._parser = UsageParser(headers.get("content-type", ""))

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        """One response body chunk (already on its way to the client)."""
        parser = self._parser
        if parser is not None:
            parser.feed(chunk)
            if end_of_stream:
                self.usage = parser.finish()

    def on_done(self, completed: bool) -> None:
        """The stream ended; record metrics once."""
        if self._done:
            return
        self._done = True
        labels = (self._model, self._model)
        m = self._metrics
        if not completed or self.status >= 400 or self.status == 0:
            code = str(self.status) if self.status else "stream_aborted"
            m.request_errors.labels(*labels, code).inc()
            return
        m.request_duration.labels(*labels).observe(time.perf_counter() - self._start)
        if self.usage is not None:
            m.input_tokens.labels(*labels).observe(self.usage.prompt_tokens)
            m.output_tokens.labels(*labels).observe(self.usage.completion_tokens)


class Director:
    """Turns a raw request into a routing decision."""

    def __init__(self, pool: EndpointSource, scheduler: Scheduler, metrics: EppMetrics) -> None:
        self._pool = pool
        self._scheduler = scheduler
        self._metrics = metrics

    async def route(
        self, headers: Mapping[str, str], body: bytes | None, subset: Sequence[str] | None
    ) -> RequestHandle:
        """Parse, find candidates, schedule. Raises :class:`RequestError` to refuse."""
        request = None
        if body is not None:
            request = parse_request(headers.get(":path", "/"), body, dict(headers))
        candidates = self._pool.snapshot()
        if not candidates:
            raise NoEndpointsError("no model server endpoints are available")
        if subset is not None:
            ips = _subset_ips(subset)
            candidates = tuple(e for e in candidates if e.ip in ips)
            if not candidates:
                raise NoEndpointsError(
                    f"none of the {len(subset)} endpoint(s) in the proxy's subset hint "
                    "is in the pool"
                )
        picks = self._scheduler.schedule(request, candidates)
        if not picks:
            raise UnschedulableError("no endpoint can serve this request")
        remove = tuple(h for h in CONTROL_HEADERS if h in headers)
        handle = RequestHandle(request, picks, remove, self._metrics)
        model = request.model if request is not None else ""
        self._metrics.requests.labels(model, model).inc()
        self._metrics.picks.labels(picks[0].name).inc()
        return handle

    def on_rejected(self, headers: Mapping[str, str], error: RequestError) -> None:
        """A request was refused before routing; count it."""
        self._metrics.request_errors.labels("", "", str(error.status)).inc()
