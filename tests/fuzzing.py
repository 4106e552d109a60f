"""Hypothesis strategies and a harness for fuzzing the ext_proc request path: what a
client can put in a body (JSON-ish, deeply nested, huge or negative numbers, invalid
UTF-8, token ids out of range) and what Envoy can send on a stream (the six phases in
order, in either body mode, or in any order at all). Shared by ``tests/unit/test_fuzz.py``
(a few hundred examples per property) and ``benchmarks/fuzz.py`` (10,000+)."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from epp.datastore import Endpoint, EndpointPool
from epp.devtools import fake_envoy as fe
from epp.extproc import messages as msg
from epp.extproc.stream import ProtocolError, ProtocolStream
from epp.kvcache.index import BlockIndex
from epp.kvcache.producer import ApproximateProducer, PreciseProducer
from epp.kvcache.tokens import LocalPromptTokenizer
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.types import ProfileResult, SchedulingContext, SchedulingResult

PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/",
         "/v1/embeddings"]
# Token ids around every boundary a key function or a C extension could trip on.
TOKEN_IDS = st.one_of(st.integers(0, 200_000), st.integers(-2**70, 2**70),
                      st.sampled_from([-1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64]))
NUMBERS = st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=False),
                    st.sampled_from([0, -1, 10**1000]))
JSON_LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=40))
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


class CharTokenizer:
    """One id per character, the chat template a plain concatenation: a real, tiny
    tokenizer so the precise producer runs its whole path."""

    special_token_pattern = re.compile(r"<\|im_start\|>|<\|im_end\|>")

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Any = None,
                    add_generation_prompt: bool = True) -> str:
        return "".join(f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>\n"
                       for m in messages)


def _messages() -> st.SearchStrategy[Any]:
    content = st.one_of(st.text(max_size=60), st.none(), JSON_VALUES,
                        st.lists(st.fixed_dictionaries(
                            {"type": st.sampled_from(["text", "image_url", "x"]),
                             "text": st.one_of(st.text(max_size=30), JSON_LEAVES)}),
                            max_size=3))
    message = st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant",
                                                         "tool", ""]),
                               "content": content}),
        JSON_VALUES)
    return st.one_of(st.lists(message, max_size=4), JSON_VALUES)


def _prompt() -> st.SearchStrategy[Any]:
    return st.one_of(st.text(max_size=200), st.lists(TOKEN_IDS, max_size=64),
                     st.lists(st.lists(TOKEN_IDS, max_size=8), max_size=3),
                     st.lists(st.text(max_size=20), max_size=3), JSON_VALUES)


@st.composite
def openai_objects(draw: st.DrawFn) -> dict[str, Any]:
    """An OpenAI-shaped request with any field of any type."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["model"] = draw(st.one_of(st.text(max_size=30), JSON_VALUES))
    if draw(st.booleans()):
        obj["prompt"] = draw(_prompt())
    if draw(st.booleans()):
        obj["messages"] = draw(_messages())
    for name in ("max_tokens", "n", "temperature", "stream", "stream_options", "input",
                 "tools", "lora"):
        if draw(st.integers(0, 3)) == 0:
            obj[name] = draw(st.one_of(NUMBERS, JSON_VALUES))
    return obj


