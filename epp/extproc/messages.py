"""Builders and readers for ext_proc protobuf messages (Envoy protocol details only)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
# On the response path, in the envoy.lb namespace: the endpoint that actually served.
SERVED_KEY = "x-gateway-destination-endpoint-served"
# With --emit-endpoint-scores, next to the destination: {"ip:port": total score}.
SCORES_KEY = "x-gateway-destination-endpoint-scores"
# Envoy's gRPC messages are capped; GIE streams bodies back in chunks of at most this size.
MAX_BODY_CHUNK = 62_000

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse
# The one gRPC method Envoy calls, named by the protos both transports serve.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
METHOD_NAME = "Process"
# What a stream answers with: a message, or one already serialized (see wire.py).
Answer = ProcessingResponse | bytes


def read_headers(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    """Headers as a dict with lower-case keys. Envoy sends ``raw_value`` (bytes) in
    recent versions and ``value`` in older ones; repeated keys are joined with ','."""
    out: dict[str, str] = {}
    for h in header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        if key in out:
            out[key] = f"{out[key]},{value}"
        else:
            out[key] = value
    return out


def read_subset_hint(request: pb.ProcessingRequest) -> list[str] | None:
    """The proxy's subset hint (list of ``ip:port``), or None when it sent none."""
    if not request.HasField("metadata_context"):
        return None
    filter_metadata = request.metadata_context.filter_metadata
    if SUBSET_HINT_NAMESPACE not in filter_metadata:
        return None
    fields = filter_metadata[SUBSET_HINT_NAMESPACE].fields
    if SUBSET_HINT_KEY not in fields:
        return None
    value = fields[SUBSET_HINT_KEY]
    if value.HasField("list_value"):
        return [v.string_value for v in value.list_value.values if v.string_value]
    if value.HasField("string_value"):  # tolerate a comma-separated string
        return [s.strip() for s in value.string_value.split(",") if s.strip()]
    return []


def read_served_endpoint(request: pb.ProcessingRequest) -> str | None:
    """The ``ip:port`` the proxy reports as having served the request, if it sent one."""
    if not request.HasField("metadata_context"):
        return None
    filter_metadata = request.metadata_context.filter_metadata
    if LB_METADATA_NAMESPACE not in filter_metadata:
        return None
    fields = filter_metadata[LB_METADATA_NAMESPACE].fields
    if SERVED_KEY not in fields:
        return None
    value = fields[SERVED_KEY]
    if value.HasField("list_value"):  # tolerate a list: the first entry served
        items = [v.string_value for v in value.list_value.values if v.string_value]
        return items[0].strip() if items else None
    return value.string_value.strip() or None


def header_mutation(
    set_headers: Mapping[str, str], remove_headers: Iterable[str] = ()
) -> pb.HeaderMutation:
    """A mutation that overwrites ``set_headers`` and removes ``remove_headers``."""
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in set_headers.items()
        ],
        remove_headers=list(remove_headers),
    )


def destination_metadata(destination: str, scores: Mapping[str, float] | None = None
                         ) -> struct_pb2.Struct:
    """Dynamic metadata ``{"envoy.lb": {"x-gateway-destination-endpoint": destination}}``,
    with ``x-gateway-destination-endpoint-scores`` (``{ip:port: score}``) when given."""
    inner = struct_pb2.Struct()
    inner.fields[DESTINATION_HEADER].string_value = destination
    if scores:
        scored = inner.fields[SCORES_KEY].struct_value
        for address, score in scores.items():
            scored.fields[address].number_value = score
    outer = struct_pb2.Struct()
    outer.fields[LB_METADATA_NAMESPACE].struct_value.CopyFrom(inner)
    return outer


def routed_headers_response(
    destination: str, set_headers: Mapping[str, str], remove_headers: Sequence[str],
    *, scores: Mapping[str, float] | None = None
) -> pb.ProcessingResponse:
    """The request-headers answer that routes: header, metadata, and a cleared route cache."""
    headers = {DESTINATION_HEADER: destination, **set_headers}
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(
                header_mutation=header_mutation(headers, remove_headers),
                clear_route_cache=True,
            )
        ),
        dynamic_metadata=destination_metadata(destination, scores),
    )


def routed_body_response(
    destination: str, set_headers: Mapping[str, str], remove_headers: Sequence[str],
    *, body: bytes | None = None, scores: Mapping[str, float] | None = None
) -> pb.ProcessingResponse:
    """BUFFERED mode: route in the body answer (its header mutation applies to the request).
    ``body`` replaces the buffered body, with ``content-length`` set to its size."""
    headers = {DESTINATION_HEADER: destination, **set_headers}
    if body is not None:
        headers["content-length"] = str(len(body))
        remove_headers = [h for h in remove_headers if h != "content-length"]
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=header_mutation(headers, remove_headers),
                body_mutation=None if body is None else pb.BodyMutation(body=body),
                clear_route_cache=True,
            )
        ),
        dynamic_metadata=destination_metadata(destination, scores),
    )


def streamed_body_chunks(
    body: bytes, *, end_of_stream: bool = True, chunk_size: int = MAX_BODY_CHUNK
) -> list[pb.ProcessingResponse]:
    """The request body sent back to Envoy as streamed chunks (duplex mode)."""
    if not body:
        return [_request_chunk(b"", end_of_stream)]
    view = memoryview(body)
    last = len(body) - 1
    return [
        _request_chunk(bytes(view[i : i + chunk_size]), end_of_stream and i + chunk_size > last)
        for i in range(0, len(body), chunk_size)
    ]


def _request_chunk(data: bytes, end: bool) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=end)
                )
            )
        )
    )


def response_body_echo(data: bytes, end: bool) -> pb.ProcessingResponse:
    """Duplex mode: pass a response body chunk through unchanged."""
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=data, end_of_stream=end)
                )
            )
        )
    )


def immediate_response(status: int, body: bytes, details: str) -> pb.ProcessingResponse:
    """Answer the client directly (JSON body) without contacting an upstream."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=header_mutation({"content-type": "application/json"}),
            body=body,
            details=details,
        )
    )


# Answers that carry no change; immutable, so shared by every stream.
EMPTY_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
EMPTY_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
EMPTY_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
EMPTY_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
EMPTY_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
