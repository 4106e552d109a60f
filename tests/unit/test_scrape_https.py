"""The scraper reads model servers over https as the upstream ``metrics-data-source``
configures it: a self-signed pod certificate is accepted when verification is skipped
(upstream's default) and refused when it is not; the path is the configured one."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from epp.config.picker_config import load_picker_config
from epp.datalayer import MetricsScraper
from epp.datastore import Endpoint, EndpointPool

PAGE = (b"vllm:num_requests_waiting{engine=\"0\"} 4\n"
        b"vllm:num_requests_running{engine=\"0\"} 1\n"
        b"vllm:kv_cache_usage_perc{engine=\"0\"} 0.5\n")
PATH = "/engine/metrics"


def _self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pod")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "tls.crt", directory / "tls.key")
    return context


@pytest_asyncio.fixture
async def https_pod(tmp_path: Path) -> AsyncIterator[str]:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/plain")

    app = web.Application()
    app.router.add_get(PATH, metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_self_signed(tmp_path))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0  # a hang guard, not a measured bound
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def _scraper_for(pool: EndpointPool, insecure_skip_verify: bool) -> MetricsScraper:
    cfg = load_picker_config(f"""
plugins:
- type: queue-scorer
- type: metrics-data-source
  parameters: {{scheme: https, path: {PATH}, insecureSkipVerify: {insecure_skip_verify}}}
schedulingProfiles: [{{name: d, plugins: [{{pluginRef: queue-scorer}}]}}]
""")
    src = cfg.metrics_source
    return MetricsScraper(pool, interval_s=0.02, scheme=src.scheme, path=src.path,
                          verify_tls=src.verify_tls)


@pytest.mark.asyncio
async def test_https_without_verification_scrapes_a_self_signed_pod(https_pod: str) -> None:
    pool = EndpointPool()
    pool.replace_all([Endpoint("pod", https_pod)])
    ep = pool.get("pod")
    assert ep is not None
    async with _scraper_for(pool, insecure_skip_verify=True):
        await _until(lambda: ep.state.metrics.scraped_at > 0)
    assert (ep.state.metrics.waiting, ep.state.metrics.kv_cache_usage) == (4, 0.5)


@pytest.mark.asyncio
async def test_https_with_verification_refuses_an_untrusted_pod(https_pod: str) -> None:
    pool = EndpointPool()
    pool.replace_all([Endpoint("pod", https_pod)])
    ep = pool.get("pod")
    assert ep is not None
    async with _scraper_for(pool, insecure_skip_verify=False):
        await _until(lambda: ep.state.scrape_error is not None)
    assert "certificate" in (ep.state.scrape_error or "").lower(), ep.state.scrape_error
    assert ep.state.metrics.scraped_at == 0
    # The pod listens; only its metrics are untrusted, so it stays a candidate.
    assert ep.state.unreachable is None
