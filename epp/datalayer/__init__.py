"""Model-server metrics: parse a ``/metrics`` page (vLLM's names by default, any engine's
by spec) and keep every endpoint's copy fresh."""

from epp.datalayer.parser import (
    SGLANG_METRICS,
    VLLM_METRICS,
    EngineMetrics,
    MetricSpec,
    MetricsParseError,
    parse_metric_spec,
    parse_metrics,
)
from epp.datalayer.scraper import (
    DEFAULT_SCRAPE_INTERVAL_S,
    DEFAULT_SCRAPE_TIMEOUT_S,
    DEFAULT_STALE_AFTER_S,
    MetricsScraper,
    ScrapeStats,
)

__all__ = [
    "DEFAULT_SCRAPE_INTERVAL_S",
    "DEFAULT_SCRAPE_TIMEOUT_S",
    "DEFAULT_STALE_AFTER_S",
    "EngineMetrics",
    "MetricSpec",
    "MetricsParseError",
    "MetricsScraper",
    "SGLANG_METRICS",
    "ScrapeStats",
    "VLLM_METRICS",
    "parse_metric_spec",
    "parse_metrics",
]
