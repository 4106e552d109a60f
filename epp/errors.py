"""Errors that carry the HTTP answer a request should get.

Any layer may raise a :class:`RequestError`; the ext_proc stream handler is the one
boundary that turns it into an Envoy ``ImmediateResponse``.
"""

from __future__ import annotations

import json


class RequestError(Exception):
    """A request refused with an HTTP status and an OpenAI-style JSON error body."""

    status: int = 500
    error_type: str = "InternalServerError"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def body(self) -> bytes:
        """The JSON body sent to the client (OpenAI error shape, as vLLM answers)."""
        return json.dumps(
            {"error": {"message": self.message, "type": self.error_type, "code": self.status}}
        ).encode()


class BadRequestError(RequestError):
    """The request body cannot be routed (not JSON, not an object, no model...)."""

    status = 400
    error_type = "BadRequestError"


class PayloadTooLargeError(RequestError):
    """The request body is larger than the configured limit."""

    status = 413
    error_type = "PayloadTooLargeError"


class NoEndpointsError(RequestError):
    """No endpoint can take the request (empty pool, empty subset)."""

    status = 503
    error_type = "ServiceUnavailableError"


class UnschedulableError(RequestError):
    """Every candidate was filtered out, or the request was shed."""

    status = 429
    error_type = "TooManyRequestsError"
