"""Usage from streamed responses: the lazy SSE parser agrees with decoding every line."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.api.usage import Usage, UsageParser, usage_from_object


def reference(body: bytes) -> Usage | None:
    """Decode every ``data:`` line of the whole body; the last usage wins."""
    found = None
    for line in body.splitlines():
        line = line.strip()
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            usage = usage_from_object(msgspec.json.decode(line[5:].strip()))
        except msgspec.DecodeError:
            continue
        if usage is not None:
            found = usage
    return found


def token_event(i: int) -> bytes:
    return b'data: {"choices":[{"text":"t%d"}]}\n\n' % i


def usage_event(prompt: int, completion: int, cached: int | None = None) -> bytes:
    usage: dict[str, object] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"


EVENTS = st.lists(st.one_of(
    st.integers(0, 999).map(token_event),
    st.builds(usage_event, st.integers(0, 10_000), st.integers(0, 4096),
              st.one_of(st.none(), st.integers(0, 10_000))),
    st.just(b'data: {"usage": {broken\n\n'),  # a usage line that does not decode
    st.just(b"data: [DONE]\n\n"),
    st.just(b": keep-alive comment\n\n"),
), max_size=40)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(events=EVENTS, cuts=st.lists(st.integers(0, 4000), max_size=12),
       trailing_newline=st.booleans())
def test_any_chunking_finds_the_usage_decoding_every_line_would(
        events: list[bytes], cuts: list[int], trailing_newline: bool) -> None:
    body = b"".join(events)
    if not trailing_newline:
        body = body.rstrip(b"\n")
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    parser = UsageParser("text/event-stream; charset=utf-8")
    for chunk in chunks:
        parser.feed(chunk)
    assert parser.finish() == reference(body)


def test_the_last_valid_usage_wins_over_an_earlier_one_and_a_broken_one() -> None:
    parser = UsageParser("text/event-stream")
    parser.feed(usage_event(10, 1))
    parser.feed(usage_event(20, 2, cached=16))
    parser.feed(b'data: {"usage": {broken\n\n')
    assert parser.finish() == Usage(20, 2, 16)


def test_json_usage_is_read_from_the_whole_body_at_the_end() -> None:
    body = json.dumps({"id": "x", "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    parser = UsageParser("application/json")
    for i in range(0, len(body), 5):
        parser.feed(body[i:i + 5].encode())
    assert parser.usage is None  # nothing is decoded before the end
    assert parser.finish() == Usage(7, 3, None)
