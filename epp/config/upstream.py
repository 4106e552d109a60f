"""The parts of llm-d-router's ``EndpointPickerConfig`` that are not scheduling plugins.

The upstream config lists data-layer plugins (``metrics-data-source``,
``core-metrics-extractor``), request parsers (``openai-parser``) and a saturation detector
(``utilization-detector``) next to its scorers. Here each is a config-only plugin: it
validates its parameters at start-up and says what our fixed parts should do (where and
how to scrape, how to detect saturation); it never takes part in a profile.

Everything upstream has that we do not implement is named in :data:`NOT_IMPLEMENTED` with
what to use instead, so a config using it fails start-up with one line saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epp.config.goflags import parse_go_duration
from epp.datalayer.parser import SGLANG_METRICS, VLLM_METRICS, EngineMetrics
from epp.scheduling.registry import PluginDeps, PluginParams, PluginRegistry

# The metrics page path and scheme every engine we scrape serves (vLLM, SGLang, TGI).
DEFAULT_METRICS_SCHEME = "http"
DEFAULT_METRICS_PATH = "/metrics"
# Upstream skips certificate checks of in-cluster model servers unless told otherwise:
# pods rarely carry certificates a picker could verify.
DEFAULT_INSECURE_SKIP_VERIFY = True
# Upstream's engine when a pod carries no engine label.
DEFAULT_ENGINE = "vllm"
# Engines whose metric names are built in (upstream also knows trtllm-serve and
# triton-tensorrt-llm: name their metrics with the metric-name flags instead).
ENGINE_METRICS: dict[str, EngineMetrics] = {"vllm": VLLM_METRICS, "sglang": SGLANG_METRICS}


@dataclass(frozen=True, slots=True)
class MetricsSourceSettings:
    """Where and how the scraper reads each endpoint's metrics page."""

    scheme: str = DEFAULT_METRICS_SCHEME
    path: str = DEFAULT_METRICS_PATH
    verify_tls: bool = not DEFAULT_INSECURE_SKIP_VERIFY


class _ConfigOnly:
    """A plugin that configures a fixed part of the EPP and never runs in a profile."""

    type_name = ""

    def __init__(self, name: str) -> None:
        self.name = name


class MetricsDataSourceParams(PluginParams):
    """``metrics-data-source`` parameters (upstream names)."""

    scheme: str = DEFAULT_METRICS_SCHEME
    path: str = DEFAULT_METRICS_PATH
    insecure_skip_verify: bool = DEFAULT_INSECURE_SKIP_VERIFY


class MetricsDataSource(_ConfigOnly):
    """Upstream's Prometheus-page source: maps onto the scraper's scheme, path and TLS
    verification (how often it polls stays ``--metrics-scrape-interval``)."""

    type_name = "metrics-data-source"
    Params = MetricsDataSourceParams

    def __init__(self, name: str, source: MetricsSourceSettings) -> None:
        super().__init__(name)
        self.source = source

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        if params.scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {params.scheme!r}")
        if not params.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {params.path!r}")
        return cls(name, MetricsSourceSettings(params.scheme, params.path,
                                               not params.insecure_skip_verify))


class CoreMetricsExtractorParams(PluginParams):
    """``core-metrics-extractor`` parameters (upstream names)."""

    default_engine: str | None = None


class CoreMetricsExtractor(_ConfigOnly):
    """Upstream's metric names per engine: ``defaultEngine`` picks which names the scraper
    reads for every pod (per-pod engine labels are not read here). An engine without
    built-in names is refused rather than scraped into zeros."""

    type_name = "core-metrics-extractor"
    Params = CoreMetricsExtractorParams

    def __init__(self, name: str, engine_metrics: EngineMetrics | None) -> None:
        super().__init__(name)
        self.engine_metrics = engine_metrics  # None: no engine named, the flags decide

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        engine = params.default_engine
        if engine is not None and engine not in ENGINE_METRICS:
            raise ValueError(
                f"defaultEngine {engine!r} has no built-in metric names (built in: "
                f"{', '.join(ENGINE_METRICS)}); drop defaultEngine and name its metrics "
                "with --total-queued-requests-metric, --total-running-requests-metric and "
                "--kv-cache-usage-percentage-metric")
        return cls(name, None if engine is None else ENGINE_METRICS[engine])


