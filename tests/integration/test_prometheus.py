"""A real Prometheus scrapes the EPP; promtool accepts our exposition."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.devtools.procs import Process, free_port
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post, request

pytestmark = pytest.mark.integration


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{tool} not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def kv_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s = LocalStack(tmp_path_factory.mktemp("prom"), StackPorts.free(2, kv_events=True),
                   envoy_concurrency=1, epp_args=["--kv-events"])
    s.start()
    for i in range(4):  # some traffic, so histograms and KV-event counters have data
        body = {"model": "qwen3", "max_tokens": 2,
                "messages": [{"role": "user", "content": f"hello {i} " * 100}]}
        assert post(s.url + "/v1/chat/completions", body).status == 200
    assert post(s.url + "/v1/completions", b"{bad").status == 400
    yield s
    s.stop()


def test_promtool_accepts_the_exposition(kv_stack: LocalStack) -> None:
    promtool = _need("promtool")
    page = request(f"http://127.0.0.1:{kv_stack.ports.epp_metrics}/metrics").body
    result = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    text = page.decode()
    for name in ("inference_objective_request_total", "inference_objective_request_error_total",
                 "inference_objective_request_duration_seconds_bucket",
                 "inference_objective_input_tokens_bucket",
                 "inference_objective_output_tokens_bucket",
                 "inference_pool_average_kv_cache_utilization",
                 "inference_pool_average_queue_size", "inference_pool_ready_pods",
                 "inference_extension_scheduler_e2e_duration_seconds_bucket",
                 "inference_extension_plugin_duration_seconds_bucket",
                 "epp_kv_events_received_total", "epp_kv_events_applied_total",
                 "epp_kv_events_dropped_total", "epp_kv_event_replays_total",
                 "epp_kv_index_blocks", "epp_prefix_cache_hit_ratio_bucket",
                 "epp_kv_index_prediction_error_tokens_bucket"):
        assert f"\n{name}" in text, name


def test_prometheus_scrapes_and_answers_queries(kv_stack: LocalStack, tmp_path: Path) -> None:
    prometheus = _need("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
- job_name: epp
  static_configs: [{{targets: ["127.0.0.1:{kv_stack.ports.epp_metrics}"]}}]
""")
    proc = Process("prometheus", [prometheus, f"--config.file={config}",
                                  f"--storage.tsdb.path={tmp_path / 'data'}",
                                  f"--web.listen-address=127.0.0.1:{port}"], tmp_path)
    try:
        deadline = time.monotonic() + 60
        query = urllib.parse.quote('inference_pool_ready_pods{job="epp"}')
        value = None
        while time.monotonic() < deadline:
            assert proc.alive(), proc.tail()
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=2) as r:
                    data = json.load(r)
                results = data["data"]["result"]
                if results:
                    value = float(results[0]["value"][1])
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert value == 2.0
        query = urllib.parse.quote('sum(inference_objective_request_error_total{job="epp"})')
        with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=2) as r:
            errors = json.load(r)["data"]["result"]
        assert errors and float(errors[0]["value"][1]) >= 1.0
    finally:
        proc.stop()
