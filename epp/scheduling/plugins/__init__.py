"""Built-in scheduling plugins (filters, scorers, pickers, profile handlers)."""

from epp.scheduling.plugins import (
    affinity,
    approxprefix,
    disagg,
    filters,
    handlers,
    inflight,
    lora,
    nohitlru,
    pickers,
    prefix,
    scorers,
    session,
    tokenload,
)
from epp.scheduling.registry import PluginRegistry

BUILTIN_PLUGINS = (
    scorers.QueueScorer,
    scorers.KVCacheUtilizationScorer,
    scorers.LoadAwareScorer,
    scorers.RunningRequestsSizeScorer,
    lora.LoraAffinityScorer,
    prefix.PrecisePrefixCacheScorer,
    prefix.PrefixCacheScorer,
    pickers.MaxScorePicker,
    pickers.RandomPicker,
    pickers.WeightedRandomPicker,
    handlers.SingleProfileHandler,
    disagg.PDProfileHandler,
    disagg.PrefillFilter,
    disagg.DecodeFilter,
    disagg.PrefillHeaderHandler,
    filters.LabelSelectorFilter,
    filters.HeaderBasedTestingFilter,
    affinity.PrefixCacheAffinityFilter,
    tokenload.TokenLoadScorer,
    inflight.InflightLoadProducer,
    nohitlru.NoHitLRUScorer,
    session.SessionAffinityFilter,
    session.SessionAffinityScorer,
    approxprefix.ApproxPrefixCacheProducer,
)


def default_registry() -> PluginRegistry:
    """The built-in plugins, under the ecosystem's type names."""
    registry = PluginRegistry()
    for cls in BUILTIN_PLUGINS:
        registry.register(cls)
    return registry
