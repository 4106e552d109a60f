"""Metric-name specs (the upstream ``--*-metric`` flags): parsing, label selection, and a
scrape of an SGLang-named page."""

from __future__ import annotations

import pytest

from epp.datalayer import (
    SGLANG_METRICS,
    VLLM_METRICS,
    EngineMetrics,
    MetricSpec,
    MetricsParseError,
    MetricsScraper,
    parse_metric_spec,
    parse_metrics,
)
from tests.unit.test_datalayer import (  # noqa: F401 (pods is a fixture)
    PodFactory,
    endpoint,
    eventually,
    pods,
    pool_of,
)

# The shape of an SGLang server's page: its own names, model_name labels, no vLLM series.
SGLANG_PAGE = b"""\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen3",engine_type="unified"} 4.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen3",engine_type="unified"} 9.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen3",engine_type="unified"} 0.375
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="qwen3",engine_type="unified"} 0.5
"""


@pytest.mark.parametrize(("text", "expected"), [
    ("my_metric", MetricSpec(b"my_metric")),
    ("vllm:num_requests_waiting", MetricSpec(b"vllm:num_requests_waiting")),
    ("my_metric{a=x}", MetricSpec(b"my_metric", (("a", "x"),))),
    ('my_metric{a="x"}', MetricSpec(b"my_metric", (("a", "x"),))),
    ("  my_metric  {  a  =  x  ,  b = y }  ", MetricSpec(b"my_metric", (("a", "x"), ("b", "y")))),
    ("my_metric{}", MetricSpec(b"my_metric")),
    ("", None),
    ("   ", None),
])
def test_spec_syntax(text: str, expected: MetricSpec | None) -> None:
    assert parse_metric_spec(text) == expected


@pytest.mark.parametrize("text", [
    "my_metric{a=x", "my_metrica=x}", "my_metric{a}", "my_metric{=x}", "my_metric{a=}",
    "1metric", "my metric",
])
def test_bad_specs_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_metric_spec(text)


def test_sglang_page_with_sglang_names() -> None:
    metrics = parse_metrics(SGLANG_PAGE, names=SGLANG_METRICS)
    assert (metrics.waiting, metrics.running, metrics.kv_cache_usage) == (9, 4, 0.375)
    assert metrics.block_size is None and metrics.max_lora == 0
    with pytest.raises(MetricsParseError, match="vllm:num_requests_waiting"):
        parse_metrics(SGLANG_PAGE)  # vLLM's names find nothing there


def test_names_from_the_upstream_flags_select_series_by_label() -> None:
    page = b"""\
q{engine="0"} 2
q{engine="1"} 5
r{engine="0"} 1
r{engine="1"} 7
u{engine="0"} 0.25
u{engine="1"} 0.75
"""
    names = EngineMetrics.from_specs("q{engine=1}", "r{engine=1}", 'u{engine="1"}')
    metrics = parse_metrics(page, names=names)
    assert (metrics.waiting, metrics.running, metrics.kv_cache_usage) == (5, 7, 0.75)
    every = parse_metrics(page, names=EngineMetrics.from_specs("q", "r", "u"))
    assert (every.waiting, every.running, every.kv_cache_usage) == (7, 8, 0.5)
    with pytest.raises(MetricsParseError, match=r"q\{engine=2\}"):
        parse_metrics(page, names=EngineMetrics.from_specs("q{engine=2}", "r", "u"))


def test_an_engine_without_a_kv_usage_series_reads_zero_usage() -> None:
    names = EngineMetrics.from_specs("tgi_queue_size", "tgi_batch_current_size", "")
    metrics = parse_metrics(b"tgi_queue_size 3\ntgi_batch_current_size 2\n", names=names)
    assert (metrics.waiting, metrics.running, metrics.kv_cache_usage) == (3, 2, 0.0)


def test_queue_and_running_specs_are_required() -> None:
    with pytest.raises(ValueError, match="cannot be empty"):
        EngineMetrics.from_specs("", "r", "u")


def test_vllm_defaults_equal_the_upstream_flag_defaults() -> None:
    assert EngineMetrics.from_specs(
        "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info", "vllm:cache_config_info") == VLLM_METRICS


@pytest.mark.asyncio
async def test_scraper_reads_an_sglang_pod(pods: PodFactory) -> None:  # noqa: F811
    (pod,) = await pods(1)
    pod.page = SGLANG_PAGE
    pool = pool_of(pod)
    ep = endpoint(pool, pod)
    async with MetricsScraper(pool, interval_s=0.02, metric_names=SGLANG_METRICS):
        await eventually(lambda: ep.state.metrics.scraped_at > 0, message=lambda: ep.state)
        assert ep.state.scrape_error is None
        assert (ep.state.metrics.waiting, ep.state.metrics.kv_cache_usage) == (9, 0.375)
