"""``EndpointPickerConfig``: the ecosystem's YAML format, validated at start-up.

Every mistake (unknown type, bad parameter, dangling pluginRef, a profile handler that
cannot run the profiles given) raises :class:`ConfigError` with one line naming the
field, so nothing fails later at request time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
import yaml

from epp.config.settings import ConfigError
from epp.datalayer.parser import EngineMetrics
from epp.config.upstream import (
    NOT_IMPLEMENTED,
    PARSER_TYPES,
    CoreMetricsExtractor,
    MetricsDataSource,
    MetricsSourceSettings,
    UtilizationDetector,
    add_config_only_plugins,
    is_config_only,
    parse_feature_gates,
)
from epp.kvcache.settings import KVCacheSettings
from epp.scheduling.plugins import default_registry
from epp.scheduling.plugins.prefix import PrecisePrefixCacheScorer
from epp.scheduling.registry import PluginConfigError, PluginDeps, PluginRegistry
from epp.scheduling.scheduler import (
    PluginTimer,
    Scheduler,
    SchedulerProfile,
    WeightedScorer,
)
from epp.scheduling.types import Filter, Picker, ProfileHandler, Scorer

log = logging.getLogger(__name__)

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
KIND = "EndpointPickerConfig"

# The built-in defaults. Without KV events: GIE's default profile (queue x2, KV
# utilisation x2, approximate prefix x3). With KV events, chosen by measurement
# (benchmarks/compare, README "Routing quality"): llm-d's sticky-until-saturated routing
# over the precise prefix match (prefix-cache-affinity-filter: keep the pods holding at
# least 80% of the prompt, pending picks included, unless their estimated TTFT at their
# learned prefill rate is more than 18 s worse than the best other pod's; then the least
# prefill work in flight), plus no-hit-lru-scorer, which places prompts no pod holds any
# of (new tenants, new conversations, unique prompts) in turn instead of by a load
# tie-break. On the simulated fleet it beat GIE's weighted blend (precise x6) on
# shared-prefix and no-sharing TTFT p90 and matched it on multi-turn. Tokens come from
# the pods' render endpoints (exact for any model, no tokenizer files needed).
DEFAULT_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: max-score-picker
"""
DEFAULT_PRECISE_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters: {tokenizer: {mode: render}}
- type: prefix-cache-affinity-filter
- type: token-load-scorer
- type: no-hit-lru-scorer
- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-affinity-filter
  - pluginRef: token-load-scorer
    weight: 1
  - pluginRef: no-hit-lru-scorer
    weight: 1
  # Weight 0: builds the KV-event index the filter and the token counts read, and shows
  # each pod's share in /debug/explain.
  - pluginRef: precise-prefix-cache-scorer
    weight: 0
  - pluginRef: max-score-picker