class UtilizationDetectorParams(PluginParams):
    """``utilization-detector`` parameters (upstream names; durations as Go writes them)."""

    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness_threshold: str | None = None
    headroom: float = 0.0


class UtilizationDetector(_ConfigOnly):
    """Upstream's default saturation detector; ours computes the same roofline mean
    (``epp.requestcontrol.admission.SaturationDetector``). Only its admission role exists
    here, so a non-zero ``headroom`` (its per-endpoint filter role) is refused."""

    type_name = "utilization-detector"
    Params = UtilizationDetectorParams

    def __init__(self, name: str, queue_depth_threshold: int, kv_cache_util_threshold: float,
                 stale_after_s: float | None) -> None:
        super().__init__(name)
        self.queue_depth_threshold = queue_depth_threshold
        self.kv_cache_util_threshold = kv_cache_util_threshold
        self.stale_after_s = stale_after_s

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        if params.queue_depth_threshold < 1:
            raise ValueError("queueDepthThreshold must be >= 1")
        if not 0 < params.kv_cache_util_threshold <= 1:
            raise ValueError("kvCacheUtilThreshold must be in (0, 1]")
        if params.headroom != 0:
            raise ValueError("headroom is not implemented (the detector here only sheds "
                             "sheddable requests, it does not filter endpoints); remove it")
        stale = None
        if params.metrics_staleness_threshold is not None:
            stale = parse_duration(params.metrics_staleness_threshold)
            if stale <= 0:
                raise ValueError("metricsStalenessThreshold must be positive")
        return cls(name, params.queue_depth_threshold, params.kv_cache_util_threshold, stale)


class OpenAIParser(_ConfigOnly):
    """Upstream's OpenAI request parser: the one request format parsed here
    (``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses``)."""

    type_name = "openai-parser"
    Params = PluginParams

    @classmethod
    def from_config(cls, name: str, params: Any, deps: PluginDeps) -> Any:
        return cls(name)


CONFIG_ONLY_PLUGINS = (MetricsDataSource, CoreMetricsExtractor, UtilizationDetector,
                       OpenAIParser)
PARSER_TYPES = frozenset({OpenAIParser.type_name})

_PARSE = "openai-parser (OpenAI completions, chat completions and responses are parsed)"
_LOAD = "load-aware-scorer or queue-scorer"
# Upstream plugin types with no implementation here, and what to use instead.
NOT_IMPLEMENTED: dict[str, str] = {
    "anthropic-parser": _PARSE,
    "vertexai-parser": _PARSE,
    "vllmgrpc-parser": _PARSE + " over HTTP",
    "vllmhttp-parser": _PARSE,
    "sglanghttp-parser": _PARSE,
    "passthrough-parser": _PARSE + "; other paths are refused with 400",
    "active-request-scorer": _LOAD,
    "burst-prefix-cache-producer": "prefix-cache-scorer (it owns its producer)",
    "token-producer": "precise-prefix-cache-scorer (it tokenizes)",
    "tokenizer": "precise-prefix-cache-scorer (parameters.tokenizer)",
    "predicted-latency-producer": _LOAD,
    "latency-scorer": _LOAD,
    "slo-headroom-tier-filter": _LOAD,
    "latency-slo-admitter": "utilization-detector (saturationDetector)",
    "probabilistic-admitter": "utilization-detector (saturationDetector)",
    "concurrency-detector": "utilization-detector",
    "utilization-filter": "utilization-detector (saturationDetector)",
    "context-length-aware": _LOAD,
    "by-label": "label-selector-filter",
    "by-label-selector": "label-selector-filter",
    "encode-filter": "prefill-filter / decode-filter",
    "disagg-profile-handler": "pd-profile-handler",
    "disagg-headers-handler": "prefill-header-handler",
    "always-disagg-pd-decider": "pd-profile-handler (parameters.threshold: 0 disaggregates "
                                "every request with uncached tokens)",
    "prefix-based-pd-decider": "pd-profile-handler (parameters.threshold)",
    "data-parallel-profile-handler": "single-profile-handler (each targetPort is already "
                                     "its own endpoint)",
    "multicluster-metrics-data-source": "metrics-data-source",
    "multicluster-metrics-extractor": "core-metrics-extractor",
    "models-data-extractor": "the endpoints' served models from discovery",
    "dcgm-extractor": "core-metrics-extractor",
    "request-attribute-reporter": "the response-usage metrics on /metrics",
}


