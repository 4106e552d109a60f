"""Parsing of OpenAI requests as vLLM accepts them, into engine ``GenerationRequest``s.

Pure functions (dict in, dataclass out); every rejection is an ``ApiError`` that the
HTTP layer turns into a vLLM-shaped JSON error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from epp.sim.engine import ChatMessage, GenerationRequest, render_chat_prompt
from epp.sim.formatting import JsonObject, error_body


class ApiError(Exception):
    """A request failure that becomes a vLLM-shaped JSON error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> JsonObject:
        """The JSON error body for this failure."""
        return error_body(self.status, self.message, param=self.param)


def decode_json_object(body: bytes) -> JsonObject:
    """Parse a request body that must be a JSON object, or raise a 400 ``ApiError``."""
    try:
        payload = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"Request body must be a JSON object, got {type(payload).__name__}")
    return payload


@dataclass(frozen=True, slots=True)
class ChatInput:
    """A chat request's messages and tools as sent, for the model's chat template."""

    messages: tuple[JsonObject, ...]
    tools: tuple[JsonObject, ...] | None = None


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What a completions or chat request asks for, independent of the endpoint."""

    model: str
    generations: tuple[GenerationRequest, ...]
    stream: bool
    include_usage: bool
    chat: ChatInput | None = None  # chat requests only
    # The output budget the client asked for; None: it set none and the default applies
    # (shortened to fit the context window, as vLLM does).
    requested_max_tokens: int | None = None


Parser = Callable[[JsonObject, Sequence[str], int], ParsedRequest]


def parse_completions(
    payload: JsonObject, served_models: Sequence[str], default_max_tokens: int
) -> ParsedRequest:
    """Parse a ``/v1/completions`` body; a list of prompts becomes a batch (one choice each)."""
    if "prompt" not in payload or payload["prompt"] is None:
        raise ApiError(400, "Field 'prompt' is required", param="prompt")
    requested = _max_tokens(payload, ("max_tokens",))
    max_tokens = default_max_tokens if requested is None else requested
    stream, include_usage = _stream_flags(payload)
    check_sampling_params(payload)
    generations = tuple(
        GenerationRequest(prompt_text=text, prompt_token_ids=ids, max_tokens=max_tokens)
        for text, ids in _prompts(payload["prompt"])
    )
    # Like vLLM: a malformed body is a 400 even when the model is unknown too.
    return ParsedRequest(_model(payload, served_models), generations, stream, include_usage,
                         requested_max_tokens=requested)


def parse_chat(
    payload: JsonObject, served_models: Sequence[str], default_max_tokens: int
) -> ParsedRequest:
    """Parse a ``/v1/chat/completions`` body into one generation over the rendered chat."""
    messages = payload.get("messages")
    if messages is None:
        raise ApiError(400, "Field 'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    tools = payload.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise ApiError(400, "'tools' must be a list of objects", param="tools")
    # vLLM prefers max_completion_tokens; max_tokens is the deprecated spelling.
    requested = _max_tokens(payload, ("max_completion_tokens", "max_tokens"))
    max_tokens = default_max_tokens if requested is None else requested
    stream, include_usage = _stream_flags(payload)
    check_sampling_params(payload)
    prompt = render_chat_prompt([_chat_message(i, m) for i, m in enumerate(messages)], tools)
    generation = GenerationRequest(prompt_text=prompt, max_tokens=max_tokens)
    chat = ChatInput(tuple(messages), tuple(tools) if tools is not None else None)
    model = _model(payload, served_models)
    return ParsedRequest(model, (generation,), stream, include_usage, chat,
                         requested_max_tokens=requested)


def _model(payload: JsonObject, served_models: Sequence[str]) -> str:
    model = payload.get("model")
    if model is None:  # vLLM serves model-less requests with its first served name
        return served_models[0]
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if model not in served_models:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    return model


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _max_tokens(payload: JsonObject, fields: Sequence[str]) -> int | None:
    """The output budget the client set (None: none). Its upper bound depends on the
    prompt's length and is checked by :func:`fit_context` once that is known."""
    for name in fields:
        value = payload.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise ApiError(400, f"'{name}' must be an integer >= 1, got {_short(value)}",
                           param=name)
        return int(value)
    return None


