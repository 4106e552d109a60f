"""The grpc.aio ``ExternalProcessor`` servicer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.extproc import messages as msg
from epp.extproc.stream import (
    DEFAULT_MAX_BODY_BYTES,
    Director,
    ProtocolError,
    ProtocolStream,
)

log = logging.getLogger(__name__)


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    """Runs one :class:`ProtocolStream` per Envoy stream (one stream per HTTP request)."""

    def __init__(self, director: Director, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self._director = director
        self._max_body = max_body_bytes

    async def Process(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[msg.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[msg.Answer]:
        """Answer Envoy's messages for one HTTP request, in order."""
        stream = ProtocolStream(self._director, max_body_bytes=self._max_body)
        try:
            async for request in request_iterator:
                try:
                    responses = await stream.handle(request)
                except ProtocolError as exc:
                    # A proxy that breaks the protocol fails its own stream, no traceback.
                    log.warning("ext_proc stream: %s", exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                for response in responses:
                    yield response
        finally:
            stream.close()  # any ending, a reset included: settle the request once


def _serialize(answer: msg.Answer) -> bytes:
    # Streamed-body echoes arrive already serialized (see epp.extproc.wire).
    return answer if type(answer) is bytes else answer.SerializeToString()  # type: ignore[union-attr]


def add_to_server(servicer: ExtProcServicer, server: grpc.aio.Server) -> None:
    """Register the servicer on a gRPC server."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Process, request_deserializer=msg.ProcessingRequest.FromString,
        response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        msg.SERVICE_NAME, {msg.METHOD_NAME: handler}),))
