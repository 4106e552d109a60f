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
from epp.kvcache.service import KVCacheSettings
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

# The built-in defaults: GIE's default profile (queue x2, KV utilisation x2, prefix x3).
# With KV events the prefix scorer is the precise one, tokenizing through the pods'
# render endpoints (exact for any model, no tokenizer files needed), weighted 6 instead
# of 3: its matches are what the engines report, not a guess, so a group should leave
# its warm pod only under real load. In the shared-prefix benchmark (benchmarks/compare)
# x3 moved a tenant to a cold pod whenever its pod had one request queued (63% hit rate
# against the oracle's 75%); x6 held ~75% with a lower TTFT p90. Without events: GIE's
# approximate scorer, GIE's weight.
_DEFAULT_TEMPLATE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: {prefix}
{params}- type: max-score-picker
- type: single-profile-handler
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: {prefix}
    weight: {weight}
  - pluginRef: max-score-picker
"""
DEFAULT_CONFIG = _DEFAULT_TEMPLATE.format(prefix="prefix-cache-scorer", params="", weight=3)
DEFAULT_PRECISE_CONFIG = _DEFAULT_TEMPLATE.format(
    prefix="precise-prefix-cache-scorer",
    params="  parameters: {tokenizer: {mode: render}}\n", weight=6)

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
    queue_depth_threshold: int = DEFAULT_QUEUE_DEPTH_THRESHOLD
    kv_cache_util_threshold: float = DEFAULT_KV_CACHE_UTIL_THRESHOLD


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


@dataclass(frozen=True, slots=True)
class SaturationSettings:
    """Thresholds of the saturation detector."""

    queue_depth_threshold: int = DEFAULT_QUEUE_DEPTH_THRESHOLD
    kv_cache_util_threshold: float = DEFAULT_KV_CACHE_UTIL_THRESHOLD


@dataclass(slots=True)
class PickerConfig:
    """A compiled config: a ready scheduler plus admission settings."""

    scheduler: Scheduler
    saturation: SaturationSettings
    objectives: dict[str, int] = field(default_factory=dict)
    plugins: dict[str, Any] = field(default_factory=dict)

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
        raise ConfigError(f"{source}: {exc}") from None
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
    registry = registry or default_registry()

    plugins: dict[str, Any] = {}
    for i, p in enumerate(spec.plugins):
        name = p.name or p.type
        where = f"{source}: plugins[{i}]"
        if name in plugins:
            raise ConfigError(f"{where}.name: duplicate plugin name {name!r}")
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
    sat = spec.saturation_detector or SaturationSpec()
    if sat.queue_depth_threshold < 1:
        raise ConfigError(f"{source}: saturationDetector.queueDepthThreshold must be >= 1")
    if not 0 < sat.kv_cache_util_threshold <= 1:
        raise ConfigError(f"{source}: saturationDetector.kvCacheUtilThreshold must be in (0, 1]")
    objectives: dict[str, int] = {}
    for i, obj in enumerate(spec.objectives):
        if obj.name in objectives:
            raise ConfigError(f"{source}: objectives[{i}].name: duplicate {obj.name!r}")
        objectives[obj.name] = obj.priority
    compiled = PickerConfig(
        scheduler=scheduler,
        saturation=SaturationSettings(sat.queue_depth_threshold, sat.kv_cache_util_threshold),
        objectives=objectives,
        plugins=plugins,
    )
    # Hooks (pre-request, response-complete) work outside profiles.
    used |= {p.name for p in (*compiled.pre_request, *compiled.response_complete)}
    for name in plugins.keys() - used:
        log.warning("%s: plugin %r is defined but no profile uses it", source, name)
    return compiled


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
