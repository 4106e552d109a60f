"""Client input the OpenAI parser must refuse with a 4xx (never another exception), and
accept without looking at what the EPP does not route on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.api.openai import (
    MAX_JSON_DEPTH,
    TOKEN_ID_LIMIT,
    ChatPrompt,
    TextPrompt,
    TokenPrompt,
    parse_request,
)
from epp.errors import BadRequestError, RequestError

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
PATHS = (COMPLETIONS, CHAT, "/v1/responses", "/v1/embeddings")


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def refused(path: str, raw: bytes) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        parse_request(path, raw)
    assert info.value.status == 400
    error = json.loads(info.value.body())["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError" and error["message"]
    return info.value


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("raw", [
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-array"),
    pytest.param(b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                 id="deep-prompt"),
    pytest.param(b'{"model":"m","x":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
                 id="deep-object"),
])
def test_body_nested_100k_deep_is_a_400(path: str, raw: bytes) -> None:
    assert "nests deeper" in refused(path, raw).message


@pytest.mark.parametrize("path", PATHS)
def test_nesting_is_bounded_below_the_recursion_limit(path: str) -> None:
    deepest = MAX_JSON_DEPTH - 1  # the body object itself is one level
    fields = {"prompt": "p", "messages": [{"role": "user", "content": "c"}], "input": "i"}
    ok = {**fields, "x": json.loads("[" * deepest + "]" * deepest)}
    parse_request(path, body(**ok))
    too_deep = {**fields, "x": json.loads("[" * (deepest + 1) + "]" * (deepest + 1))}
    assert "nests deeper" in refused(path, body(**too_deep)).message


@pytest.mark.parametrize("prompt", [
    pytest.param([1, TOKEN_ID_LIMIT], id="2**32"),
    pytest.param([1, 10**30], id="huge"),
    pytest.param([1, -1], id="negative"),
    pytest.param([1, 2.0], id="float"),
    pytest.param([1, True], id="bool"),
    pytest.param([1, "2"], id="string"),
    pytest.param([1, None], id="null"),
    pytest.param([[1, 2], [3, TOKEN_ID_LIMIT]], id="batch-2**32"),
    pytest.param([[1, 2], [True]], id="batch-bool"),
    pytest.param([[1, 2], [[3]]], id="batch-nested"),
    pytest.param([[1], []], id="batch-empty"),
])
def test_out_of_range_token_ids_are_a_400(prompt: list[Any]) -> None:
    refused(COMPLETIONS, body(prompt=prompt))


def test_token_ids_up_to_uint32_are_accepted() -> None:
    request = parse_request(COMPLETIONS, body(prompt=[0, 1, TOKEN_ID_LIMIT - 1]))
    assert request.prompt == TokenPrompt(((0, 1, TOKEN_ID_LIMIT - 1),))
    batch = parse_request(COMPLETIONS, body(prompt=[[5], [6, 7]]))
    assert batch.prompt == TokenPrompt(((5,), (6, 7)))


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n", "temperature",
                                   "top_p", "top_k", "seed", "logprobs", "presence_penalty"])
@pytest.mark.parametrize("value", [10**1000, -(10**1000), 1e308, -1e308, -1, 0, "x", None,
                                   [1], {"a": 1}, True])
def test_sampling_params_of_any_value_do_not_fail_routing(field: str, value: Any) -> None:
    """The EPP routes without validating sampling params; the engine answers for them."""
    raw = json.dumps({"model": "m", "prompt": "p", field: value}).encode()
    assert parse_request(COMPLETIONS, raw).prompt == TextPrompt(("p",))


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"model":"m","prompt":"\xff"}', id="in-string"),
    pytest.param(b'{"model":"m","prompt":"p"}\xff', id="after-object"),
    pytest.param(b'\xfe\xff{"model":"m","prompt":"p"}', id="utf16-bom"),
    pytest.param('{"model":"m","prompt":"é"}'.encode("latin-1"), id="latin-1"),
])
def test_invalid_utf8_is_a_400(raw: bytes) -> None:
    assert "UTF-8" in refused(COMPLETIONS, raw).message


@pytest.mark.parametrize("raw", [b"[]", b'["model"]', b'"m"', b"1", b"null", b"true", b"",
                                 b"1e999", b"{", b"NaN"])
def test_non_object_body_is_a_400(raw: bytes) -> None:
    refused(CHAT, raw)


@pytest.mark.parametrize("content,text", [
    pytest.param("hi", "hi", id="string"),
    pytest.param(None, "", id="null"),
    pytest.param([], "", id="no-parts"),
    pytest.param([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab",
                 id="text-parts"),
    pytest.param([{"type": "image_url", "image_url": {"url": "data:,"}},
                  {"type": "text", "text": "a"}], "a", id="image-and-text"),
    pytest.param([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "",
                 id="audio"),
    pytest.param([{"type": "refusal", "refusal": "no"}], "", id="refusal"),
    pytest.param(["a", "b"], "ab", id="bare-strings"),
])
def test_every_openai_content_shape_is_routed(content: Any, text: str) -> None:
    messages = [{"role": "assistant", "content": content, "tool_calls": [{"id": "1"}]}]
    prompt = parse_request(CHAT, body(messages=messages)).prompt
    assert isinstance(prompt, ChatPrompt)
    assert prompt.messages[0].text == text


@pytest.mark.parametrize("messages", [
    pytest.param("hi", id="string"),
    pytest.param({"role": "user"}, id="object"),
    pytest.param([], id="empty"),
    pytest.param([1], id="number-message"),
    pytest.param([{"content": "hi"}], id="no-role"),
    pytest.param([{"role": 1, "content": "hi"}], id="numeric-role"),
    pytest.param([{"role": "user", "content": 1}], id="numeric-content"),
    pytest.param([{"role": "user", "content": {"text": "hi"}}], id="object-content"),
    pytest.param([{"role": "user", "content": [1]}], id="numeric-part"),
    pytest.param([{"role": "user", "content": [None]}], id="null-part"),
])
def test_malformed_messages_are_a_400(messages: Any) -> None:
    refused(CHAT, body(messages=messages))


# Any JSON value, nested a little: the shapes clients actually send, and wrong ones.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["role", "content", "text", "type", "x"]), children,
                      max_size=4),
    max_leaves=20,
)
# Around the uint32 range, where valid ids end.
token_ids = st.integers(-(2**33), 2**33) | st.integers(0, 300)
request_fields = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.text(max_size=4), json_values),
    "prompt": st.one_of(st.lists(token_ids, max_size=4),
                        st.lists(st.lists(token_ids, max_size=3), max_size=3), json_values),
    "messages": st.one_of(
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"])},
                                       optional={"content": json_values}), max_size=3),
        json_values),
    "input": json_values,
    "instructions": json_values,
    "tools": json_values,
    "stream": json_values,
    "stream_options": json_values,
    "max_tokens": json_values,
    "cache_salt": json_values,
})


def assert_parses_or_4xx(path: str, raw: bytes) -> None:
    """The parser's contract: a request the rest of the EPP can use, or a 4xx."""
    try:
        request = parse_request(path, raw)
    except RequestError as exc:
        assert 400 <= exc.status < 500
        json.loads(exc.body())
        return
    if isinstance(request.prompt, TokenPrompt):  # keyable as uint32 by the precise scorer
        assert all(type(t) is int and 0 <= t < TOKEN_ID_LIMIT
                   for seq in request.prompt.sequences for t in seq)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), fields=request_fields)