def _short(value: object) -> str:
    """``repr`` for an error message, cut short: a client's value may be huge."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# vLLM's SamplingParams checks (``_verify_args``), each a 400 when it fails: the field,
# whether it must be an integer, and the rule as (accepts, how vLLM words the range).
# int64 bounds are pydantic's for ``seed``.
_INT64 = 2**63
_SAMPLING_RULES: tuple[tuple[str, bool, Callable[[float], bool], str], ...] = (
    ("n", True, lambda v: v >= 1, "must be at least 1"),
    ("best_of", True, lambda v: v >= 1, "must be at least 1"),
    ("temperature", False, lambda v: v >= 0, "must be non-negative"),
    ("top_p", False, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("top_k", True, lambda v: v >= -1, "must be 0 or -1 (disable), or at least 1"),
    ("min_p", False, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("presence_penalty", False, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    ("frequency_penalty", False, lambda v: -2 <= v <= 2, "must be in [-2, 2]"),
    ("repetition_penalty", False, lambda v: v > 0, "must be greater than zero"),
    ("seed", True, lambda v: -_INT64 <= v < _INT64, "must fit in a signed 64-bit integer"),
)


def check_sampling_params(payload: JsonObject) -> None:
    """Refuse sampling parameters vLLM refuses (a 400 naming the field), so a client sees
    the answer a real pod would give. Absent or null fields take vLLM's defaults."""
    for name, integer, accepts, rule in _SAMPLING_RULES:
        value = payload.get(name)
        if value is None:
            continue
        if integer and not _is_int(value):
            raise ApiError(400, f"{name} must be an integer, got {_short(value)}.", param=name)
        if not integer and not (_is_int(value) or isinstance(value, float)):
            raise ApiError(400, f"{name} must be a number, got {_short(value)}.", param=name)
        if (isinstance(value, float) and not math.isfinite(value)) or not accepts(value):
            raise ApiError(400, f"{name} {rule}, got {_short(value)}.", param=name)


def fit_context(parsed: ParsedRequest, count_tokens: Callable[[GenerationRequest], int],
                max_model_len: int) -> ParsedRequest:
    """Check every prompt against the context window as vLLM does, or raise a 400.

    A prompt must leave room for one output token; an explicit ``max_tokens`` must fit
    beside the prompt; the default budget is shortened to what fits (vLLM's default is
    all that fits).
    """
    fitted = []
    for generation in parsed.generations:
        prompt = count_tokens(generation)
        if prompt >= max_model_len:
            raise ApiError(
                400, f"This model's maximum context length is {max_model_len} tokens. "
                f"However, your request has {prompt} input tokens. Please reduce the length "
                "of the input messages.", param="messages" if parsed.chat else "prompt")
        room = max_model_len - prompt
        wanted = parsed.requested_max_tokens
        if wanted is not None and wanted > room:
            raise ApiError(
                400, f"'max_tokens' or 'max_completion_tokens' is too large: "
                f"{_short(wanted)}. This model's maximum context length is {max_model_len} "
                f"tokens and your request has {prompt} input tokens "
                f"({_short(wanted)} > {max_model_len} - {prompt}).", param="max_tokens")
        if generation.max_tokens > room:
            generation = dataclasses.replace(generation, max_tokens=room)
        fitted.append(generation)
    return dataclasses.replace(parsed, generations=tuple(fitted))


def _stream_flags(payload: JsonObject) -> tuple[bool, bool]:
    stream = payload.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = payload.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    if not stream:  # same rule as vLLM's request validation
        raise ApiError(
            400, "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(
            400, "'stream_options.include_usage' must be a boolean", param="stream_options"
        )
    return stream, bool(include_usage)


def _prompts(prompt: object) -> list[tuple[str | None, tuple[int, ...] | None]]:
    """Normalize the four prompt forms into (text, token ids) pairs, one per prompt."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(
            400,
            "'prompt' must be a string, a list of strings, or a non-empty list of token ids "
            "(or of token id lists)",
            param="prompt",
        )
    if all(isinstance(p, str) for p in prompt):
        return [(p, None) for p in prompt]
    if all(_is_int(p) for p in prompt):
        return [(None, _token_ids(prompt))]
    if all(isinstance(p, list) for p in prompt):
        return [(None, _token_ids(p)) for p in prompt]
    raise ApiError(
        400, "'prompt' must not mix strings, token ids and token id lists", param="prompt"
    )


def _token_ids(ids: list[Any]) -> tuple[int, ...]:
    if not ids:
        raise ApiError(400, "A token id prompt must not be empty", param="prompt")
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ApiError(400, "Token ids must be non-negative integers", param="prompt")
    return tuple(ids)


def _chat_message(index: int, message: object) -> ChatMessage:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{param} must be an object", param=param)
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ApiError(400, f"{param}.role must be a non-empty string", param=param)
    text = _content_text(message.get("content"), param)
    tool_calls = message.get("tool_calls")
    if tool_calls:
        # Tool calls are part of the prompt the model sees, so they count as tokens.
        text += msgspec.json.encode(tool_calls).decode()
    return ChatMessage(role=role, text=text)


def _content_text(content: object, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ApiError(400, f"{param}.content must be a string or a list of parts", param=param)
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ApiError(
                400, f"{param}.content parts must be objects with a 'type'", param=param
            )
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(
                    400, f"{param}.content text parts need a string 'text'", param=param
                )
            texts.append(text)
        # Non-text parts (images, audio) carry no text for this token estimate.
    return "\n".join(texts)
