"""Build the ProcessingRequests Envoy would send for one HTTP exchange.

A cheap stand-in for Envoy in unit tests and micro-benchmarks: the six ext_proc phases
(request headers, body, trailers; response headers, body, trailers) in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


def header_map(headers: Mapping[str, str]) -> base_pb2.HeaderMap:
    """Headers as Envoy sends them (``raw_value`` bytes)."""
    return base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def request_headers(path: str = "/v1/completions", *, method: str = "POST",
                    end_of_stream: bool = False, extra: Mapping[str, str] | None = None,
                    subset: Sequence[str] | None = None, body_mode: int = DUPLEX,
                    ) -> pb.ProcessingRequest:
    """The first message of a stream."""
    headers = {":method": method, ":path": path, ":authority": "gateway",
               ":scheme": "http", "content-type": "application/json", **(extra or {})}
    req = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=header_map(headers), end_of_stream=end_of_stream),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=body_mode,  # type: ignore[arg-type]
                                                 response_body_mode=body_mode),  # type: ignore[arg-type]
    )
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.fields["x-gateway-destination-endpoint-subset"].list_value.extend(list(subset))
        req.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return req


def request_body(data: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    """One request body chunk."""
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def request_body_chunks(data: bytes, chunk: int) -> list[pb.ProcessingRequest]:
    """A body split the way Envoy streams it."""
    parts = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    return [request_body(p, i == len(parts) - 1) for i, p in enumerate(parts)]


def response_headers(status: int = 200, content_type: str = "application/json",
                     end_of_stream: bool = False) -> pb.ProcessingRequest:
    """Upstream response headers."""
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=header_map({":status": str(status), "content-type": content_type}),
        end_of_stream=end_of_stream))


def response_body(data: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    """One upstream response body chunk."""
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def trailers(response: bool = False) -> pb.ProcessingRequest:
    """Request or response trailers."""
    if response:
        return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
