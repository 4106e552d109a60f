"""Table-driven tests of the ext_proc stream state machine: ProcessingRequests in,
ProcessingResponses out, compared field by field."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint, EndpointPool
from epp.devtools import fake_envoy as fe
from epp.extproc.messages import pb
from epp.extproc.stream import ProtocolStream
from epp.observability.metrics import MAX_MODEL_LABELS, OTHER_MODEL, EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.types import ProfileResult, SchedulingContext, SchedulingResult

COMPLETION = json.dumps({"model": "m", "prompt": "hello"}).encode()
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


class FirstN:
    """Deterministic scheduler: the first ``n`` candidates in pool order."""

    def __init__(self, n: int = 1) -> None:
        self.n = n
        self.seen: list[LLMRequest | None] = []

    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        self.seen.append(ctx.request)
        return SchedulingResult({"p": ProfileResult(list(candidates[: self.n]))}, "p")


def admission() -> Admission:
    return Admission({}, SaturationDetector(5, 0.8, 0.5))


def summarize(resp: Any) -> tuple[Any, ...]:
    """A response reduced to the fields the protocol cares about."""
    if isinstance(resp, bytes):  # answers the stream sends pre-serialized
        resp = pb.ProcessingResponse.FromString(resp)
    kind = resp.WhichOneof("response")
    if kind == "immediate_response":
        ir = resp.immediate_response
        body = json.loads(ir.body)
        return ("immediate", ir.status.code, body["error"]["code"])
    if kind in ("request_headers", "request_body", "response_headers", "response_body"):
        common = getattr(resp, kind).response
        out: list[Any] = [kind]
        sets = {h.header.key: h.header.raw_value.decode()
                for h in common.header_mutation.set_headers}
        if sets or common.header_mutation.remove_headers:
            out.append(("set", sets))
            out.append(("remove", sorted(common.header_mutation.remove_headers)))
        if common.clear_route_cache:
            out.append("clear_route_cache")
        if resp.HasField("dynamic_metadata"):
            lb = resp.dynamic_metadata.fields["envoy.lb"].struct_value
            out.append(("metadata", lb.fields["x-gateway-destination-endpoint"].string_value))
        if common.body_mutation.HasField("streamed_response"):
            sr = common.body_mutation.streamed_response
            out.append(("chunk", len(sr.body), sr.end_of_stream))
        return tuple(out)
    return (kind,)


DEST = "x-gateway-destination-endpoint"
ROUTED_A = ("request_headers", ("set", {DEST: "10.0.0.1:8000"}), ("remove", ["content-length"]),
            "clear_route_cache", ("metadata", "10.0.0.1:8000"))


@dataclass
class Case:
    name: str
    requests: list[Any]
    expected: list[tuple[Any, ...]]
    endpoints: int = 2
    fallbacks: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("duplex body routed: headers answer first, then the body",
         [fe.request_headers(), fe.request_body(COMPLETION)],
         [ROUTED_A, ("request_body", ("chunk", len(COMPLETION), True))]),
    Case("body in several chunks is held until end of stream",
         [fe.request_headers("/v1/chat/completions"), *fe.request_body_chunks(CHAT, 7)],
         [ROUTED_A, ("request_body", ("chunk", len(CHAT), True))]),
    Case("no body: picked at header time",
         [fe.request_headers("/v1/models", method="GET", end_of_stream=True)],
         [("request_headers", ("set", {DEST: "10.0.0.1:8000"}), ("remove", []),
           "clear_route_cache", ("metadata", "10.0.0.1:8000"))]),
    Case("response passes through; SSE chunks echoed as they come",
         [fe.request_headers(), fe.request_body(COMPLETION),
          fe.response_headers(200, "text/event-stream"),
          fe.response_body(b"data: {}\n\n", False), fe.response_body(b"data: [DONE]\n\n", True)],
         [ROUTED_A, ("request_body", ("chunk", len(COMPLETION), True)),
          ("response_headers",), ("response_body", ("chunk", 10, False)),
          ("response_body", ("chunk", 14, True))]),
    Case("invalid JSON -> 400",
         [fe.request_headers(), fe.request_body(b"{not json")], [("immediate", 400, 400)]),
    Case("invalid UTF-8 -> 400",
         [fe.request_headers(), fe.request_body(b'{"model": "\xff\xfe"}')],
         [("immediate", 400, 400)]),
    Case("JSON array body -> 400",
         [fe.request_headers(), fe.request_body(b"[1, 2]")], [("immediate", 400, 400)]),
    Case("missing model -> 400",
         [fe.request_headers(), fe.request_body(b'{"prompt": "x"}')], [("immediate", 400, 400)]),
    Case("messages after an immediate response are ignored",
         [fe.request_headers(), fe.request_body(b"{"), fe.response_headers()],
         [("immediate", 400, 400)]),
    Case("empty pool -> 503",
         [fe.request_headers(), fe.request_body(COMPLETION)], [("immediate", 503, 503)],
         endpoints=0),
    Case("subset hint restricts candidates (match on IP)",
         [fe.request_headers(subset=["10.0.0.2:9999"]), fe.request_body(COMPLETION)],
         [("request_headers", ("set", {DEST: "10.0.0.2:8000"}), ("remove", ["content-length"]),
           "clear_route_cache", ("metadata", "10.0.0.2:8000")),
          ("request_body", ("chunk", len(COMPLETION), True))]),
    Case("subset hint with no pool member -> 503",
         [fe.request_headers(subset=["192.168.9.9:8000"]), fe.request_body(COMPLETION)],
         [("immediate", 503, 503)]),
    Case("empty subset hint -> 503",
         [fe.request_headers(subset=[]), fe.request_body(COMPLETION)], [("immediate", 503, 503)]),
    Case("fallbacks: ordered comma-separated list in header and metadata",
         [fe.request_headers(), fe.request_body(COMPLETION)],
         [("request_headers", ("set", {DEST: "10.0.0.1:8000,10.0.0.2:8000"}),
           ("remove", ["content-length"]), "clear_route_cache",
           ("metadata", "10.0.0.1:8000,10.0.0.2:8000")),
          ("request_body", ("chunk", len(COMPLETION), True))], fallbacks=2),
    Case("control headers are stripped before forwarding",
         [fe.request_headers(extra={"x-gateway-inference-objective": "critical"}),
          fe.request_body(COMPLETION)],
         [("request_headers", ("set", {DEST: "10.0.0.1:8000"}),
           ("remove", ["content-length", "x-gateway-inference-objective"]),
           "clear_route_cache", ("metadata", "10.0.0.1:8000")),
          ("request_body", ("chunk", len(COMPLETION), True))]),
    Case("buffered mode: headers acknowledged, routed in the body answer",
         [fe.request_headers(body_mode=fe.BUFFERED), fe.request_body(COMPLETION)],
         [("request_headers",),
          ("request_body", ("set", {DEST: "10.0.0.1:8000"}), ("remove", []),
           "clear_route_cache", ("metadata", "10.0.0.1:8000"))]),
    Case("buffered response body: acknowledged without mutation",
         [fe.request_headers(body_mode=fe.BUFFERED), fe.request_body(COMPLETION),
          fe.response_headers(), fe.response_body(b"{}")],
         [("request_headers",),
          ("request_body", ("set", {DEST: "10.0.0.1:8000"}), ("remove", []),
           "clear_route_cache", ("metadata", "10.0.0.1:8000")),
          ("response_headers",), ("response_body",)]),
    Case("request trailers end the body",
         [fe.request_headers(), fe.request_body(COMPLETION, end_of_stream=False), fe.trailers()],
         [ROUTED_A, ("request_body", ("chunk", len(COMPLETION), False)),
          ("request_trailers",)]),
    Case("streamed (non-duplex) body mode cannot route -> 500 with a reason",
         [fe.request_headers(body_mode=1), fe.request_body(COMPLETION)],
         [("immediate", 500, 500)]),
]


def make_director(n_endpoints: int, fallbacks: int) -> tuple[Director, EppMetrics]:
    pool = EndpointPool()
    pool.replace_all(Endpoint(f"e{i}", f"10.0.0.{i + 1}:8000") for i in range(n_endpoints))
    metrics = EppMetrics()
    return Director(pool, FirstN(fallbacks), admission(), metrics), metrics


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_stream_table(case: Case) -> None:
    director, _ = make_director(case.endpoints, case.fallbacks)
    stream = ProtocolStream(director)
    got: list[tuple[Any, ...]] = []
    for req in case.requests:
        got.extend(summarize(r) for r in await stream.handle(req))
    stream.close()
    assert got == case.expected


@pytest.mark.asyncio
async def test_large_body_is_sent_back_in_62000_byte_chunks_byte_identical() -> None:
    director, _ = make_director(1, 1)
    prompt = "x" * 300_000
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    stream = ProtocolStream(director)
    out = []
    for req in [fe.request_headers(), *fe.request_body_chunks(body, 16_384)]:
        out.extend(r if not isinstance(r, bytes) else pb.ProcessingResponse.FromString(r)
                   for r in await stream.handle(req))
    assert out[0].WhichOneof("response") == "request_headers"
    chunks = [r.request_body.response.body_mutation.streamed_response for r in out[1:]]
    assert all(len(c.body) <= 62_000 for c in chunks)
    assert [c.end_of_stream for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert b"".join(c.body for c in chunks) == body


@pytest.mark.asyncio
async def test_body_over_limit_gets_413_and_is_not_buffered_further() -> None:
    director, _ = make_director(1, 1)
    stream = ProtocolStream(director, max_body_bytes=1000)
    first = await stream.handle(fe.request_headers())
    refused = await stream.handle(fe.request_body(b"x" * 600, end_of_stream=False))
    assert first == [] and refused == []
    refused = await stream.handle(fe.request_body(b"x" * 600, end_of_stream=False))
    assert [summarize(r) for r in refused] == [("immediate", 413, 413)]
    assert await stream.handle(fe.request_body(b"x", end_of_stream=True)) == []


@pytest.mark.asyncio
async def test_usage_and_metrics_recorded_from_sse_response() -> None:
    director, metrics = make_director(1, 1)
    stream = ProtocolStream(director)
    for req in [fe.request_headers(), fe.request_body(COMPLETION),
                fe.response_headers(200, "text/event-stream")]:
        await stream.handle(req)
    handle = stream.routed
    assert handle is not None
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": 4}}
    sse = (b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],"usage":'
           + json.dumps(usage).encode() + b"}\n\ndata: [DONE]\n\n")
    await stream.handle(fe.response_body(sse[:25], False))
    await stream.handle(fe.response_body(sse[25:], True))
    assert handle.usage is not None
    assert (handle.usage.prompt_tokens, handle.usage.completion_tokens,
            handle.usage.cached_tokens) == (7, 3, 4)
    reg = metrics.registry
    assert reg.get_sample_value("inference_objective_input_tokens_sum",
                                {"model_name": "m", "target_model_name": "m"}) == 7
    assert reg.get_sample_value("inference_objective_request_total",
                                {"model_name": "m", "target_model_name": "m"}) == 1


@pytest.mark.asyncio
async def test_aborted_stream_counts_an_error_once() -> None:
    director, metrics = make_director(1, 1)
    stream = ProtocolStream(director)
    await stream.handle(fe.request_headers())
    await stream.handle(fe.request_body(COMPLETION))
    stream.close()
    stream.close()
    # "m" was never served (no 2xx, not declared by discovery): the shared label.
    value = metrics.registry.get_sample_value(
        "inference_objective_request_error_total",
        {"model_name": OTHER_MODEL, "target_model_name": OTHER_MODEL,
         "error_code": "stream_aborted"})
    assert value == 1


async def _exchange(director: Director, model: str, status: int) -> None:
    stream = ProtocolStream(director)
    body = json.dumps({"model": model, "prompt": "hi"}).encode()
    for req in [fe.request_headers(), fe.request_body(body), fe.response_headers(status),
                fe.response_body(b"{}", True)]:
        await stream.handle(req)
    stream.close()


def _model_labels(metrics: EppMetrics) -> set[str]:
    return {s.labels["model_name"] for m in metrics.registry.collect()
            if m.name.startswith("inference_objective") for s in m.samples}


@pytest.mark.asyncio
async def test_client_chosen_model_names_cannot_grow_the_metric_series() -> None:
    director, metrics = make_director(1, 1)
    for i in range(2000):  # names the pool does not serve: the engine answers 404
        await _exchange(director, f"bogus-{i}", 404)
    assert _model_labels(metrics) == {OTHER_MODEL}
    await _exchange(director, "x" * 10_000, 200)  # no served model has such a name
    assert _model_labels(metrics) == {OTHER_MODEL}
    await _exchange(director, "m", 200)  # a served model earns its series on a 2xx ...
    await _exchange(director, "m", 200)
    assert _model_labels(metrics) == {OTHER_MODEL, "m"}
    # ... and every one of its requests is counted under it, the first one included.
    assert metrics.registry.get_sample_value(
        "inference_objective_request_total", {"model_name": "m", "target_model_name": "m"}) == 2
    for i in range(MAX_MODEL_LABELS + 50):  # even served names are capped
        await _exchange(director, f"lora-{i}", 200)
    assert len(_model_labels(metrics)) == MAX_MODEL_LABELS + 1


@pytest.mark.asyncio
async def test_director_exception_becomes_500() -> None:
    class Broken:
        def schedule(self, ctx: Any, candidates: Any, explain: bool = False) -> Any:
            raise RuntimeError("boom")

    pool = EndpointPool()
    pool.upsert(Endpoint("e", "10.0.0.1:8000"))
    stream = ProtocolStream(Director(pool, Broken(), admission(), EppMetrics()))
    await stream.handle(fe.request_headers())
    out = await stream.handle(fe.request_body(COMPLETION))
    assert [summarize(r) for r in out] == [("immediate", 500, 500)]


STEERING = {
    "x-prefiller-host-port": "10.9.9.9:8000",
    "x-gateway-destination-endpoint-subset": "10.9.9.9:8000",
    "x-gateway-destination-endpoint-served": "10.9.9.9:8000",
    "x-gateway-inference-objective": "critical",
    "x-llm-d-inference-objective": "critical",
    "x-gateway-inference-fairness-id": "tenant",
    "x-llm-d-inference-fairness-id": "tenant",
    "x-gateway-model-name-rewrite": "other",
    "x-llm-d-model-name-rewrite": "other",
    "test-epp-endpoint-selection": "10.9.9.9:8000",
}


@pytest.mark.asyncio
@pytest.mark.parametrize("allow_test_header", [False, True])
async def test_every_steering_header_is_stripped(allow_test_header: bool) -> None:
    pool = EndpointPool()
    pool.upsert(Endpoint("e", "10.0.0.1:8000"))
    director = Director(pool, FirstN(1), admission(), EppMetrics(),
                        allow_test_header=allow_test_header)
    stream = ProtocolStream(director)
    await stream.handle(fe.request_headers(extra=STEERING))
    out = await stream.handle(fe.request_body(COMPLETION))
    mutation = out[0].request_headers.response.header_mutation
    removed = set(mutation.remove_headers)
    expected = set(STEERING) - ({"test-epp-endpoint-selection"} if allow_test_header else set())
    assert expected <= removed
    sets = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    assert sets["x-gateway-destination-endpoint"] == "10.0.0.1:8000"


@pytest.mark.asyncio
async def test_a_prefiller_set_by_the_epp_replaces_the_clients() -> None:
    class SetPrefiller:
        name = "pd"

        def pre_request(self, ctx: Any, result: Any, headers: Any) -> None:
            headers.set["x-prefiller-host-port"] = "10.0.0.2:8000"

    pool = EndpointPool()
    pool.upsert(Endpoint("e", "10.0.0.1:8000"))
    director = Director(pool, FirstN(1), admission(), EppMetrics(), pre_request=[SetPrefiller()])
    stream = ProtocolStream(director)
    await stream.handle(fe.request_headers(extra={"x-prefiller-host-port": "6.6.6.6:1"}))
    out = await stream.handle(fe.request_body(COMPLETION))
    mutation = out[0].request_headers.response.header_mutation
    assert "x-prefiller-host-port" not in mutation.remove_headers
    sets = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    assert sets["x-prefiller-host-port"] == "10.0.0.2:8000"
