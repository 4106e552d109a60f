"""TLS on the ext_proc port: certificate generation, reading, reload, and both transports
serving over TLS (ALPN h2), following a rotation, and surviving a cleartext client."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.cli import parse_args, settings_from_args
from epp.config import ConfigError, EppSettings
from epp.devtools import fake_envoy as fe
from epp.extproc import certs
from epp.extproc.h2server import H2ExtProcServer
from epp.extproc.server import ExtProcServicer, add_to_server
from epp.extproc.tls import TlsServerProtocol, describe_cleartext
from epp.extproc.tls import log as tls_log
from epp.runner import build_app
from epp.supervise import LogLimiter
from tests.h2client import H2Client
from tests.unit.test_h2server import director
from tests.tlsutil import issue, make_ca, probe, write_pair

# -- certificates ------------------------------------------------------------------------


def test_self_signed_certificate_is_p256_for_the_host_and_localhost_for_a_year() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    cert = certs.generate_self_signed(["epp-7f9c-abcde", "localhost"],
                                      ["10.1.2.3", "127.0.0.1", "not-an-ip"], now=now)
    leaf = cert.leaf()
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["epp-7f9c-abcde", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")]
    assert leaf.not_valid_after_utc - now == certs.SELF_SIGNED_VALIDITY
    assert leaf.not_valid_before_utc < now
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    certs.validate(cert, source="generated")  # OpenSSL accepts the pair


def test_local_names_cover_localhost_and_the_pod_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.244.0.17")
    dns, ips = certs.local_names()
    assert "localhost" in dns
    assert {"127.0.0.1", "10.244.0.17"} <= set(ips)


def test_read_certificate_names_the_missing_file_and_refuses_a_mismatched_pair(
        tmp_path: Path) -> None:
    with pytest.raises(certs.CertificateError, match="tls.crt"):
        certs.read_certificate(tmp_path)
    ca = make_ca()
    one, other = issue(ca, ["a"]), issue(ca, ["b"])
    write_pair(tmp_path, certs.ServerCertificate(one.chain_pem, other.key_pem))
    with pytest.raises(certs.CertificateError, match="not a usable"):
        certs.read_certificate(tmp_path)
    write_pair(tmp_path, one)
    assert certs.read_certificate(tmp_path) == one


def test_reloader_installs_a_rotation_once_and_waits_out_a_half_written_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = make_ca()
    first, second = issue(ca, ["epp"]), issue(ca, ["epp"])
    write_pair(tmp_path, first)
    reloader = certs.CertificateReloader(tmp_path)
    seen: list[certs.ServerCertificate] = []
    reloader.add_listener(seen.append)
    assert not reloader.check()  # nothing changed
    # cert-manager writing in place: the new certificate lands before its key.
    (tmp_path / certs.CERT_FILE).write_bytes(second.chain_pem)
    with caplog.at_level(logging.WARNING, logger="epp.extproc.certs"):
        assert not reloader.check()
        assert not reloader.check()
    assert reloader.current == first and seen == [] and reloader.generation == 0
    assert len([r for r in caplog.records if "cannot be used yet" in r.message]) == 1
    (tmp_path / certs.KEY_FILE).write_bytes(second.key_pem)
    assert reloader.check()
    assert reloader.current == second and seen == [second] and reloader.generation == 1
    assert not reloader.check()


def test_reloader_follows_a_secret_volume_symlink_swap(tmp_path: Path) -> None:
    """The kubelet updates a Secret volume by writing a new timestamped directory and
    atomically repointing ``..data``; tls.crt and tls.key are links through it."""
    ca = make_ca()
    first, second = issue(ca, ["epp"]), issue(ca, ["epp"])
    write_pair(tmp_path / "..2026_01_01", first)
    (tmp_path / "..data").symlink_to("..2026_01_01")
    for name in (certs.CERT_FILE, certs.KEY_FILE):
        (tmp_path / name).symlink_to(f"..data/{name}")
    reloader = certs.CertificateReloader(tmp_path)
    assert reloader.current == first
    write_pair(tmp_path / "..2026_03_01", second)
    (tmp_path / "..data_tmp").symlink_to("..2026_03_01")
    (tmp_path / "..data_tmp").replace(tmp_path / "..data")
    assert reloader.check()
    assert reloader.current == second


def test_tls_min_version_must_be_known() -> None:
    with pytest.raises(certs.CertificateError, match="tls-min-version"):
        certs.ExtProcTls(certs.generate_self_signed(["localhost"], []), min_version="1.1")


@pytest.mark.parametrize(("first", "expected"), [
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "cleartext HTTP/2 (h2c)"),
    (b"PRI", "cleartext HTTP/2 (h2c)"),
    (b"GET / HTTP/1.1\r\n", "cleartext HTTP/1"),
    (b"\x00\x00", "something other than TLS"),
    (b"\x16\x03\x01\x02\x00", None),
])
def test_describe_cleartext(first: bytes, expected: str | None) -> None:
    assert describe_cleartext(first) == expected


# -- both transports over TLS ----------------------------------------------------------


Serve = Callable[[certs.ExtProcTls], Awaitable[int]]  # starts a server, returns its port


async def _serve_h2(tls: certs.ExtProcTls) -> tuple[int, Callable[[], Awaitable[None]]]:
    server = H2ExtProcServer(director(), ssl_context=tls.ssl_context())
    port = await server.start("127.0.0.1", 0)
    return port, lambda: server.stop(1.0)


async def _serve_grpc(tls: certs.ExtProcTls) -> tuple[int, Callable[[], Awaitable[None]]]:
    server = grpc.aio.server()
    add_to_server(ExtProcServicer(director()), server)
    port = server.add_secure_port("127.0.0.1:0", tls.grpc_credentials())
    await server.start()
    return port, lambda: server.stop(1.0)


@pytest_asyncio.fixture(params=["h2", "grpc"])
async def serve(request: pytest.FixtureRequest) -> AsyncIterator[Serve]:
    stops: list[Callable[[], Awaitable[None]]] = []

    async def start(tls: certs.ExtProcTls) -> int:
        port, stop = await (_serve_h2 if request.param == "h2" else _serve_grpc)(tls)
        stops.append(stop)
        return port

    yield start
    for stop in stops:
        await stop()


async def _exchange(channel: grpc.aio.Channel) -> None:
    """One request through the ext_proc stream: routed to the pool's only endpoint."""
    stub = pb_grpc.ExternalProcessorStub(channel)
    body = json.dumps({"model": "m", "prompt": "hello"}).encode()
    call = stub.Process(iter([fe.request_headers(), fe.request_body(body),
                              fe.response_headers(), fe.response_body(b"{}", True)]))
    responses = [r async for r in call]
    assert responses[0].WhichOneof("response") == "request_headers"
    assert await call.code() == grpc.StatusCode.OK


