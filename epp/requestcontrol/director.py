"""The director: parse -> candidates -> schedule -> hooks, for one request at a time.

The ext_proc layer calls :meth:`Director.route` with raw headers and body; the director
returns a :class:`RequestHandle` that carries the destination and follows the response
(usage, duration) until the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from epp.api.openai import LLMRequest, parse_request, with_model
from epp.api.usage import Usage, UsageParser
from epp.datastore import Endpoint, parse_address
from epp.datastore.model_rewrites import ModelRewrites
from epp.errors import NoEndpointsError, RequestError, UnschedulableError
from epp.kvcache.feedback import SERVED_ENDPOINT_KEY
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.supervise import LogLimiter
from epp.observability.logsetup import bind_request_id
from epp.observability.tracing import NO_TRACING, Tracing
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission
from epp.scheduling.scheduler import NoCandidatesError
from epp.scheduling.types import HeaderChanges, SchedulingContext, SchedulingResult

log = logging.getLogger(__name__)

# Headers a client could send to steer the data plane. The EPP reads some of them
# (objective, fairness id, rewrite); none may reach a model server as the client wrote
# it: the routing sidecar posts the prompt to whatever ``x-prefiller-host-port`` names,
# and the destination/subset names are ours to set. Stripped from every request; a
# pre-request hook (P/D) may set ``x-prefiller-host-port`` afresh, and the destination
# header is always overwritten.
CONTROL_HEADERS = (
    "x-gateway-inference-objective",
    "x-gateway-inference-fairness-id",
    "x-gateway-model-name-rewrite",
    "x-llm-d-inference-objective",
    "x-llm-d-inference-fairness-id",
    "x-llm-d-model-name-rewrite",
    "x-prefiller-host-port",
    "x-gateway-destination-endpoint-subset",
    "x-gateway-destination-endpoint-served",
)
# The model a request is to be sent as (llm-d's name first, GIE's older one still read).
# An InferenceModelRewrite rule for the request's model takes precedence, as upstream.
MODEL_REWRITE_HEADERS = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")
# Cycle-state key of a rewrite applied to the request: {"from", "to", "by"}.
MODEL_REWRITE_KEY = "model-rewrite"
# The conformance suite's header that forces a pick; stripped unless that test mode is on.
TEST_SELECTION_HEADER = "test-epp-endpoint-selection"
# Budget of the whole prefix step (tokenize, hash, look up) per request. A render call to
# a healthy pod answers in ~2-10 ms and a slow one is hedged after 20 ms, so a hedged
# answer lands by ~30 ms; 100 ms leaves 3x that for a busy API server's event loop and
# caps what a wedged tokenizer source can add to every request at a quarter of the Go
# picker's 400 ms data-producer cap. Past it the request is routed on what is known
# (the approximate match, or none), and the cycle records why.
PREFIX_DEADLINE_S = 0.1
# Cycle-state key of the reason a request was routed without its precise prefix match.
PREFIX_DEGRADED_KEY = "prefix-degraded"


# Responses the exported prediction accuracy is computed over.
ACCURACY_WINDOW = 1000


class RollingShare:
    """The share of True among the last ``size`` outcomes, in O(1) per outcome."""

    __slots__ = ("_window", "_true")

    def __init__(self, size: int) -> None:
        self._window: deque[bool] = deque(maxlen=size)
        self._true = 0

    def record(self, ok: bool) -> None:
        window = self._window
        if len(window) == window.maxlen and window[0]:
            self._true -= 1
        window.append(ok)
        self._true += ok

    @property
    def ratio(self) -> float:
        return self._true / len(self._window) if self._window else 1.0


class EndpointSource(Protocol):
    """Where candidates come from (the datastore's pool)."""

    def snapshot(self) -> tuple[Endpoint, ...]: ...

    def routable(self, candidates: tuple[Endpoint, ...]) -> tuple[tuple[Endpoint, ...], bool]: ...


class Scheduler(Protocol):
    """The scheduling framework, as the director uses it."""

    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult: ...


class DataProducer(Protocol):
    """Computes per-request data once, before scheduling (e.g. the prefix match)."""

    name: str

    async def produce(self, request: LLMRequest | None,
                      candidates: Sequence[Endpoint]) -> PrefixMatch | None: ...


class PreRequest(Protocol):
    """Runs after scheduling, before the request leaves; may add request headers."""

    name: str

    def pre_request(self, ctx: SchedulingContext, result: SchedulingResult,
                    headers: HeaderChanges) -> None: ...


class FirstBytes(Protocol):
    """Runs once when a routed request's first response bytes arrive (prefill done)."""

    name: str

    def on_first_bytes(self, ctx: SchedulingContext) -> None: ...


class ResponseComplete(Protocol):
    """Runs once when the response has ended (or the stream was cut)."""

    name: str

    def response_complete(self, ctx: SchedulingContext, result: SchedulingResult,
                          status: int, usage: Usage | None) -> None: ...


def _same_address(ours: str, reported: str) -> bool:
    """Whether a reported ``ip:port`` names the endpoint at ``ours`` (IPv6 brackets and
    spelling may differ)."""
    if ours == reported:
        return True
    try:
        return parse_address(ours) == parse_address(reported)
    except ValueError:
        return False


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

    __slots__ = ("ctx", "result", "endpoints", "destination", "set_headers",
                 "remove_headers", "body", "endpoint_scores", "served", "status", "usage",
                 "prompt_tokens", "prefill_tokens", "ttft", "_director", "_start",
                 "_parser", "_done", "counted")

    def __init__(self, director: Director, ctx: SchedulingContext, result: SchedulingResult,
                 remove_headers: Sequence[str], tokens: int) -> None:
        self.ctx = ctx
        self.result = result
        self.endpoints = tuple(result.endpoints)
        self.destination = ",".join(e.address for e in self.endpoints)
        self.set_headers: dict[str, str] = {}
        self.remove_headers: tuple[str, ...] = tuple(remove_headers)
        # The body to forward instead of the client's (its model rewritten), or None.
        self.body: bytes | None = None
        if MODEL_REWRITE_KEY in ctx.cycle and ctx.request is not None:
            self.body = ctx.request.raw_body
        # {ip:port: total score} of the primary profile, published with --emit-endpoint-scores.
        self.endpoint_scores: dict[str, float] | None = None
        # Who holds this request's load: the primary pick until the proxy reports that
        # another endpoint served it; None once it is known to be outside the pool.
        self.served: Endpoint | None = self.endpoints[0] if self.endpoints else None
        self.status = 0
        self.usage: Usage | None = None
        self.prompt_tokens = tokens  # counted as in-flight load until the stream ends
        # Uncached prompt tokens counted as the served endpoint's outstanding prefill
        # until the first response bytes arrive (then 0).
        self.prefill_tokens = 0
        self.ttft: float | None = None  # seconds from routing to the first response bytes
        self._director = director
        self._start = time.perf_counter()
        self._parser: UsageParser | None = None
        self._done = False
        self.counted = False  # in the request counter yet (see Director.route)

    @property
    def request(self) -> LLMRequest | None:
        """The parsed request (None for requests without a body)."""
        return self.ctx.request

    @property
    def elapsed(self) -> float:
        """Seconds since routing."""
        return time.perf_counter() - self._start

    def on_served_endpoint(self, address: str) -> None:
        """The proxy reports the endpoint that served (a fallback, or its own choice)."""
        if not self._done:
            self._director.served_by(self, address)

    def on_response_headers(self, status: int, headers: Mapping[str, str]) -> None:
        """Upstream answered: remember the status, prepare to read usage."""
        self.status = status
        if self.ctx.request is not None:
            self._parser = UsageParser(headers.get("content-type", ""))

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        """One response body chunk (already on its way to the client)."""
        if self.ttft is None and (chunk or end_of_stream):
            self.ttft = self.elapsed
            self._director.first_bytes(self)
        parser = self._parser
        if parser is not None:
            parser.feed(chunk)
            if end_of_stream:
                self.usage = parser.finish()

    def on_done(self, completed: bool) -> None:
        """The stream ended; release load and run completion hooks, once."""
        if self._done:
            return
        self._done = True
        self._director.complete(self, completed)


class Director:
    """Turns a raw request into a routing decision: parse -> admit -> candidates ->
    schedule -> pre-request hooks; and closes it: in-flight load, metrics, hooks."""

    def __init__(self, pool: EndpointSource, scheduler: Scheduler, admission: Admission,
                 metrics: EppMetrics, *, producers: Sequence[DataProducer] = (),
                 pre_request: Sequence[PreRequest] = (),
                 response_complete: Sequence[ResponseComplete] = (),
                 first_bytes: Sequence[FirstBytes] = (),
                 allow_test_header: bool = False,
                 model_rewrites: ModelRewrites | None = None,
                 emit_endpoint_scores: bool = False) -> None:
        self._pool = pool
        self.model_rewrites = model_rewrites or ModelRewrites()
        self._emit_scores = emit_endpoint_scores
        self._strip = CONTROL_HEADERS if allow_test_header else (
            *CONTROL_HEADERS, TEST_SELECTION_HEADER)
        self.scheduler = scheduler
        self.admission = admission
        self._metrics = metrics
        self._producers = list(producers)
        self._pre_request = list(pre_request)
        self._response_complete = list(response_complete)
        self._first_bytes = list(first_bytes)
        self._e2e = metrics.scheduler_e2e
        self._log_limit = LogLimiter(log)
        self._accuracy = RollingShare(ACCURACY_WINDOW)
        # Spans of the request path; the runner sets a live tracer with --tracing.
        self.tracer: Tracing = NO_TRACING

    def candidates(self, subset: Sequence[str] | None, *, count: bool = True
                   ) -> tuple[Endpoint, ...]:
        """The pool, restricted to the proxy's subset hint and to reachable endpoints
        (all of them when none is: fail open); raises 503 when empty."""
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
        candidates, failed_open = self._pool.routable(candidates)
        if failed_open and count:
            self._metrics.unreachable_fail_open.inc()
        return candidates

    def prepare(self, headers: Mapping[str, str], body: bytes | None,
                subset: Sequence[str] | None, *, count: bool = True
                ) -> tuple[SchedulingContext, tuple[Endpoint, ...]]:
        """Parse and admit; returns the scheduling context and candidates (``count``:
        whether this is a real request, for the metrics)."""
        request = None
        rewrite: dict[str, str] | None = None
        if body is not None:
            request = parse_request(headers.get(":path", "/"), body)
            request, rewrite = self._rewrite_model(request, headers)
        candidates = self.candidates(subset, count=count)
        now = time.monotonic()
        priority = self.admission.priority(headers)
        self.admission.admit(priority, candidates, now)
        ctx = SchedulingContext(request, headers, now, priority)
        if rewrite is not None:
            ctx.cycle[MODEL_REWRITE_KEY] = rewrite
        return ctx, candidates

    def _rewrite_model(self, request: LLMRequest, headers: Mapping[str, str]
                       ) -> tuple[LLMRequest, dict[str, str] | None]:
        """The request as it is to be served: an InferenceModelRewrite rule for its model,
        else the rewrite header, names the model; the body is rewritten before anything
        tokenizes or matches it, so the prefix match is the served model's."""
        incoming = request.model
        target = self.model_rewrites.target(incoming)
        by = "InferenceModelRewrite"
        if target is None:
            target = next((v.strip() for v in map(headers.get, MODEL_REWRITE_HEADERS)
                           if v and v.strip()), None)
            by = "header"
        if target is None or target == incoming:
            return request, None
        return with_model(request, target), {"from": incoming, "to": target, "by": by}

    async def _produce(self, ctx: SchedulingContext, candidates: Sequence[Endpoint], *,
                       count: bool = True) -> None:
        """Run the data producers within ``PREFIX_DEADLINE_S`` in all. A producer that runs
        out of time, raises or has no result is skipped; if that costs the request its
        precise match, the reason goes into the cycle state (for ``explain``) and, when
        ``count``, into a metric and a log line with the request id."""
        if not self._producers:
            return
        deadline = asyncio.get_running_loop().time() + PREFIX_DEADLINE_S
        lost: str | None = None
        for producer in self._producers:
            if getattr(producer, "fallback_only", False):
                current = ctx.cycle.get(PREFIX_MATCH_KEY)
                if current is not None and current.precise:
                    continue
            # A producer that never suspends (the approximate one) finishes even after
            # the deadline: the timeout only cancels at an await.
            budget = asyncio.timeout_at(deadline)
            try:
                async with budget:
                    match = await producer.produce(ctx.request, candidates)
            except Exception as exc:
                if budget.expired():
                    lost = "deadline"
                else:
                    lost = "error"
                    self._log_limit.warning(
                        f"error:{producer.name}", "prefix producer %s failed: %s: %s",
                        producer.name, type(exc).__name__, exc, exc_info=True)
                continue
            if match is None:
                if ctx.request is not None and ctx.request.prompt is not None:
                    lost = lost or "unavailable"
                continue
            ctx.cycle[producer.name] = match
            if match.precise or PREFIX_MATCH_KEY not in ctx.cycle:
                ctx.cycle[PREFIX_MATCH_KEY] = match
        if lost is None:
            return
        match = ctx.cycle.get(PREFIX_MATCH_KEY)
        if match is not None and match.precise:
            return  # another producer supplied the precise match
        fallback = "none" if match is None else "approximate"
        ctx.cycle[PREFIX_DEGRADED_KEY] = {"reason": lost, "fallback": fallback}
        if count:
            self._metrics.prefix_degraded.labels(lost).inc()
            # Rate-limited per reason: a wedged tokenizer source degrades every request.
            self._log_limit.warning(
                lost, "request %s: routed without the precise prefix match (%s; using %s)",
                ctx.headers.get("x-request-id", "-"), lost,
                "the approximate match" if match is not None else "no prefix match")

    async def explain(self, headers: Mapping[str, str], body: bytes | None
                      ) -> dict[str, Any]:
        """Everything the director would decide for a request, without routing it: no
        in-flight accounting, no hooks, no metrics. Raises :class:`RequestError`."""
        ctx, candidates = self.prepare(headers, body, None, count=False)
        await self._produce(ctx, candidates, count=False)
        try:
            result = self.scheduler.schedule(ctx, candidates, explain=True)
            primary, error = result.primary, None
            profiles = result.profiles
        except NoCandidatesError as exc:
            primary, error, profiles = None, str(exc), {}
        match = ctx.cycle.get(PREFIX_MATCH_KEY)
        out: dict[str, Any] = {
            "model": ctx.model,
            "model_rewrite": ctx.cycle.get(MODEL_REWRITE_KEY),
            "priority": ctx.priority,
            "candidates": [{"name": e.name, "address": e.address, "role": e.role}
                           for e in candidates],
            # Left out of the candidates: reason each was judged unreachable.
            "unreachable": {e.name: e.state.unreachable for e in self._pool.snapshot()
                            if e.state.unreachable is not None},
            "prefix_degraded": ctx.cycle.get(PREFIX_DEGRADED_KEY),
            "prefix_match": None if match is None else {
                "precise": match.precise, "prompt_tokens": match.prompt_tokens,
                "block_size": match.block_size, "prompt_blocks": match.total_blocks,
                "endpoints": {e.name: {"blocks": match.of(e.name).blocks,
                                       "gpu_blocks": match.of(e.name).gpu_blocks,
                                       "cached_tokens": match.cached_tokens(e.name)}
                              for e in candidates}},
            "profiles": {name: {"candidates": r.candidates, "error": r.error,
                                "total_scores": r.scores, "plugin_scores": r.plugin_scores,
                                "picked": [e.address for e in r.endpoints]}
                         for name, r in profiles.items()},
            "primary_profile": primary,
            "destination": (",".join(e.address for e in profiles[primary].endpoints)
                            if primary else None),
            "error": error,
        }
        return out

    async def route(
        self, headers: Mapping[str, str], body: bytes | None, subset: Sequence[str] | None
    ) -> RequestHandle:
        """Parse, admit, schedule. Raises :class:`RequestError` to refuse."""
        # Every line logged while this request is routed carries its id (see logsetup);
        # Envoy sets x-request-id on every request, so a generated one stays in our logs.
        bind_request_id(headers)
        with self.tracer.request_span(headers):
            handle = await self._route(headers, body, subset)
            self.tracer.annotate("epp.destination", handle.destination)
            return handle

    async def _route(self, headers: Mapping[str, str], body: bytes | None,
                     subset: Sequence[str] | None) -> RequestHandle:
        with self.tracer.span("epp.parse"):
            ctx, candidates = self.prepare(headers, body, subset)
        with self.tracer.span("epp.prefix_match"):  # tokenize, block keys, index lookup
            await self._produce(ctx, candidates)
        t0 = time.perf_counter()
        try:
            with self.tracer.span("epp.schedule"):
                result = self.scheduler.schedule(ctx, candidates)
        except NoCandidatesError as exc:
            raise UnschedulableError(f"no endpoint can serve this request: {exc}") from None
        self._e2e.observe(time.perf_counter() - t0)
        if not result.endpoints:
            raise UnschedulableError("no endpoint can serve this request")
        remove = tuple(h for h in self._strip if h in headers)
        match = ctx.cycle.get(PREFIX_MATCH_KEY)
        if match is not None:
            tokens = match.prompt_tokens
        else:
            tokens = ctx.request.estimated_tokens() if ctx.request is not None else 0
        handle = RequestHandle(self, ctx, result, remove, tokens)
        if self._pre_request:
            changes = HeaderChanges()
            for hook in self._pre_request:
                hook.pre_request(ctx, result, changes)
            handle.set_headers.update(changes.set)
            # What a hook sets replaces the client's value; removing it too would drop it.
            handle.remove_headers = tuple(
                h for h in (*handle.remove_headers, *changes.remove) if h not in changes.set)
        if self._emit_scores:
            scored = result.profiles[result.primary]
            handle.endpoint_scores = {e.address: total
                                      for e, total in zip(scored.scored, scored.totals)}
        primary = result.endpoints[0]
        if match is not None:
            handle.prefill_tokens = match.uncached_tokens(primary.name)
        else:
            handle.prefill_tokens = tokens
        primary.state.load.add(tokens, handle.prefill_tokens)
        if match is not None and match.prompt_tokens:
            self._metrics.prefix_hit_ratio.labels("precise" if match.precise else "approximate"
                                                  ).observe(match.cached_tokens(primary.name)
                                                            / match.prompt_tokens)
        if self._metrics.serves(ctx.model):
            self._metrics.model(ctx.model).requests.inc()
            handle.counted = True  # else counted at completion, once its label is known
        self._metrics.pick(primary.name)
        return handle

    def served_by(self, handle: RequestHandle, address: str) -> None:
        """Move a request's load from the endpoint holding it to ``address``, the one the
        proxy reports served it, and count where that was."""
        current = handle.served
        if current is not None and _same_address(current.address, address):
            return
        served = next((e for e in handle.endpoints if _same_address(e.address, address)), None)
        where = "fallback"
        if served is None:
            served = next((e for e in self._pool.snapshot()
                           if _same_address(e.address, address)), None)
            where = "other" if served is not None else "unknown"
        if served is current:  # reported again (e.g. an unknown address twice)
            return
        if current is not None:
            current.state.load.withdraw(handle.prompt_tokens, handle.prefill_tokens)
        if served is not None:
            served.state.load.add(handle.prompt_tokens, handle.prefill_tokens)
        handle.served = served
        self._metrics.served_elsewhere.labels(where).inc()

    def first_bytes(self, handle: RequestHandle) -> None:
        """The response's first bytes arrived: the served endpoint has prefilled it."""
        served = handle.served
        if served is not None and handle.prefill_tokens:
            served.state.load.prefilled(handle.prefill_tokens)
        handle.prefill_tokens = 0
        for hook in self._first_bytes:
            try:
                hook.on_first_bytes(handle.ctx)
            except Exception:  # a hook must not break the response path
                self._log_limit.warning(f"first-bytes:{hook.name}",
                                        "first-bytes hook %s failed", hook.name,
                                        exc_info=True)

    def complete(self, handle: RequestHandle, completed: bool) -> None:
        """Called once per routed request when its stream ends."""
        served = handle.served
        if served is not None:
            served.state.load.release(handle.prompt_tokens, handle.prefill_tokens)
            handle.prefill_tokens = 0
            served.report_response(handle.status)  # 503: gateway could not reach it
            self._learn_prefill_rate(handle, served, completed)
        model = handle.ctx.model
        status = handle.status
        if not completed or status >= 400 or status == 0:
            # A stream cut mid-response is an abort, whatever status had arrived.
            code = str(status) if completed and status else "stream_aborted"
            label = self._metrics.model_label(model)
            self._metrics.request_errors.labels(label, label, code).inc()
        else:
            self._metrics.confirm_model(model)  # a pod served it: it earns its own series
            series = self._metrics.model(model)
            series.duration.observe(handle.elapsed)
            if handle.usage is not None:
                series.input_tokens.observe(handle.usage.prompt_tokens)
                series.output_tokens.observe(handle.usage.completion_tokens)
                self._check_prediction(handle)
        if not handle.counted:
            self._metrics.model(model).requests.inc()
        handle.ctx.cycle[SERVED_ENDPOINT_KEY] = served.name if served is not None else None
        for hook in self._response_complete:
            try:
                hook.response_complete(handle.ctx, handle.result, status, handle.usage)
            except Exception:  # a hook must not break the stream's teardown
                log.exception("response-complete hook %s failed", hook.name)

    @staticmethod
    def _learn_prefill_rate(handle: RequestHandle, served: Endpoint, completed: bool) -> None:
        """A streamed response's first bytes follow the prefill: with the usage's counts,
        one sample of the endpoint's prefill rate. (A whole non-streamed body arrives
        after the decode too, so it says nothing about prefill.)"""
        usage, request = handle.usage, handle.ctx.request
        if (not completed or handle.status != 200 or usage is None or handle.ttft is None
                or request is None or not request.stream):
            return
        served.state.prefill.observe(usage.prompt_tokens - (usage.cached_tokens or 0),
                                     handle.ttft)

    def _check_prediction(self, handle: RequestHandle) -> None:
        """Compare the cached tokens we predicted with what the engine reported."""
        match = handle.ctx.cycle.get(PREFIX_MATCH_KEY)
        usage = handle.usage
        served = handle.served
        if (match is None or not match.precise or usage is None or usage.cached_tokens is None
                or served is None):
            return
        if any(r.endpoints for name, r in handle.result.profiles.items()
               if name != handle.result.primary):
            return  # disaggregated: the decode pod also counts the KV it received
        engine = usage.cached_tokens
        self._metrics.index_accuracy.observe(match.prediction_error(served.name, engine))
        outcome = match.prediction_outcome(served.name, engine)
        self._metrics.index_predictions.labels(outcome).inc()
        if outcome in ("over", "under"):
            self._metrics.index_mispredictions.labels(outcome).inc()
        self._accuracy.record(outcome not in ("over", "under"))
        self._metrics.index_prediction_accuracy.set(self._accuracy.ratio)

    def on_rejected(self, headers: Mapping[str, str], error: RequestError) -> None:
        """A request was refused before routing; count it."""
        self._metrics.request_errors.labels("", "", str(error.status)).inc()
