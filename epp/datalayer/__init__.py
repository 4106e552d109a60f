"""Model-server metrics: parse vLLM's ``/metrics`` page and keep every endpoint's copy fresh."""

from epp.datalayer.parser import MetricsParseError, parse_metrics
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
    "MetricsParseError",
    "MetricsScraper",
    "ScrapeStats",
    "parse_metrics",
]