def _deep(depth: int, opener: str) -> bytes:
    closer = "]" if opener == "[" else "}"
    if opener == "[":
        return ('{"model": "m", "prompt": ' + "[" * depth + "]" * depth + "}").encode()
    return ('{"model": "m", "prompt": ' + '{"a":' * depth + "1" + closer * depth + "}"
            ).encode()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A request body as a client could send it, well-formed or not."""
    kind = draw(st.sampled_from(["openai", "openai", "openai", "json", "deep", "bytes",
                                 "badutf8", "empty", "big"]))
    if kind == "openai":
        return json.dumps(draw(openai_objects())).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "deep":
        return _deep(draw(st.sampled_from([64, 1000, 5000, 100_000])),
                     draw(st.sampled_from(["[", "{"])))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "badutf8":
        text = json.dumps({"model": "m", "prompt": "hello"}).encode()
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + \
            text[cut:]
    if kind == "big":
        return json.dumps({"model": "m", "prompt": "x" * draw(st.sampled_from(
            [70_000, 300_000]))}).encode()
    return b""


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(data[last:p])
        last = p
    parts.append(data[last:])
    return [p for p in parts if p] or [b""]


@st.composite
def envoy_sequences(draw: st.DrawFn) -> list[msg.ProcessingRequest]:
    """The messages Envoy sends for one client request, in protocol order, for any
    body a client can send, in either body mode, cut off anywhere (a client abort)."""
    mode = draw(st.sampled_from([fe.DUPLEX, fe.BUFFERED]))
    body = draw(bodies())
    path = draw(st.sampled_from(PATHS))
    has_body = bool(body) or draw(st.booleans())
    extra = draw(st.dictionaries(
        st.sampled_from(["x-request-id", "x-gateway-inference-objective",
                         "x-prefiller-host-port", "test-epp-endpoint-selection",
                         "x-gateway-destination-endpoint"]),
        st.text(max_size=20).map(lambda t: t.replace("\n", " ").replace("\r", " ")),
        max_size=3))
    out = [fe.request_headers(path, end_of_stream=not has_body, extra=extra, body_mode=mode)]
    if has_body:
        if mode == fe.BUFFERED:
            out.append(fe.request_body(body, True))
        else:
            parts = _chunks(body, draw(st.lists(st.integers(0, 10**6), max_size=4)))
            trailers = draw(st.booleans())
            for i, part in enumerate(parts):
                out.append(fe.request_body(part, not trailers and i == len(parts) - 1))
            if trailers:
                out.append(fe.trailers())
    status = draw(st.sampled_from([200, 200, 400, 404, 500, 503]))
    sse = draw(st.booleans())
    out.append(fe.response_headers(status, "text/event-stream" if sse else "application/json"))
    reply = draw(st.sampled_from([b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}',
                                  b"data: {}\n\ndata: [DONE]\n\n", b"garbage\xff", b""]))
    for i, part in enumerate(_chunks(reply, draw(st.lists(st.integers(0, 100), max_size=3)))):
        out.append(fe.response_body(part, False))
    out.append(fe.response_body(b"", True))
    # Some clients abort somewhere (hypothesis favours the first choice and small ints).
    if draw(st.sampled_from(["complete", "complete", "complete", "abort"])) == "abort":
        return out[:draw(st.integers(1, len(out)))]
    return out


@st.composite
def any_order_sequences(draw: st.DrawFn) -> list[msg.ProcessingRequest]:
    """Messages of every kind in any order: what a broken proxy could send."""
    pool = [fe.request_headers(), fe.request_headers(end_of_stream=True),
            fe.request_headers(body_mode=fe.BUFFERED), fe.request_body(b'{"model":"m"}'),
            fe.request_body(b'{"model":', False), fe.trailers(), fe.trailers(response=True),
            fe.response_headers(), fe.response_headers(end_of_stream=True),
            fe.response_body(b"{}", False), fe.response_body(b"", True),
            msg.ProcessingRequest()]
    return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=10))


class _First:
    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        return SchedulingResult({"p": ProfileResult([candidates[0]])}, "p")


class _ErrorLog(logging.Handler):
    """Counts records at ERROR and above (a traceback in the log is one of them)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Harness:
    """A director with the precise and approximate producers, one endpoint, and the
    outcome counts of every sequence run through it."""

    endpoint: Endpoint = field(default_factory=lambda: Endpoint("e", "10.0.0.1:8000"))
    outcomes: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        pool = EndpointPool()
        pool.upsert(self.endpoint)
        precise = PreciseProducer(BlockIndex(), LocalPromptTokenizer(CharTokenizer()),
                                  block_size=4)
        self.director = Director(pool, _First(),
                                 Admission({}, SaturationDetector(5, 0.8, 0.5)),
                                 EppMetrics(), producers=[precise, ApproximateProducer()])
        self.errors = _ErrorLog()

    async def run(self, sequence: list[msg.ProcessingRequest], *, client_order: bool
                  ) -> str:
        """Feed one stream; check the invariants; return the outcome's name."""
        root = logging.getLogger()
        root.addHandler(self.errors)
        self.errors.records.clear()
        stream = ProtocolStream(self.director, max_body_bytes=256 * 1024)
        outcome = "incomplete"
        try:
            for request in sequence:
                try:
                    responses = await stream.handle(request)
                except ProtocolError:
                    outcome = "protocol_error"
                    break
                for answer in responses:
                    response = answer if not isinstance(answer, bytes) else \
                        msg.ProcessingResponse.FromString(answer)
                    if response.WhichOneof("response") == "immediate_response":
                        outcome = f"immediate_{response.immediate_response.status.code}"
                    elif response.WhichOneof("response") == "request_headers" and \
                            response.request_headers.response.clear_route_cache:
                        outcome = "routed"
                    elif response.WhichOneof("response") == "request_body" and \
                            response.request_body.response.clear_route_cache:
                        outcome = "routed"
                if outcome.startswith("immediate") or outcome == "protocol_error":
                    break
        finally:
            stream.close()
            root.removeHandler(self.errors)
        load = self.endpoint.state.load
        assert load.requests == 0 and load.prompt_tokens == 0, "load not settled"
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]
        if client_order:
            assert outcome != "protocol_error", "a client-made sequence broke the protocol"
            assert not outcome.startswith("immediate_5"), f"{outcome} for a client input"
        self.outcomes[outcome] += 1
        return outcome

