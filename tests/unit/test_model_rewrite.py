"""InferenceModelRewrite and the model-name rewrite header: rule precedence and weighted
targets, parsing of the Kubernetes object, and the rewritten body as the ext_proc stream
forwards it (duplex chunks, BUFFERED body mutation), tokenized under the served model."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from epp.api.openai import LLMRequest
from epp.datastore import Endpoint, EndpointPool
from epp.datastore.model_rewrites import ModelRewrite, ModelRewrites, RewriteRule, RewriteTarget
from epp.devtools import fake_envoy as fe
from epp.discovery.kubernetes import model_rewrite
from epp.extproc.stream import ProtocolStream
from epp.kvcache.match import PrefixMatch
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.types import ProfileResult, SchedulingContext, SchedulingResult

BODY = json.dumps({"model": "chat", "prompt": "hello", "max_tokens": 3}).encode()


def rule(models: Sequence[str], *targets: str | tuple[str, int]) -> RewriteRule:
    return RewriteRule(frozenset(models), tuple(
        RewriteTarget(t) if isinstance(t, str) else RewriteTarget(*t) for t in targets))


# --- precedence and weights -----------------------------------------------------------------


def test_exact_rule_beats_generic_oldest_object_wins_then_first_rule() -> None:
    rewrites = ModelRewrites()
    rewrites.replace([
        ModelRewrite("newer", "2026-02-01T00:00:00Z", (rule(["chat"], "from-newer"),)),
        ModelRewrite("catch-all", "2025-01-01T00:00:00Z", (rule([], "from-generic"),)),
        ModelRewrite("older", "2026-01-01T00:00:00Z",
                     (rule(["chat"], "first-rule"), rule(["chat"], "second-rule"))),
    ])
    assert rewrites.target("chat") == "first-rule"
    assert rewrites.target("anything-else") == "from-generic"
    rewrites.replace([ModelRewrite("x", "2026-01-01T00:00:00Z", (rule(["chat"], "y"),))])
    assert rewrites.target("other") is None  # replaced as a whole: the generic rule is gone


def test_rule_without_targets_does_nothing() -> None:
    rewrites = ModelRewrites()
    rewrites.replace([ModelRewrite("a", "1", (rule(["chat"]),)),
                      ModelRewrite("b", "2", (rule(["chat"], "kept"),))])
    assert rewrites.target("chat") == "kept"


def test_weighted_targets_split_by_weight() -> None:
    rewrites = ModelRewrites(random.Random(7))
    rewrites.replace([ModelRewrite("canary", "1", (rule(["chat"], ("v1", 90), ("v2", 10)),))])
    draws = Counter(rewrites.target("chat") for _ in range(10_000))
    assert set(draws) == {"v1", "v2"}
    assert 8_500 < draws["v1"] < 9_500  # 9,000 expected; binomial sd is 30


def test_unweighted_targets_uniform_and_mixed_weights_skip_unweighted() -> None:
    rewrites = ModelRewrites(random.Random(3))
    rewrites.replace([ModelRewrite("ab", "1", (rule(["chat"], "a", "b"),))])
    draws = Counter(rewrites.target("chat") for _ in range(2_000))
    assert set(draws) == {"a", "b"} and min(draws.values()) > 800
    rewrites.replace([ModelRewrite("mixed", "1", (rule(["chat"], "never", ("always", 5)),))])
    assert {rewrites.target("chat") for _ in range(200)} == {"always"}


# --- the Kubernetes object -------------------------------------------------------------------


def _object(rules: list[dict[str, Any]], pool: str = "pool") -> dict[str, Any]:
    return {"metadata": {"name": "rw", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"poolRef": {"group": "inference.networking.k8s.io",
                                 "kind": "InferencePool", "name": pool}, "rules": rules}}


def test_object_parsing() -> None:
    parsed = model_rewrite(_object([
        {"matches": [{"model": {"type": "Exact", "value": "chat"}}, {"model": {"value": "c"}}],
         "targets": [{"modelRewrite": "v1", "weight": 3}, {"modelRewrite": "v2", "weight": 1}]},
        {"targets": [{"modelRewrite": "default"}]},
    ]), "pool")
    assert parsed == ModelRewrite("rw", "2026-01-01T00:00:00Z", (
        rule(["chat", "c"], ("v1", 3), ("v2", 1)), rule([], "default")))
    assert model_rewrite(_object([], pool="other"), "pool") is None


def test_malformed_parts_are_dropped_not_widened(caplog: pytest.LogCaptureFixture) -> None:
    parsed = model_rewrite(_object([
        # A match of an unknown type must not turn the rule into a catch-all.
        {"matches": [{"model": {"type": "Prefix", "value": "ch"}}],
         "targets": [{"modelRewrite": "x"}]},
        {"matches": [{"model": {"value": "chat"}}],
         "targets": [{"modelRewrite": ""}, {"modelRewrite": "ok", "weight": 0},
                     {"modelRewrite": "good", "weight": 2}]},
    ]), "pool")
    assert parsed is not None
    assert parsed.rules == (rule(["chat"], ("good", 2)),)
    assert "ignoring match" in caplog.text and "ignoring target" in caplog.text


# --- through the ext_proc stream ---------------------------------------------------------------


class Recorder:
    """Scheduler and data producer that remember the request they were given."""

    name = "recorder"

    def __init__(self) -> None:
        self.scheduled: list[LLMRequest | None] = []
        self.produced: list[LLMRequest | None] = []

    def schedule(self, ctx: SchedulingContext, candidates: Sequence[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        self.scheduled.append(ctx.request)
        return SchedulingResult({"p": ProfileResult([candidates[0]])}, "p")

    async def produce(self, request: LLMRequest | None,
                      candidates: Sequence[Endpoint]) -> PrefixMatch | None:
        self.produced.append(request)
        return None


def make_director(rewrites: list[ModelRewrite] | None = None) -> tuple[Director, Recorder]:
    pool = EndpointPool()
    pool.replace_all([Endpoint("e0", "10.0.0.1:8000")])
    recorder = Recorder()
    model_rewrites = ModelRewrites(random.Random(1))
    model_rewrites.replace(rewrites or [])
    director = Director(pool, recorder, Admission({}, SaturationDetector(5, 0.8, 0.5)),
                        EppMetrics(), producers=[recorder], model_rewrites=model_rewrites)
    return director, recorder


async def _run(director: Director, *requests: Any) -> list[Any]:
    stream = ProtocolStream(director)
    out: list[Any] = []
    for req in requests:
        out.extend(await stream.handle(req))
    stream.close()
    return out


def _forwarded_duplex(out: list[Any]) -> bytes:
    return b"".join(r.request_body.response.body_mutation.streamed_response.body
                    for r in out if r.WhichOneof("response") == "request_body")


@pytest.mark.asyncio
@pytest.mark.parametrize("header", ["x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"])
async def test_header_rewrites_the_forwarded_body_and_is_stripped(header: str) -> None:
    director, recorder = make_director()
    out = await _run(director, fe.request_headers(extra={header: "served"}),
                     fe.request_body(BODY))
    forwarded = json.loads(_forwarded_duplex(out))
    assert forwarded == {"model": "served", "prompt": "hello", "max_tokens": 3}
    removed = out[0].request_headers.response.header_mutation.remove_headers
    assert header in removed and "content-length" in removed
    # Tokenization (producers) and scheduling saw the served model and its body.
    for request in (*recorder.produced, *recorder.scheduled):
        assert request is not None and request.model == "served"
        assert json.loads(request.raw_body)["model"] == "served"


@pytest.mark.asyncio
async def test_rule_overrides_the_header() -> None:
    director, _ = make_director([ModelRewrite("rw", "1", (rule(["chat"], "by-rule"),))])
    out = await _run(director, fe.request_headers(
        extra={"x-llm-d-model-name-rewrite": "by-header"}), fe.request_body(BODY))
    assert json.loads(_forwarded_duplex(out))["model"] == "by-rule"


@pytest.mark.asyncio
async def test_no_rewrite_forwards_the_client_bytes_unchanged() -> None:
    director, _ = make_director([ModelRewrite("rw", "1", (rule(["other"], "x"),))])
    body = b'{"model": "chat",   "prompt": "hello"}'  # spacing a re-encode would change
    out = await _run(director, fe.request_headers(), fe.request_body(body))
    assert _forwarded_duplex(out) == body


@pytest.mark.asyncio
async def test_buffered_mode_sends_a_body_mutation_with_its_length() -> None:
    director, _ = make_director([ModelRewrite("rw", "1", (rule(["chat"], "a-longer-name"),))])
    out = await _run(director, fe.request_headers(body_mode=fe.BUFFERED), fe.request_body(BODY))
    assert [r.WhichOneof("response") for r in out] == ["request_headers", "request_body"]
    common = out[1].request_body.response
    new_body = common.body_mutation.body
    assert json.loads(new_body)["model"] == "a-longer-name"
    sets = {h.header.key: h.header.raw_value.decode()
            for h in common.header_mutation.set_headers}
    assert sets["content-length"] == str(len(new_body)) != str(len(BODY))
    assert "content-length" not in common.header_mutation.remove_headers


@pytest.mark.asyncio
async def test_buffered_mode_without_rewrite_leaves_the_body_alone() -> None:
    director, _ = make_director()
    out = await _run(director, fe.request_headers(body_mode=fe.BUFFERED), fe.request_body(BODY))
    common = out[1].request_body.response
    assert not common.HasField("body_mutation")
    assert "content-length" not in {h.header.key for h in common.header_mutation.set_headers}


@pytest.mark.asyncio
async def test_explain_shows_the_rewrite() -> None:
    director, _ = make_director([ModelRewrite("rw", "1", (rule(["chat"], "served"),))])
    result = await director.explain({":path": "/v1/completions"}, BODY)
    assert result["model"] == "served"
    assert result["model_rewrite"] == {"from": "chat", "to": "served",
                                       "by": "InferenceModelRewrite"}
