"""The protocol's response side: the endpoint the proxy reports as having served
(``envoy.lb`` ``x-gateway-destination-endpoint-served``) gets the request's in-flight load,
its status and the index-accuracy check; ``--emit-endpoint-scores`` publishes the primary
profile's scores next to the destination, under llm-d's key."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from google.protobuf import struct_pb2

from epp.api.openai import LLMRequest
from epp.config.picker_config import load_picker_config
from epp.datastore import Endpoint, EndpointPool, ServerMetrics
from epp.devtools import fake_envoy as fe
from epp.extproc import messages as msg
from epp.extproc.stream import ProtocolStream
from epp.kvcache.index import EndpointMatch
from epp.kvcache.match import PrefixMatch
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.scheduler import Scheduler
from epp.scheduling.types import ProfileResult, SchedulingContext, SchedulingResult

BODY = json.dumps({"model": "m", "prompt": "hello " * 40}).encode()
ADDRESSES = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]
PROMPT_TOKENS = 80
BLOCK = 16


class PickFirstTwo:
    """The first endpoint, with the second as its fallback."""

    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        return SchedulingResult({"p": ProfileResult(list(candidates[:2]))}, "p")


class PreciseMatch:
    """A precise prefix match in which only the first endpoint holds the prompt."""

    name = "precise"

    async def produce(self, request: LLMRequest | None,
                      candidates: Sequence[Endpoint]) -> PrefixMatch | None:
        return PrefixMatch(True, PROMPT_TOKENS, BLOCK, PROMPT_TOKENS // BLOCK,
                           {candidates[0].name: EndpointMatch(4, 4)})


def make(scheduler: Any = None, *, emit: bool = False
         ) -> tuple[Director, EndpointPool, EppMetrics]:
    pool = EndpointPool()
    pool.replace_all(Endpoint(f"e{i}", a) for i, a in enumerate(ADDRESSES))
    metrics = EppMetrics()
    director = Director(pool, scheduler or PickFirstTwo(),
                        Admission({}, SaturationDetector(5, 0.8, 0.5)), metrics,
                        producers=[PreciseMatch()], emit_endpoint_scores=emit)
    return director, pool, metrics


def served(address: Any, status: int = 200) -> msg.ProcessingRequest:
    req = fe.response_headers(status)
    lb = struct_pb2.Struct()
    if isinstance(address, list):
        lb.fields[msg.SERVED_KEY].list_value.extend(address)
    else:
        lb.fields[msg.SERVED_KEY].string_value = address
    req.metadata_context.filter_metadata["envoy.lb"].CopyFrom(lb)
    return req


def load(pool: EndpointPool) -> list[tuple[int, int]]:
    return [(e.state.load.requests, e.state.load.since_scrape) for e in pool.snapshot()]


def count(metrics: EppMetrics, where: str) -> float:
    return float(metrics.served_elsewhere.labels(where)._value.get())


async def start(director: Director) -> ProtocolStream:
    stream = ProtocolStream(director)
    for req in (fe.request_headers(), fe.request_body(BODY)):
        await stream.handle(req)
    return stream


def test_served_endpoint_is_read_from_the_lb_namespace() -> None:
    assert msg.read_served_endpoint(served("10.0.0.2:8000")) == "10.0.0.2:8000"
    assert msg.read_served_endpoint(served(["10.0.0.3:8000"])) == "10.0.0.3:8000"
    assert msg.read_served_endpoint(fe.response_headers()) is None
    other = fe.response_headers()
    other.metadata_context.filter_metadata["envoy.lb"].fields["x"].string_value = "y"
    assert msg.read_served_endpoint(other) is None


@pytest.mark.asyncio
async def test_a_fallback_that_served_takes_the_load() -> None:
    director, pool, metrics = make()
    stream = await start(director)
    assert load(pool) == [(1, 1), (0, 0), (0, 0)]  # held by the primary pick
    stream.handle_now(served("10.0.0.2:8000"))
    assert load(pool) == [(0, 0), (1, 1), (0, 0)]
    assert count(metrics, "fallback") == 1
    stream.handle_now(fe.response_body(b"{}", True))
    assert load(pool) == [(0, 0), (0, 1), (0, 0)]  # released where it was held
    stream.close()


@pytest.mark.asyncio
async def test_same_endpoint_reported_changes_nothing() -> None:
    director, pool, metrics = make()
    stream = await start(director)
    stream.handle_now(served("10.0.0.1:8000"))
    assert load(pool) == [(1, 1), (0, 0), (0, 0)]
    assert sum(count(metrics, w) for w in ("fallback", "other", "unknown")) == 0
    stream.close()
    assert load(pool)[0][0] == 0


@pytest.mark.asyncio
async def test_a_503_marks_the_endpoint_that_served_unreachable() -> None:
    director, pool, metrics = make()
    stream = await start(director)
    stream.handle_now(served("10.0.0.3:8000", status=503))  # outside the pick
    stream.handle_now(fe.response_body(b"", True))
    first, _, third = pool.snapshot()
    assert third.state.unreachable is not None and first.state.unreachable is None
    assert count(metrics, "other") == 1


@pytest.mark.asyncio
async def test_an_endpoint_outside_the_pool_holds_nothing() -> None:
    director, pool, metrics = make()
    stream = await start(director)
    stream.handle_now(served("192.168.7.7:9000", status=503))
    assert load(pool) == [(0, 0), (0, 0), (0, 0)]
    stream.handle_now(fe.response_body(b"", True))
    assert all(e.state.unreachable is None for e in pool.snapshot())
    assert count(metrics, "unknown") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("served_by, errors", [("10.0.0.1:8000", 0), ("10.0.0.2:8000", 1)])
async def test_index_accuracy_is_checked_against_who_served(served_by: str,
                                                           errors: int) -> None:
    """The index says e0 holds 4 blocks, e1 none. The engine reports 64 cached tokens:
    right for e0, an underestimate for e1 (where the index predicted 0)."""
    director, _, metrics = make()
    stream = await start(director)
    stream.handle_now(served(served_by))
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1,
             "prompt_tokens_details": {"cached_tokens": 64}}
    stream.handle_now(fe.response_body(json.dumps({"usage": usage}).encode(), True))
    assert metrics.index_mispredictions.labels("under")._value.get() == errors
    assert metrics.index_accuracy._sum.get() == 64 * errors


def _lb_fields(response: msg.ProcessingResponse) -> dict[str, Any]:
    lb = response.dynamic_metadata.fields["envoy.lb"].struct_value
    return {k: (dict(v.struct_value.fields) if v.HasField("struct_value") else v.string_value)
            for k, v in lb.fields.items()}


@pytest.mark.asyncio
@pytest.mark.parametrize("body_mode", [fe.DUPLEX, fe.BUFFERED])
async def test_endpoint_scores_published_with_the_destination(body_mode: int) -> None:
    cfg = load_picker_config("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, weight: 2}]}]
""")
    scheduler: Scheduler = cfg.scheduler
    director, pool, _ = make(scheduler, emit=True)
    for e, waiting in zip(pool.snapshot(), (0, 4, 2)):
        e.state.update_metrics(ServerMetrics(waiting=waiting, scraped_at=1e12))
    stream = ProtocolStream(director)
    out = []
    for req in (fe.request_headers(body_mode=body_mode), fe.request_body(BODY)):
        out.extend(await stream.handle(req))
    routed = next(r for r in out if r.HasField("dynamic_metadata"))
    fields = _lb_fields(routed)
    assert fields[msg.DESTINATION_HEADER] == "10.0.0.1:8000"
    scores = {k: v.number_value for k, v in fields[msg.SCORES_KEY].items()}
    assert scores == {"10.0.0.1:8000": 2.0, "10.0.0.2:8000": 0.0, "10.0.0.3:8000": 1.0}
    stream.close()


@pytest.mark.asyncio
async def test_no_scores_without_the_flag() -> None:
    director, _, _ = make()
    stream = ProtocolStream(director)
    out = []
    for req in (fe.request_headers(), fe.request_body(BODY)):
        out.extend(await stream.handle(req))
    assert set(_lb_fields(out[0])) == {msg.DESTINATION_HEADER}
    stream.close()


@pytest.mark.asyncio
async def test_a_repeated_report_counts_once() -> None:
    director, pool, metrics = make()
    stream = await start(director)
    handle = stream.routed
    assert handle is not None
    for address in ("192.168.7.7:9000", "192.168.7.7:9000"):
        handle.on_served_endpoint(address)
    for address in ("10.0.0.3:8000", "10.0.0.3:8000"):
        handle.on_served_endpoint(address)
    assert count(metrics, "unknown") == 1 and count(metrics, "other") == 1
    assert load(pool) == [(0, 0), (0, 0), (1, 1)]
    stream.close()
    assert load(pool) == [(0, 0), (0, 0), (0, 1)]
