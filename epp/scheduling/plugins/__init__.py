"""Built-in scheduling plugins (filters, scorers, pickers, profile handlers)."""

from epp.scheduling.plugins import (
    disagg,
    filters,
    handlers,
    lora,
    pickers,
    prefix,
    scorers,
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
)


def default_registry() -> PluginRegistry:
    """The built-in plugins, under the ecosystem's type names."""
    registry = PluginRegistry()
    for cls in BUILTIN_PLUGINS:
        registry.register(cls)
    return registry
