"""TLS on the ext_proc port through real Envoy, on both transports: a CA-verified
connection (and a wrong SAN refused), cleartext with --secure-serving=false, a
certificate rotated under traffic, and a gateway that speaks cleartext to the TLS port."""

from __future__ import annotations

import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.devtools import envoy as envoy_cfg
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import post, request
from tests.tlsutil import issue, make_ca, probe, write_pair

pytestmark = pytest.mark.integration

BODY = {"model": "qwen3", "prompt": "Hello over TLS", "max_tokens": 2}
# The name the EPP's Service would have; the test certificates carry it as their SAN.
SAN = "epp.inference.svc.cluster.local"
TRANSPORTS = ["h2", "grpc"]


def _stack(work: Path, transport: str, epp_args: list[str],
           epp_tls: envoy_cfg.EppTls) -> LocalStack:
    return LocalStack(work, StackPorts.free(1), envoy_concurrency=1, epp_tls=epp_tls,
                      epp_args=["--extproc-server", transport, "--shutdown-grace-seconds",
                                "1", *epp_args])


@pytest.fixture
def running(request: pytest.FixtureRequest) -> Iterator[list[LocalStack]]:
    """Stacks a test started, stopped when it ends."""
    stacks: list[LocalStack] = []
    yield stacks
    for s in stacks:
        s.stop()


def _restart_envoy(stack: LocalStack, epp_tls: envoy_cfg.EppTls) -> None:
    assert stack.envoy is not None
    stack.envoy.stop()
    stack.epp_tls = epp_tls
    stack.start_envoy()


def _envoy_stat(stack: LocalStack, name: str) -> int:
    url = f"http://127.0.0.1:{stack.ports.envoy_admin}/stats?filter=^{name}$"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def _status(stack: LocalStack) -> int:
    return post(stack.url + "/v1/completions", BODY).status


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_envoy_verifies_a_ca_issued_certificate_and_refuses_a_wrong_san(
        tmp_path: Path, running: list[LocalStack], transport: str) -> None:
    ca = make_ca()
    ca_file = ca.write(tmp_path / "ca.crt")
    write_pair(tmp_path / "certs", issue(ca, [SAN]))
    stack = _stack(tmp_path, transport, ["--cert-path", str(tmp_path / "certs")],
                   envoy_cfg.EppTls(trusted_ca=ca_file, subject_alt_name=SAN))
    running.append(stack)
    stack.start()
    assert _status(stack) == 200
    assert _envoy_stat(stack, "cluster.endpoint_picker.ssl.handshake") >= 1
    assert probe(stack.ports.epp_grpc, cadata=ca.pem, hostname=SAN).alpn == "h2"

    # Envoy checking another name refuses the certificate: FailClose gives 503.
    _restart_envoy(stack, envoy_cfg.EppTls(trusted_ca=ca_file, subject_alt_name="other.svc"))
    assert _status(stack) == 503
    assert _envoy_stat(stack, "cluster.endpoint_picker.ssl.fail_verify_san") >= 1
    assert _envoy_stat(stack, "cluster.endpoint_picker.ssl.handshake") == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_secure_serving_false_serves_cleartext(tmp_path: Path, running: list[LocalStack],
                                               transport: str) -> None:
    stack = _stack(tmp_path, transport, ["--secure-serving=false"], envoy_cfg.CLEARTEXT)
    running.append(stack)
    stack.start()
    assert _status(stack) == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        probe(stack.ports.epp_grpc)  # the port does not speak TLS


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rotated_certificate_under_traffic(tmp_path: Path, running: list[LocalStack],
                                           transport: str) -> None:
    ca = make_ca()
    ca_file = ca.write(tmp_path / "ca.crt")
    certs_dir = tmp_path / "certs"
    first, second = issue(ca, [SAN]), issue(ca, [SAN])
    write_pair(certs_dir, first)
    verified = envoy_cfg.EppTls(trusted_ca=ca_file, subject_alt_name=SAN)
    stack = _stack(tmp_path, transport, ["--cert-path", str(certs_dir),
                                         "--enable-cert-reload=true"], verified)
    running.append(stack)
    stack.start()
    port = stack.ports.epp_grpc
    assert probe(port, cadata=ca.pem, hostname=SAN).serial == first.leaf().serial_number

    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            statuses.append(_status(stack))

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(statuses) < count:
            assert time.monotonic() < deadline, f"only {len(statuses)} requests done"
            time.sleep(0.02)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        wait_for(20)
        write_pair(certs_dir, second)  # cert-manager renews the Secret
        deadline = time.monotonic() + 30
        while probe(port, cadata=ca.pem, hostname=SAN).serial != second.leaf().serial_number:
            assert time.monotonic() < deadline, "the EPP never presented the new certificate"
            time.sleep(0.1)
        wait_for(len(statuses) + 20)  # the established Envoy connection carries on
    finally:
        stop.set()
        for t in clients:
            t.join()
    failed = [s for s in statuses if s != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} requests failed: {set(failed)}"
    # A new Envoy (new connections, still verifying CA and SAN) accepts the new one.
    _restart_envoy(stack, verified)
    assert _status(stack) == 200
    assert stack.epp is not None
    assert b"loaded the rotated TLS certificate" in stack.epp.log_path.read_bytes()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cleartext_gateway_on_the_tls_port_is_logged_and_the_epp_serves_on(
        tmp_path: Path, running: list[LocalStack], transport: str) -> None:
    stack = _stack(tmp_path, transport, [], envoy_cfg.CLEARTEXT)
    running.append(stack)
    stack.start()
    assert _status(stack) == 503  # Envoy's h2c cannot reach a TLS picker: FailClose
    assert stack.epp is not None
    if transport == "h2":
        stack.epp.wait_for_log("cleartext HTTP/2 (h2c) on the TLS ext_proc port from 127.0.0.1:")
        assert b"--secure-serving=false" in stack.epp.log_path.read_bytes()
        page = request(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics").body.decode()
        assert re.search(r'epp_extproc_tls_handshake_failures_total\{reason="cleartext"\} '
                         r'[1-9]', page), page[-2000:]
    else:  # grpc.aio: gRPC core's own line, which names no peer
        stack.epp.wait_for_log("Handshake failed with error SSL_ERROR_SSL")
    _restart_envoy(stack, envoy_cfg.KGATEWAY_TLS)
    assert stack.epp.alive()
    assert _status(stack) == 200
