"""llm-d-router's EndpointPickerConfig: the chart's default file starts unchanged and
routes by its weights; every upstream section and plugin type is either mapped onto our
parts or refused at start-up with one line naming it and what to use instead."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from epp.api.openai import parse_request
from epp.config import ConfigError
from epp.config.picker_config import PickerConfig, SaturationSettings, load_picker_config
from epp.config.upstream import MetricsSourceSettings, parse_duration
from epp.datastore import Endpoint, ServerMetrics
from epp.scheduling.plugins.handlers import SingleProfileHandler
from epp.scheduling.plugins.pickers import MaxScorePicker
from epp.scheduling.plugins.prefix import PrefixCacheScorer
from epp.scheduling.plugins.scorers import KVCacheUtilizationScorer, QueueScorer
from epp.scheduling.types import SchedulingContext

CHART_DEFAULT = (Path(__file__).parent / "fixtures" / "llm-d-router-default-plugins.yaml"
                 ).read_text()
NOW = 1000.0
BASE = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
"""


def test_chart_default_compiles_to_its_profile(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = load_picker_config(CHART_DEFAULT, source="default-plugins.yaml")
    profile = cfg.scheduler.profiles["default"]
    assert [(type(w.scorer), w.weight) for w in profile.scorers] == [
        (QueueScorer, 2.0), (KVCacheUtilizationScorer, 2.0), (PrefixCacheScorer, 3.0)]
    # Neither picker nor handler is named: upstream's defaults fill both in.
    assert isinstance(profile.picker, MaxScorePicker)
    assert isinstance(cfg.scheduler.handler, SingleProfileHandler)
    assert cfg.metrics_source == MetricsSourceSettings("http", "/metrics", verify_tls=False)
    assert cfg.saturation == SaturationSettings()
    # The data-layer plugins are used (by the scraper), so nothing is reported unused.
    assert not caplog.records, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("api_version", ["llm-d.ai/v1alpha1",
                                         "inference.networking.x-k8s.io/v1alpha1"])
def test_both_api_versions_accepted(api_version: str) -> None:
    text = CHART_DEFAULT.replace("apiVersion: llm-d.ai/v1alpha1", f"apiVersion: {api_version}")
    assert f"apiVersion: {api_version}" in text
    load_picker_config(text)


def _endpoint(i: int, waiting: int, kv: float) -> Endpoint:
    e = Endpoint(f"e{i}", f"10.0.0.{i}:8000")
    e.state.update_metrics(ServerMetrics(waiting=waiting, kv_cache_usage=kv, scraped_at=NOW))
    return e


async def _route(cfg: PickerConfig, prompt: str, endpoints: list[Endpoint]) -> str:
    request = parse_request("/v1/completions",
                            f'{{"model": "m", "prompt": "{prompt}"}}'.encode())
    ctx = SchedulingContext(request, {}, NOW)
    for producer in cfg.producers:
        ctx.cycle[producer.name] = await producer.produce(request, endpoints)
    return cfg.scheduler.schedule(ctx, endpoints).endpoints[0].name


def test_chart_default_routes_by_its_weights() -> None:
    """A warm pod with a queue of 2 and 30% KV use against a cold idle pod: the prefix
    weight of 3 outweighs queue 2 + KV 2 (4.4 against 4.0), so the warm pod wins; with
    equal weights the same state sends the request to the cold pod (1.7 against 2.0)."""
    prompt = "shared system prompt " * 40
    warm, cold = _endpoint(1, waiting=2, kv=0.3), _endpoint(2, waiting=0, kv=0.0)

    async def picks(text: str) -> list[str]:
        cfg = load_picker_config(text)
        (producer,) = cfg.producers
        match = await producer.produce(
            parse_request("/v1/completions", f'{{"model": "m", "prompt": "{prompt}"}}'.encode()),
            [warm, cold])
        assert match is not None
        producer.history.record(warm.name, match.keys)  # warm served this prompt before
        return [await _route(cfg, prompt, [warm, cold]) for _ in range(5)]

    assert asyncio.run(picks(CHART_DEFAULT)) == ["e1"] * 5
    equal = CHART_DEFAULT.replace("weight: 2", "weight: 1").replace("weight: 3", "weight: 1")
    assert asyncio.run(picks(equal)) == ["e2"] * 5


def _with_plugins(extra: str, tail: str = "") -> str:
    return BASE.replace("plugins:\n- type: queue-scorer\n",
                        "plugins:\n- type: queue-scorer\n" + extra) + tail


def test_metrics_data_source_maps_onto_the_scraper() -> None:
    cfg = load_picker_config(_with_plugins(
        "- type: metrics-data-source\n"
        "  parameters: {scheme: https, path: /engine/metrics, insecureSkipVerify: false}\n"
        "- type: core-metrics-extractor\n"
        "  parameters: {defaultEngine: vllm}\n"))
    assert cfg.metrics_source == MetricsSourceSettings("https", "/engine/metrics", True)


@pytest.mark.parametrize("section", ["dataLayer", "data"])
def test_data_layer_section_and_its_older_name(section: str) -> None:
    cfg = load_picker_config(_with_plugins(
        "- {name: pods, type: metrics-data-source, parameters: {path: /m}}\n"
        "- {name: vllm, type: core-metrics-extractor}\n",
        f"{section}:\n  sources:\n  - pluginRef: pods\n    extractors: [{{pluginRef: vllm}}]\n"))
    assert cfg.metrics_source.path == "/m"
    # As upstream: a reference to a default data-layer type creates it.
    cfg = load_picker_config(BASE + f"{section}:\n  sources:\n"
                             "  - pluginRef: metrics-data-source\n"
                             "    extractors: [{pluginRef: core-metrics-extractor}]\n")
    assert cfg.metrics_source == MetricsSourceSettings()


def test_saturation_detector_plugin_ref() -> None:
    cfg = load_picker_config(_with_plugins(
        "- name: sat\n  type: utilization-detector\n  parameters: {queueDepthThreshold: 8, "
        "kvCacheUtilThreshold: 0.9, metricsStalenessThreshold: 200ms}\n",
        "saturationDetector: {pluginRef: sat}\n"))
    assert cfg.saturation == SaturationSettings(8, 0.9, 0.2)
    # Undefined but named after the default type: the default detector.
    cfg = load_picker_config(BASE + "saturationDetector: {pluginRef: utilization-detector}\n")
    assert cfg.saturation == SaturationSettings()
    # flowControl.saturationDetector wins over the deprecated top-level field.
    cfg = load_picker_config(_with_plugins(
        "- {name: a, type: utilization-detector, parameters: {queueDepthThreshold: 3}}\n"
        "- {name: b, type: utilization-detector, parameters: {queueDepthThreshold: 7}}\n",
        "saturationDetector: {pluginRef: a}\n"
        "flowControl:\n  saturationDetector: {pluginRef: b}\n"))
    assert cfg.saturation.queue_depth_threshold == 7
    # GIE's older inline thresholds still work.
    cfg = load_picker_config(BASE + "saturationDetector: {queueDepthThreshold: 9}\n")
    assert cfg.saturation == SaturationSettings(9, 0.8)


def test_request_handler_parsers() -> None:
    load_picker_config(BASE + "requestHandler:\n  parsers: [{pluginRef: openai-parser}]\n")
    load_picker_config(_with_plugins("- {name: oa, type: openai-parser}\n",
                                     "requestHandler: {parsers: [{pluginRef: oa}]}\n"))
    load_picker_config(BASE + "parser: {pluginRef: openai-parser}\n")


def test_feature_gates() -> None:
    load_picker_config(BASE + "featureGates: [flowControl=false, haPopulateNonLeaderDatastore, "
                              "dataLayer=true, prepareDataPlugins, enableLegacyMetrics=false]\n")


def test_inert_flow_control_settings_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_picker_config(BASE + "flowControl: {maxRequests: 100, defaultRequestTTL: 30s}\n")
    (record,) = caplog.records
    assert "flowControl.maxRequests, defaultRequestTTL: no effect" in record.getMessage()


@pytest.mark.parametrize("text, message", [
    (_with_plugins("- type: active-request-scorer\n"),
     "config: plugins[1].type (active-request-scorer): not implemented here; use "
     "load-aware-scorer or queue-scorer"),
    (_with_plugins("- type: passthrough-parser\n"),
     "config: plugins[1].type (passthrough-parser): not implemented here; use openai-parser"),
    (BASE + "requestHandler: {parsers: [{pluginRef: anthropic-parser}]}\n",
     "config: requestHandler.parsers[0].pluginRef: anthropic-parser is not implemented here; "
     "use openai-parser"),
    (BASE + "requestHandler: {parsers: [{pluginRef: queue-scorer}]}\n",
     "config: requestHandler.parsers[0].pluginRef: 'queue-scorer' (queue-scorer) is not a "
     "parser; use openai-parser"),
    (BASE + "requestHandler: {parsers: [{pluginRef: mine}]}\n",
     "config: requestHandler.parsers[0].pluginRef: no plugin named 'mine'"),
    (BASE + "featureGates: [flowControl]\n",
     "config: featureGates: flowControl is not implemented: requests are admitted or shed "
     "at once"),
    (BASE + "featureGates: [speculativeDecoding]\n",
     "config: featureGates: unknown feature gate 'speculativeDecoding' (known: "),
    (BASE + "featureGates: [flowControl=maybe]\n",
     "config: featureGates: 'maybe' is not a boolean for feature gate 'flowControl'"),
    (BASE + "dataLayer: {discovery: {pluginRef: file}}\n",
     "config: dataLayer.discovery is not implemented here; use --endpoints-file"),
    (BASE + "data: {peerDiscovery: {pluginRef: dns}}\n",
     "config: data.peerDiscovery is not implemented here; replicas here are active-active"),
    (BASE + "dataLayer: {injectDefaults: false}\n",
     "config: dataLayer.injectDefaults: false with no metrics-data-source turns metrics "
     "collection off, which is not supported here"),
    (BASE + "dataLayer: {}\ndata: {}\n",
     "config: give dataLayer or its older name data, not both"),
    (BASE + "dataLayer: {sources: [{pluginRef: queue-scorer}]}\n",
     "config: dataLayer.sources[0].pluginRef: 'queue-scorer' (queue-scorer) is not a data "
     "source; use metrics-data-source"),
    (BASE + "dataLayer: {sources: [{pluginRef: dcgm-extractor}]}\n",
     "config: dataLayer.sources[0].pluginRef: dcgm-extractor is not implemented here; use "
     "core-metrics-extractor"),
    (_with_plugins("- {name: a, type: metrics-data-source}\n"
                   "- {name: b, type: metrics-data-source}\n"),
     "config: plugins: at most one metrics-data-source (one scraper per EPP; got a, b)"),
    (_with_plugins("- {type: metrics-data-source, parameters: {scheme: ftp}}\n"),
     "config: plugins[1].parameters (metrics-data-source): scheme must be http or https, "
     "got 'ftp'"),
    (_with_plugins("- {type: metrics-data-source, parameters: {caCertPath: /ca.pem}}\n"),
     "config: plugins[1].parameters (metrics-data-source): Object contains unknown field "
     "`caCertPath`"),
    (_with_plugins("- type: core-metrics-extractor\n"
                   "  parameters: {defaultEngine: trtllm-serve}\n"),
     "config: plugins[1].parameters (core-metrics-extractor): defaultEngine 'trtllm-serve' has "
     "no built-in metric names (built in: vllm, sglang); drop defaultEngine and name its "
     "metrics with --total-queued-requests-metric"),
    (_with_plugins("- {name: a, type: core-metrics-extractor,"
                   " parameters: {defaultEngine: vllm}}\n"
                   "- {name: b, type: core-metrics-extractor,"
                   " parameters: {defaultEngine: sglang}}\n"),
     "config: plugins: core-metrics-extractor plugins name different engines (a, b)"),
    (_with_plugins("- {type: utilization-detector, parameters: {headroom: 0.2}}\n"),
     "config: plugins[1].parameters (utilization-detector): headroom is not implemented"),
    (_with_plugins("- {type: utilization-detector, parameters: "
                   "{metricsStalenessThreshold: soon}}\n"),
     "config: plugins[1].parameters (utilization-detector): 'soon' is not a duration"),
    (_with_plugins("- type: concurrency-detector\n"),
     "config: plugins[1].type (concurrency-detector): not implemented here; use "
     "utilization-detector"),
    (BASE + "saturationDetector: {pluginRef: queue-scorer}\n",
     "config: saturationDetector.pluginRef: 'queue-scorer' (queue-scorer) is not a "
     "saturation detector; use a utilization-detector plugin"),
    (BASE + "saturationDetector: {pluginRef: utilization-detector, queueDepthThreshold: 3}\n",
     "config: saturationDetector: give pluginRef or the thresholds, not both"),
    (BASE + "flowControl: {saturationDetector: {kvCacheUtilThreshold: 2}}\n",
     "config: flowControl.saturationDetector.kvCacheUtilThreshold must be in (0, 1]"),
    (BASE + "flowControl: {queueing: true}\n",
     "config: Object contains unknown field `queueing` - at `$.flowControl`"),
    (BASE + "schedulers: []\n", "config: unknown section 'schedulers'; the sections read "
                                 "here are apiVersion, kind, plugins, schedulingProfiles, "
                                 "saturationDetector, objectives, featureGates, "
                                 "requestHandler, parser, data, dataLayer, flowControl"),
    (BASE.replace("plugins:\n- type: queue-scorer\n",
                  "plugins:\n- type: queue-scorer\n- type: openai-parser\n")
     + "  - pluginRef: openai-parser\n",
     "config: schedulingProfiles[0].plugins[1].pluginRef: 'openai-parser' (openai-parser) "
     "cannot be used inside a profile"),
])
def test_unimplemented_upstream_parts_fail_naming_them(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_picker_config(text)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, seconds", [
    ("200ms", 0.2), ("1s", 1.0), ("1.5s", 1.5), ("1m30s", 90.0), ("0", 0.0), ("250us", 25e-5)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "1s 2s", "-1s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_epp_builds_from_the_chart_default_file(tmp_path: Path) -> None:
    """``--config-file default-plugins.yaml`` as the chart passes it: the app is built
    with the chart's profile, and the scraper reads the configured path."""
    from epp.config import EppSettings
    from epp.runner import build_app

    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {address: 10.0.0.1:8000}\n")
    config = tmp_path / "default-plugins.yaml"
    config.write_text(CHART_DEFAULT.replace('path: "/metrics"', 'path: "/vllm/metrics"'))
    app = build_app(EppSettings(endpoints_file=str(endpoints), config_file=str(config),
                                grpc_port=0, health_port=0, metrics_port=0))
    profile = app.picker_config.scheduler.profiles["default"]
    assert [w.weight for w in profile.scorers] == [2.0, 2.0, 3.0]
    assert app.scraper._path == "/vllm/metrics"


def test_default_engine_picks_the_scraped_metric_names(tmp_path: Path) -> None:
    """``defaultEngine: sglang`` (what the chart renders for SGLang pools) makes the scraper
    read SGLang's names; naming other metrics by flag as well is refused."""
    from epp.config import EppSettings
    from epp.datalayer.parser import SGLANG_METRICS, VLLM_METRICS, EngineMetrics
    from epp.runner import build_app

    assert load_picker_config(CHART_DEFAULT).engine_metrics is None  # the flags decide
    text = CHART_DEFAULT.replace("- type: core-metrics-extractor\n",
                                 "- type: core-metrics-extractor\n"
                                 "  parameters: {defaultEngine: sglang}\n")
    assert load_picker_config(text).engine_metrics == SGLANG_METRICS
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints:\n- {address: 10.0.0.1:8000}\n")
    settings = {"endpoints_file": str(endpoints), "config_text": text,
                "grpc_port": 0, "health_port": 0, "metrics_port": 0}
    app = build_app(EppSettings(**settings))  # type: ignore[arg-type]
    assert app.scraper._names == SGLANG_METRICS
    same = EppSettings(**settings, engine_metrics=SGLANG_METRICS)  # type: ignore[arg-type]
    assert build_app(same).scraper._names == SGLANG_METRICS
    custom = EngineMetrics.from_specs("q", "r", "kv")
    assert custom != VLLM_METRICS
    with pytest.raises(ConfigError, match="name different metrics"):
        build_app(EppSettings(**settings, engine_metrics=custom))  # type: ignore[arg-type]
