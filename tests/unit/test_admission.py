"""Admission: objective priorities and saturation-based shedding."""

from __future__ import annotations

import pytest

from epp.datastore import Endpoint, ServerMetrics
from epp.errors import UnschedulableError
from epp.requestcontrol.admission import Admission, SaturationDetector

NOW = 500.0


def ep(i: int, waiting: int = 0, kv: float = 0.0, age: float = 0.0) -> Endpoint:
    e = Endpoint(f"e{i}", f"10.0.0.{i}:8000")
    e.state.update_metrics(ServerMetrics(waiting=waiting, kv_cache_usage=kv,
                                         scraped_at=NOW - age))
    return e


def test_saturation_is_mean_pressure() -> None:
    d = SaturationDetector(5, 0.8, 0.5)
    assert not d.saturated([ep(1, waiting=5), ep(2)], NOW)  # mean 0.5
    assert d.saturated([ep(1, waiting=10), ep(2)], NOW)  # mean 1.0
    assert d.saturated([ep(1, kv=0.8), ep(2, kv=0.8)], NOW)
    assert d.pressure(ep(1, waiting=2, kv=0.4), NOW) == pytest.approx(0.5)


def test_stale_counts_as_saturated() -> None:
    d = SaturationDetector(5, 0.8, 0.5)
    assert d.saturated([ep(1, age=2.0)], NOW)
    assert not d.saturated([ep(1, age=2.0), ep(2), ep(3)], NOW)  # one stale of three


def test_only_sheddable_requests_are_shed() -> None:
    adm = Admission({"critical": 5, "batch": -1}, SaturationDetector(5, 0.8, 0.5))
    full = [ep(1, waiting=50)]
    assert adm.priority({"x-gateway-inference-objective": "batch"}) == -1
    assert adm.priority({"x-gateway-inference-objective": "critical"}) == 5
    assert adm.priority({"x-gateway-inference-objective": "unknown"}) == 0
    assert adm.priority({}) == 0
    with pytest.raises(UnschedulableError, match="saturated"):
        adm.admit(-1, full, NOW)
    adm.admit(5, full, NOW)
    adm.admit(0, full, NOW)
    adm.admit(-1, [ep(1)], NOW)


def test_objective_header_new_and_old_names() -> None:
    adm = Admission({"critical": 5, "batch": -1}, SaturationDetector(5, 0.8, 0.5))
    assert adm.priority({"x-llm-d-inference-objective": "batch"}) == -1
    assert adm.priority({"x-gateway-inference-objective": "batch"}) == -1
    # Both present: llm-d's name wins; an empty one does not hide the other.
    assert adm.priority({"x-llm-d-inference-objective": "critical",
                         "x-gateway-inference-objective": "batch"}) == 5
    assert adm.priority({"x-llm-d-inference-objective": "",
                         "x-gateway-inference-objective": "batch"}) == -1
