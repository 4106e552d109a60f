"""OpenAI response shapes as vLLM produces them: bodies, SSE chunks, usage and errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import msgspec

from epp.sim.engine import Completion

JsonObject = dict[str, Any]


def error_body(status: int, message: str, *, param: str | None = None) -> JsonObject:
    """vLLM's error shape, e.g. ``{"error": {"message", "type": "BadRequestError", ...}}``."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # non-standard status codes have no phrase
        phrase = "Unknown"
    error_type = phrase.replace(" ", "").replace("-", "")
    if not error_type.endswith("Error"):  # "Internal Server Error" is not doubled
        error_type += "Error"
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def usage(completions: Sequence[Completion]) -> JsonObject:
    """OpenAI ``usage`` summed over all choices, with vLLM's cached-token detail."""
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in completions)},
    }


def models_list(names: Sequence[str], created: int, adapters: Sequence[str] = ()) -> JsonObject:
    """The ``GET /v1/models`` body: served names, then LoRA adapters (parent: the base)."""
    base = names[0]
    cards: list[tuple[str, str, str | None]] = [(name, name, None) for name in names]
    cards += [(name, name, base) for name in adapters]
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
            }
            for name, root, parent in cards
        ],
    }


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """Identity fields shared by a response and all its chunks."""

    id: str
    created: int
    model: str


class ResponseFormat:
    """Response shapes shared by the completion endpoints; subclasses fill in the choices."""

    id_prefix: ClassVar[str] = ""
    response_object: ClassVar[str] = ""
    chunk_object: ClassVar[str] = ""

    def response(self, head: ResponseMeta, completions: Sequence[Completion]) -> JsonObject:
        """Non-streaming body."""
        choices = [self._choice(index, c) for index, c in enumerate(completions)]
        return self._envelope(head, self.response_object, choices, usage(completions))

    def token_chunks(
        self, head: ResponseMeta, index: int, token: str, first: bool, finish_reason: str | None
    ) -> list[JsonObject]:
        """The SSE chunk(s) carrying one token of choice ``index``."""
        raise NotImplementedError

    def usage_chunk(self, head: ResponseMeta, completions: Sequence[Completion]) -> JsonObject:
        """The final chunk sent when ``stream_options.include_usage`` is true."""
        return self._envelope(head, self.chunk_object, [], usage(completions))

    def _choice(self, index: int, completion: Completion) -> JsonObject:
        raise NotImplementedError

    @staticmethod
    def _envelope(
        head: ResponseMeta, obj: str, choices: list[JsonObject], usage_: JsonObject | None = None
    ) -> JsonObject:
        body: JsonObject = {
            "id": head.id,
            "object": obj,
            "created": head.created,
            "model": head.model,
            "choices": choices,
        }
        if usage_ is not None:
            body["usage"] = usage_
        return body


class CompletionFormat(ResponseFormat):
    """Response shapes of ``/v1/completions``."""

    id_prefix = "cmpl-"
    response_object = "text_completion"
    chunk_object = "text_completion"

    def token_chunks(
        self, head: ResponseMeta, index: int, token: str, first: bool, finish_reason: str | None
    ) -> list[JsonObject]:
        """One chunk per token."""
        choice = _text_choice(index, token, finish_reason)
        return [self._envelope(head, self.chunk_object, [choice])]

    def _choice(self, index: int, completion: Completion) -> JsonObject:
        return _text_choice(index, completion.text, completion.finish_reason)


class ChatFormat(ResponseFormat):
    """Response shapes of ``/v1/chat/completions``."""

    id_prefix = "chatcmpl-"
    response_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def token_chunks(
        self, head: ResponseMeta, index: int, token: str, first: bool, finish_reason: str | None
    ) -> list[JsonObject]:
        """One chunk per token, preceded on the first token by vLLM's role-only chunk."""
        chunks: list[JsonObject] = []
        if first:
            # vLLM announces the role once output starts, so TTFT measured on it holds.
            role = _delta_choice(index, {"role": "assistant", "content": ""}, None)
            chunks.append(self._envelope(head, self.chunk_object, [role]))
        choice = _delta_choice(index, {"content": token}, finish_reason)
        chunks.append(self._envelope(head, self.chunk_object, [choice]))
        return chunks

    def _choice(self, index: int, completion: Completion) -> JsonObject:
        return {
            "index": index,
            "message": {"role": "assistant", "content": completion.text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": completion.finish_reason,
            "stop_reason": None,
        }


def _text_choice(index: int, text: str, finish_reason: str | None) -> JsonObject:
    return {
        "index": index,
        "text": text,
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
    }


def _delta_choice(index: int, delta: JsonObject, finish_reason: str | None) -> JsonObject:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def encode(body: Mapping[str, Any]) -> bytes:
    """Serialize a JSON body."""
    return msgspec.json.encode(body)
