"""Parse OpenAI-style inference requests into an :class:`LLMRequest`.

Supports ``/v1/completions`` (string, list of strings, token ids, lists of token ids),
``/v1/chat/completions`` (string or content-part messages, ``tools``) and a minimal
``/v1/responses``. Any other path with a JSON body that names a ``model`` is routed as a
generic request. The body is decoded once, with msgspec; the raw bytes are kept so the
request can be forwarded unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from epp.errors import BadRequestError

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()

# Deepest JSON nesting accepted. OpenAI bodies nest about 6 levels (messages -> content
# parts -> image_url) and tool or response-format JSON schemas add a few dozen at most;
# 128 leaves room for those and stays far below Python's recursion limit (1,000), so code
# that walks the body recursively later (chat templates, re-encoding, repr) cannot blow up.
MAX_JSON_DEPTH = 128
# Token ids are keyed as uint32 (``epp.kvcache.keys``): every real vocabulary is far
# smaller (~150k-260k). vLLM rejects ids outside its vocabulary with a 400; we cannot know
# the vocabulary here, so we reject what no vocabulary can hold.
TOKEN_ID_LIMIT = 2**32
_TokenIds = tuple[Annotated[int, msgspec.Meta(ge=0, lt=TOKEN_ID_LIMIT)], ...]


class RequestKind(enum.Enum):
    """Which OpenAI API a request targets."""

    COMPLETIONS = "completions"
    CHAT = "chat"
    RESPONSES = "responses"
    OTHER = "other"


_KIND_BY_PATH = {
    "/v1/completions": RequestKind.COMPLETIONS,
    "/v1/chat/completions": RequestKind.CHAT,
    "/v1/responses": RequestKind.RESPONSES,
}


@dataclass(frozen=True, slots=True)
class TextPrompt:
    """A completions prompt given as one or more strings."""

    texts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TokenPrompt:
    """A completions prompt given as token ids (one or more sequences)."""

    sequences: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message; ``text`` is its textual content with content parts joined."""

    role: str
    text: str
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A chat conversation (also used for ``/v1/responses`` input), with tools if any."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[Any, ...] = ()


Prompt = TextPrompt | TokenPrompt | ChatPrompt


@dataclass(slots=True)
class LLMRequest:
    """A parsed inference request, as the director and scheduler see it."""

    kind: RequestKind
    path: str
    model: str
    body: dict[str, Any]
    raw_body: bytes
    prompt: Prompt | None
    stream: bool = False
    include_usage: bool = False

    def estimated_tokens(self) -> int:
        """Prompt tokens before tokenization: about 4 characters a token (rounded up)."""
        return (self.prompt_chars() + 3) // 4

    def prompt_chars(self) -> int:
        """Characters of prompt text (token prompts count 4 characters a token)."""
        prompt = self.prompt
        if isinstance(prompt, TextPrompt):
            return sum(len(t) for t in prompt.texts)
        if isinstance(prompt, TokenPrompt):
            return 4 * sum(len(s) for s in prompt.sequences)
        if isinstance(prompt, ChatPrompt):
            return sum(len(m.text) for m in prompt.messages)
        return 0


def request_kind(path: str) -> RequestKind:
    """The API a request path targets (query string ignored)."""
    return _KIND_BY_PATH.get(path.split("?", 1)[0].rstrip("/"), RequestKind.OTHER)


