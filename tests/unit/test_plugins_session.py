"""Session affinity (llm-d's session-affinity-filter and -scorer, session_id strategy):
sessions stick to their endpoint, expire, are bounded, leave departed, unreachable or
saturated endpoints."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.config.picker_config import load_picker_config
from epp.config.settings import ConfigError
from epp.datastore import Endpoint
from epp.scheduling.plugins.handlers import SingleProfileHandler
from epp.scheduling.plugins.pickers import MaxScorePicker
from epp.scheduling.plugins.session import (
    AGENT_SESSION_HEADERS,
    SessionAffinityFilter,
    SessionAffinityScorer,
    session_key,
)
from epp.scheduling.scheduler import Scheduler, SchedulerProfile, WeightedScorer
from epp.scheduling.types import HeaderChanges, SchedulingContext, SchedulingResult

NOW = 1000.0


class Prefer:
    """A scorer that prefers one endpoint: what 'normal scheduling' picks."""

    type_name = "prefer"
    name = "prefer"

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def score(self, ctx: SchedulingContext, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0 if e.name == self.endpoint else 0.0 for e in endpoints]


def pool(n: int = 3) -> list[Endpoint]:
    return [Endpoint(f"e{i}", f"10.0.0.{i}:8000") for i in range(1, n + 1)]


class Router:
    """One profile: the session plugin, a 'normal scheduling' preference, max-score."""

    def __init__(self, plugin: SessionAffinityFilter | SessionAffinityScorer,
                 weight: float = 1.0) -> None:
        self.plugin = plugin
        self.prefer = Prefer("e1")
        filters = [plugin] if isinstance(plugin, SessionAffinityFilter) else []
        scorers = [WeightedScorer(self.prefer, 1.0)]
        if isinstance(plugin, SessionAffinityScorer):
            scorers.append(WeightedScorer(plugin, weight))
        self.scheduler = Scheduler(
            {"p": SchedulerProfile("p", filters, scorers, MaxScorePicker("m", 1, 0))},
            SingleProfileHandler("h"))

    def route(self, endpoints: Sequence[Endpoint], headers: dict[str, str],
              now: float = NOW, prefer: str = "e1") -> str:
        self.prefer.endpoint = prefer
        ctx = SchedulingContext(None, headers, now)
        result: SchedulingResult = self.scheduler.schedule(ctx, endpoints)
        self.plugin.pre_request(ctx, result, HeaderChanges())
        return result.endpoints[0].name


def sid(value: str) -> dict[str, str]:
    return {"x-session-id": value}


def test_a_session_sticks_to_its_first_endpoint() -> None:
    r = Router(SessionAffinityFilter("s"))
    endpoints = pool()
    assert r.route(endpoints, sid("a"), prefer="e2") == "e2"  # placed by normal scheduling
    # Later turns go back, whatever normal scheduling prefers now.
    assert [r.route(endpoints, sid("a"), prefer=p) for p in ("e1", "e3", "e1")] == ["e2"] * 3
    # Other sessions and requests without one are placed normally.
    assert r.route(endpoints, sid("b"), prefer="e3") == "e3"
    assert r.route(endpoints, {}, prefer="e1") == "e1"
    assert r.route(endpoints, sid("b"), prefer="e1") == "e3"


@pytest.mark.parametrize("header", AGENT_SESSION_HEADERS)
def test_agent_session_headers_are_sessions(header: str) -> None:
    r = Router(SessionAffinityFilter("s"))
    endpoints = pool()
    assert r.route(endpoints, {header: "conv-1"}, prefer="e3") == "e3"
    assert r.route(endpoints, {header: "conv-1"}, prefer="e1") == "e3"


def test_x_session_id_comes_before_agent_headers() -> None:
    r = Router(SessionAffinityFilter("s"))
    endpoints = pool()
    r.route(endpoints, sid("a"), prefer="e2")
    r.route(endpoints, {"x-claude-code-session-id": "c"}, prefer="e3")
    both = {"x-session-id": "a", "x-claude-code-session-id": "c"}
    assert r.route(endpoints, both) == "e2"


def test_sessions_expire_after_the_ttl_since_last_use() -> None:
    r = Router(SessionAffinityFilter("s", ttl_s=300, sweep_s=10))
    endpoints = pool()
    r.route(endpoints, sid("a"), now=NOW, prefer="e2")
    # Each use refreshes the pin ...
    assert r.route(endpoints, sid("a"), now=NOW + 299) == "e2"
    assert r.route(endpoints, sid("a"), now=NOW + 598) == "e2"
    # ... and 300 s unused end it: placed normally again, and pinned there.
    assert r.route(endpoints, sid("a"), now=NOW + 899, prefer="e3") == "e3"
    assert r.route(endpoints, sid("a"), now=NOW + 900, prefer="e1") == "e3"


def test_the_sweep_removes_expired_sessions() -> None:
    r = Router(SessionAffinityFilter("s", ttl_s=60, sweep_s=10))
    endpoints = pool()
    for i in range(5):
        r.route(endpoints, sid(f"old-{i}"), now=NOW)
    r.route(endpoints, sid("new"), now=NOW + 30)
    assert len(r.plugin.table) == 6
    r.route(endpoints, sid("new"), now=NOW + 61)
    assert len(r.plugin.table) == 1


def test_the_table_is_bounded_least_recently_used_out() -> None:
    r = Router(SessionAffinityFilter("s", max_sessions=2))
    endpoints = pool()
    r.route(endpoints, sid("a"), prefer="e1")
    r.route(endpoints, sid("b"), prefer="e2")
    r.route(endpoints, sid("a"), prefer="e3")  # a used again: b is the oldest
    r.route(endpoints, sid("c"), prefer="e3")
    assert len(r.plugin.table) == 2
    assert r.route(endpoints, sid("a"), prefer="e3") == "e1"  # kept
    assert r.route(endpoints, sid("b"), prefer="e3") == "e3"  # evicted: placed anew


@settings(max_examples=50)
@given(st.lists(st.text(min_size=1, max_size=2000), min_size=1, max_size=60))
def test_table_size_never_exceeds_its_bound(ids: list[str]) -> None:
    r = Router(SessionAffinityFilter("s", max_sessions=7))
    endpoints = pool()
    for i, value in enumerate(ids):
        if value.strip():
            r.route(endpoints, sid(value), prefer=f"e{i % 3 + 1}")
        assert len(r.plugin.table) <= 7
    assert len(session_key("x" * 100_000)) == 16  # stored size independent of the id


def test_a_departed_or_unreachable_endpoint_falls_back_to_normal_scheduling() -> None:
    r = Router(SessionAffinityFilter("s"))
    e1, e2, e3 = pool()
    r.route([e1, e2, e3], sid("a"), prefer="e2")
    # e2 left the pool: the session is placed normally and moves there.
    assert r.route([e1, e3], sid("a"), prefer="e3") == "e3"
    assert r.route([e1, e2, e3], sid("a"), prefer="e1") == "e3"
    # A new pod under e3's name is not the session's endpoint.
    e3_new = Endpoint("e3", "10.0.9.3:8000")
    assert r.route([e1, e2, e3_new], sid("a"), prefer="e1") == "e1"
    # Unreachable (the director keeps such endpoints out unless all are): same.
    e1.state.report_unreachable("refused", now=NOW)
    assert r.route([e1, e2, e3], sid("a"), prefer="e2") == "e2"
    # on_pool_change drops pins to endpoints that left.
    r.plugin.on_pool_change([e1, e3])
    assert len(r.plugin.table) == 0


def test_stickiness_yields_to_saturation() -> None:
    r = Router(SessionAffinityFilter("s", max_ttft_penalty_ms=1000,
                                     peak_prefill_throughput=1000))
    e1, e2, e3 = pool()
    r.route([e1, e2, e3], sid("a"), prefer="e2")
    # e2 has 1,500 tokens of prefill queued: 1.5 s against an idle pod's ~0 (no prompt).
    e2.state.load.add(1500, 1500)
    assert r.route([e1, e2, e3], sid("a"), prefer="e3") == "e3"
    # The session moved with its newest turn, and sticks there.
    e2.state.load.prefilled(1500)
    assert r.route([e1, e2, e3], sid("a"), prefer="e1") == "e3"
    # Within the bound it stays.
    e3.state.load.add(900, 900)
    assert r.route([e1, e2, e3], sid("a"), prefer="e1") == "e3"


def test_scorer_prefers_the_session_endpoint_and_keeps_the_pin_when_outweighed() -> None:
    r = Router(SessionAffinityScorer("s"), weight=2.0)
    endpoints = pool()
    r.route(endpoints, sid("a"), prefer="e2")
    ctx = SchedulingContext(None, sid("a"), NOW)
    assert r.plugin.score(ctx, endpoints) == [0.0, 1.0, 0.0]
    assert r.plugin.score(SchedulingContext(None, {}, NOW), endpoints) == [0.0, 0.0, 0.0]
    assert r.route(endpoints, sid("a"), prefer="e3") == "e2"
    # Outweighed by other scorers the request goes elsewhere, but the session keeps its
    # endpoint (llm-d moves a session only when its endpoint was gone).
    weak = Router(SessionAffinityScorer("w"), weight=0.5)
    weak.route(endpoints, sid("a"), prefer="e2")
    assert weak.route(endpoints, sid("a"), prefer="e3") == "e3"
    assert weak.plugin.score(SchedulingContext(None, sid("a"), NOW), endpoints) == [
        0.0, 1.0, 0.0]


def config(params: str, kind: str = "session-affinity-filter") -> str:
    return ("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
            f"- type: {kind}\n  parameters: {params}\n"
            "schedulingProfiles:\n- name: default\n  plugins:\n"
            f"  - pluginRef: {kind}\n")


def test_llm_d_session_id_config_loads() -> None:
    compiled = load_picker_config(config(
        "{strategy: session_id, profileName: '', sessionIdConfig: {sources: [{header: "
        "X-Session-Id}, {attribute: agent-identity}], evictionTtlSeconds: 600, "
        "evictionSweepSeconds: 5}}", "session-affinity-scorer"))
    s = compiled.plugins["session-affinity-scorer"]
    assert s.headers == ("x-session-id", *AGENT_SESSION_HEADERS)
    assert (s.table.ttl_s, s.table.sweep_s) == (600, 5)
    assert s in compiled.pre_request
    # Defaults: x-session-id then the agent headers, 300 s, swept every 10 s.
    d = load_picker_config(config("{}")).plugins["session-affinity-filter"]
    assert d.headers == ("x-session-id", *AGENT_SESSION_HEADERS)
    assert (d.table.ttl_s, d.table.sweep_s, d.max_ttft_penalty_ms) == (300, 10, 18000)


@pytest.mark.parametrize("params, message", [
    ("{strategy: encoded_endpoint_header}",
     "strategy: encoded_endpoint_header is not implemented here"),
    ("{strategy: cookie}", "strategy must be 'encoded_endpoint_header' or 'session_id'"),
    ("{sessionIdConfig: {sources: [{header: a, attribute: b}]}}",
     "sessionIdConfig.sources[0]: exactly one of header or attribute must be set"),
    ("{sessionIdConfig: {sources: [{header: x}, {attribute: session-id, producer: "
     "session-id-producer}]}}", "sessionIdConfig.sources[1].attribute: 'session-id' of "
                                "producer 'session-id-producer' is not available here"),
    ("{sessionIdConfig: {evictionTtlSeconds: -1}}",
     "sessionIdConfig.evictionTtlSeconds must be > 0"),
    ("{sessionIdConfig: {maxSessions: 0}}", "sessionIdConfig.maxSessions must be at least 1"),
    ("{maxTTFTPenaltyMs: -5}", "maxTTFTPenaltyMs must be >= 0"),
    ("{sessionIdConfig: {ttl: 5}}", "unknown field `ttl` - at `$.sessionIdConfig`"),
])
def test_session_config_errors_name_the_field(params: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_picker_config(config(params))
    assert "plugins[0].parameters (session-affinity-filter)" in str(err.value)
    assert message in str(err.value)
