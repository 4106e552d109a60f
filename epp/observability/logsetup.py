"""Process logging: the upstream picker's ``--zap-encoder`` / ``-v`` flags, and the request id
on every request-scoped line.

``json`` writes one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, then
``request_id`` and any ``extra=`` fields), as log shippers expect from the upstream image;
``console`` stays human-readable. The request id lives in a context variable that the
director sets per request (:func:`bind_request_id`): every line logged while that request
is being routed, in any module, carries it without being passed down.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import uuid
from collections.abc import Mapping
from typing import Any, TextIO

REQUEST_ID_HEADER = "x-request-id"
ENCODERS = ("json", "console")
# The upstream picker's verbosity scale (logr V-levels): 2 is its default ("DEFAULT"),
# 3 VERBOSE, 4 DEBUG, 5 TRACE. Python logging has nothing between INFO and DEBUG, so
# anything above the default shows DEBUG.
UPSTREAM_DEFAULT_VERBOSITY = 2

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "epp_request_id", default=None)
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "taskName"}


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    return _request_id.get()


def bind_request_id(headers: Mapping[str, str]) -> tuple[str, bool]:
    """Set this context's request id from ``x-request-id`` (a fresh UUID when missing or
    blank). Returns the id and whether it was generated."""
    given = headers.get(REQUEST_ID_HEADER, "").strip()
    rid = given or str(uuid.uuid4())
    _request_id.set(rid)
    return rid, not given


def verbosity_level(verbosity: int) -> int:
    """The Python log level for an upstream ``-v`` value."""
    return logging.INFO if verbosity <= UPSTREAM_DEFAULT_VERBOSITY else logging.DEBUG


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id (``None`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``,
    ``request_id`` when set, ``extra=`` fields, and ``error`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL logger: message``, with ``request_id=...`` appended inside a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid is None:
            return text
        head, sep, tail = text.partition("\n")  # keep a traceback below the id
        return f"{head} request_id={rid}{sep}{tail}"


def configure_logging(encoder: str, level: int, stream: TextIO | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) in ``encoder`` format: the
    picker's own (``epp.*``) from ``level``, other libraries' from INFO at the lowest
    (h2 and hpack log every frame at DEBUG, which would swamp the picker's lines)."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown log encoder {encoder!r} (json or console)")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if encoder == "json" else ConsoleFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.INFO))
    logging.getLogger("epp").setLevel(level)
