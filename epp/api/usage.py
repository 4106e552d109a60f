"""Token usage from OpenAI responses: whole JSON bodies and SSE streams.

The parser is fed response body chunks as Envoy streams them. For SSE it keeps only the
last ``data:`` line that mentions ``"usage"`` and decodes it at the end, so a long stream
costs a substring search per chunk, not a JSON decode per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()

# JSON bodies larger than this are passed through without looking for usage: vLLM
# responses are far smaller, and buffering a huge body only to count tokens costs memory.
MAX_JSON_USAGE_BODY = 16 * 1024 * 1024
# An SSE line longer than this without a newline is not an OpenAI event; stop buffering it.
MAX_SSE_LINE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts a model server reported for one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None


def usage_from_object(obj: Any) -> Usage | None:
    """Extract usage from a decoded response or stream event (chat, completions, responses)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")  # /v1/responses "response.completed" event
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt_tokens=prompt if type(prompt) is int else 0,
        completion_tokens=completion if type(completion) is int else 0,
        cached_tokens=cached if type(cached) is int else None,
    )


def is_event_stream(content_type: str) -> bool:
    """Whether a response ``content-type`` is server-sent events."""
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class UsageParser:
    """Incremental usage extraction from a response body (JSON or SSE).

    Built to cost next to nothing per streamed chunk: an SSE chunk is searched for the
    ``"usage"`` key with one substring search, and the line that carries it is only kept,
    not decoded; decoding happens when a newer usage line replaces it (vLLM's
    continuous usage stats) or at :meth:`finish`. A JSON body is decoded once, at the
    end, as usage can only be read from the whole object."""

    __slots__ = ("_sse", "_buf", "_overflow", "_line", "usage")

    def __init__(self, content_type: str) -> None:
        self._sse = is_event_stream(content_type)
        self._buf = bytearray()  # JSON: the body so far; SSE: an unfinished line
        self._overflow = False
        self._line: bytes | None = None  # the last SSE line with usage, not decoded yet
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        """Consume one body chunk."""
        if self._overflow or not chunk:
            return
        if not self._sse:
            if len(self._buf) + len(chunk) > MAX_JSON_USAGE_BODY:
                self._overflow = True
                self._buf.clear()
            else:
                self._buf += chunk
            return
        buf = self._buf
        if buf:  # a line continues from the last chunk
            buf += chunk
            data: bytes | bytearray = buf
        else:
            data = chunk
        end = data.rfind(b"\n")
        if end < 0:
            if data is chunk:
                buf += chunk
            if len(buf) > MAX_SSE_LINE:
                self._overflow = True
                buf.clear()
            return
        if b'"usage"' in data:
            for line in bytes(data[:end + 1]).splitlines():
                self._keep(line)
        if data is buf:
            del buf[:end + 1]
        elif end + 1 < len(data):
            buf += data[end + 1:]

    def _keep(self, line: bytes) -> None:
        """Keep an SSE line that carries usage, decoding the one it replaces (an earlier
        valid usage must win over a later line that does not decode)."""
        if line.startswith(b"data:") and b'"usage"' in line:
            if self._line is not None:
                self._decode(self._line)
            self._line = line

    def _decode(self, line: bytes) -> None:
        payload = line[5:].strip()
        try:
            usage = usage_from_object(_decoder.decode(payload))
        except msgspec.DecodeError:
            return
        if usage is not None:
            self.usage = usage

    def finish(self) -> Usage | None:
        """Call at end of stream; returns the last usage seen, if any."""
        if self._sse:
            if not self._overflow and self._buf:
                self._keep(bytes(self._buf).strip())
            if self._line is not None:
                self._decode(self._line)
                self._line = None
        elif self._buf and not self._overflow:
            try:
                self.usage = usage_from_object(_decoder.decode(bytes(self._buf)))
            except msgspec.DecodeError:
                pass
        self._buf.clear()
        return self.usage
