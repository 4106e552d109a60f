"""The per-stream ext_proc state machine: what Envoy has sent and what we owe it.

Request state (model, prompt, chosen endpoints) belongs to the director; this module only
tracks the protocol: which phase the stream is in, the request body collected so far, and
whether each direction runs in duplex-streamed or buffered mode.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

from epp.errors import PayloadTooLargeError, RequestError
from epp.extproc import messages as msg
from epp.extproc import wire

log = logging.getLogger(__name__)

BodyMode = processing_mode_pb2.ProcessingMode.BodySendMode
DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
NONE_MODE = processing_mode_pb2.ProcessingMode.NONE

# The largest request body we buffer. Envoy's own BUFFERED limit is 1 MiB by default;
# duplex mode has none, and a 128k-token prompt is about 0.5 MB, so 16 MiB is generous.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class RoutedRequest(Protocol):
    """What the director hands back for a routed request."""

    @property
    def destination(self) -> str: ...

    @property
    def set_headers(self) -> Mapping[str, str]: ...

    @property
    def remove_headers(self) -> Sequence[str]: ...

    @property
    def body(self) -> bytes | None:
        """A body to forward instead of the one received (None: forward it unchanged)."""

    @property
    def endpoint_scores(self) -> Mapping[str, float] | None:
        """``{ip:port: score}`` to publish next to the destination (None: publish none)."""

    def on_served_endpoint(self, address: str) -> None:
        """The proxy reports that ``address`` served the request."""

    def on_response_headers(self, status: int, headers: Mapping[str, str]) -> None: ...

    def on_response_body(self, chunk: bytes, end_of_stream: bool) -> None: ...

    def on_done(self, completed: bool) -> None: ...


class Director(Protocol):
    """The request-control layer, as the stream handler needs it."""

    async def route(
        self, headers: Mapping[str, str], body: bytes | None, subset: Sequence[str] | None
    ) -> RoutedRequest: ...

    def on_rejected(self, headers: Mapping[str, str], error: RequestError) -> None: ...


class Phase(enum.Enum):
    """Where a stream is in the HTTP exchange."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    UPSTREAM = "upstream"  # routed; request and response flowing through Envoy
    CLOSED = "closed"  # answered with an immediate response; nothing more is owed


class ProtocolError(Exception):
    """Envoy sent something the protocol does not allow at this point. Raised out of
    :meth:`ProtocolStream.handle` / :meth:`ProtocolStream.handle_now` (after the
    request's state is released) so the transport fails this gRPC stream with
    ``INVALID_ARGUMENT``, as the upstream EPP does; never a client's fault."""


class StreamClosedError(Exception):
    """Routing finished after the stream was closed; there is nobody to answer."""


def _details(text: str) -> str:
    # Envoy's response-code details must not contain whitespace.
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text)[:120]


