"""``epp --workers 2`` behind a real Envoy: both workers route, the supervisor's /metrics
is their sum and passes promtool, health follows the workers, a killed worker comes back
while the other keeps routing, SIGTERM drains, and a bad configuration fails once."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import REPO_ROOT, Process, wait_for_http
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post, request

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class WorkersStack(LocalStack):
    """The local stack with one change to how Envoy dials the picker: a new connection
    for every ext_proc stream (``max_requests_per_connection: 1``), so the kernel's
    SO_REUSEPORT hash spreads streams over the workers instead of pinning each of
    Envoy's few long-lived connections to one."""

    def start_envoy(self) -> None:
        p = self.ports
        config = envoy_cfg.epp_config(p.envoy, p.epp_grpc, p.envoy_admin, self.epp_tls)
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "endpoint_picker":
                options = cluster["typed_extension_protocol_options"][
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                options["common_http_protocol_options"] = {"max_requests_per_connection": 1}
        path = envoy_cfg.write_config(config, self.work_dir / "envoy.yaml")
        self.envoy = Process("envoy", [
            envoy_cfg.envoy_binary(), "-c", str(path), "--disable-hot-restart",
            "--concurrency", str(self.envoy_concurrency), "--log-level", "warn"],
            self.work_dir)
        wait_for_http(f"http://127.0.0.1:{p.envoy_admin}/ready", expect=b"LIVE")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkersStack]:
    s = WorkersStack(tmp_path_factory.mktemp("workers"), StackPorts.free(2),
                     envoy_concurrency=1, epp_args=["--workers", "2", "--enable-explain"])
    s.start()
    yield s
    s.stop()


def _chat(stack: LocalStack, i: int) -> int:
    body = {"model": "qwen3", "max_tokens": 2,
            "messages": [{"role": "user", "content": f"question {i} " * 20}]}
    return post(stack.url + "/v1/chat/completions", body).status


def _families(text: str) -> dict[str, tuple[str, dict[tuple[str, frozenset[tuple[str, str]]],
                                                        float]]]:
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = (family.type, {
            (s.name, frozenset(s.labels.items())): s.value for s in family.samples})
    return out


