"""``--tracing``: spans of the request path through the director, export over OTLP/gRPC as
the ``OTEL_*`` variables say, and nothing loaded when tracing is off."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from epp.datastore import Endpoint, EndpointPool
from epp.errors import RequestError
from epp.observability.metrics import EppMetrics
from epp.observability.tracing import TracingError, setup_tracing
from epp.requestcontrol.director import Director
from tests.unit.test_extproc_stream import FirstN, admission

BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def director() -> Director:
    pool = EndpointPool()
    pool.upsert(Endpoint("e", "10.0.0.1:8000"))
    return Director(pool, FirstN(1), admission(), EppMetrics())


@pytest.mark.asyncio
async def test_a_routed_request_is_one_trace_of_parse_prefix_match_and_schedule(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    exporter = InMemorySpanExporter()
    d = director()
    d.tracer = setup_tracing(exporter=exporter)
    headers = {":path": "/v1/completions", "x-request-id": "r-1", "traceparent": TRACEPARENT}
    handle = await asyncio.create_task(d.route(headers, BODY, None))
    with pytest.raises(RequestError):
        await asyncio.create_task(d.route({":path": "/v1/completions"}, b"{", None))
    d.tracer.shutdown()  # flushes the batch
    spans = exporter.get_finished_spans()
    routed = [s for s in spans if format(s.context.trace_id, "032x") == TRACE_ID]
    root = next(s for s in routed if s.name == "epp.request")
    assert root.kind == SpanKind.SERVER
    assert root.resource.attributes["service.name"] == "epp"  # no OTEL_SERVICE_NAME here
    assert root.parent is not None and format(root.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert root.attributes is not None
    assert root.attributes["epp.request_id"] == "r-1"
    assert root.attributes["epp.destination"] == handle.destination == "10.0.0.1:8000"
    children = [s for s in routed if s.name != "epp.request"]
    assert [s.name for s in sorted(children, key=lambda s: s.start_time or 0)] == [
        "epp.parse", "epp.prefix_match", "epp.schedule"]
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id
               for s in children)
    # The refused request: its own trace, root and parse span marked as errors.
    refused = [s for s in spans if s not in routed]
    assert {s.name for s in refused} == {"epp.request", "epp.parse"}
    assert all(s.status.status_code == StatusCode.ERROR for s in refused)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC trace collector that keeps what it receives."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: object) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest_asyncio.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(None)


@pytest.mark.asyncio
async def test_spans_go_to_the_otlp_endpoint_the_chart_sets(
        collector: tuple[Collector, int], monkeypatch: pytest.MonkeyPatch) -> None:
    servicer, port = collector
    # The variables the llm-d-router chart sets with tracing enabled.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-d-router/epp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.namespace.name=inference")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1.0")
    d = director()
    d.tracer = setup_tracing()
    await asyncio.create_task(d.route({":path": "/v1/completions"}, BODY, None))
    await asyncio.to_thread(d.tracer.shutdown)  # exports from its own thread
    spans = [(rs, span) for req in servicer.requests for rs in req.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    assert {span.name for _, span in spans} == {
        "epp.request", "epp.parse", "epp.prefix_match", "epp.schedule"}
    resource = {a.key: a.value.string_value for a in spans[0][0].resource.attributes}
    assert resource["service.name"] == "llm-d-router/epp"
    assert resource["k8s.namespace.name"] == "inference"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("OTEL_TRACES_EXPORTER", "zipkin", "OTEL_TRACES_EXPORTER"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", "only grpc"),
])
def test_unsupported_exporters_are_refused(name: str, value: str, message: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(TracingError, match=message):
        setup_tracing()


def test_nothing_of_opentelemetry_is_loaded_when_tracing_is_off() -> None:
    code = ("import sys, epp.cli, epp.runner, epp.requestcontrol.director; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_an_exporter_that_cannot_be_imported_is_a_clear_start_up_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What a venv gets when xds-protos unpacked its older opentelemetry/proto copy last.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                        None)
    with pytest.raises(TracingError, match="force-reinstall --no-deps opentelemetry-proto"):
        setup_tracing()
