"""Hostile request bodies through the ext_proc stream, the default profile and both
prefix scorers: an immediate 400 in the OpenAI error shape, never a 500."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.config.picker_config import load_picker_config
from epp.datastore import Endpoint, EndpointPool, ServerMetrics
from epp.devtools import fake_envoy as fe
from epp.extproc.stream import ProtocolStream
from epp.kvcache.index import BlockIndex
from epp.kvcache.producer import PreciseProducer
from epp.kvcache.tokens import LocalPromptTokenizer
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director


class CharTokenizer:
    """One id per character: enough for the precise producer to key blocks."""

    special_token_pattern = re.compile("<[|]im_start[|]>")

    def encode(self, text: str) -> list[int]:
        return [1000 + ord(c) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Any = None,
                    add_generation_prompt: bool = True) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m.get('content')}" for m in messages)


DEEP = b"[" * 100_000 + b"]" * 100_000
BODIES = {
    "deep-array": DEEP,
    "deep-field": b'{"model":"m","prompt":"p","x":' + DEEP + b"}",
    "token-2**32": json.dumps({"model": "m", "prompt": [1, 2**32]}).encode(),
    "token-negative": json.dumps({"model": "m", "prompt": [[1], [-1]]}).encode(),
    "token-bool": json.dumps({"model": "m", "prompt": [1, True]}).encode(),
    "invalid-utf8": b'{"model":"m","prompt":"\xc3\x28"}',
    "not-an-object": b'["model", "m"]',
}


def director() -> Director:
    metrics = EppMetrics()
    cfg = load_picker_config(timer=metrics.observe_plugin)
    pool = EndpointPool()
    endpoints = [Endpoint(f"e{i}", f"10.0.0.{i + 1}:8000") for i in range(2)]
    for e in endpoints:
        e.state.update_metrics(ServerMetrics(scraped_at=time.monotonic() + 3600))
    pool.replace_all(endpoints)
    precise = PreciseProducer(BlockIndex(model="m"), LocalPromptTokenizer(CharTokenizer()))
    return Director(pool, cfg.scheduler, Admission({}, SaturationDetector(5, 0.8, 0.5)),
                    metrics, producers=[precise, *cfg.producers],
                    pre_request=cfg.pre_request, response_complete=cfg.response_complete)


async def answers(d: Director, path: str, body: bytes) -> list[pb.ProcessingResponse]:
    stream = ProtocolStream(d)
    out = []
    for msg in (fe.request_headers(path), fe.request_body(body, True)):
        out.extend(await stream.handle(msg))
    stream.close()
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name", list(BODIES))
async def test_hostile_bodies_are_an_immediate_400(name: str, path: str) -> None:
    [answer] = await answers(director(), path, BODIES[name])
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 400
    error = json.loads(answer.immediate_response.body)["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"


@pytest.mark.asyncio
@pytest.mark.parametrize("field,value", [("max_tokens", 10**1000), ("n", -(10**1000)),
                                         ("temperature", -1e308), ("cache_salt", [[1]]),
                                         ("cache_salt", 10**1000)])
async def test_sampling_params_of_any_size_are_routed(field: str, value: object) -> None:
    body = json.dumps({"model": "m", "prompt": "hello " * 50, field: value}).encode()
    out = await answers(director(), "/v1/completions", body)
    assert [a.WhichOneof("response") for a in out] == ["request_headers", "request_body"]