def decode_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body, with a 400 that says what is wrong."""
    if not raw:
        raise BadRequestError("request body is empty; expected a JSON object")
    try:
        obj = _decoder.decode(raw)
    except RecursionError:  # msgspec recurses per level: a 100k-deep body lands here
        raise BadRequestError(
            f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError:  # msgspec raises this for bad bytes inside strings
        raise BadRequestError("request body is not valid UTF-8") from None
    except msgspec.DecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise BadRequestError(
                f"request body is not valid UTF-8 (byte {uexc.start})"
            ) from None
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequestError(
            f"request body must be a JSON object, got {_json_type(obj)}"
        )
    return obj


def check_depth(body: dict[str, Any], skip: str | None = None) -> None:
    """Refuse a body whose containers nest deeper than :data:`MAX_JSON_DEPTH`.

    Level by level, without recursion, so a deep body cannot exhaust the stack; the cost
    is one type check per container element (about a decode's worth for tool-heavy
    bodies). ``skip`` names a top-level field validated flat elsewhere (a completions
    ``prompt``: up to 128k token ids not worth walking twice).
    """
    level = [v for k, v in body.items() if (type(v) is dict or type(v) is list) and k != skip]
    depth = 1
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise BadRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level = below


def parse_request(path: str, raw: bytes) -> LLMRequest:
    """Parse a request body for routing; raises :class:`BadRequestError`."""
    body = decode_body(raw)
    model = body.get("model")
    if model is None:
        raise BadRequestError("missing required field 'model'")
    if not isinstance(model, str) or not model:
        raise BadRequestError("field 'model' must be a non-empty string")
    kind = request_kind(path)
    check_depth(body, "prompt" if kind is RequestKind.COMPLETIONS else None)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError("field 'stream' must be a boolean")
    options = body.get("stream_options")
    include_usage = (
        stream and isinstance(options, dict) and options.get("include_usage") is True
    )
    if kind is RequestKind.COMPLETIONS:
        prompt: Prompt | None = _completion_prompt(body)
    elif kind is RequestKind.CHAT:
        prompt = _chat_prompt(body)
    elif kind is RequestKind.RESPONSES:
        prompt = _responses_prompt(body)
    else:
        prompt = _generic_prompt(body)
    return LLMRequest(
        kind=kind,
        path=path,
        model=model,
        body=body,
        raw_body=raw,
        prompt=prompt,
        stream=stream,
        include_usage=include_usage,
    )


def with_model(request: LLMRequest, model: str) -> LLMRequest:
    """The same request sent as ``model``: the body's ``model`` field replaced and the body
    re-encoded, so what is tokenized, matched and forwarded all name the served model."""
    body = dict(request.body)
    body["model"] = model
    try:
        raw = _encoder.encode(body)
    except (msgspec.EncodeError, OverflowError) as exc:  # e.g. an integer beyond 64 bits
        raise BadRequestError(f"cannot rewrite the model of this body: {exc}") from None
    return dataclasses.replace(request, model=model, body=body, raw_body=raw)


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return "an object"


def _token_ids(value: list[Any], where: str) -> tuple[int, ...]:
    """Token ids as a tuple, or a 400: each must be an int (not a bool) in
    ``[0, TOKEN_ID_LIMIT)`` (checked in C: a 32k-token prompt takes ~0.4 ms)."""
    try:
        return msgspec.convert(value, _TokenIds, strict=True)
    except msgspec.ValidationError as exc:
        raise BadRequestError(
            f"{where} token ids must be integers in [0, {TOKEN_ID_LIMIT}): {exc}"
        ) from None


def _completion_prompt(body: dict[str, Any]) -> Prompt:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequestError("missing required field 'prompt'")
    if isinstance(prompt, str):
        return TextPrompt((prompt,))
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            if not all(isinstance(p, str) for p in prompt):
                raise BadRequestError("field 'prompt' mixes strings and other values")
            return TextPrompt(tuple(prompt))
        if type(first) is int:
            return TokenPrompt((_token_ids(prompt, "field 'prompt'"),))
        if isinstance(first, list):
            if not all(isinstance(p, list) and p for p in prompt):
                raise BadRequestError(
                    "field 'prompt' must be a list of non-empty lists of token ids"
                )
            return TokenPrompt(tuple(_token_ids(p, f"field 'prompt[{i}]'")
                                     for i, p in enumerate(prompt)))
    raise BadRequestError(
        "field 'prompt' must be a string, a list of strings, or token ids"
    )


def content_text(content: Any, where: str) -> str:
    """Text of a message ``content``: a string, null, or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
            else:
                raise BadRequestError(f"{where}.content[{i}] must be an object")
        return "".join(texts)
    raise BadRequestError(f"{where}.content must be a string, an array or null")


def _messages(items: list[Any], field_name: str) -> tuple[ChatMessage, ...]:
    messages = []
    for i, msg in enumerate(items):
        where = f"{field_name}[{i}]"
        if not isinstance(msg, dict):
            raise BadRequestError(f"{where} must be an object")
        role = msg.get("role")
        if not isinstance(role, str):
            raise BadRequestError(f"{where}.role must be a string")
        messages.append(ChatMessage(role, content_text(msg.get("content"), where), msg))
    return tuple(messages)


def _tools(body: dict[str, Any]) -> tuple[Any, ...]:
    tools = body.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise BadRequestError("field 'tools' must be an array")
    return tuple(tools)


def _chat_prompt(body: dict[str, Any]) -> Prompt:
    items = body.get("messages")
    if items is None:
        raise BadRequestError("missing required field 'messages'")
    if not isinstance(items, list) or not items:
        raise BadRequestError("field 'messages' must be a non-empty array")
    return ChatPrompt(_messages(items, "messages"), _tools(body))


def _responses_prompt(body: dict[str, Any]) -> Prompt:
    items = body.get("input")
    if items is None:
        raise BadRequestError("missing required field 'input'")
    messages: list[ChatMessage] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append(ChatMessage("system", instructions, {"role": "system"}))
    if isinstance(items, str):
        messages.append(ChatMessage("user", items, {"role": "user", "content": items}))
    elif isinstance(items, list):
        # Items without a role (function calls, reasoning) carry no prompt text we route on.
        messages.extend(
            _messages([m for m in items if isinstance(m, dict) and "role" in m], "input")
        )
    else:
        raise BadRequestError("field 'input' must be a string or an array")
    return ChatPrompt(tuple(messages), _tools(body))


def _generic_prompt(body: dict[str, Any]) -> Prompt | None:
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return TextPrompt((value,))
    return None
