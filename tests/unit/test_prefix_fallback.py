"""When a request's tokens do not come in time (a slow or unreachable render endpoint),
the precise prefix cache falls back to where this EPP sent the same text before, so a
tenant stays with its pod instead of being spread by the load scorers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest

from epp.api.openai import LLMRequest
from epp.config.picker_config import load_picker_config
from epp.datastore import Endpoint, EndpointPool
from epp.kvcache.feedback import FALLBACK_NAME, IndexFeedback, fallback_producer
from epp.kvcache.index import BlockIndex
from epp.kvcache.producer import PreciseProducer
from epp.observability.metrics import EppMetrics
from epp.requestcontrol import director as director_module
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import PREFIX_DEGRADED_KEY, Director
from tests.unit.test_kv_pending import PRECISE_AND_LOAD


class Tokens:
    """Answers at once until ``slow`` is set, then never in time."""

    def __init__(self) -> None:
        self.slow = False
        self.calls = 0

    async def tokens(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> list[int]:
        self.calls += 1
        if self.slow:
            await asyncio.sleep(10)
        return [7] * 64


def body(tenant: int, question: int) -> bytes:
    return json.dumps({"model": "m", "messages": [
        {"role": "system", "content": f"You are tenant {tenant}'s assistant. " * 40},
        {"role": "user", "content": f"question {question}"}]}).encode()


def make(fallback: bool) -> tuple[Director, Tokens, EppMetrics]:
    pool = EndpointPool()
    pool.replace_all(Endpoint(f"e{i}", f"10.0.0.{i + 1}:8000") for i in range(3))
    config = load_picker_config(PRECISE_AND_LOAD)
    index = BlockIndex(model="m")
    tokens = Tokens()
    backup = fallback_producer() if fallback else None
    feedback = IndexFeedback(index, pending=False, fallback=backup)
    metrics = EppMetrics()
    producers: list = [PreciseProducer(index, tokens, block_size=4)]
    if backup is not None:
        producers.append(backup)
    d = Director(pool, config.scheduler, Admission({}, SaturationDetector(5, 0.8, 0.5)),
                 metrics, producers=producers, pre_request=[feedback],
                 response_complete=[feedback])
    return d, tokens, metrics


async def route(d: Director, data: bytes) -> str:
    handle = await asyncio.create_task(d.route({":path": "/v1/chat/completions"}, data, None))
    handle.on_done(True)
    return handle.destination


@pytest.mark.asyncio
@pytest.mark.parametrize("fallback", [True, False])
async def test_a_tenant_stays_on_its_pod_when_tokens_miss_the_deadline(
        fallback: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(director_module, "PREFIX_DEADLINE_S", 0.01)
    d, tokens, metrics = make(fallback)
    homes = {t: await route(d, body(t, 0)) for t in range(3)}
    tokens.slow = True
    served = {(t, q): await route(d, body(t, q)) for q in range(1, 5) for t in range(3)}
    kept = sum(served[t, q] == homes[t] for t, q in served)
    if fallback:
        assert kept == len(served)
        assert metrics.registry.get_sample_value(
            "epp_prefix_match_degraded_total", {"reason": "deadline"}) == len(served)
    else:  # routed on load alone: the tenants' prompts end up everywhere
        assert kept < len(served)


@pytest.mark.asyncio
async def test_the_fallback_is_not_computed_when_the_tokens_came() -> None:
    d, _, _ = make(True)
    ctx, candidates = d.prepare({":path": "/v1/chat/completions"}, body(1, 1), None)
    await d._produce(ctx, candidates)
    assert FALLBACK_NAME not in ctx.cycle and PREFIX_DEGRADED_KEY not in ctx.cycle


@pytest.mark.asyncio
async def test_explain_says_the_request_fell_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(director_module, "PREFIX_DEADLINE_S", 0.01)
    d, tokens, _ = make(True)
    await route(d, body(1, 0))
    tokens.slow = True
    out = await d.explain({":path": "/v1/chat/completions"}, body(1, 1))
    assert out["prefix_degraded"] == {"reason": "deadline", "fallback": "approximate"}
    assert out["prefix_match"]["precise"] is False
