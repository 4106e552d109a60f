"""HTTP layer of the simulated vLLM pod (aiohttp): parse, call the engine, format.

Every response carries ``x-sim-endpoint`` (the advertised ``ip:port``) so callers
behind a proxy can tell which pod answered; generation endpoints also echo the size
and SHA-256 of the body they received, so tests can prove it arrived intact, and say who
prefilled the prompt (``x-sim-prefilled-by``; P/D disaggregation is in ``disagg``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import socket
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack, aclosing
from typing import Any, TypeVar

from aiohttp import web

from epp.sim.cache_routes import cache_routes, kv_events_context
from epp.sim.config import SimConfig
from epp.sim.disagg import (
    LOCAL_PREFILL,
    PREFILL_FALLBACK_HEADER,
    PREFILLED_BY_HEADER,
    PREFILLER_ECHO_HEADER,
    PREFILLER_HEADER,
    PDStats,
    PrefillSource,
    RoutingSidecar,
    kv_transfer_params,
    remote_source,
    wants_remote_decode,
)
from epp.sim.engine import Completion, Engine
from epp.sim.formatting import (
    ChatFormat,
    CompletionFormat,
    ResponseFormat,
    ResponseMeta,
    encode,
    error_body,
    models_list,
)
from epp.sim.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from epp.sim.metrics import MetricsPage
from epp.sim.parsing import (
    ApiError,
    ParsedRequest,
    Parser,
    decode_json_object,
    fit_context,
    parse_chat,
    parse_completions,
)
from epp.sim.prompts import Tokenizer, load_tokenizer, tokenize_request

CONFIG_KEY = web.AppKey("epp_sim_config", SimConfig)
ENGINE_KEY = web.AppKey("epp_sim_engine", Engine)
METRICS_KEY = web.AppKey("epp_sim_metrics", MetricsPage)
TOKENIZER_KEY: web.AppKey[Tokenizer | None] = web.AppKey("epp_sim_tokenizer")
SIDECAR_KEY = web.AppKey("epp_sim_sidecar", RoutingSidecar)

ENDPOINT_HEADER = "x-sim-endpoint"
REQUEST_BYTES_HEADER = "x-sim-request-bytes"
REQUEST_SHA256_HEADER = "x-sim-request-sha256"
# When the request reached the pod's handler: CLOCK_MONOTONIC seconds, the same clock for
# every process on the host, so a client there can tell how long the path through a
# router took (its send time to this).
RECEIVED_AT_HEADER = "x-sim-received-at"
# Echo of the x-gateway-destination-endpoint header the gateway forwarded (the EPP's
# pick), so tests can check the pod that served is the pod that was picked.
DESTINATION_ECHO_HEADER = "x-sim-destination"
DESTINATION_HEADER = "x-gateway-destination-endpoint"

# Grace for in-flight requests on stop; aiohttp waits up to twice this before cutting them.
SHUTDOWN_GRACE_S = 1.0

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class _Done:
    """Sentinel type: a stream in ``_interleave()`` is exhausted."""


_DONE = _Done()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(
    config: SimConfig, engine: Engine | None = None, *, tokenizer: Tokenizer | None = None
) -> web.Application:
    """Build the aiohttp application of one simulated pod.

    ``engine`` defaults to ``Engine.from_config(config)``; pass one to observe its stats.
    ``tokenizer`` defaults to ``load_tokenizer(config)``, which blocks for a real tokenizer:
    ``run()`` loads it in a thread first.
    """
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_errors])
    app[CONFIG_KEY] = config
    app[ENGINE_KEY] = engine if engine is not None else Engine.from_config(config)
    pd_stats = PDStats()
    app[METRICS_KEY] = MetricsPage(config, app[ENGINE_KEY], pd_stats=pd_stats)
    app[TOKENIZER_KEY] = tokenizer if tokenizer is not None else load_tokenizer(config)
    app[SIDECAR_KEY] = RoutingSidecar(config, pd_stats)
    app.cleanup_ctx.append(kv_events_context(config, app[ENGINE_KEY]))
    app.cleanup_ctx.append(app[SIDECAR_KEY].context())
    app.on_response_prepare.append(_stamp_endpoint)
    router = app.router
    router.add_post("/v1/completions", _generation_handler(parse_completions, CompletionFormat()))
    router.add_post("/v1/chat/completions", _generation_handler(parse_chat, ChatFormat()))
    router.add_get("/v1/models", _models)
    router.add_get("/health", _health)
    router.add_get("/metrics", _metrics)
    router.add_routes(cache_routes(config, app[ENGINE_KEY], app[TOKENIZER_KEY]))
    return app


async def run(
    config: SimConfig,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Serve ``config`` until ``stop`` is set (or the task is cancelled), then clean up.

    ``on_listening(host, port)`` is called once the socket is bound; with ``port=0``
    it reports the port the OS picked (and the default advertise address uses it).
    """
    sock = _bind(config.host, config.port)
    port = sock.getsockname()[1]
    if config.port == 0 and config.advertise == f"{config.host}:0":
        # The default advertise address is useless with an ephemeral port.
        config = dataclasses.replace(config, port=port, advertise=None)
    tokenizer = await asyncio.to_thread(load_tokenizer, config)  # seconds for a real one
    app = build_app(config, tokenizer=tokenizer)
    # access_log=None: per-request logging would dominate load-test profiles.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        if on_listening is not None:
            on_listening(config.host, port)
        await (stop if stop is not None else asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front so an ephemeral port is known before serving."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _stamp_endpoint(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[ENDPOINT_HEADER] = request.app[CONFIG_KEY].advertise or ""
    destination = request.headers.get(DESTINATION_HEADER)
    if destination is not None:
        response.headers[DESTINATION_ECHO_HEADER] = destination
    prefiller = request.headers.get(PREFILLER_HEADER)
    if prefiller is not None:
        response.headers[PREFILLER_ECHO_HEADER] = prefiller


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into vLLM's JSON error shape instead of aiohttp's text pages."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text or exc.reason  # e.g. the size limit on 413
        return _json(error_body(exc.status, message), status=exc.status, headers=exc.headers)
    except Exception:
        _log.exception("epp-sim handler failed for %s %s", request.method, request.path)
        return _json(error_body(500, "Internal server error"), status=500)


def _json(
    body: Mapping[str, object], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    response = web.Response(body=encode(body), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        # Keep e.g. Allow on 405, but not the exception's plain-text Content-Type/Length.
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def _generation_handler(parse: Parser, fmt: ResponseFormat) -> Handler:
    """A POST handler: read the body, parse it, run the engine, answer in ``fmt``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        received_at = time.monotonic()
        body = await request.read()  # also de-chunks Transfer-Encoding: chunked bodies
        echo = {
            REQUEST_BYTES_HEADER: str(len(body)),
            REQUEST_SHA256_HEADER: hashlib.sha256(body).hexdigest(),
            RECEIVED_AT_HEADER: f"{received_at:.6f}",
        }
        config = request.app[CONFIG_KEY]
        engine = request.app[ENGINE_KEY]
        try:
            payload = decode_json_object(body)
            parsed = parse(payload, config.model_names, config.default_max_tokens)
            parsed = await tokenize_request(request.app[TOKENIZER_KEY], parsed)
            parsed = fit_context(parsed, engine.count_prompt_tokens, config.max_model_len)
        except ApiError as exc:
            response = _json(exc.body(), status=exc.status)
            response.headers.update(echo)
            return response
        remote_decode = wants_remote_decode(payload)
        if remote_decode and config.remote_prefill_error_status:  # the fault asked for
            status = config.remote_prefill_error_status
            response = _json(error_body(status, "Injected prefill failure"), status=status)
            response.headers.update(echo)
            return response
        head = ResponseMeta(
            id=fmt.id_prefix + (request.headers.get("x-request-id") or uuid.uuid4().hex),
            created=int(time.time()),
            model=parsed.model,
        )
        lora = parsed.model if parsed.model in config.lora_names else None
        completions = [engine.plan(generation, lora=lora) for generation in parsed.generations]
        source = await _prefill_source(request, payload, len(completions))
        if source.remote_blocks:
            first = completions[0]
            first.remote_tokens = engine.remote_prefill_tokens(first.prompt_tokens,
                                                               source.remote_blocks)
        echo[PREFILLED_BY_HEADER] = source.prefilled_by
        if source.fallback is not None:
            echo[PREFILL_FALLBACK_HEADER] = source.fallback
        if parsed.stream:
            return await _stream(request, engine, parsed, fmt, head, completions, echo)
        await asyncio.gather(*(engine.execute(c) for c in completions))
        answer = fmt.response(head, completions)
        if remote_decode:  # tell the decode pod where the prompt's KV blocks are
            answer["kv_transfer_params"] = kv_transfer_params(
                config, completions[0].kv_blocks, head.id)
            request.app[SIDECAR_KEY].stats.prefills_for_remote_decode += 1
        response = _json(answer)
        response.headers.update(echo)
        return response

    return handle


async def _prefill_source(
    request: web.Request, payload: Mapping[str, Any], prompts: int
) -> PrefillSource:
    """Who computes the prompt's KV: a prefill pod (named by the gateway, or by a sidecar
    that already ran the prefill) or this pod."""
    params = payload.get("kv_transfer_params")
    if prompts == 1 and (source := remote_source(params)) is not None:
        return source
    sidecar = request.app[SIDECAR_KEY]
    prefiller = request.headers.get(PREFILLER_HEADER)
    if prefiller is None or not sidecar.handles(prefiller, prompts):
        return LOCAL_PREFILL
    return await sidecar.prefill(prefiller, request.path, dict(payload),
                                 request.headers.get("x-request-id"))


async def _stream(
    request: web.Request,
    engine: Engine,
    parsed: ParsedRequest,
    fmt: ResponseFormat,
    head: ResponseMeta,
    completions: Sequence[Completion],
    echo: dict[str, str],
) -> web.StreamResponse:
    """Answer as Server-Sent Events: one chunk per token, optional usage, then [DONE]."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **echo,
        }
    )
    await response.prepare(request)
    emitted = [0] * len(completions)
    try:
        async with AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(aclosing(engine.generate(c))) for c in completions
            ]
            tokens = await stack.enter_async_context(aclosing(_interleave(streams)))
            async for index, token in tokens:
                emitted[index] += 1
                completion = completions[index]
                last = emitted[index] == completion.completion_tokens
                finish_reason = completion.finish_reason if last else None
                first = emitted[index] == 1
                for chunk in fmt.token_chunks(head, index, token, first, finish_reason):
                    await response.write(_sse(chunk))
        if parsed.include_usage:
            await response.write(_sse(fmt.usage_chunk(head, completions)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; closing the streams above released the engine
    return response


def _sse(chunk: Mapping[str, Any]) -> bytes:
    return b"data: " + encode(chunk) + b"\n\n"


async def _interleave(
    streams: Sequence[AsyncIterator[_T]],
) -> AsyncGenerator[tuple[int, _T], None]:
    """Advance all streams concurrently, yielding ``(stream index, item)`` step by step."""
    if len(streams) == 1:  # the common case needs no task per token
        async for item in streams[0]:
            yield 0, item
        return
    active = dict(enumerate(streams))
    while active:
        indexes = list(active)
        steps = await asyncio.gather(*(_next(active[i]) for i in indexes))
        for index, step in zip(indexes, steps, strict=True):
            if isinstance(step, _Done):
                del active[index]
            else:
                yield index, step


async def _next(stream: AsyncIterator[_T]) -> _T | _Done:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _DONE


async def _models(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    return _json(models_list(config.served_model_names, int(time.time()), config.lora_names))


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)  # vLLM answers /health with an empty 200
