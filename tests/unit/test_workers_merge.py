"""The supervisor's merge of worker pages (epp.workers.merge): real prometheus_client
pages in, checked against prometheus_client's own parser."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.workers.merge import (
    LOWEST_GAUGES,
    MAX_CARRIED_SERIES,
    SUMMED_GAUGES,
    Carry,
    Family,
    PageError,
    merge_pages,
    parse_page,
    render_page,
)

Key = tuple[str, frozenset[tuple[str, str]]]
# Label values a client or a pod could bring: spaces, braces, quotes, escapes, unicode.
LABEL_VALUES = st.text(alphabet=st.sampled_from(list('ab {}",=\\\n é')), max_size=8)
SUMMED = sorted(SUMMED_GAUGES)[0]
LOWEST = sorted(LOWEST_GAUGES)[0]


def samples(text: str) -> dict[Key, float]:
    """Every sample of a page, by name and labels (prometheus_client's parser)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def merged_text(pages: Iterable[str], carry: Carry | None = None) -> str:
    families = merge_pages([parse_page(p) for p in pages],
                           carry.families if carry is not None else None)
    return render_page(families.values())


@st.composite
def worker_pages(draw: st.DrawFn) -> list[str]:
    """1-4 workers' pages over the same metric definitions, each worker with its own
    series (a random subset of label values) and values."""
    values = draw(st.lists(LABEL_VALUES, min_size=1, max_size=4, unique=True))
    pages = []
    for _ in range(draw(st.integers(1, 4))):
        r = CollectorRegistry()
        requests = Counter("requests", "Requests.", ["model"], registry=r)
        duration = Histogram("duration_seconds", "Duration.", ["model"], registry=r,
                             buckets=(0.1, 1.0, 10.0))
        summed = Gauge(SUMMED, "Held by each worker.", ["endpoint"], registry=r)
        lowest = Gauge(LOWEST, "A worker's health.", registry=r)
        highest = Gauge("pool_size", "Observed by each worker.", ["name"], registry=r)
        for value in draw(st.lists(st.sampled_from(values), unique=True)):
            requests.labels(value).inc(draw(st.integers(0, 10**6)))
            for seconds in draw(st.lists(st.floats(0, 20), max_size=5)):
                duration.labels(value).observe(seconds)
            summed.labels(value).set(draw(st.integers(0, 1000)))
            highest.labels(value).set(draw(st.integers(0, 1000)))
        lowest.set(draw(st.floats(0, 1)))
        pages.append(generate_latest(r).decode())
    return pages


@settings(max_examples=150, deadline=None)
@given(worker_pages())
def test_merge_is_the_sum_or_the_extreme_by_family(pages: list[str]) -> None:
    merged = merged_text(pages)
    got = samples(merged)
    per_worker = [samples(p) for p in pages]
    keys = set().union(*per_worker)
    assert set(got) == keys
    kinds = {name: kind for page in pages for name, kind in types(page).items()}
    for key in keys:
        name = key[0]
        values = [w[key] for w in per_worker if key in w]
        family = next(f for f in kinds if name == f or name.startswith(f + "_"))
        if name.endswith("_created"):
            expected = min(values)  # when the series first existed anywhere
        elif kinds[family] in ("counter", "histogram") or family == SUMMED:
            expected = math.fsum(values)
        elif family == LOWEST:
            expected = min(values)
        else:
            expected = max(values)
        assert got[key] == pytest.approx(expected, rel=1e-12), key
    assert types(merged) == kinds  # TYPE lines survive the merge


@settings(max_examples=100, deadline=None)
@given(worker_pages(), st.data())
def test_a_restarted_worker_never_takes_a_sum_backwards(pages: list[str],
                                                        data: st.DataObject) -> None:
    before = samples(merged_text(pages))
    # Worker 0 exits; its slot restarts from zero and counts a little again.
    r = CollectorRegistry()
    Counter("requests", "Requests.", ["model"], registry=r).labels("x").inc(
        data.draw(st.integers(0, 5)))
    carry = Carry().add(parse_page(pages[0]))
    after = samples(merged_text([generate_latest(r).decode(), *pages[1:]], carry))
    for key, value in before.items():
        if key[0].endswith(("_total", "_bucket", "_count", "_sum")):
            assert after[key] >= value - 1e-9 * abs(value), key


def test_page_roundtrip_keeps_every_line() -> None:
    r = CollectorRegistry()
    Counter("c", 'Doc with "quotes", a \\ and a\nnewline.', ["a", "b"], registry=r) \
        .labels("x y", "{z}").inc(3)
    Histogram("h", "H.", registry=r).observe(float("inf"))
    Gauge("g", "G.", registry=r).set(float("nan"))
    page = generate_latest(r).decode()
    assert render_page(parse_page(page).values()) == page


def test_timestamps_are_dropped_and_comments_ignored() -> None:
    page = ("# a comment\n# HELP x X.\n# TYPE x gauge\nx{a=\"1\"} 2.5 1700000000000\n"
            "x 1\n")
    family = parse_page(page)["x"]
    assert family.samples == {'x{a="1"}': 2.5, "x": 1.0}


@pytest.mark.parametrize("line", ["x", "x{a=\"1\"}", "x{a=\"1\"} one", "x not-a-number"])
def test_malformed_sample_lines_are_refused(line: str) -> None:
    with pytest.raises(PageError):
        parse_page(f"# TYPE x gauge\n{line}\n")


def test_carried_series_are_bounded() -> None:
    big = {"c_total": Family("c_total", "counter", "C.",
                             {f'c_total{{i="{i}"}}': 1.0 for i in range(MAX_CARRIED_SERIES)})}
    carry = Carry().add(big)
    assert (carry.series, carry.dropped) == (MAX_CARRIED_SERIES, 0)
    more = {"c_total": Family("c_total", "counter", "C.",
                              {'c_total{i="0"}': 2.0, 'c_total{i="new"}': 5.0})}
    carry = carry.add(more)
    assert carry.families["c_total"].samples['c_total{i="0"}'] == 3.0  # existing: added
    assert 'c_total{i="new"}' not in carry.families["c_total"].samples
    assert carry.dropped == 1


def test_only_monotonic_families_are_carried() -> None:
    page = parse_page("# TYPE g gauge\ng 5\n# TYPE c_total counter\nc_total 2\n")
    carry = Carry().add(page)
    assert set(carry.families) == {"c_total"}
    # A carry is never changed by adding to it (a merge in a thread may hold it).
    carry.add(page)
    assert carry.families["c_total"].samples == {"c_total": 2.0}