"""

# GIE's saturation detector defaults: a pod is "full" at 5 waiting requests or 80% KV.
DEFAULT_QUEUE_DEPTH_THRESHOLD = 5
DEFAULT_KV_CACHE_UTIL_THRESHOLD = 0.8


class _Spec(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    pass


class PluginSpec(_Spec):
    type: str
    name: str | None = None
    parameters: dict[str, Any] | None = None


class PluginRefSpec(_Spec):
    plugin_ref: str
    weight: float | None = None


class ProfileSpec(_Spec):
    name: str
    plugins: list[PluginRefSpec]


class SaturationSpec(_Spec):
    # Upstream names a utilization-detector plugin; the inline thresholds are GIE's
    # older form, still accepted.
    plugin_ref: str | None = None
    queue_depth_threshold: int | None = None
    kv_cache_util_threshold: float | None = None


class RefSpec(_Spec):
    plugin_ref: str


class RequestHandlerSpec(_Spec):
    parsers: list[RefSpec] = []


class DataSourceSpec(_Spec):
    plugin_ref: str
    extractors: list[RefSpec] = []


class DataLayerSpec(_Spec):
    inject_defaults: bool | None = None
    sources: list[DataSourceSpec] = []
    # Upstream fields with no implementation here: refused by name when set.
    discovery: Any = None
    peer_discovery: Any = None
    cross_replica_syncer_plugin_ref: Any = None
    cross_replica_sync_interval: Any = None


class FlowControlSpec(_Spec):
    saturation_detector: SaturationSpec | None = None
    # Queueing settings: inert unless the flowControl gate is on, which is refused here.
    max_bytes: Any = None
    max_requests: Any = None
    default_request_ttl: Any = msgspec.field(default=None, name="defaultRequestTTL")
    no_endpoint_request_ttl: Any = msgspec.field(default=None, name="noEndpointRequestTTL")
    default_priority_band: Any = None
    default_negative_priority_band: Any = None
    priority_bands: Any = None
    usage_limit_policy_plugin_ref: Any = None
    enable_eviction: Any = None


class ObjectiveSpec(_Spec):
    name: str
    priority: int = 0


class ConfigSpec(_Spec):
    api_version: str | None = None
    kind: str | None = None
    plugins: list[PluginSpec] = []
    scheduling_profiles: list[ProfileSpec] = []
    saturation_detector: SaturationSpec | None = None
    objectives: list[ObjectiveSpec] = []
    feature_gates: list[str] = []
    request_handler: RequestHandlerSpec | None = None
    parser: RefSpec | None = None  # upstream's deprecated form of requestHandler.parsers
    # GIE called the data-layer section ``data``; llm-d-router renamed it ``dataLayer``.
    data: DataLayerSpec | None = None
    data_layer: DataLayerSpec | None = None
    flow_control: FlowControlSpec | None = None


@dataclass(frozen=True, slots=True)
class SaturationSettings:
    """Thresholds of the saturation detector."""

    queue_depth_threshold: int = DEFAULT_QUEUE_DEPTH_THRESHOLD
    kv_cache_util_threshold: float = DEFAULT_KV_CACHE_UTIL_THRESHOLD
    # Metrics older than this count as saturated; None: the process-wide staleness.
    stale_after_s: float | None = None


@dataclass(slots=True)
class PickerConfig:
    """A compiled config: a ready scheduler plus admission and scraping settings."""

    scheduler: Scheduler
    saturation: SaturationSettings
    objectives: dict[str, int] = field(default_factory=dict)
    plugins: dict[str, Any] = field(default_factory=dict)
    metrics_source: MetricsSourceSettings = field(default_factory=MetricsSourceSettings)

    @property
    def engine_metrics(self) -> EngineMetrics | None:
        """The metric names a ``core-metrics-extractor`` named by engine (None: none did)."""
        named = {p.engine_metrics for p in self.plugins.values()
                 if isinstance(p, CoreMetricsExtractor) and p.engine_metrics is not None}
        return named.pop() if len(named) == 1 else None

    @property
    def pre_request(self) -> list[Any]:
        """Plugins that are pre-request hooks."""
        return [p for p in self.plugins.values() if hasattr(p, "pre_request")]

    @property
    def response_complete(self) -> list[Any]:
        """Plugins that are response-complete hooks."""
        return [p for p in self.plugins.values() if hasattr(p, "response_complete")]

    @property
    def producers(self) -> list[Any]:
        """Data producers owned by plugins (the approximate prefix scorer's)."""
        return [p.producer for p in self.plugins.values() if hasattr(p, "producer")]

    @property
    def kv_settings(self) -> list[KVCacheSettings]:
        """What the precise prefix scorer needs built: the KV index and its feeders."""
        return [p.kv_settings for p in self.plugins.values()
                if isinstance(p, PrecisePrefixCacheScorer)]


def _spec_from_text(text: str, source: str) -> ConfigSpec:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping (an EndpointPickerConfig)")
    try:
        spec = msgspec.convert(doc, type=ConfigSpec)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Object contains unknown field") and " - at " not in text:
            # A top-level section we do not read: say which ones we do.
            known = ", ".join(f.encode_name for f in msgspec.structs.fields(ConfigSpec))
            raise ConfigError(f"{source}: unknown section {text.split('`')[1]!r}; the "
                              f"sections read here are {known}") from None
        raise ConfigError(f"{source}: {text}") from None
    if spec.api_version is not None and spec.api_version not in API_VERSIONS:
        raise ConfigError(f"{source}: apiVersion {spec.api_version!r} is not one of "
                          f"{', '.join(API_VERSIONS)}")
    if spec.kind is not None and spec.kind != KIND:
        raise ConfigError(f"{source}: kind {spec.kind!r} must be {KIND}")
    return spec


def load_picker_config(text: str | None = None, *, source: str = "config",
                       kv_events: bool = False,
                       deps: PluginDeps | None = None, timer: PluginTimer | None = None,
                       registry: PluginRegistry | None = None) -> PickerConfig:
    """Parse and compile an EndpointPickerConfig (the built-in default when ``text`` is
    None: precise when ``kv_events``). Raises :class:`ConfigError` naming the field."""
    if text is None:
        text = DEFAULT_PRECISE_CONFIG if kv_events else DEFAULT_CONFIG
        source = "built-in default config"
    spec = _spec_from_text(text, source)
    deps = deps or PluginDeps()
    registry = add_config_only_plugins(registry or default_registry())
    try:
        parse_feature_gates(spec.feature_gates)
    except ValueError as exc:
        raise ConfigError(f"{source}: featureGates: {exc}") from None

    plugins: dict[str, Any] = {}
    for i, p in enumerate(spec.plugins):
        name = p.name or p.type
        where = f"{source}: plugins[{i}]"
        if name in plugins:
            raise ConfigError(f"{where}.name: duplicate plugin name {name!r}")
        if p.type in NOT_IMPLEMENTED and p.type not in registry.known():
            raise ConfigError(f"{where}.type ({p.type}): not implemented here; use "
                              f"{NOT_IMPLEMENTED[p.type]}")
        try:
            plugins[name] = registry.create(p.type, name, p.parameters, deps)
        except PluginConfigError as exc:
            field_name = "type" if str(exc).startswith("unknown") else "parameters"
            detail = str(exc).removeprefix("parameters: ")
            raise ConfigError(f"{where}.{field_name} ({p.type}): {detail}") from None

    precise = [n for n, p in plugins.items() if p.type_name == "precise-prefix-cache-scorer"]
    if len(precise) > 1:
        # One KV index per EPP: its events, tokens and matches are shared by every profile.
        raise ConfigError(f"{source}: plugins: at most one precise-prefix-cache-scorer "
                          f"(got {', '.join(precise)})")
    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise ConfigError(f"{source}: plugins: more than one profile handler "
                          f"({', '.join(h.name for h in handlers)})")
    handler: ProfileHandler = handlers[0] if handlers else registry.create(
        "single-profile-handler", "single-profile-handler", None, deps)

    if not spec.scheduling_profiles:
        raise ConfigError(f"{source}: schedulingProfiles: at least one profile is required")
    profiles: dict[str, SchedulerProfile] = {}
    used: set[str] = {handler.name}
    for i, prof in enumerate(spec.scheduling_profiles):
        where = f"{source}: schedulingProfiles[{i}]"
        if prof.name in profiles:
            raise ConfigError(f"{where}.name: duplicate profile name {prof.name!r}")
        profiles[prof.name] = _compile_profile(prof, plugins, registry, deps, where, used)
    try:
        scheduler = Scheduler(profiles, handler, timer)
    except ValueError as exc:
        raise ConfigError(f"{source}: schedulingProfiles: {exc}") from None
    saturation = _saturation(spec, plugins, registry, deps, source, used)
    _check_parsers(spec, plugins, registry, deps, source, used)
    metrics_source = _metrics_source(spec, plugins, registry, deps, source, used)
    _check_flow_control(spec.flow_control, source)
    objectives: dict[str, int] = {}
    for i, obj in enumerate(spec.objectives):
        if obj.name in objectives:
            raise ConfigError(f"{source}: objectives[{i}].name: duplicate {obj.name!r}")
        objectives[obj.name] = obj.priority
    compiled = PickerConfig(
        scheduler=scheduler,
        saturation=saturation,
        objectives=objectives,
        plugins=plugins,
        metrics_source=metrics_source,
    )
    # Hooks (pre-request, response-complete) work outside profiles; data-layer and
    # parser plugins configure fixed parts of the EPP.
    used |= {p.name for p in (*compiled.pre_request, *compiled.response_complete)}
    used |= {name for name, p in plugins.items() if is_config_only(p)}
    for name in plugins.keys() - used:
        log.warning("%s: plugin %r is defined but no profile uses it", source, name)
    return compiled


def _referenced(ref: str, plugins: dict[str, Any], registry: PluginRegistry,
                deps: PluginDeps, where: str, default_types: frozenset[str]) -> Any:
    """The plugin ``ref`` names; as upstream does, an undefined reference that is the type
    name of a config-only default (``openai-parser``, ``utilization-detector``...) creates
    it with default parameters."""
    plugin = plugins.get(ref)
    if plugin is not None:
        return plugin
    if ref in NOT_IMPLEMENTED:
        raise ConfigError(f"{where}: {ref} is not implemented here; use {NOT_IMPLEMENTED[ref]}")
    if ref not in default_types:
        raise ConfigError(f"{where}: no plugin named {ref!r} "
                          f"(defined: {', '.join(sorted(plugins)) or 'none'})")
    plugins[ref] = registry.create(ref, ref, None, deps)
    return plugins[ref]


def _saturation(spec: ConfigSpec, plugins: dict[str, Any], registry: PluginRegistry,
                deps: PluginDeps, source: str, used: set[str]) -> SaturationSettings:
    # Upstream reads flowControl.saturationDetector first, the top-level one otherwise.
    where = "saturationDetector"
    sat = spec.saturation_detector
    if spec.flow_control is not None and spec.flow_control.saturation_detector is not None:
        where, sat = "flowControl.saturationDetector", spec.flow_control.saturation_detector
    if sat is None:
        return SaturationSettings()
    if sat.plugin_ref is not None:
        if sat.queue_depth_threshold is not None or sat.kv_cache_util_threshold is not None:
            raise ConfigError(f"{source}: {where}: give pluginRef or the thresholds, not both "
                              "(thresholds belong in the detector plugin's parameters)")
        detector = _referenced(sat.plugin_ref, plugins, registry, deps,
                               f"{source}: {where}.pluginRef",
                               frozenset({UtilizationDetector.type_name}))
        if not isinstance(detector, UtilizationDetector):
            raise ConfigError(f"{source}: {where}.pluginRef: {sat.plugin_ref!r} "
                              f"({detector.type_name}) is not a saturation detector; use "
                              f"a {UtilizationDetector.type_name} plugin")
        used.add(detector.name)
        return SaturationSettings(detector.queue_depth_threshold,
                                  detector.kv_cache_util_threshold, detector.stale_after_s)
    queue = DEFAULT_QUEUE_DEPTH_THRESHOLD if sat.queue_depth_threshold is None \
        else sat.queue_depth_threshold
    kv = DEFAULT_KV_CACHE_UTIL_THRESHOLD if sat.kv_cache_util_threshold is None \
        else sat.kv_cache_util_threshold
    if queue < 1:
        raise ConfigError(f"{source}: {where}.queueDepthThreshold must be >= 1")
    if not 0 < kv <= 1:
        raise ConfigError(f"{source}: {where}.kvCacheUtilThreshold must be in (0, 1]")
    return SaturationSettings(queue, kv)


def _check_parsers(spec: ConfigSpec, plugins: dict[str, Any], registry: PluginRegistry,
                   deps: PluginDeps, source: str, used: set[str]) -> None:
    # Upstream's newer field wins when both are given.
    if spec.request_handler is not None and spec.request_handler.parsers:
        refs = [(f"requestHandler.parsers[{i}].pluginRef", r.plugin_ref)
                for i, r in enumerate(spec.request_handler.parsers)]
    elif spec.parser is not None:
        refs = [("parser.pluginRef", spec.parser.plugin_ref)]
    else:
        return
    for where, ref in refs:
        parser = _referenced(ref, plugins, registry, deps, f"{source}: {where}", PARSER_TYPES)
        if parser.type_name not in PARSER_TYPES:
            raise ConfigError(f"{source}: {where}: {ref!r} ({parser.type_name}) is not a "
                              f"parser; use {', '.join(sorted(PARSER_TYPES))}")
        used.add(parser.name)


def _metrics_source(spec: ConfigSpec, plugins: dict[str, Any], registry: PluginRegistry,
                    deps: PluginDeps, source: str, used: set[str]) -> MetricsSourceSettings:
    if spec.data is not None and spec.data_layer is not None:
        raise ConfigError(f"{source}: give dataLayer or its older name data, not both")
    section = "dataLayer" if spec.data_layer is not None else "data"
    layer = spec.data_layer if spec.data_layer is not None else spec.data
    data_types = frozenset({MetricsDataSource.type_name, CoreMetricsExtractor.type_name})
    if layer is not None:
        for name, reason in (
                ("discovery", "use --endpoints-file, --pool-name or --endpoint-selector"),
                ("peerDiscovery", "replicas here are active-active and share nothing"),
                ("crossReplicaSyncerPluginRef", "replicas here share nothing"),
                ("crossReplicaSyncInterval", "replicas here share nothing")):
            if getattr(layer, _snake(name)) is not None:
                raise ConfigError(f"{source}: {section}.{name} is not implemented here; "
                                  f"{reason}")
        for i, src in enumerate(layer.sources):
            at = f"{source}: {section}.sources[{i}]"
            plugin = _referenced(src.plugin_ref, plugins, registry, deps, f"{at}.pluginRef",
                                 data_types)
            if not isinstance(plugin, MetricsDataSource):
                raise ConfigError(f"{at}.pluginRef: {src.plugin_ref!r} ({plugin.type_name}) "
                                  f"is not a data source; use {MetricsDataSource.type_name}")
            for j, ext in enumerate(src.extractors):
                extractor = _referenced(ext.plugin_ref, plugins, registry, deps,
                                        f"{at}.extractors[{j}].pluginRef", data_types)
                if not isinstance(extractor, CoreMetricsExtractor):
                    raise ConfigError(
                        f"{at}.extractors[{j}].pluginRef: {ext.plugin_ref!r} "
                        f"({extractor.type_name}) is not an extractor; use "
                        f"{CoreMetricsExtractor.type_name}")
    engines = {p.name: p.engine_metrics for p in plugins.values()
               if isinstance(p, CoreMetricsExtractor) and p.engine_metrics is not None}
    if len(set(engines.values())) > 1:
        raise ConfigError(f"{source}: plugins: core-metrics-extractor plugins name different "
                          f"engines ({', '.join(engines)}); every pod is scraped by one set "
                          "of metric names here")
    sources = [p for p in plugins.values() if isinstance(p, MetricsDataSource)]
    if len(sources) > 1:
        raise ConfigError(f"{source}: plugins: at most one {MetricsDataSource.type_name} "
                          f"(one scraper per EPP; got {', '.join(p.name for p in sources)})")
    if layer is not None and layer.inject_defaults is False and not sources:
        raise ConfigError(
            f"{source}: {section}.injectDefaults: false with no {MetricsDataSource.type_name} "
            "turns metrics collection off, which is not supported here (the load scorers "
            "and the saturation detector read the scraped metrics); add the source")
    return sources[0].source if sources else MetricsSourceSettings()


_INERT_FLOW_CONTROL = ("maxBytes", "maxRequests", "defaultRequestTTL", "noEndpointRequestTTL",
                       "defaultPriorityBand", "defaultNegativePriorityBand", "priorityBands",
                       "usageLimitPolicyPluginRef", "enableEviction")


def _check_flow_control(flow: FlowControlSpec | None, source: str) -> None:
    if flow is None:
        return
    set_fields = [name for name in _INERT_FLOW_CONTROL
                  if getattr(flow, _snake(name)) is not None]
    if set_fields:
        # Upstream also ignores these while the flowControl gate is off (its default);
        # the gate cannot be turned on here, so say so once at start-up.
        log.warning("%s: flowControl.%s: no effect: the flowControl feature gate is off, "
                    "requests are admitted or shed at once, never queued",
                    source, ", ".join(set_fields))


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel).replace(
        "_t_t_l", "_ttl")


