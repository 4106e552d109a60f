"""EndpointPickerConfig validation: every mistake fails at start-up, naming the field."""

from __future__ import annotations

import pytest

from epp.config import ConfigError
from epp.config.picker_config import load_picker_config
from epp.scheduling.plugins.affinity import PrefixCacheAffinityFilter
from epp.scheduling.plugins.nohitlru import NoHitLRUScorer
from epp.scheduling.plugins.pickers import MaxScorePicker
from epp.scheduling.plugins.prefix import PrecisePrefixCacheScorer, PrefixCacheScorer
from epp.scheduling.plugins.scorers import KVCacheUtilizationScorer, QueueScorer
from epp.scheduling.plugins.tokenload import TokenLoadScorer


def test_builtin_default_profile() -> None:
    cfg = load_picker_config()
    profile = cfg.scheduler.profiles["default"]
    assert [(type(w.scorer), w.weight) for w in profile.scorers] == [
        (QueueScorer, 2.0), (KVCacheUtilizationScorer, 2.0), (PrefixCacheScorer, 3.0)]
    assert isinstance(profile.picker, MaxScorePicker)
    # With KV events: sticky until saturated over the precise match, new prefixes in turn.
    precise = load_picker_config(kv_events=True).scheduler.profiles["default"]
    assert [type(f) for f in precise.filters] == [PrefixCacheAffinityFilter]
    assert [(type(w.scorer), w.weight) for w in precise.scorers] == [
        (TokenLoadScorer, 1.0), (NoHitLRUScorer, 1.0), (PrecisePrefixCacheScorer, 0.0)]
    assert precise.scorers[2].scorer.kv_settings.tokenizer_mode == "render"
    assert precise.scorers[2].scorer.kv_settings.pending_picks
    assert cfg.saturation.queue_depth_threshold == 5
    assert cfg.saturation.kv_cache_util_threshold == 0.8


def test_full_config_parses() -> None:
    cfg = load_picker_config("""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {name: load, type: load-aware-scorer, parameters: {threshold: 64}}
- {name: only-a, type: label-selector-filter, parameters: {matchLabels: {pool: a}}}
- {name: picker, type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: main
  plugins: [{pluginRef: only-a}, {pluginRef: load, weight: 3}, {pluginRef: picker}]
saturationDetector: {queueDepthThreshold: 8, kvCacheUtilThreshold: 0.9}
objectives: [{name: critical, priority: 10}, {name: batch, priority: -1}]
""")
    profile = cfg.scheduler.profiles["main"]
    assert cfg.plugins["load"].threshold == 64
    assert profile.scorers[0].weight == 3.0 and len(profile.filters) == 1
    assert cfg.plugins["picker"].count == 2
    assert cfg.objectives == {"critical": 10, "batch": -1}
    assert cfg.saturation.queue_depth_threshold == 8


P = "plugins: [{type: queue-scorer}]\n"
PROFILE = "schedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}]\n"


@pytest.mark.parametrize("text, message", [
    ("plugins: [{type: nope}]\n" + PROFILE,
     "config: plugins[0].type (nope): unknown plugin type 'nope' (known: "),
    ("plugins: [{type: load-aware-scorer, parameters: {threshold: x}}]\n"
     "schedulingProfiles: [{name: a, plugins: [{pluginRef: load-aware-scorer}]}]",
     "config: plugins[0].parameters (load-aware-scorer): Expected `int`, got `str` - at "
     "`$.threshold`"),
    ("plugins: [{type: load-aware-scorer, parameters: {threshold: 0}}]\n"
     "schedulingProfiles: [{name: a, plugins: [{pluginRef: load-aware-scorer}]}]",
     "config: plugins[0].parameters (load-aware-scorer): threshold must be at least 1"),
    ("plugins: [{type: queue-scorer, parameters: {depth: 1}}]\n" + PROFILE,
     "config: plugins[0].parameters (queue-scorer): Object contains unknown field `depth`"),
    (P + "schedulingProfiles: [{name: a, plugins: [{pluginRef: q}]}]",
     "config: schedulingProfiles[0].plugins[0].pluginRef: no plugin named 'q' "
     "(defined: queue-scorer)"),
    (P + "schedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]},"
         " {name: b, plugins: [{pluginRef: queue-scorer}]}]",
     "config: schedulingProfiles: single-profile-handler needs exactly one scheduling "
     "profile, got 2: ['a', 'b']"),
    (P, "config: schedulingProfiles: at least one profile is required"),
    ("plugins: [{type: queue-scorer}, {type: queue-scorer}]\n" + PROFILE,
     "config: plugins[1].name: duplicate plugin name 'queue-scorer'"),
    ("plugins: [{type: random-picker}]\n"
     "schedulingProfiles: [{name: a, plugins: [{pluginRef: random-picker, weight: 2}]}]",
     "config: schedulingProfiles[0].plugins[0].weight: 'random-picker' is not a scorer; "
     "only scorers take a weight"),
    ("plugins: [{type: random-picker}, {type: max-score-picker}]\n"
     "schedulingProfiles: [{name: a, plugins: [{pluginRef: random-picker}, "
     "{pluginRef: max-score-picker}]}]",
     "config: schedulingProfiles[0].plugins: more than one picker (random-picker, "
     "max-score-picker)"),
    ("plugins: [{type: single-profile-handler}]\n"
     "schedulingProfiles: [{name: a, plugins: [{pluginRef: single-profile-handler}]}]",
     "config: schedulingProfiles[0].plugins[0].pluginRef: 'single-profile-handler' "
     "(single-profile-handler) cannot be used inside a profile"),
    (P + "schedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, weight: -1}]}]",
     "config: schedulingProfiles[0].plugins[0].weight: must not be negative"),
    ("kind: Deployment\n" + P + PROFILE,
     "config: kind 'Deployment' must be EndpointPickerConfig"),
    ("apiVersion: v1\n" + P + PROFILE, "config: apiVersion 'v1' is not one of"),
    ("plugins: [{type: queue-scorer, nam: x}]\n" + PROFILE,
     "config: Object contains unknown field `nam` - at `$.plugins[0]`"),
    ("plugins: {type: queue-scorer}\n" + PROFILE,
     "config: Expected `array`, got `object` - at `$.plugins`"),
    ("- just a list", "config: expected a mapping (an EndpointPickerConfig)"),
    ("plugins: [", "config: not valid YAML:"),
    (P + PROFILE + "saturationDetector: {kvCacheUtilThreshold: 1.5}",
     "config: saturationDetector.kvCacheUtilThreshold must be in (0, 1]"),
    (P + PROFILE + "objectives: [{name: a}, {name: a, priority: 1}]",
     "config: objectives[1].name: duplicate 'a'"),
])
def test_config_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_picker_config(text)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)