def _channel(port: int, ca_pem: bytes) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=ca_pem),
        options=[("grpc.ssl_target_name_override", "localhost")])


@pytest.mark.asyncio
async def test_self_signed_tls_routes_with_alpn_h2(serve: Serve) -> None:
    tls = await asyncio.to_thread(certs.ExtProcTls.create, None)
    port = await serve(tls)
    # A client that trusts the self-signed certificate itself verifies it for localhost.
    pem = tls.certificate.chain_pem
    async with _channel(port, pem) as channel:
        await _exchange(channel)
    seen = await asyncio.to_thread(probe, port, cadata=pem)
    assert seen.alpn == "h2"
    assert seen.serial == tls.certificate.leaf().serial_number


@pytest.mark.asyncio
async def test_rotation_reaches_new_connections_and_keeps_established_ones(
        serve: Serve, tmp_path: Path) -> None:
    ca = make_ca()
    first, second = issue(ca, ["localhost"]), issue(ca, ["localhost"])
    write_pair(tmp_path, first)
    tls = await asyncio.to_thread(certs.ExtProcTls.create, str(tmp_path), enable_reload=True)
    port = await serve(tls)
    async with _channel(port, ca.pem) as established:
        await _exchange(established)
        assert (await asyncio.to_thread(probe, port, cadata=ca.pem)).serial == \
            first.leaf().serial_number
        write_pair(tmp_path, second)
        assert tls.reloader is not None and tls.reloader.check()
        seen = await asyncio.to_thread(probe, port, cadata=ca.pem)
        assert seen.serial == second.leaf().serial_number
        await _exchange(established)  # the connection made before the rotation goes on
        async with _channel(port, ca.pem) as fresh:
            await _exchange(fresh)