def _compile_profile(prof: ProfileSpec, plugins: dict[str, Any], registry: PluginRegistry,
                     deps: PluginDeps, where: str, used: set[str]) -> SchedulerProfile:
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    pickers: list[Picker] = []
    if not prof.plugins:
        raise ConfigError(f"{where}.plugins: a profile needs at least one plugin")
    for j, ref in enumerate(prof.plugins):
        at = f"{where}.plugins[{j}]"
        plugin = plugins.get(ref.plugin_ref)
        if plugin is None:
            raise ConfigError(f"{at}.pluginRef: no plugin named {ref.plugin_ref!r} "
                              f"(defined: {', '.join(sorted(plugins)) or 'none'})")
        used.add(ref.plugin_ref)
        if isinstance(plugin, Scorer):
            weight = 1.0 if ref.weight is None else ref.weight
            if weight < 0:
                raise ConfigError(f"{at}.weight: must not be negative")
            scorers.append(WeightedScorer(plugin, weight))
            continue
        if ref.weight is not None:
            raise ConfigError(f"{at}.weight: {ref.plugin_ref!r} is not a scorer; "
                              "only scorers take a weight")
        if isinstance(plugin, Filter):
            filters.append(plugin)
        elif isinstance(plugin, Picker):
            pickers.append(plugin)
        else:
            raise ConfigError(f"{at}.pluginRef: {ref.plugin_ref!r} ({plugin.type_name}) "
                              "cannot be used inside a profile")
    if len(pickers) > 1:
        raise ConfigError(f"{where}.plugins: more than one picker "
                          f"({', '.join(p.name for p in pickers)})")
    picker: Picker = pickers[0] if pickers else registry.create(
        "max-score-picker", "max-score-picker", None, deps)
    return SchedulerProfile(prof.name, filters, scorers, picker)
