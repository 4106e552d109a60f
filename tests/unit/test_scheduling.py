"""Scheduling plugins and the profile loop."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from epp.datastore import Endpoint, ServerMetrics
from epp.scheduling.plugins.filters import HeaderBasedTestingFilter, LabelSelectorFilter
from epp.scheduling.plugins.handlers import SingleProfileHandler
from epp.scheduling.plugins.lora import LoraAffinityScorer
from epp.scheduling.plugins.pickers import MaxScorePicker, RandomPicker, WeightedRandomPicker
from epp.scheduling.plugins.scorers import (
    KVCacheUtilizationScorer,
    LoadAwareScorer,
    QueueScorer,
    RunningRequestsSizeScorer,
    min_max_scores,
)
from epp.scheduling.scheduler import (
    NoCandidatesError,
    Scheduler,
    SchedulerProfile,
    WeightedScorer,
)
from epp.scheduling.types import SchedulingContext

NOW = 1000.0
STALE = 0.5


def ep(i: int, *, waiting: int = 0, running: int = 0, kv: float = 0.0, age: float = 0.0,
       labels: dict[str, str] | None = None, loras: Sequence[str] = (),
       waiting_loras: Sequence[str] = (), max_lora: int = 0) -> Endpoint:
    e = Endpoint(f"e{i}", f"10.0.0.{i}:8000", labels=labels or {})
    scraped = 0.0 if age == float("inf") else NOW - age
    e.state.update_metrics(ServerMetrics(
        waiting=waiting, running=running, kv_cache_usage=kv, running_loras=frozenset(loras),
        waiting_loras=frozenset(waiting_loras), max_lora=max_lora, scraped_at=scraped))
    return e


def ctx(headers: dict[str, str] | None = None, model: str = "") -> SchedulingContext:
    c = SchedulingContext(None, headers or {}, NOW)
    if model:
        from epp.api.openai import parse_request
        c.request = parse_request("/v1/completions",
                                  f'{{"model": "{model}", "prompt": "x"}}'.encode())
    return c


def test_min_max_normalisation() -> None:
    assert min_max_scores([0, 5, 10]) == [1.0, 0.5, 0.0]
    assert min_max_scores([3, 3]) == [1.0, 1.0]
    assert min_max_scores([None, 2, 4]) == [0.0, 1.0, 0.0]
    assert min_max_scores([None, None]) == [0.0, 0.0]


def test_queue_scorer_counts_waiting_plus_dispatches_since_scrape() -> None:
    a, b, c = ep(1, waiting=0), ep(2, waiting=4), ep(3, waiting=2)
    scorer = QueueScorer("q", STALE)
    assert scorer.score(ctx(), [a, b, c]) == [1.0, 0.0, 0.5]
    for _ in range(4):  # four requests routed to a since its last scrape
        a.state.load.add(10)
    assert scorer.score(ctx(), [a, b, c]) == [0.0, 0.0, 1.0]
    a.state.update_metrics(ServerMetrics(waiting=1, scraped_at=NOW))  # scrape caught up
    assert scorer.score(ctx(), [a, b, c]) == [1.0, 0.0, pytest.approx(2 / 3)]


def test_stale_endpoint_neither_attracts_nor_blocks() -> None:
    idle_but_stale = ep(1, waiting=0, age=10.0)
    busy = ep(2, waiting=3)
    for scorer in (QueueScorer("q", STALE), KVCacheUtilizationScorer("k", STALE),
                   LoadAwareScorer("l", STALE, 128), RunningRequestsSizeScorer("r", STALE)):
        s = scorer.score(ctx(), [idle_but_stale, busy])
        assert s[0] == 0.0, scorer.type_name
    # All stale: all tie (0), so every pod stays usable.
    never = [ep(1, age=float("inf")), ep(2, age=float("inf"))]
    assert QueueScorer("q", STALE).score(ctx(), never) == [0.0, 0.0]


def test_kv_cache_scorer_is_free_fraction() -> None:
    assert KVCacheUtilizationScorer("k", STALE).score(
        ctx(), [ep(1, kv=0.25), ep(2, kv=1.0)]) == [0.75, 0.0]


def test_load_aware_scorer_linear_to_threshold() -> None:
    s = LoadAwareScorer("l", STALE, 100).score(
        ctx(), [ep(1), ep(2, waiting=50), ep(3, waiting=100), ep(4, waiting=500)])
    assert s == [0.5, 0.25, 0.0, 0.0]


def test_running_requests_scorer() -> None:
    assert RunningRequestsSizeScorer("r", STALE).score(
        ctx(), [ep(1, running=2), ep(2, running=6)]) == [1.0, 0.0]


def test_lora_affinity_levels() -> None:
    eps = [ep(1, loras=["sql"], max_lora=2), ep(2, waiting_loras=["sql"], loras=["a", "b"],
                                               max_lora=2),
           ep(3, loras=["a"], max_lora=2), ep(4, loras=["a", "b"], max_lora=2)]
    assert LoraAffinityScorer("l", STALE).score(ctx(model="sql"), eps) == [1.0, 0.6, 0.8, 0.0]


def test_max_score_picker_breaks_ties_at_random() -> None:
    eps = [ep(i) for i in range(1, 5)]
    picker = MaxScorePicker("p", 1, seed=1)
    counts = Counter(picker.pick(ctx(), eps, [0.5, 1.0, 1.0, 1.0])[0].name for _ in range(600))
    assert set(counts) == {"e2", "e3", "e4"}
    assert min(counts.values()) > 120  # a burst of ties spreads over the tied pods


def test_max_score_picker_returns_fallbacks_in_score_order() -> None:
    eps = [ep(i) for i in range(1, 5)]
    picked = MaxScorePicker("p", 3, seed=1).pick(ctx(), eps, [0.1, 0.9, 0.5, 0.7])
    assert [e.name for e in picked] == ["e2", "e4", "e3"]


def test_random_picker_and_weighted_random_picker() -> None:
    eps = [ep(i) for i in range(1, 4)]
    rp = RandomPicker("r", 1, 3)
    assert len({rp.pick(ctx(), eps, [0, 0, 0])[0].name for _ in range(100)}) == 3
    w = WeightedRandomPicker("w", 1, seed=3)
    counts = Counter(w.pick(ctx(), eps, [0.0, 1.0, 3.0])[0].name for _ in range(4000))
    assert "e1" not in counts
    assert 2.5 < counts["e3"] / counts["e2"] < 3.6
    two = w.pick(ctx(), eps, [0.0, 1.0, 3.0]) + WeightedRandomPicker("w", 2, 1).pick(
        ctx(), eps, [1.0, 1.0, 1.0])
    assert len(two) == 3


def test_label_selector_filter() -> None:
    eps = [ep(1, labels={"tier": "a"}), ep(2, labels={"tier": "b"}), ep(3)]
    f = LabelSelectorFilter("f", {"tier": "a"})
    assert [e.name for e in f.filter(ctx(), eps)] == ["e1"]
    with pytest.raises(ValueError):
        LabelSelectorFilter("f", {})


def test_test_header_filter_only_when_enabled() -> None:
    eps = [ep(1), ep(2), ep(3)]
    headers = {"test-epp-endpoint-selection": "10.0.0.3:8000,10.0.0.1"}
    on = HeaderBasedTestingFilter("t", enabled=True)
    assert [e.name for e in on.filter(ctx(headers), eps)] == ["e3", "e1"]
    assert len(on.filter(ctx(), eps)) == 3
    off = HeaderBasedTestingFilter("t", enabled=False)
    assert len(off.filter(ctx(headers), eps)) == 3


def _timer_log() -> tuple[list[tuple[str, str, str]], object]:
    calls: list[tuple[str, str, str]] = []

    def timer(point: str, plugin_type: str, name: str, seconds: float) -> None:
        assert seconds >= 0
        calls.append((point, plugin_type, name))
    return calls, timer


def test_profile_loop_weights_clamps_and_times_every_plugin() -> None:
    class Wild:
        type_name = "wild"
        name = "wild"

        def score(self, c: SchedulingContext, eps: Sequence[Endpoint]) -> list[float]:
            return [5.0, -3.0]  # out of range: the framework clamps to [0, 1]

    calls, timer = _timer_log()
    profile = SchedulerProfile(
        "default", [LabelSelectorFilter("f", {"ok": "1"})],
        [WeightedScorer(Wild(), 2.0), WeightedScorer(QueueScorer("q", STALE), 1.0)],
        MaxScorePicker("p", 1, 0))
    sched = Scheduler({"default": profile}, SingleProfileHandler("h"), timer)  # type: ignore[arg-type]
    eps = [ep(1, waiting=5, labels={"ok": "1"}), ep(2, labels={"ok": "1"}), ep(3)]
    result = sched.schedule(ctx(), eps, explain=True)
    pr = result.profiles["default"]
    assert result.primary == "default"
    assert pr.scores == {"e1": 2.0, "e2": 1.0}
    assert pr.plugin_scores["wild"] == {"e1": 1.0, "e2": 0.0}
    assert [e.name for e in result.endpoints] == ["e1"]
    assert calls == [("profile_handler", "single-profile-handler", "h"),
                     ("filter", "label-selector-filter", "f"), ("scorer", "wild", "wild"),
                     ("scorer", "queue-scorer", "q"), ("picker", "max-score-picker", "p"),
                     ("profile_handler", "single-profile-handler", "h")]


def test_filters_removing_everything_raise() -> None:
    profile = SchedulerProfile("default", [LabelSelectorFilter("f", {"x": "y"})], [],
                               MaxScorePicker("p", 1, 0))
    sched = Scheduler({"default": profile}, SingleProfileHandler("h"))
    with pytest.raises(NoCandidatesError, match="removed every endpoint"):
        sched.schedule(ctx(), [ep(1)])


def test_single_profile_handler_rejects_two_profiles() -> None:
    p = SchedulerProfile("a", [], [], MaxScorePicker("p", 1, 0))
    with pytest.raises(ValueError, match="exactly one scheduling profile"):
        Scheduler({"a": p, "b": p}, SingleProfileHandler("h"))
