"""OpenTelemetry spans of the request path (``--tracing``), configured by the standard
``OTEL_*`` variables, as the upstream picker's chart sets them.

One ``epp.request`` span per routed request (a child of the caller's ``traceparent`` when
the gateway propagates one), with ``epp.parse`` (parse and admit), ``epp.prefix_match``
(tokenize, block keys, index lookup) and ``epp.schedule`` beneath it. The exporter is
``OTEL_TRACES_EXPORTER`` (``otlp``, the default, over gRPC to
``OTEL_EXPORTER_OTLP_ENDPOINT``; ``console``; ``none``), the sampler
``OTEL_TRACES_SAMPLER``/``_ARG``, the resource ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES``. Spans are batched and exported from a background thread.

Off (the default), the director holds :data:`NO_TRACING`, whose spans are one shared
no-op context manager, and the OpenTelemetry packages are never imported; they are the
optional extra ``epp[tracing]``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

# The service name spans carry when OTEL_SERVICE_NAME is unset.
DEFAULT_SERVICE_NAME = "epp"
TRACER_NAME = "epp"
SUPPORTED_EXPORTERS = ("otlp", "console", "none")
_NULL: AbstractContextManager[None] = contextlib.nullcontext()


class TracingError(Exception):
    """Tracing was asked for but cannot be set up; the message says why."""


class NoTracing:
    """The tracer when tracing is off: every call is a no-op."""

    enabled = False

    def request_span(self, headers: Mapping[str, str]) -> AbstractContextManager[None]:
        """No span."""
        return _NULL

    def span(self, name: str) -> AbstractContextManager[None]:
        """No span."""
        return _NULL

    def annotate(self, key: str, value: str | int | float | bool) -> None:
        """Nothing to annotate."""

    def shutdown(self) -> None:
        """Nothing to flush."""


NO_TRACING = NoTracing()


class OtelTracing:
    """Spans through an OpenTelemetry ``TracerProvider`` owned by one app (not the
    process-global provider, so two apps in one process do not share it)."""

    enabled = True

    def __init__(self, provider: Any) -> None:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, get_current_span

        self._provider = provider
        self._tracer = provider.get_tracer(TRACER_NAME)
        self._extract = extract
        self._server = SpanKind.SERVER
        self._current = get_current_span

    def request_span(self, headers: Mapping[str, str]) -> AbstractContextManager[Any]:
        """The root span of one request, continuing the caller's trace if it sent one."""
        return self._request_span(headers)

    @contextlib.contextmanager
    def _request_span(self, headers: Mapping[str, str]) -> Iterator[Any]:
        parent = self._extract(dict(headers))
        with self._tracer.start_as_current_span("epp.request", context=parent,
                                                kind=self._server) as span:
            rid = headers.get("x-request-id")
            if rid:
                span.set_attribute("epp.request_id", rid)
            yield span

    def span(self, name: str) -> AbstractContextManager[Any]:
        """A child of the current span."""
        return self._tracer.start_as_current_span(name)  # type: ignore[no-any-return]

    def annotate(self, key: str, value: str | int | float | bool) -> None:
        """Set an attribute on the current span."""
        self._current().set_attribute(key, value)

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter thread (blocks)."""
        self._provider.shutdown()


Tracing = NoTracing | OtelTracing


def setup_tracing(*, exporter: Any = None) -> OtelTracing:
    """A tracer configured from the ``OTEL_*`` environment variables. ``exporter``
    replaces the one they name (tests pass an in-memory one). Raises
    :class:`TracingError` when the packages are missing or a variable is wrong."""
    env = os.environ
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise TracingError("--tracing needs the OpenTelemetry SDK: pip install 'epp[tracing]'")
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter is None:
        kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
        if kind not in SUPPORTED_EXPORTERS:
            raise TracingError(f"OTEL_TRACES_EXPORTER={kind!r}: use one of "
                               f"{', '.join(SUPPORTED_EXPORTERS)}")
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                           env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
        if kind == "otlp" and protocol != "grpc":
            raise TracingError(f"OTLP protocol {protocol!r}: only grpc is supported "
                               "(the upstream picker's exporter)")
        if kind == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError as exc:
                # xds-protos ships its own, older copy of opentelemetry/proto/*; whichever
                # of the two distributions pip installed last owns those files.
                raise TracingError(
                    f"the OTLP exporter cannot be imported ({exc}); if xds-protos was "
                    "installed after opentelemetry-proto it replaced its files: "
                    "pip install --force-reinstall --no-deps opentelemetry-proto") from exc
            exporter = OTLPSpanExporter()  # endpoint, headers, TLS from OTEL_EXPORTER_OTLP_*
        elif kind == "console":
            exporter = ConsoleSpanExporter()
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; without a name
    # from either, the SDK says "unknown_service", ours says what the spans come from.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return OtelTracing(provider)
