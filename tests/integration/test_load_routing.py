"""Load-aware routing, shedding and the conformance header, through real Envoy."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post, request

pytestmark = pytest.mark.integration

COMPLETION = {"model": "qwen3", "prompt": "Tell me a story", "max_tokens": 8}


def _stack(tmp_path: Path, sims: int, **kwargs: object) -> LocalStack:
    return LocalStack(tmp_path, StackPorts.free(sims), envoy_concurrency=1, **kwargs)  # type: ignore[arg-type]


def _metric(stack: LocalStack, sim: int, name: str) -> float:
    text = request(f"http://{stack.sim_addresses[sim]}/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on sim {sim}'s /metrics")


@pytest.fixture
def slow_pod_stack(tmp_path: Path) -> Iterator[LocalStack]:
    # Pod 0 runs one request at a time and decodes slowly: its queue grows under load.
    s = _stack(tmp_path, 3, sim_args=["--itl-ms", "2"],
               per_sim_args={0: ["--max-num-seqs", "1", "--itl-ms", "60"]})
    s.start()
    yield s
    s.stop()


def test_traffic_shifts_away_from_a_pod_with_a_deep_queue(slow_pod_stack: LocalStack) -> None:
    stack = slow_pod_stack
    served: Counter[str] = Counter()
    lock = threading.Lock()

    def one(_: int) -> None:
        reply = post(stack.url + "/v1/completions", COMPLETION)
        assert reply.status == 200, reply.body
        with lock:
            served[reply.headers["x-sim-endpoint"]] += 1

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(120)))
    slow = served[stack.sim_addresses[0]]
    # Random or round-robin would send a third (40) to the slow pod.
    assert slow <= 20, served
    assert sum(served.values()) == 120


@pytest.fixture
def saturated_stack(tmp_path: Path) -> Iterator[LocalStack]:
    config = """
plugins:
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
objectives:
- {name: critical, priority: 10}
- {name: batch, priority: -1}
"""
    s = _stack(tmp_path, 2, sim_args=["--max-num-seqs", "1", "--itl-ms", "40"],
               epp_args=["--config-text", config])
    s.start()
    yield s
    s.stop()


def test_sheddable_request_gets_429_when_saturated_and_critical_is_served(
        saturated_stack: LocalStack) -> None:
    stack = saturated_stack
    # Idle pool: a sheddable request is served.
    batch = {"x-gateway-inference-objective": "batch"}
    assert post(stack.url + "/v1/completions", {**COMPLETION, "max_tokens": 1},
                batch).status == 200
    # Fill both pods' queues: each runs one request at a time for ~0.4 s.
    background = ThreadPoolExecutor(16)
    futures = [background.submit(post, stack.url + "/v1/completions",
                                 {**COMPLETION, "max_tokens": 10}) for _ in range(16)]
    try:
        deadline = time.monotonic() + 10
        while _metric(stack, 0, "vllm:num_requests_waiting") + _metric(
                stack, 1, "vllm:num_requests_waiting") < 10:
            assert time.monotonic() < deadline, "queues did not fill"
            time.sleep(0.02)
        time.sleep(0.3)  # let the EPP scrape the deep queues
        shed = post(stack.url + "/v1/completions", {**COMPLETION, "max_tokens": 1}, batch)
        assert shed.status == 429, shed.body
        assert "saturated" in shed.json()["error"]["message"]
        assert "x-sim-endpoint" not in shed.headers
        critical = post(stack.url + "/v1/completions", {**COMPLETION, "max_tokens": 1},
                        {"x-gateway-inference-objective": "critical"})
        assert critical.status == 200
        assert "x-gateway-inference-objective" not in critical.headers
    finally:
        results = [f.result() for f in futures]
        background.shutdown()
    assert all(r.status == 200 for r in results)


TEST_FILTER_CONFIG = """
plugins:
- type: header-based-testing-filter
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: header-based-testing-filter}, {pluginRef: queue-scorer},
            {pluginRef: max-score-picker}]
"""


@pytest.mark.parametrize("enabled", [True, False])
def test_conformance_header_forces_the_pick_only_when_enabled(
        tmp_path: Path, enabled: bool) -> None:
    args = ["--config-text", TEST_FILTER_CONFIG]
    if enabled:
        args.append("--enable-test-endpoint-selection")
    stack = _stack(tmp_path, 3, epp_args=args)
    stack.start()
    try:
        target = stack.sim_addresses[2]
        served = Counter(
            post(stack.url + "/v1/completions", {**COMPLETION, "max_tokens": 1},
                 {"test-epp-endpoint-selection": target}).headers["x-sim-endpoint"]
            for _ in range(24))
    finally:
        stack.stop()
    if enabled:
        assert served == Counter({target: 24})
    else:
        assert len(served) > 1  # ignored: ties spread over all three pods
