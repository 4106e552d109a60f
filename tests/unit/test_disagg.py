"""Prefill/decode disaggregation: filters, the decider, the header hook, the config."""

from __future__ import annotations

import json

import pytest

from epp.api.openai import parse_request
from epp.config import ConfigError
from epp.config.picker_config import load_picker_config
from epp.datastore import Endpoint, ServerMetrics
from epp.devtools.procs import REPO_ROOT
from epp.kvcache.index import EndpointMatch
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.scheduling.plugins.disagg import PREFILLER_HEADER, DecodeFilter, PrefillFilter
from epp.scheduling.registry import PluginDeps
from epp.scheduling.scheduler import NoCandidatesError
from epp.scheduling.types import HeaderChanges, SchedulingContext

NOW = 100.0


def ep(name: str, role: str | None) -> Endpoint:
    labels = {"llm-d.ai/role": role} if role else {}
    e = Endpoint(name, f"10.0.0.{len(name) + ord(name[-1]) % 200}:8000", labels=labels)
    e.state.update_metrics(ServerMetrics(scraped_at=NOW))
    return e


PODS = [ep("p1", "prefill"), ep("p2", "prefill"), ep("d1", "decode"), ep("d2", "decode")]
PD_CONFIG = (REPO_ROOT / "deploy" / "local" / "pd-config.yaml").read_text()


def ctx(prompt_tokens: int, cached_on: dict[str, int] | None = None) -> SchedulingContext:
    body = json.dumps({"model": "m", "prompt": "x" * (4 * prompt_tokens)}).encode()
    c = SchedulingContext(parse_request("/v1/completions", body), {}, NOW)
    matches = {n: EndpointMatch(b, b) for n, b in (cached_on or {}).items()}
    c.cycle[PREFIX_MATCH_KEY] = PrefixMatch(True, prompt_tokens, 16, prompt_tokens // 16,
                                            matches)
    return c


def test_role_filters() -> None:
    pods = [*PODS, ep("b", "both"), ep("pd", "prefill-decode"), ep("none", None)]
    assert [e.name for e in PrefillFilter("f").filter(ctx(0), pods)] == [
        "p1", "p2", "b", "pd", "none"]
    assert [e.name for e in DecodeFilter("f").filter(ctx(0), pods)] == [
        "d1", "d2", "b", "pd", "none"]


def _config(**params: object) -> object:
    decisions: list[str] = []
    text = PD_CONFIG.replace("{decider: non-cached-tokens, nonCachedTokens: 256}",
                             json.dumps(params) if params else "{}")
    cfg = load_picker_config(text, deps=PluginDeps(seed=1, pd_decisions=decisions.append))
    return cfg, decisions


def test_long_cold_prompt_is_disaggregated() -> None:
    cfg, decisions = _config()
    result = cfg.scheduler.schedule(ctx(1000), PODS)  # type: ignore[attr-defined]
    assert result.primary == "decode"
    assert result.endpoints[0].name in ("d1", "d2")
    assert result.profiles["prefill"].endpoints[0].name in ("p1", "p2")
    assert decisions == ["prefill-decode"]
    changes = HeaderChanges()
    cfg.plugins["prefill-header-handler"].pre_request(ctx(1000), result, changes)  # type: ignore[attr-defined]
    assert changes.set == {PREFILLER_HEADER: result.profiles["prefill"].endpoints[0].address}


def test_short_prompt_or_cached_prefix_decodes_locally() -> None:
    cfg, decisions = _config()
    short = cfg.scheduler.schedule(ctx(100), PODS)  # type: ignore[attr-defined]
    assert "prefill" not in short.profiles
    # 1000 tokens, 960 already cached on both decode pods: 40 to prefill < 256.
    warm = cfg.scheduler.schedule(ctx(1000, {"d1": 60, "d2": 60}), PODS)  # type: ignore[attr-defined]
    assert "prefill" not in warm.profiles
    assert decisions == ["decode-only", "decode-only"]
    changes = HeaderChanges()
    cfg.plugins["prefill-header-handler"].pre_request(ctx(100), short, changes)  # type: ignore[attr-defined]
    assert changes.remove == [PREFILLER_HEADER] and not changes.set


def test_always_and_never_deciders() -> None:
    always, _ = _config(decider="always")
    assert "prefill" in always.scheduler.schedule(ctx(1), PODS).profiles  # type: ignore[attr-defined]
    never, _ = _config(decider="never")
    assert "prefill" not in never.scheduler.schedule(ctx(10**5), PODS).profiles  # type: ignore[attr-defined]


def test_no_prefill_pod_falls_back_to_local_prefill() -> None:
    cfg, _ = _config()
    result = cfg.scheduler.schedule(ctx(1000), PODS[2:])  # type: ignore[attr-defined]
    assert result.endpoints[0].name in ("d1", "d2")
    assert result.profiles["prefill"].endpoints == []


def test_no_decode_pod_is_an_error() -> None:
    cfg, _ = _config()
    with pytest.raises(NoCandidatesError):
        cfg.scheduler.schedule(ctx(1000), PODS[:2])  # type: ignore[attr-defined]


def test_pd_handler_needs_both_profiles() -> None:
    text = PD_CONFIG.split("- name: prefill")[0]
    with pytest.raises(ConfigError, match="needs profiles 'decode' and 'prefill'"):
        load_picker_config(text)
