"""llm-d's "sticky until saturated" plugins (prefix-cache-affinity-filter, token-load-scorer,
inflight-load-producer), no-hit-lru-scorer, approx-prefix-cache-producer, and the guide
configs that use them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.config.picker_config import load_picker_config
from epp.config.settings import ConfigError
from epp.datastore import Endpoint, EndpointPool
from epp.datastore.metrics import PREFILL_MIN_SAMPLES
from epp.kvcache.index import EndpointMatch
from epp.kvcache.match import PREFIX_MATCH_KEY, PrefixMatch
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.requestcontrol.director import Director
from epp.scheduling.plugins.affinity import PrefixCacheAffinityFilter
from epp.scheduling.plugins.handlers import SingleProfileHandler
from epp.scheduling.plugins.inflight import DEFAULT_PEAK_PREFILL_THROUGHPUT, TTFTEstimator
from epp.scheduling.plugins.nohitlru import NoHitLRUScorer
from epp.scheduling.plugins.pickers import MaxScorePicker
from epp.scheduling.plugins.tokenload import TokenLoadScorer
from epp.scheduling.scheduler import Scheduler, SchedulerProfile, WeightedScorer
from epp.scheduling.types import HeaderChanges, SchedulingContext

NOW = 1000.0
REPO = Path(__file__).parents[2]
GUIDE = Path(__file__).parent / "fixtures" / "llm-d-optimized-baseline-plugins.yaml"
STICKY = REPO / "deploy" / "local" / "epp-config-sticky.yaml"


def ep(i: int, *, inflight: int = 0, rate: float | None = None,
       address: str | None = None) -> Endpoint:
    """Endpoint ``e<i>`` with ``inflight`` uncached prompt tokens still to prefill and,
    when ``rate`` is given, a learned prefill rate of ``rate`` tokens/s."""
    e = Endpoint(f"e{i}", address or f"10.0.0.{i}:8000")
    if inflight:
        e.state.load.add(inflight, inflight)
    if rate is not None:
        for _ in range(PREFILL_MIN_SAMPLES):
            e.state.prefill.observe(int(rate), 1.0)
    return e


def match(prompt: int, cached: dict[str, int], block: int = 1) -> PrefixMatch:
    """A precise match of a ``prompt``-token prompt; ``cached``: tokens held per name."""
    return PrefixMatch(True, prompt, block, prompt // block,
                       {n: EndpointMatch(c // block, c // block) for n, c in cached.items()})


def ctx(m: PrefixMatch | None = None, headers: dict[str, str] | None = None,
        now: float = NOW) -> SchedulingContext:
    c = SchedulingContext(None, headers or {}, now)
    if m is not None:
        c.cycle[PREFIX_MATCH_KEY] = m
    return c


def names(endpoints: Sequence[Endpoint]) -> list[str]:
    return [e.name for e in endpoints]


def config(plugins: str, profile: str) -> str:
    return ("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n" + plugins
            + "schedulingProfiles:\n- name: default\n  plugins:\n" + profile)


# --------------------------------------------------------------------------------------
# prefix-cache-affinity-filter


def test_sticky_endpoint_is_kept_while_the_others_are_idle() -> None:
    a, b, c = ep(1, inflight=3000), ep(2), ep(3)
    f = PrefixCacheAffinityFilter("f")  # llm-d's defaults: 0.80, 18 s
    m = match(1000, {"e1": 1000, "e2": 200})
    # e1 has work queued and the others none, yet it holds the whole prompt.
    assert names(f.filter(ctx(m), [a, b, c])) == ["e1"]


def test_threshold_is_a_share_of_the_prompt() -> None:
    a, b, c = ep(1), ep(2), ep(3)
    f = PrefixCacheAffinityFilter("f", affinity_threshold=0.8)
    m = match(100, {"e1": 80, "e2": 79})
    assert names(f.filter(ctx(m), [a, b, c])) == ["e1"]
    # Nothing sticky, everything sticky, no match, one candidate: nothing to narrow.
    assert names(f.filter(ctx(match(100, {"e1": 79})), [a, b])) == ["e1", "e2"]
    assert names(f.filter(ctx(match(100, {"e1": 90, "e2": 95})), [a, b])) == ["e1", "e2"]
    assert names(f.filter(ctx(), [a, b])) == ["e1", "e2"]
    assert names(f.filter(ctx(m), [b])) == ["e2"]
    # A threshold of 0 turns the filter off (llm-d).
    off = PrefixCacheAffinityFilter("f", affinity_threshold=0.0)
    assert names(off.filter(ctx(m), [a, b, c])) == ["e1", "e2", "e3"]


def test_stickiness_yields_when_its_ttft_penalty_exceeds_the_bound() -> None:
    f = PrefixCacheAffinityFilter("f", max_ttft_penalty_ms=1000, peak_prefill_throughput=1000)
    m = match(1600, {"e1": 1600})
    # e1: (2500 queued + 0 uncached) / 1000 tok/s = 2.5 s; e2: (0 + 1600) / 1000 = 1.6 s.
    # The 0.9 s penalty is within the 1 s bound: stick.
    assert names(f.filter(ctx(m), [ep(1, inflight=2500), ep(2)])) == ["e1"]
    # Exactly at the bound still sticks; past it, e1 is saturated and all are kept.
    assert names(f.filter(ctx(m), [ep(1, inflight=2600), ep(2)])) == ["e1"]
    assert names(f.filter(ctx(m), [ep(1, inflight=2601), ep(2)])) == ["e1", "e2"]
    # The best non-sticky endpoint is the yardstick, not any of them.
    assert names(f.filter(ctx(m), [ep(1, inflight=5000), ep(2, inflight=10_000),
                                    ep(3)])) == ["e1", "e2", "e3"]
    # maxTTFTPenaltyMs 0: always stick.
    always = PrefixCacheAffinityFilter("f", max_ttft_penalty_ms=0)
    assert names(always.filter(ctx(m), [ep(1, inflight=10**9), ep(2)])) == ["e1"]


def test_learned_prefill_rate_is_used_when_no_peak_is_given() -> None:
    m = match(1600, {"e1": 1600})

    def pool() -> list[Endpoint]:
        # e1 holds the prompt but prefills at 1,000 tok/s with 5,000 tokens queued: 5 s.
        # e2 is cold, idle and learned at 100,000 tok/s: 1,600 tokens take 16 ms.
        return [ep(1, inflight=5000, rate=1000), ep(2, rate=100_000)]

    learned = PrefixCacheAffinityFilter("f", max_ttft_penalty_ms=1000)
    assert names(learned.filter(ctx(m), pool())) == ["e1", "e2"]
    # The same pool judged at one configured peak: e1's 5 ms queue is nothing.
    fixed = PrefixCacheAffinityFilter("f", max_ttft_penalty_ms=1000,
                                      peak_prefill_throughput=1_000_000)
    assert names(fixed.filter(ctx(m), pool())) == ["e1"]


def test_ttft_estimate_and_its_rate_fallbacks() -> None:
    m = match(1000, {"e1": 600})
    a, b = ep(1, inflight=400, rate=2000), ep(2)
    # (in-flight + this request's uncached tokens) / rate, in ms; an endpoint without a
    # learned rate takes the others' (median), and with none learned, llm-d's default.
    assert TTFTEstimator(None).ttft_ms(ctx(m), [a, b]) == [
        pytest.approx((400 + 400) / 2000 * 1000), pytest.approx(1000 / 2000 * 1000)]
    assert TTFTEstimator(None).rates([ep(3), ep(4)]) == [DEFAULT_PEAK_PREFILL_THROUGHPUT] * 2
    assert TTFTEstimator(500.0).rates([a, b]) == [500.0, 500.0]


def test_in_flight_token_gate() -> None:
    f = PrefixCacheAffinityFilter("f", max_ttft_penalty_ms=0, max_tokens_in_flight_penalty=100)
    m = match(1000, {"e1": 1000})
    assert names(f.filter(ctx(m), [ep(1, inflight=150), ep(2, inflight=50)])) == ["e1"]
    assert names(f.filter(ctx(m), [ep(1, inflight=151), ep(2, inflight=50)])) == ["e1", "e2"]


def test_exploration_skips_the_gate() -> None:
    f = PrefixCacheAffinityFilter("f", exploration_probability=1.0)
    assert names(f.filter(ctx(match(10, {"e1": 10})), [ep(1), ep(2)])) == ["e1", "e2"]


@given(shares=st.lists(st.integers(0, 100), min_size=1, max_size=8),
       loads=st.lists(st.integers(0, 50_000), min_size=8, max_size=8),
       threshold=st.floats(0.01, 1.0), penalty=st.floats(0, 60_000))
def test_filter_keeps_all_or_exactly_the_sticky_ones(shares: list[int], loads: list[int],
                                                     threshold: float, penalty: float) -> None:
    endpoints = [ep(i, inflight=loads[i]) for i in range(len(shares))]
    m = match(100, {f"e{i}": s for i, s in enumerate(shares)})
    f = PrefixCacheAffinityFilter("f", affinity_threshold=threshold, max_ttft_penalty_ms=penalty,
                                  peak_prefill_throughput=10_000)
    kept = names(f.filter(ctx(m), endpoints))
    sticky = [f"e{i}" for i, s in enumerate(shares) if s / 100 >= threshold]
    assert kept in (names(endpoints), sticky)
    assert kept  # never empty
    if penalty == 0 and sticky:
        assert kept == sticky


@pytest.mark.parametrize("params, message", [
    ("{affinityThreshold: 1.5}", "affinityThreshold must be <= 1.0"),
    ("{explorationProbability: 2}", "explorationProbability must be in [0, 1]"),
    ("{maxTTFTPenaltyMs: -1}", "maxTTFTPenaltyMs must be >= 0"),
    ("{maxTokensInFlightPenalty: -1}", "maxTokensInFlightPenalty must be >= 0"),
    ("{peakPrefillThroughput: 0}", "peakPrefillThroughput must be > 0"),
    ("{ttftSource: latencyPredictor}", "ttftSource: latencyPredictor is not implemented"),
    ("{ttftSource: guess}", "ttftSource must be 'prefillThroughput' or 'latencyPredictor'"),
    ("{maxTtftPenaltyMs: 5}", "unknown field `maxTtftPenaltyMs`"),
    ("{affinityThreshold: high}", "Expected `float`, got `str` - at `$.affinityThreshold`"),
])
def test_affinity_filter_config_errors_name_the_field(params: str, message: str) -> None:
    text = config(f"- type: prefix-cache-affinity-filter\n  parameters: {params}\n",
                  "  - pluginRef: prefix-cache-affinity-filter\n")
    with pytest.raises(ConfigError) as err:
        load_picker_config(text)
    assert "plugins[0].parameters (prefix-cache-affinity-filter)" in str(err.value)
    assert message in str(err.value)


def test_affinity_filter_reads_llm_d_parameter_names() -> None:
    text = config("- type: prefix-cache-affinity-filter\n  parameters: {affinityThreshold: 0.9, "
                  "explorationProbability: 0.01, maxTTFTPenaltyMs: 5000, ttftSource: "
                  "prefillThroughput, peakPrefillThroughput: 3585, prefixMatchInfoProducerName:"
                  " p, inFlightLoadProducerName: i, latencyPredictionInfoProducerName: l}\n",
                  "  - pluginRef: prefix-cache-affinity-filter\n")
    f = load_picker_config(text).plugins["prefix-cache-affinity-filter"]
    assert (f.threshold, f.exploration, f.max_ttft_penalty_ms, f.ttft.peak) == (
        0.9, 0.01, 5000, 3585)


# --------------------------------------------------------------------------------------
# token-load-scorer and inflight-load-producer


def test_token_load_orders_by_in_flight_plus_uncached_tokens() -> None:
    s = TokenLoadScorer("t", queue_threshold_tokens=1000)
    idle_cold, idle_warm, busy_warm, saturated = (
        ep(1), ep(2), ep(3, inflight=500), ep(4, inflight=5000))
    m = match(200, {"e2": 200, "e3": 200, "e4": 200})
    scores = s.score(ctx(m), [idle_cold, idle_warm, busy_warm, saturated])
    # e1 would prefill 200 tokens; e2 nothing; e3 has 500 queued; e4 is past the threshold.
    assert scores == [pytest.approx(0.8), 1.0, pytest.approx(0.5), 0.0]
    # Without a match the whole prompt counts everywhere (about 4 characters a token).
    assert TokenLoadScorer("t").score(ctx(), [ep(1), ep(2, inflight=10)])[0] == 1.0


def test_token_load_follows_the_directors_accounting() -> None:
    # llm-d's in-flight tokens are uncached prompt tokens until the first response bytes;
    # the director's EndpointLoad keeps exactly that, so the score moves with it.
    s = TokenLoadScorer("t", queue_threshold_tokens=1000)
    e = ep(1)
    e.state.load.add(800, 400)  # an 800-token prompt, 400 of them cached here
    assert s.score(ctx(match(1, {"e1": 1})), [e]) == [pytest.approx(0.6)]
    e.state.load.prefilled(400)  # first bytes: prefill done, the request still runs
    assert e.state.load.requests == 1
    assert s.score(ctx(match(1, {"e1": 1})), [e]) == [1.0]


@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=6))
def test_token_load_is_monotonic_in_tokens(loads: list[int]) -> None:
    endpoints = [ep(i, inflight=n) for i, n in enumerate(loads)]
    scores = TokenLoadScorer("t", queue_threshold_tokens=5000).score(
        ctx(match(1, {e.name: 1 for e in endpoints})), endpoints)
    for (la, sa) in zip(loads, scores):
        for (lb, sb) in zip(loads, scores):
            if la < lb:
                assert sa >= sb
            assert 0.0 <= sa <= 1.0


@pytest.mark.parametrize("plugin, message", [
    ("- type: token-load-scorer\n  parameters: {queueThresholdTokens: 0}\n",
     "(token-load-scorer): queueThresholdTokens must be at least 1"),
    ("- type: inflight-load-producer\n  parameters: {addEstimatedOutputTokens: true}\n",
     "(inflight-load-producer): addEstimatedOutputTokens: true is not supported here"),
    ("- type: inflight-load-producer\n  parameters: {outputRatio: -1}\n",
     "(inflight-load-producer): outputRatio must be non-negative"),
    ("- type: inflight-load-producer\n  parameters: {maxEstimatedOutputTokens: -5}\n",
     "(inflight-load-producer): maxEstimatedOutputTokens must be non-negative"),
    ("- type: inflight-load-producer\n  parameters: {includeOutputTokens: false}\n",
     "(inflight-load-producer): Object contains unknown field `includeOutputTokens`"),
])
def test_load_plugin_config_errors_name_the_field(plugin: str, message: str) -> None:
    with pytest.raises(ConfigError, match="plugins\\[0\\].parameters") as err:
        load_picker_config(config(plugin + "- type: queue-scorer\n",
                                  "  - pluginRef: queue-scorer\n"))
    assert message in str(err.value)


def test_inflight_load_producer_accepts_llm_d_parameters() -> None:
    load_picker_config(config(
        "- type: inflight-load-producer\n  parameters: {addEstimatedOutputTokens: false, "
        "outputRatio: 1.5, maxEstimatedOutputTokens: 512, prefixMatchInfoProducerName: "
        "precise-prefix-cache-producer, syncCrossReplicaState: false}\n"
        "- type: token-load-scorer\n  parameters: {queueThresholdTokens: 8192, "
        "inFlightLoadProducerName: inflight-load-producer}\n",
        "  - pluginRef: token-load-scorer\n"))


# --------------------------------------------------------------------------------------
# no-hit-lru-scorer


def pick_cold(lru: NoHitLRUScorer, endpoints: list[Endpoint], m: PrefixMatch | None) -> str:
    """Schedule one request on the LRU scorer alone, then run its pre-request hook."""
    sched = Scheduler({"p": SchedulerProfile("p", [], [WeightedScorer(lru, 1.0)],
                                             MaxScorePicker("m", 1, 0))},
                      SingleProfileHandler("h"))
    c = ctx(m)
    result = sched.schedule(c, endpoints)
    lru.pre_request(c, result, HeaderChanges())
    return result.endpoints[0].name


def test_no_hit_lru_spreads_cold_requests() -> None:
    lru = NoHitLRUScorer("lru")
    endpoints = [ep(1), ep(2), ep(3)]
    cold = match(100, {})
    picks = [pick_cold(lru, endpoints, cold) for _ in range(6)]
    assert picks == ["e1", "e2", "e3", "e1", "e2", "e3"]
    # No prefix match at all counts as cold too.
    assert pick_cold(lru, endpoints, None) == "e1"


def test_no_hit_lru_is_neutral_for_warm_requests_and_does_not_record_them() -> None:
    lru = NoHitLRUScorer("lru")
    endpoints = [ep(1), ep(2), ep(3)]
    warm = match(100, {"e3": 16})
    assert lru.score(ctx(warm), endpoints) == [0.5, 0.5, 0.5]
    pick_cold(lru, endpoints, warm)
    assert len(lru) == 0
    # Cold: never used first (in order), then least recently used; 1 - rank / (n - 1).
    pick_cold(lru, endpoints, match(100, {}))  # e1
    assert lru.score(ctx(match(100, {})), endpoints) == [0.0, 1.0, 0.5]


def test_no_hit_lru_state_is_bounded_and_forgets_departed_endpoints() -> None:
    lru = NoHitLRUScorer("lru", lru_size=2)
    endpoints = [ep(1), ep(2), ep(3)]
    for _ in range(3):
        pick_cold(lru, endpoints, match(100, {}))
    assert len(lru) == 2
    lru.on_pool_change(endpoints[1:2])
    assert len(lru) == 1
    # A new pod under an old name has never had a cold request.
    e2_new = ep(2, address="10.0.9.2:8000")
    assert lru.score(ctx(match(100, {})), [endpoints[1], e2_new]) == [0.0, 1.0]


def test_no_hit_lru_config() -> None:
    text = config("- type: no-hit-lru-scorer\n  parameters: {lruSize: 2048, prefixPluginType: "
                  "prefix-cache-scorer, prefixPluginName: x, prefixMatchInfoProducerName: "
                  "precise-prefix-cache-producer}\n", "  - pluginRef: no-hit-lru-scorer\n")
    compiled = load_picker_config(text)
    assert compiled.plugins["no-hit-lru-scorer"].lru_size == 2048
    assert compiled.plugins["no-hit-lru-scorer"] in compiled.pre_request
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.parameters \(no-hit-lru-scorer\): "
                                          r"lruSize must be at least 1"):
        load_picker_config(text.replace("2048", "0"))


# --------------------------------------------------------------------------------------
# llm-d's guide config and ours, through the real director


def director(text: str, n: int = 3) -> tuple[Director, EndpointPool]:
    cfg = load_picker_config(text, source="guide")
    pool = EndpointPool()
    pool.replace_all(Endpoint(f"e{i}", f"10.0.0.{i + 1}:8000") for i in range(n))
    d = Director(pool, cfg.scheduler, Admission({}, SaturationDetector(5, 0.8, 0.5)),
                 EppMetrics(), producers=cfg.producers, pre_request=cfg.pre_request,
                 response_complete=cfg.response_complete)
    return d, pool


def body(prompt: str) -> bytes:
    return json.dumps({"model": "m", "prompt": prompt}).encode()


async def route(d: Director, prompt: str) -> str:
    handle = await d.route({":path": "/v1/completions"}, body(prompt), None)
    return handle.endpoints[0].name


@pytest.mark.asyncio
async def test_llm_d_guide_config_loads_unchanged_and_sticks_until_saturated() -> None:
    d, pool = director(GUIDE.read_text())
    doc = "".join(f"paragraph {i} of the shared document. " for i in range(80))  # ~2.9k chars
    first = await route(d, doc)
    # Still in flight, the first request loads its pod; the same prompt follows it anyway.
    assert [await route(d, doc) for _ in range(3)] == [first] * 3
    # A different prompt is cold: the token-load scorer sends it to an idle pod.
    other = await route(d, "an unrelated question " * 120)
    assert other != first
    # maxTokensInFlightPenalty (286,720 tokens) breaks stickiness once the sticky pod
    # has that much more prefill work in flight than the least loaded other pod.
    hot = next(e for e in pool.snapshot() if e.name == first)
    hot.state.load.add(300_000, 300_000)
    assert await route(d, doc) != first


def test_llm_d_stock_sticky_config_loads() -> None:
    # The same guide as installed without parameters (llm-d documents this plugin list).
    compiled = load_picker_config(config(
        "- type: approx-prefix-cache-producer\n- type: inflight-load-producer\n"
        "- type: prefix-cache-affinity-filter\n- type: token-load-scorer\n",
        "  - pluginRef: prefix-cache-affinity-filter\n  - pluginRef: token-load-scorer\n"))
    f = compiled.plugins["prefix-cache-affinity-filter"]
    assert (f.threshold, f.max_ttft_penalty_ms, f.ttft.peak) == (0.80, 18000, None)
    assert compiled.plugins["token-load-scorer"].threshold == 4_194_304
    (producer,) = compiled.producers
    assert (producer.block_size, producer.max_blocks) == (64, 131_072 // 64)


def test_sticky_deploy_config_loads() -> None:
    compiled = load_picker_config(STICKY.read_text(), source=str(STICKY))
    profile = compiled.scheduler.profiles["default"]
    assert [f.type_name for f in profile.filters] == ["prefix-cache-affinity-filter"]
    assert {s.scorer.type_name: s.weight for s in profile.scorers} == {
        "token-load-scorer": 1.0, "precise-prefix-cache-scorer": 0.0}
    assert compiled.plugins["prefix-cache-affinity-filter"].ttft.peak is None
    assert len(compiled.kv_settings) == 1


def test_no_hit_lru_takes_turns_with_other_replicas() -> None:
    # With replica sync, a cold placement another replica made counts as this one's.
    lru = NoHitLRUScorer("lru")
    endpoints = [ep(1), ep(2), ep(3)]
    cold = match(100, {})
    assert pick_cold(lru, endpoints, cold) == "e1"
    endpoints[1].state.peer_cold_pick_at = NOW + 1  # a peer, after this replica's pick
    assert pick_cold(lru, endpoints, cold) == "e3"
    assert pick_cold(lru, endpoints, cold) == "e1"  # e1's own turn is older than e2's