def add_config_only_plugins(registry: PluginRegistry) -> PluginRegistry:
    """Register the config-only plugin types (once) and return ``registry``."""
    known = set(registry.known())
    for cls in CONFIG_ONLY_PLUGINS:
        if cls.type_name not in known:
            registry.register(cls)
    return registry


def is_config_only(plugin: object) -> bool:
    """Whether ``plugin`` configures a fixed part of the EPP (never used in a profile)."""
    return isinstance(plugin, _ConfigOnly) or getattr(plugin, "config_only", False) is True


@dataclass(frozen=True, slots=True)
class FeatureGate:
    """An upstream feature gate: its default and what turning it on means here."""

    default: bool
    meaning: str
    # Set when enabling the gate asks for something not implemented: the refusal text.
    refused_when_on: str | None = None


FEATURE_GATES: dict[str, FeatureGate] = {
    "flowControl": FeatureGate(
        False, "queueing by priority band",
        "requests are admitted or shed at once by the saturation detector, never queued; "
        "remove the gate (the flowControl section's saturationDetector is still read)"),
    "haPopulateNonLeaderDatastore": FeatureGate(
        True, "every replica keeps a full datastore (replicas here are active-active)"),
    "dataLayer": FeatureGate(True, "the metrics scraper (always on here)"),
    "enableLegacyMetrics": FeatureGate(False, "the metrics scraper (one implementation here)"),
    "prepareDataPlugins": FeatureGate(True, "data producers (always on here)"),
}


def parse_feature_gates(gates: list[str]) -> dict[str, bool]:
    """``name``, ``name=true`` or ``name=false`` entries -> gate values; raises
    ``ValueError`` naming an unknown gate, a bad value or a gate refused here."""
    values = {name: gate.default for name, gate in FEATURE_GATES.items()}
    for entry in gates:
        name, _, raw = entry.partition("=")
        name = name.strip()
        gate = FEATURE_GATES.get(name)
        if gate is None:
            raise ValueError(f"unknown feature gate {name!r} (known: "
                             f"{', '.join(sorted(FEATURE_GATES))})")
        value = raw.strip().lower() if raw else "true"
        if value not in ("true", "false", "1", "0", "t", "f"):
            raise ValueError(f"{raw!r} is not a boolean for feature gate {name!r}")
        values[name] = value in ("true", "1", "t")
        if values[name] and gate.refused_when_on is not None:
            raise ValueError(f"{name} is not implemented: {gate.refused_when_on}")
    return values


def parse_duration(text: str) -> float:
    """A non-negative Go duration in a config file (``200ms``, ``1.5s``, ``1m30s``), in
    seconds; ``ValueError`` if not one."""
    try:
        seconds = parse_go_duration(text, bare_seconds=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 200ms or 1s") from None
    if seconds < 0:
        raise ValueError(f"{text!r} is negative; a duration such as 200ms or 1s is needed")
    return seconds