class ProtocolStream:
    """One ext_proc stream. Feed it each ProcessingRequest; it returns what to send back."""

    def __init__(
        self,
        director: Director,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        default_request_body_mode: int = DUPLEX,
        default_response_body_mode: int = DUPLEX,
    ) -> None:
        self._director = director
        self._max_body = max_body_bytes
        self._request_mode = default_request_body_mode
        self._response_mode = default_response_body_mode
        self.phase = Phase.REQUEST_HEADERS
        self._headers: dict[str, str] = {}
        self._subset: list[str] | None = None
        self._body: list[bytes] = []
        self._body_len = 0
        self._routed: RoutedRequest | None = None
        self._completed = False
        self._closed = False  # the gRPC stream is gone: nothing routed may outlive it

    @property
    def routed(self) -> RoutedRequest | None:
        """The director's handle for this request, once routed."""
        return self._routed

    def needs_routing(self, request: msg.ProcessingRequest) -> bool:
        """Whether this message completes the request, so answering it means routing
        (the only step that may await). Every other message is answered by
        :meth:`handle_now` without suspending."""
        if self.phase is Phase.CLOSED:
            return False
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            return self.phase is Phase.REQUEST_HEADERS and request.request_headers.end_of_stream
        if kind == "request_body":
            return self.phase is Phase.REQUEST_BODY and request.request_body.end_of_stream
        if kind == "request_trailers":
            return self.phase is Phase.REQUEST_BODY
        return False

    async def handle(self, request: msg.ProcessingRequest) -> list[msg.Answer]:
        """Process one message from Envoy; never raises (errors become immediate responses)."""
        if not self.needs_routing(request):
            return self.handle_now(request)
        try:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                self._accept_request_headers(request)
                routed = await self._route(None)
                self.phase = Phase.UPSTREAM
                return [msg.routed_headers_response(
                    routed.destination, routed.set_headers, routed.remove_headers,
                    scores=routed.endpoint_scores)]
            if kind == "request_body":
                self._append_body(request.request_body)
                return await self._route_with_body(end_of_stream=True)
            out = await self._route_with_body(end_of_stream=False)  # trailers end the body
            return [*out, msg.EMPTY_REQUEST_TRAILERS]
        except RequestError as exc:
            return [self._refuse(exc)]
        except ProtocolError:
            self._abandon()
            raise
        except StreamClosedError:
            return []
        except Exception:
            log.exception("ext_proc stream failed in phase %s", self.phase.value)
            return [self._refuse(RequestError("internal error in the endpoint picker"))]

    def handle_now(self, request: msg.ProcessingRequest) -> list[msg.Answer]:
        """Answer a message that does not route (see :meth:`needs_routing`)."""
        if self.phase is Phase.CLOSED:
            return []  # after an immediate response Envoy may still flush messages
        kind = request.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self._on_request_headers(request)
            if kind == "request_body":
                if self.phase is not Phase.REQUEST_BODY:
                    raise ProtocolError(f"request body received in phase {self.phase.value}")
                self._append_body(request.request_body)
                return []
            if kind == "request_trailers":
                return [msg.EMPTY_REQUEST_TRAILERS]
            if kind == "response_headers":
                return self._on_response_headers(request.response_headers,
                                                 msg.read_served_endpoint(request))
            if kind == "response_body":
                return self._on_response_body(request.response_body)
            if kind == "response_trailers":
                self._finish(completed=True)
                return [msg.EMPTY_RESPONSE_TRAILERS]
            raise ProtocolError(f"unexpected message {kind!r}")
        except RequestError as exc:
            return [self._refuse(exc)]
        except ProtocolError:
            self._abandon()
            raise
        except Exception:
            log.exception("ext_proc stream failed in phase %s", self.phase.value)
            return [self._refuse(RequestError("internal error in the endpoint picker"))]

    def close(self) -> None:
        """The gRPC stream ended (normally or not): release the request's state. A
        routing step still running when this is called releases what it took as soon
        as it returns (see :meth:`_route`)."""
        self._closed = True
        self._finish(completed=self._completed)

    def refuse(self, error: RequestError) -> msg.ProcessingResponse:
        """End the request with an immediate response (a transport-level refusal)."""
        return self._refuse(error)

    @property
    def buffered_bytes(self) -> int:
        """Request body bytes held until the body is complete."""
        return self._body_len if self.phase is Phase.REQUEST_BODY else 0

    def _abandon(self) -> None:
        """A protocol violation ends the stream: settle the request once."""
        if self._routed is None and self.phase is not Phase.CLOSED:
            self._director.on_rejected(self._headers, RequestError("ext_proc protocol error"))
        self._finish(completed=False)
        self.phase = Phase.CLOSED

    # -- request path ---------------------------------------------------------------

    def _accept_request_headers(self, request: msg.ProcessingRequest) -> None:
        if self.phase is not Phase.REQUEST_HEADERS:
            raise ProtocolError(f"request headers received in phase {self.phase.value}")
        if request.HasField("protocol_config"):
            cfg = request.protocol_config
            self._request_mode = cfg.request_body_mode
            self._response_mode = cfg.response_body_mode
        self._headers = msg.read_headers(request.request_headers.headers)
        self._subset = msg.read_subset_hint(request)

    def _on_request_headers(self, request: msg.ProcessingRequest) -> list[msg.Answer]:
        self._accept_request_headers(request)
        if self._request_mode == DUPLEX:
            self.phase = Phase.REQUEST_BODY
            return []  # the headers answer waits until the body is complete
        if self._request_mode == BUFFERED:
            self.phase = Phase.REQUEST_BODY
            return [msg.EMPTY_REQUEST_HEADERS]
        raise RequestError(
            "ext_proc request_body_mode must be FULL_DUPLEX_STREAMED or BUFFERED "
            f"to route on the body (got {BodyMode.Name(self._request_mode)})"
        )

    def _append_body(self, body: msg.pb.HttpBody) -> None:
        if body.body:
            self._body_len += len(body.body)
            if self._body_len > self._max_body:
                raise PayloadTooLargeError(f"request body exceeds {self._max_body} bytes")
            self._body.append(body.body)

    async def _route_with_body(self, *, end_of_stream: bool) -> list[msg.Answer]:
        raw = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        routed = await self._route(raw or None)
        self.phase = Phase.UPSTREAM
        replacement = routed.body
        if self._request_mode == BUFFERED:
            return [msg.routed_body_response(
                routed.destination, routed.set_headers, routed.remove_headers,
                body=replacement, scores=routed.endpoint_scores)]
        # Duplex: headers answer first, then the body. The body is re-sent without a
        # content-length, so Envoy forwards it chunked.
        remove = ("content-length", *routed.remove_headers)
        return [
            msg.routed_headers_response(routed.destination, routed.set_headers, remove,
                                        scores=routed.endpoint_scores),
            *msg.streamed_body_chunks(raw if replacement is None else replacement,
                                      end_of_stream=end_of_stream),
        ]

    async def _route(self, body: bytes | None) -> RoutedRequest:
        routed = await self._director.route(self._headers, body, self._subset)
        if self._closed:
            # The stream was reset while routing ran: release the load just taken.
            routed.on_done(False)
            raise StreamClosedError("the ext_proc stream closed while routing")
        self._routed = routed
        return routed

    # -- response path --------------------------------------------------------------

    def _on_response_headers(self, headers: msg.pb.HttpHeaders, served: str | None
                             ) -> list[msg.Answer]:
        values = msg.read_headers(headers.headers)
        routed = self._routed
        if routed is not None:
            if served is not None:  # before the status: a 503 belongs to who served it
                routed.on_served_endpoint(served)
            status_text = values.get(":status", "0")
            routed.on_response_headers(int(status_text) if status_text.isdigit() else 0, values)
            if headers.end_of_stream:
                routed.on_response_body(b"", True)
        if headers.end_of_stream:
            self._finish(completed=True)
        return [msg.EMPTY_RESPONSE_HEADERS]

    def _on_response_body(self, body: msg.pb.HttpBody) -> list[msg.Answer]:
        if self._routed is not None:
            self._routed.on_response_body(body.body, body.end_of_stream)
        if body.end_of_stream:
            self._finish(completed=True)
        if self._response_mode == DUPLEX:
            # Every streamed token passes here: the echo is built as bytes, not protobuf.
            return [wire.encode_response_body_echo(body.body, body.end_of_stream)]
        return [msg.EMPTY_RESPONSE_BODY]

    # -- endings --------------------------------------------------------------------

    def _refuse(self, error: RequestError) -> msg.ProcessingResponse:
        if self._routed is None:
            self._director.on_rejected(self._headers, error)
        self._finish(completed=False)
        self.phase = Phase.CLOSED
        return msg.immediate_response(
            error.status, error.body(), _details(f"epp_{error.status}_{error.message}")
        )

    def _finish(self, *, completed: bool) -> None:
        self._completed = self._completed or completed
        routed, self._routed = self._routed, None
        if routed is not None:
            routed.on_done(self._completed)
