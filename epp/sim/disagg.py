"""Prefill/decode disaggregation in the simulated pod: both ends of llm-d's P/D protocol.

Decode side, what llm-d's routing sidecar does in front of a decode vLLM: a request with
``x-prefiller-host-port: ip:port`` is first sent to that pod as a prefill request (the
same body with ``max_tokens: 1``, ``stream: false``, no ``stream_options`` and
``kv_transfer_params: {do_remote_decode: true, do_remote_prefill: false}``). The prefill
pod answers with ``kv_transfer_params`` naming the KV blocks it holds; the decode pod then
receives those blocks instead of prefilling them and decodes locally. Any failure
(connection refused, a non-200 status, a timeout, an answer without usable
``kv_transfer_params``) falls back to local prefill. Prefill-role pods ignore the header;
requests with several prompts are prefilled locally.

A request that already carries ``kv_transfer_params`` with ``do_remote_prefill: true`` (a
real sidecar's second call) is decoded from the remote blocks it names, the same way.

Prefill side: a request with ``kv_transfer_params.do_remote_decode`` is served as usual
and answered with ``kv_transfer_params`` for the decode pod, in the shape of vLLM's
NixlConnector (block ids here are the prompt's block indexes).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.formatting import JsonObject

PREFILLER_HEADER = "x-prefiller-host-port"
# Response headers for tests and humans: who prefilled, and the x-prefiller-host-port
# value this pod received (absent when it received none).
PREFILLED_BY_HEADER = "x-sim-prefilled-by"
PREFILLER_ECHO_HEADER = "x-sim-prefiller"
# Why a named prefill pod was not used (only on fallbacks).
PREFILL_FALLBACK_HEADER = "x-sim-prefill-fallback"
LOCAL = "local"

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class PDStats:
    """P/D counters of one pod (mutable on purpose: they change per request)."""

    remote_prefills: int = 0  # decode side: prompts a prefill pod computed
    prefill_fallbacks: int = 0  # decode side: the prefill pod failed, prefilled locally
    prefills_for_remote_decode: int = 0  # prefill side: answered with kv_transfer_params


@dataclass(frozen=True, slots=True)
class PrefillSource:
    """Where a request's prompt KV comes from: this pod or a prefill pod's blocks."""

    prefilled_by: str = LOCAL  # the prefill pod's ip:port, or "local"
    remote_blocks: int = 0  # full prompt blocks the prefill pod holds for the request
    fallback: str | None = None  # why a named prefill pod was not used


LOCAL_PREFILL = PrefillSource()


def wants_remote_decode(payload: JsonObject) -> bool:
    """Whether ``payload`` asks this pod to prefill for a remote decode pod."""
    params = payload.get("kv_transfer_params")
    return isinstance(params, dict) and params.get("do_remote_decode") is True


def prefill_request_body(payload: JsonObject) -> JsonObject:
    """The body the sidecar sends the prefill pod: the request, cut to one token."""
    body = {key: value for key, value in payload.items() if key != "stream_options"}
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    return body


def kv_transfer_params(config: SimConfig, kv_blocks: int, request_id: str) -> JsonObject:
    """What a prefill pod answers: where the decode pod finds the prompt's KV blocks."""
    advertise = config.advertise or f"{config.host}:{config.port}"
    host, _, port = advertise.rpartition(":")
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": list(range(kv_blocks)),
        "remote_engine_id": advertise,
        "remote_request_id": request_id,
        "remote_host": host.strip("[]"),
        "remote_port": int(port),
        "tp_size": 1,
    }


def remote_source(params: object) -> PrefillSource | None:
    """The prefill pod and blocks named by ``kv_transfer_params`` (None: unusable)."""
    if not isinstance(params, dict) or params.get("do_remote_prefill") is not True:
        return None
    blocks = params.get("remote_block_ids")
    if not isinstance(blocks, list):
        return None
    host, port = params.get("remote_host"), params.get("remote_port")
    name = f"{host}:{port}" if isinstance(host, str) and isinstance(port, int) else "remote"
    return PrefillSource(prefilled_by=name, remote_blocks=len(blocks))


class RoutingSidecar:
    """The decode side: asks the named prefill pod to prefill, or says why not."""

    def __init__(self, config: SimConfig, stats: PDStats) -> None:
        self._config = config
        self.stats = stats
        self._session: aiohttp.ClientSession | None = None

    def context(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """An aiohttp cleanup context that owns the HTTP client while the app runs."""

        async def context(app: web.Application) -> AsyncIterator[None]:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.remote_prefill_timeout_s))
            try:
                yield
            finally:
                await self._session.close()
                self._session = None

        return context

    def handles(self, prefiller: str | None, prompts: int) -> bool:
        """Whether this pod sends the request to ``prefiller`` first."""
        return (prefiller is not None and self._config.role != "prefill" and prompts == 1
                and prefiller != self._config.advertise)

    async def prefill(self, prefiller: str, path: str, payload: JsonObject,
                      request_id: str | None) -> PrefillSource:
        """Have ``prefiller`` prefill the request; a local source on any failure."""
        source = await self._ask(prefiller, path, payload, request_id)
        if source.fallback is None:
            self.stats.remote_prefills += 1
        else:
            self.stats.prefill_fallbacks += 1
            _log.warning("epp-sim: prefill on %s failed (%s); prefilling locally",
                         prefiller, source.fallback)
        return source

    async def _ask(self, prefiller: str, path: str, payload: JsonObject,
                   request_id: str | None) -> PrefillSource:
        if self._session is None:
            raise RuntimeError("the sidecar's HTTP client is not running")
        headers = {"Content-Type": "application/json"}
        if request_id:
            headers["x-request-id"] = request_id
        body = msgspec.json.encode(prefill_request_body(payload))
        try:
            async with self._session.post(f"http://{prefiller}{path}", data=body,
                                          headers=headers) as response:
                if response.status != 200:
                    return _fallback(f"status {response.status}")
                answer: Any = msgspec.json.decode(await response.read())
        except TimeoutError:
            return _fallback("timeout")
        except aiohttp.ClientError as exc:  # connection refused, reset, bad URL...
            return _fallback(type(exc).__name__)
        except msgspec.DecodeError:
            return _fallback("invalid JSON")
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        source = remote_source(params)
        if source is None:
            return _fallback("no kv_transfer_params")
        return PrefillSource(prefilled_by=prefiller, remote_blocks=source.remote_blocks)


def _fallback(reason: str) -> PrefillSource:
    return PrefillSource(fallback=reason)
