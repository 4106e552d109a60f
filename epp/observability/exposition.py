"""``/metrics`` rendered on the event loop in short slices.

prometheus_client's ``generate_latest`` collects and formats a whole registry in one go:
about 25 ms for a picker with 64 endpoints (2,000 samples, 160 KB). On the event loop that
is 25 ms no request is routed; in a thread it is hardly better, because a thread holding
the GIL keeps it for up to the interpreter's switch interval (5 ms) each time the loop
wants it back. :func:`render_latest` produces the same bytes on the loop itself: it
collects family by family and formats line by line, and gives the loop back whenever a
slice has run for :data:`RENDER_SLICE_S`. Routing then waits at most about one slice,
or the collection of the single largest family (one call into a collector), whichever is
longer.

Collecting across loop turns is safe for our collectors: each builds a family completely
before yielding it (none keeps an iterator over live state across a ``yield``), and the
registry copies its collector list before iterating. Families are read at slightly
different moments, as with any scrape of a live process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import escape_label_name, escape_metric_name
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# Longest stretch of rendering between two turns of the event loop. A sample line costs a
# few microseconds, so a slice is ~100 lines; a turn of the loop costs a few microseconds
# when nothing else is ready, so the yields add under 5% to the render while keeping the
# loop's lag far below the 2 ms a routed request may wait on it.
RENDER_SLICE_S = 0.0005
# Samples prometheus_client renders as a separate gauge family after the main one.
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


async def render_latest(registry: Collector, slice_s: float = RENDER_SLICE_S) -> bytes:
    """What ``generate_latest(registry)`` returns (text format 0.0.4), rendered on the
    running loop in slices of about ``slice_s`` seconds."""
    out: list[str] = []
    clock = time.perf_counter
    until = clock() + slice_s
    for family in registry.collect():
        for line in family_lines(family):
            out.append(line)
            if clock() > until:
                await asyncio.sleep(0)
                until = clock() + slice_s
    return "".join(out).encode("utf-8")


def family_lines(metric: Metric) -> Iterator[str]:
    """The text-format lines of one family, as ``generate_latest`` writes them: HELP,
    TYPE, the samples, then ``_created`` (and gauge-histogram ``_gsum``/``_gcount``)
    samples as gauge families of their own."""
    name, kind = metric.name, metric.type
    if kind == "counter":
        name += "_total"
    elif kind == "info":
        name += "_info"
        kind = "gauge"
    elif kind == "stateset":
        kind = "gauge"
    elif kind == "gaugehistogram":
        kind = "histogram"
    elif kind == "unknown":
        kind = "untyped"
    doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    shown = escape_metric_name(name)
    yield f"# HELP {shown} {doc}\n"
    yield f"# TYPE {shown} {kind}\n"
    special = {metric.name + suffix: suffix for suffix in _OM_SUFFIXES}
    trailing: dict[str, list[str]] = {}
    for sample in metric.samples:
        suffix = special.get(sample.name)
        if suffix is not None:
            trailing.setdefault(suffix, []).append(sample_line(sample))
        else:
            yield sample_line(sample)
    for suffix, lines in sorted(trailing.items()):
        shown = escape_metric_name(metric.name + suffix)
        yield f"# HELP {shown} {doc}\n"
        yield f"# TYPE {shown} gauge\n"
        yield from lines


def sample_line(sample: Sample) -> str:
    """One sample line: name, labels sorted by name, value, optional timestamp (ms)."""
    labels = ""
    if sample.labels:
        labels = "{" + ",".join(
            f'{escape_label_name(k)}="{_escape_value(v)}"'
            for k, v in sorted(sample.labels.items())) + "}"
    timestamp = ""
    if sample.timestamp is not None:
        timestamp = f" {int(float(sample.timestamp) * 1000):d}"
    return (f"{escape_metric_name(sample.name)}{labels} {floatToGoString(sample.value)}"
            f"{timestamp}\n")


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


__all__ = ["RENDER_SLICE_S", "family_lines", "render_latest", "sample_line"]