def test_any_json_object_parses_or_is_a_4xx(path: str, fields: dict[str, Any]) -> None:
    assert_parses_or_4xx(path, json.dumps(fields).encode())


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(PATHS), value=json_values)
def test_any_json_value_parses_or_is_a_4xx(path: str, value: Any) -> None:
    assert_parses_or_4xx(path, json.dumps(value).encode())


@settings(max_examples=100, deadline=None)
@given(path=st.sampled_from(PATHS), depth=st.integers(1, 5000),
       pattern=st.lists(st.sampled_from([b"[", b'{"x":']), min_size=1, max_size=8))
def test_any_nesting_parses_or_is_a_4xx(path: str, depth: int, pattern: list[bytes]) -> None:
    opens = [pattern[i % len(pattern)] for i in range(depth)]
    closes = b"".join(b"]" if o == b"[" else b"}" for o in reversed(opens))
    nested = b"".join(opens) + b"1" + closes
    assert_parses_or_4xx(path, b'{"model":"m","prompt":"p","messages":[{"role":"user"}],'
                               b'"x":' + nested + b"}")


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(PATHS), raw=st.binary(max_size=64))
def test_any_bytes_parse_or_are_a_4xx(path: str, raw: bytes) -> None:
    assert_parses_or_4xx(path, b'{"model":"m","prompt":' + raw)
    assert_parses_or_4xx(path, raw)