def _page(stack: LocalStack) -> str:
    return request(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics").body.decode()


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(sample)


def _total(text: str, family: str) -> float:
    """The sum of every sample of a family (``name{...} value`` lines)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(family + "{") or line.startswith(family + " "))


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("worker", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


def _worker_page(path: str) -> str:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _worker_sockets(stack: LocalStack) -> dict[int, str]:
    assert stack.epp is not None
    found = re.findall(r"worker (\d+) serving: .* metrics on (\S+)",
                       stack.epp.log_path.read_text())
    return {int(i): path for i, path in found}


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _exited(pid: int) -> bool:
    """Gone, or a zombie (its sockets are closed; its parent has yet to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_both_workers_route_and_the_merged_page_is_their_sum(workers: WorkersStack) -> None:
    assert all(_chat(workers, i) == 200 for i in range(24))
    merged = _page(workers)
    pages = [_worker_page(path) for path in _worker_sockets(workers).values()]
    assert len(pages) == 2
    # Each worker routed some of the streams, and the per-worker view adds up.
    per_worker = [_value(merged, f'epp_worker_requests_total{{worker="{i}"}}')
                  for i in (0, 1)]
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == _total(merged, "inference_objective_request_total") == 24
    # Every counter and histogram sample of the merged page is the workers' sum.
    ours = _families(merged)
    theirs = [_families(page) for page in pages]
    checked = 0
    for name, (kind, samples) in ours.items():
        if kind not in ("counter", "histogram") or name.startswith("epp_worker"):
            continue
        for key, value in samples.items():
            assert value == pytest.approx(sum(t[name][1].get(key, 0.0)
                                              for t in theirs if name in t)), (name, key)
            checked += 1
    assert checked > 100
    # A pool-wide gauge each worker observes is reported once, not doubled.
    assert _value(merged, 'inference_pool_ready_pods{name="default"}') == 2.0


def test_promtool_accepts_the_merged_page(workers: WorkersStack) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    _chat(workers, 100)
    page = request(f"http://127.0.0.1:{workers.ports.epp_metrics}/metrics").body
    result = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_health_is_served_once_for_all_workers(workers: WorkersStack) -> None:
    port = workers.ports.epp_health
    for service in ("liveness", "readiness", "inference-extension",
                    "envoy.service.ext_proc.v3.ExternalProcessor", ""):
        assert _health(port, service) == SERVING, service


def test_explain_is_answered_by_a_worker(workers: WorkersStack) -> None:
    url = f"http://127.0.0.1:{workers.ports.epp_metrics}/debug/explain"
    body = {"model": "qwen3", "messages": [{"role": "user", "content": "hello"}]}
    reply = post(url + "?path=/v1/chat/completions", body)
    assert reply.status == 200, reply.body
    assert reply.json()["destination"] in workers.sim_addresses
    bad = post(url, b"{not json")
    assert bad.status == 400 and "not valid JSON" in bad.json()["error"]["message"]


def test_every_worker_presents_the_supervisors_certificate(workers: WorkersStack) -> None:
    assert workers.epp is not None
    log = workers.epp.log_path.read_text()
    serials = set(re.findall(r"ext_proc serves TLS .*serial ([0-9a-f]+)", log))
    assert len(serials) == 1, serials  # the supervisor's line and each worker's
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    seen = set()
    for _ in range(8):  # new connections land on either worker
        with socket.create_connection(("127.0.0.1", workers.ports.epp_grpc), timeout=5) as raw, \
                context.wrap_socket(raw) as tls:
            seen.add(tls.getpeercert(binary_form=True))
    assert len(seen) == 1


def test_a_killed_worker_comes_back_while_the_other_routes(workers: WorkersStack) -> None:
    assert workers.epp is not None
    before = _total(_page(workers), "inference_objective_request_total")
    victim = _children(workers.epp.pid)[0]
    os.kill(victim, signal.SIGKILL)
    # Connections that reach its listening socket while it is being torn down are lost
    # (Envoy answers 503 for their streams); once it is gone, the other worker takes all.
    _wait_for("the worker's exit", lambda: _exited(victim))
    # Envoy may dispatch a stream on the dead worker's connection before it has read the
    # reset (the killed worker never counted it); once one request has gone through,
    # every following one must.
    _wait_for("a request through the live worker", lambda: _chat(workers, 199) == 200)
    assert all(_chat(workers, 200 + i) == 200 for i in range(10))

    def restarted() -> bool:
        page = _page(workers)
        return _total(page, "epp_worker_restarts_total") == 1 and \
            _total(page, "epp_worker_ready") == 2

    _wait_for("the worker's restart", restarted)
    assert victim not in _children(workers.epp.pid)
    assert all(_chat(workers, 300 + i) == 200 for i in range(10))
    # What the killed worker had counted is carried over: the sum never went back.
    assert _total(_page(workers), "inference_objective_request_total") == before + 21
    assert _health(workers.ports.epp_health, "readiness") == SERVING


def test_grpc_transport_spreads_and_sigterm_drains(tmp_path: Path) -> None:
    stack = WorkersStack(tmp_path, StackPorts.free(2), envoy_concurrency=1,
                         epp_args=["--workers", "2", "--extproc-server", "grpc",
                                   "--drain-timeout", "1s", "--shutdown-grace-seconds", "2"])
    stack.start()
    try:
        assert all(_chat(stack, i) == 200 for i in range(16))
        page = _page(stack)
        assert all(_value(page, f'epp_worker_requests_total{{worker="{i}"}}') > 0
                   for i in (0, 1))
        assert stack.epp is not None
        supervisor = stack.epp.proc
        kids = _children(supervisor.pid)
        assert len(kids) == 2
        supervisor.send_signal(signal.SIGTERM)
        _wait_for("readiness NOT_SERVING",
                  lambda: _health(stack.ports.epp_health, "readiness") == NOT_SERVING, 5)
        assert _health(stack.ports.epp_health, "liveness") == SERVING
        assert _chat(stack, 99) == 200  # draining: the workers still take streams
        assert supervisor.wait(timeout=20) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in kids)
    finally:
        stack.stop()


def _run_epp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epp", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT)


def test_a_bad_configuration_is_reported_once(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: [{name: a, address: '127.0.0.1:1'}]\n")
    result = _run_epp("--workers", "2", "--endpoints-file", str(endpoints),
                      "--config-text", "plugins: [{type: no-such-plugin}]")
    assert result.returncode == 2
    assert result.stderr.count("epp: error:") == 1
    assert "no-such-plugin" in result.stderr
    assert "worker-0" not in result.stderr  # refused before any worker started
