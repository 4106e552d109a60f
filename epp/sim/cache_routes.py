"""HTTP surface of the simulated pod's prefix cache, in vLLM's shapes.

- ``POST /v1/completions/render`` and ``POST /v1/chat/completions/render``: the prompt
  token ids the engine would run, as vLLM's ``GenerateRequest`` (a list of them for
  completions, one per prompt; one object for chat).
- ``POST /reset_prefix_cache``: drop the cache (``AllBlocksCleared``); an empty 200.
- ``POST /debug/prefix_lookup``: how much of a prompt (``token_ids``, or a completions or
  chat body) this pod holds now, and its load; changes nothing. Not vLLM's: benchmarks
  use it to route like an oracle that sees every pod's true cache.
- The KV events publisher's lifetime, tied to the application's.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.engine import Engine
from epp.sim.formatting import JsonObject
from epp.sim.kv_events import KVEventPublisher
from epp.sim.parsing import (
    ApiError,
    Parser,
    decode_json_object,
    parse_chat,
    parse_completions,
)
from epp.sim.prompts import RenderedPrompt, Tokenizer, render_prompts


def cache_routes(
    config: SimConfig, engine: Engine, tokenizer: Tokenizer | None
) -> list[web.RouteDef]:
    """The render and reset routes of one pod."""

    def render_handler(parse: Parser, id_prefix: str, api: str, many: bool) -> Any:
        async def handle(request: web.Request) -> web.Response:
            if tokenizer is None:  # vLLM answers 501 when the model has no renderer
                raise ApiError(501, f"The model does not support {api} Render API")
            payload = decode_json_object(await request.read())
            parsed = parse(payload, config.model_names, config.default_max_tokens)
            prompts = await render_prompts(tokenizer, parsed)
            stream_options = {"include_usage": parsed.include_usage} if parsed.stream else None
            bodies = [
                _generate_request(id_prefix, prompt, generation.max_tokens, parsed.model,
                                  parsed.stream, stream_options)
                for prompt, generation in zip(prompts, parsed.generations, strict=True)
            ]
            body = msgspec.json.encode(bodies if many else bodies[0])
            return web.Response(body=body, content_type="application/json")

        return handle

    async def reset(request: web.Request) -> web.Response:
        engine.reset_prefix_cache()
        return web.Response(status=200)  # vLLM answers with an empty 200 too

    async def prefix_lookup(request: web.Request) -> web.Response:
        payload = decode_json_object(await request.read())
        model = payload.get("model", config.default_model)
        lora = model if model in config.lora_names else None
        token_ids = payload.get("token_ids")
        if token_ids is None:
            if tokenizer is None:
                raise ApiError(501, "prefix lookup of text needs a tokenizer; send token_ids")
            parse = parse_chat if "messages" in payload else parse_completions
            parsed = parse(payload, config.model_names, config.default_max_tokens)
            token_ids = list((await render_prompts(tokenizer, parsed))[0].token_ids)
        elif not isinstance(token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ApiError(400, "token_ids must be a list of integers", param="token_ids")
        cache = engine.prefix_cache
        stats = engine.stats
        body = {
            "prompt_tokens": len(token_ids),
            "cached_tokens": cache.lookup(token_ids, lora) if cache is not None else 0,
            "running": stats.running - stats.queued_for_prefill,
            "waiting": stats.waiting + stats.queued_for_prefill,
            "kv_cache_usage": engine.kv_cache_usage,
        }
        return web.Response(body=msgspec.json.encode(body), content_type="application/json")

    return [
        web.post("/v1/completions/render",
                 render_handler(parse_completions, "cmpl-", "Completions", True)),
        web.post("/v1/chat/completions/render",
                 render_handler(parse_chat, "chatcmpl-", "Chat Completions", False)),
        web.post("/reset_prefix_cache", reset),
        web.post("/debug/prefix_lookup", prefix_lookup),
    ]


def _generate_request(
    id_prefix: str,
    prompt: RenderedPrompt,
    max_tokens: int,
    model: str,
    stream: bool,
    stream_options: JsonObject | None,
) -> JsonObject:
    """vLLM's ``GenerateRequest`` for one prompt (sampling parameters: only max_tokens)."""
    return {
        "request_id": id_prefix + uuid.uuid4().hex,
        "token_ids": list(prompt.token_ids),
        "features": None,
        "sampling_params": {"max_tokens": max_tokens},
        "model": model,
        "stream": stream,
        "stream_options": stream_options,
        "cache_salt": None,
        "priority": 0,
        "kv_transfer_params": None,
    }


def kv_events_context(
    config: SimConfig, engine: Engine
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context running the KV events publisher while the app runs."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        cache = engine.prefix_cache
        if not config.kv_events.enabled or cache is None:
            yield
            return
        topic = f"kv@{config.advertise}@{config.default_model}"
        # vLLM publishes once per engine step: a faster-running fleet flushes sooner too.
        events = dataclasses.replace(
            config.kv_events, flush_ms=config.kv_events.flush_ms / config.time_scale)
        publisher = KVEventPublisher(events, host=config.host, topic=topic)
        await publisher.start()
        cache.subscribe(publisher.publish)
        try:
            yield
        finally:
            cache.unsubscribe(publisher.publish)
            await publisher.close()

    return context