@pytest.mark.asyncio
async def test_tls_1_3_floor_refuses_a_tls_1_2_client(tmp_path: Path) -> None:
    tls = certs.ExtProcTls(certs.generate_self_signed(["localhost"], []), min_version="1.3")
    port, stop = await _serve_h2(tls)
    try:
        assert (await asyncio.to_thread(probe, port)).version == "TLSv1.3"

        def tls12_client() -> None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                ctx.wrap_socket(raw, server_hostname="localhost")

        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(tls12_client)
    finally:
        await stop()


@pytest.mark.asyncio
async def test_cleartext_client_on_the_tls_port_is_logged_and_the_server_serves_on(
        caplog: pytest.LogCaptureFixture) -> None:
    tls = await asyncio.to_thread(certs.ExtProcTls.create, None)
    server = H2ExtProcServer(director(), ssl_context=tls.ssl_context())
    port = await server.start("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.WARNING, logger="epp.extproc.tls"):
            client = H2Client()  # cleartext HTTP/2 with prior knowledge, as h2c Envoy
            await client.connect(port)
            await asyncio.wait_for(client.closed.wait(), 10)
            await client.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "epp.extproc.tls"]
        assert len(lines) == 1
        assert "cleartext HTTP/2 (h2c) on the TLS ext_proc port from 127.0.0.1:" in lines[0]
        assert "--secure-serving=false" in lines[0]
        assert server.tls_failures == 1
        async with _channel(port, tls.certificate.chain_pem) as channel:
            await _exchange(channel)
    finally:
        await server.stop(1.0)


# -- flags, settings, start-up ---------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    ([], (True, None, False, "1.2")),
    (["--secure-serving=false"], (False, None, False, "1.2")),
    (["--secure-serving=true", "--cert-path", "/certs", "--enable-cert-reload"],
     (True, "/certs", True, "1.2")),
    (["--secure-serving", "--enable-cert-reload=false", "--tls-min-version", "1.3"],
     (True, None, False, "1.3")),
])
def test_tls_flags_in_the_forms_the_chart_renders(flags: list[str],
                                                  expected: tuple[object, ...]) -> None:
    s = settings_from_args(parse_args(["--endpoints-file", "e.yaml", *flags]))
    assert (s.secure_serving, s.cert_path, s.enable_cert_reload, s.tls_min_version) == expected


def test_settings_refuse_tls_1_3_on_grpc_and_unknown_versions() -> None:
    with pytest.raises(ConfigError, match="needs --extproc-server h2"):
        EppSettings(endpoints_file="e.yaml", extproc_server="grpc", tls_min_version="1.3")
    with pytest.raises(ConfigError, match="tls-min-version"):
        EppSettings(endpoints_file="e.yaml", tls_min_version="1.0")
    # Without TLS the floor does not matter.
    EppSettings(endpoints_file="e.yaml", extproc_server="grpc", tls_min_version="1.3",
                secure_serving=False)


@pytest.mark.asyncio
async def test_app_with_an_unreadable_cert_path_fails_start_up_naming_the_file(
        tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    app = build_app(EppSettings(endpoints_file=str(endpoints), bind_address="127.0.0.1",
                                grpc_port=0, health_port=0, metrics_port=0,
                                cert_path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="cannot read .*tls.crt"):
        await app.start()


class _Inner(asyncio.Protocol):
    """Records what the TLS layer hands to the application protocol."""

    def __init__(self) -> None:
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True


@pytest.mark.asyncio
async def test_a_peer_that_never_finishes_its_handshake_is_closed_and_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    tls = certs.ExtProcTls(certs.generate_self_signed(["localhost"], []))
    inner = _Inner()
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: TlsServerProtocol(tls.ssl_context(), inner, LogLimiter(tls_log),
                                  on_failure=failures.append, handshake_timeout=0.2),
        "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="epp.extproc.tls"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            writer.close()
        assert failures == ["handshake timeout"] and not inner.made
        assert any("did not finish" in r.getMessage() for r in caplog.records)
    finally:
        server.close()
        await server.wait_closed()
