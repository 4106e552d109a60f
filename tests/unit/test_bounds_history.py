"""The approximate scorer's routing history forgets departed pods and stays bounded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epp.api.openai import LLMRequest, parse_request
from epp.config import EppSettings
from epp.datastore import Endpoint, EndpointPool
from epp.kvcache.producer import ApproximateProducer, RoutingHistory, record_routing
from epp.runner import build_app


def endpoints(*names: str) -> list[Endpoint]:
    return [Endpoint(n, f"10.0.0.{i + 1}:8000") for i, n in enumerate(names)]


def request(text: str) -> LLMRequest:
    return parse_request("/v1/completions",
                         json.dumps({"model": "m", "prompt": text}).encode())


def test_a_pod_that_leaves_the_pool_loses_its_history() -> None:
    pool = EndpointPool()
    producer = ApproximateProducer(block_size=4, capacity_per_endpoint=1000)
    pool.add_listener(producer.on_pool_change)
    pool.replace_all(endpoints("a", "b"))
    producer.history.record("a", [1, 2, 3])
    producer.history.record("b", [4, 5])
    pool.remove("a")
    assert producer.history.endpoints() == ["b"]
    assert producer.history.total_keys == 2
    assert producer.history.match([1, 2, 3], "a") == 0
    pool.replace_all([])
    assert producer.history.endpoints() == [] and producer.history.total_keys == 0


def test_routing_recorded_after_the_pod_left_is_not_kept() -> None:
    """A request scheduled just before its pod left records afterwards: ignore it."""
    pool = EndpointPool()
    producer = ApproximateProducer(block_size=4)
    pool.add_listener(producer.on_pool_change)
    eps = endpoints("a", "b")
    pool.replace_all(eps)
    pool.remove("a")
    producer.history.record("a", [1, 2, 3])
    assert producer.history.endpoints() == [] and producer.history.total_keys == 0


def test_a_new_pod_under_an_old_name_starts_with_no_history() -> None:
    pool = EndpointPool()
    producer = ApproximateProducer(block_size=4)
    pool.add_listener(producer.on_pool_change)
    pool.replace_all([Endpoint("a", "10.0.0.1:8000")])
    producer.history.record("a", [1, 2])
    pool.replace_all([Endpoint("a", "10.0.0.9:8000")])  # rescheduled: an empty KV cache
    assert producer.history.match([1, 2], "a") == 0


def test_total_history_is_bounded_across_endpoints() -> None:
    history = RoutingHistory(capacity_per_endpoint=1000, max_total_keys=300)
    for round_ in range(20):
        for i, name in enumerate("abcd"):
            base = (round_ * 4 + i) * 100
            history.record(name, range(base, base + 100))
            assert history.total_keys <= 300
            assert history.total_keys == sum(len(history._lru[n]) for n in history.endpoints())
    # Evicting from the largest history first shares the budget between endpoints.
    sizes = sorted(len(history._lru[n]) for n in "abcd")
    assert sizes[-1] - sizes[0] <= 100
    last = (19 * 4 + 3) * 100
    assert history.match(range(last, last + 100), "d") == 100  # the newest keys stay


def test_per_endpoint_capacity_is_still_kept() -> None:
    history = RoutingHistory(capacity_per_endpoint=50)
    history.record("a", range(200))
    assert history.total_keys == 50 and history.match(range(150, 200), "a") == 50


@pytest.mark.asyncio
async def test_the_app_forgets_pods_discovery_removes(tmp_path: Path) -> None:
    """Wiring: the runner subscribes the approximate scorer's producer to the pool."""
    path = tmp_path / "endpoints.yaml"
    path.write_text("endpoints: [{name: a, address: '127.0.0.1:1'},"
                    " {name: b, address: '127.0.0.1:2'}]\n")
    app = build_app(EppSettings(endpoints_file=str(path), bind_address="127.0.0.1",
                                grpc_port=0, health_port=0, metrics_port=0,
                                endpoints_reload_s=0))
    [producer] = [p for p in app.picker_config.producers
                  if isinstance(p, ApproximateProducer)]
    await app.start()
    try:
        eps = app.pool.snapshot()
        for ep in eps:
            match = await producer.produce(request("shared prefix " * 20 + ep.name), eps)
            record_routing(producer, match, ep)
        assert sorted(producer.history.endpoints()) == ["a", "b"]
        app.pool.replace_all([e for e in eps if e.name == "b"])  # as discovery does
        assert producer.history.endpoints() == ["b"]
    finally:
        await app.stop()
