"""/metrics rendered on the event loop in slices (epp.observability.exposition), the
renderer of every worker's page and of a single process's: byte for byte what
prometheus_client's generate_latest writes, while the loop keeps turning."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, Metric

from epp.observability.exposition import render_latest
from epp.observability.metrics import EppMetrics


class _Custom:
    """A collector of the kinds our own collectors yield, plus the rarer ones."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeHistogramMetricFamily("gh", "A gauge histogram.",
                                         buckets=[("1", 2), ("+Inf", 3)], gsum_value=5)
        stamped = CounterMetricFamily("stamped", "With a timestamp.", labels=["k"])
        stamped.add_metric(["v"], 1.0, timestamp=12.5)
        yield stamped


def _varied() -> CollectorRegistry:
    r = CollectorRegistry()
    c = Counter("c", 'Doc with a \\ and a\nnewline and "quotes".', ["a", "b"], registry=r)
    c.labels('x"y', "z\\n\n").inc(3)
    Gauge("g", "G.", registry=r).set(float("nan"))
    Gauge("big", "Go switches to exponents sooner.", registry=r).set(123456789.0)
    Histogram("h", "H.", ["m"], registry=r).labels("q").observe(0.3)
    Summary("s", "S.", registry=r).observe(2)
    Info("i", "I.", registry=r).info({"v": "1"})
    Enum("e", "E.", states=["a", "b"], registry=r)
    r.register(_Custom())
    return r


@pytest.mark.asyncio
async def test_the_same_bytes_as_generate_latest() -> None:
    for registry in (_varied(), _epp_registry()):
        assert await render_latest(registry) == generate_latest(registry)


def _epp_registry() -> CollectorRegistry:
    metrics = EppMetrics()
    for i in range(8):
        metrics.pick(f"pod-{i}")
    metrics.confirm_model("qwen3")
    metrics.model("qwen3").duration.observe(0.5)
    metrics.observe_plugin("score", "queue-scorer", "queue", 1e-4)
    return metrics.registry


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=12), min_size=1, max_size=6, unique=True))
def test_any_label_value_renders_as_generate_latest_does(values: list[str]) -> None:
    r = CollectorRegistry()
    counter = Counter("requests", "Requests.", ["model"], registry=r)
    for value in values:
        counter.labels(value).inc()
    assert asyncio.run(render_latest(r)) == generate_latest(r)


@pytest.mark.asyncio
async def test_the_loop_turns_while_a_page_renders() -> None:
    r = CollectorRegistry()
    counter = Counter("per_endpoint", "Many series.", ["endpoint"], registry=r)
    for i in range(200):
        counter.labels(f"pod-{i}").inc()
    turns = 0
    done = False

    async def other_work() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    page = await render_latest(r, slice_s=0.0)  # a slice of nothing: yield at every line
    done = True
    await task
    assert turns >= page.count(b"\n")
