"""The ext_proc port's TLS certificate: generated in memory (self-signed) or read from a
directory (``tls.crt``, ``tls.key``, as a Kubernetes TLS Secret mounts them), and
reloaded when the files change (cert-manager renews them in place).

Gateways dial the endpoint picker over TLS and, by default, do not validate its
certificate (kgateway: an ``UpstreamTlsContext`` with an empty validation context), as
the upstream EPP serves a self-signed one unless ``--cert-path`` is given. Operators who
want verification mount a CA-issued certificate and configure the gateway to check it.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

# File names inside --cert-path: the keys of a kubernetes.io/tls Secret (and of
# cert-manager's Certificate secrets), which the upstream EPP reads too.
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
# The self-signed certificate lives as long as the process that made it; a year is far
# longer than any pod runs between restarts, and short enough that a client which does
# check dates never meets a certificate valid for decades.
SELF_SIGNED_VALIDITY = datetime.timedelta(days=365)
# Backdate notBefore so a client whose clock runs a little behind still accepts it.
SELF_SIGNED_CLOCK_SKEW = datetime.timedelta(minutes=5)
# How often the certificate files are checked for a rotation (two stat() calls). A
# Secret volume is updated by the kubelet within about a minute of the Secret changing,
# and cert-manager renews weeks before expiry, so a 1 s check adds nothing noticeable to
# the rotation delay and costs next to nothing.
CERT_RELOAD_INTERVAL_S = 1.0
# TLS versions --tls-min-version accepts. 1.2 is the floor of every supported gateway
# (and of gRPC's TLS stack); 1.3 refuses older clients.
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_TLS_MIN_VERSION = "1.2"
# HTTP/2 is the only protocol served; ALPN negotiates it as gRPC requires.
ALPN_PROTOCOLS = ["h2"]


class CertificateError(ValueError):
    """A certificate or key cannot be read or does not form a usable pair."""


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """A PEM certificate chain and its PEM private key."""

    chain_pem: bytes
    key_pem: bytes

    def leaf(self) -> x509.Certificate:
        """The first (leaf) certificate of the chain."""
        return x509.load_pem_x509_certificate(self.chain_pem)


def local_names() -> tuple[list[str], list[str]]:
    """DNS names and IP addresses a client may use for this host: its hostname (the pod
    name in Kubernetes), the addresses it resolves to (the pod IP), ``$POD_IP`` when the
    Deployment sets it, and localhost."""
    hostname = socket.gethostname()
    # No reverse lookup (getfqdn): with a slow resolver it would stall start-up.
    dns = [n for n in (hostname, "localhost") if n]
    ips = ["127.0.0.1", "::1"]
    if os.environ.get("POD_IP"):
        ips.append(os.environ["POD_IP"])
    try:
        for info in socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP):
            ips.append(str(info[4][0]))
    except OSError:
        pass  # an unresolvable hostname: the names above still cover localhost
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))


def generate_self_signed(dns_names: Iterable[str], ip_addresses: Iterable[str], *,
                         now: datetime.datetime | None = None) -> ServerCertificate:
    """A self-signed server certificate for the given names: ECDSA P-256 (the fastest
    handshake every gateway supports), valid for :data:`SELF_SIGNED_VALIDITY`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.timezone.utc)
    dns = list(dns_names)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    for ip in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip.split("%")[0])))
        except ValueError:
            continue  # not an address (a scoped or malformed value): leave it out
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else "epp")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SELF_SIGNED_CLOCK_SKEW)
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return ServerCertificate(
        chain_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def read_certificate(cert_dir: str | Path) -> ServerCertificate:
    """Read ``tls.crt`` and ``tls.key`` from ``cert_dir`` and check they are a pair."""
    d = Path(cert_dir)
    try:
        cert = ServerCertificate((d / CERT_FILE).read_bytes(), (d / KEY_FILE).read_bytes())
    except OSError as exc:
        raise CertificateError(f"--cert-path: cannot read {exc.filename}: "
                               f"{exc.strerror}") from None
    validate(cert, source=str(d))
    return cert


def validate(cert: ServerCertificate, *, source: str) -> None:
    """Raise :class:`CertificateError` unless OpenSSL accepts the pair."""
    try:
        load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert)
    except ssl.SSLError as exc:
        raise CertificateError(f"{source}: {CERT_FILE} and {KEY_FILE} are not a usable "
                               f"certificate and key: {exc.reason or exc}") from None


def load_into(context: ssl.SSLContext, cert: ServerCertificate) -> None:
    """Install ``cert`` in ``context``; new handshakes present it, established
    connections keep theirs. OpenSSL loads only from files, so the PEM goes through a
    private temporary directory that is removed at once."""
    with tempfile.TemporaryDirectory(prefix="epp-tls-") as tmp:
        chain, key = Path(tmp) / CERT_FILE, Path(tmp) / KEY_FILE
        chain.write_bytes(cert.chain_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert.key_pem)
        context.load_cert_chain(chain, key)


def server_context(cert: ServerCertificate, min_version: str = DEFAULT_TLS_MIN_VERSION
                   ) -> ssl.SSLContext:
    """A server SSLContext presenting ``cert``, offering only HTTP/2 by ALPN."""
    if min_version not in TLS_VERSIONS:
        raise CertificateError(f"--tls-min-version: {min_version!r} is not one of "
                               f"{', '.join(TLS_VERSIONS)}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[min_version]
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    # RFC 9113 §9.2.2: HTTP/2 over TLS 1.2 forbids renegotiation and compression.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    load_into(context, cert)
    return context


def _signature(cert_dir: Path) -> tuple[tuple[int, int, int], ...] | None:
    """What changes when either file is replaced or rewritten (a Secret volume swaps a
    symlink to new files; an in-place write changes size or mtime)."""
    try:
        stats = [os.stat(cert_dir / name) for name in (CERT_FILE, KEY_FILE)]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


class CertificateReloader:
    """Follows the certificate files in ``cert_dir``: :meth:`check` rereads them when
    they change and, once the new pair is valid, makes it :attr:`current` and tells the
    listeners. A half-written rotation (a new certificate next to the old key) is not
    installed: the old pair stays until the files form a valid pair again."""

    def __init__(self, cert_dir: str | Path) -> None:
        self.cert_dir = Path(cert_dir)
        self._signature = _signature(self.cert_dir)
        self.current = read_certificate(self.cert_dir)
        self.generation = 0  # bumped on every installed rotation
        self._listeners: list[Callable[[ServerCertificate], None]] = []
        self._rejected: object = None  # the signature last refused (logged once)

    def add_listener(self, listener: Callable[[ServerCertificate], None]) -> None:
        """Call ``listener(cert)`` after each installed rotation."""
        self._listeners.append(listener)

    def check(self) -> bool:
        """Reload if the files changed; True when a new certificate was installed."""
        signature = _signature(self.cert_dir)
        if signature is None or signature == self._signature:
            return False
        try:
            cert = read_certificate(self.cert_dir)
        except CertificateError as exc:
            if signature != self._rejected:
                log.warning("certificate files changed but cannot be used yet (keeping "
                            "the current certificate): %s", exc)
                self._rejected = signature
            return False
        self._signature = signature
        if cert == self.current:
            return False
        self.current = cert
        self.generation += 1
        for listener in self._listeners:
            listener(cert)
        leaf = cert.leaf()
        log.info("loaded the rotated TLS certificate from %s (serial %x, valid until %s)",
                 self.cert_dir, leaf.serial_number, leaf.not_valid_after_utc.isoformat())
        return True


class ExtProcTls:
    """The ext_proc port's TLS for either transport: an ``SSLContext`` for the h2
    server and credentials for grpc.aio, both following :attr:`reloader` when
    certificate reload is on."""

    def __init__(self, cert: ServerCertificate, *, min_version: str = DEFAULT_TLS_MIN_VERSION,
                 reloader: CertificateReloader | None = None,
                 self_signed: bool = False) -> None:
        if min_version not in TLS_VERSIONS:
            raise CertificateError(f"--tls-min-version: {min_version!r} is not one of "
                                   f"{', '.join(TLS_VERSIONS)}")
        self._cert = cert
        self.min_version = min_version
        self.reloader = reloader
        self.self_signed = self_signed
        self._context: ssl.SSLContext | None = None

    @classmethod
    def create(cls, cert_path: str | None, *, enable_reload: bool = False,
               min_version: str = DEFAULT_TLS_MIN_VERSION) -> ExtProcTls:
        """Read ``cert_path`` (following it when ``enable_reload``), or generate a
        self-signed certificate when it is None. Blocking: file reads, a DNS lookup of
        the hostname and key generation; call it off the event loop."""
        if cert_path is None:
            cert = generate_self_signed(*local_names())
            return cls(cert, min_version=min_version, self_signed=True)
        if enable_reload:
            reloader = CertificateReloader(cert_path)
            return cls(reloader.current, min_version=min_version, reloader=reloader)
        return cls(read_certificate(cert_path), min_version=min_version)

    @property
    def certificate(self) -> ServerCertificate:
        """The certificate new handshakes present."""
        return self.reloader.current if self.reloader is not None else self._cert

    def ssl_context(self) -> ssl.SSLContext:
        """The h2 server's context (one per instance); rotations are loaded into it."""
        if self._context is None:
            context = server_context(self.certificate, self.min_version)
            if self.reloader is not None:
                self.reloader.add_listener(lambda cert: load_into(context, cert))
            self._context = context
        return self._context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """grpc.aio server credentials (gRPC negotiates ALPN ``h2`` itself). Its TLS
        floor is 1.2 and cannot be raised from Python: the settings refuse 1.3 with
        the grpc transport."""
        if self.reloader is None:
            cert = self.certificate
            return grpc.ssl_server_credentials([(cert.key_pem, cert.chain_pem)])
        reloader = self.reloader
        served = [reloader.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # gRPC asks before every new handshake; None keeps the current certificate.
            if reloader.generation == served[0]:
                return None
            served[0] = reloader.generation
            cert = reloader.current
            return grpc.ssl_server_certificate_configuration([(cert.key_pem, cert.chain_pem)])

        first = reloader.current
        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(first.key_pem, first.chain_pem)]),
            fetch, require_client_authentication=False)

    async def watch(self, interval_s: float = CERT_RELOAD_INTERVAL_S) -> None:
        """Check the certificate files every ``interval_s`` until cancelled (returns at
        once when reload is off)."""
        if self.reloader is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            self.reloader.check()

    def describe(self) -> str:
        """One line for the start-up log."""
        leaf = self.certificate.leaf()
        source = "self-signed, generated at start-up" if self.self_signed else (
            f"from {self.reloader.cert_dir}, reloaded on change" if self.reloader is not None
            else "from --cert-path")
        return (f"TLS {self.min_version}+ ({source}; serial {leaf.serial_number:x}, valid "
                f"until {leaf.not_valid_after_utc.date().isoformat()})")


__all__ = [
    "ALPN_PROTOCOLS", "ExtProcTls", "CERT_FILE", "CERT_RELOAD_INTERVAL_S", "DEFAULT_TLS_MIN_VERSION",
    "KEY_FILE", "TLS_VERSIONS", "CertificateError", "CertificateReloader",
    "ServerCertificate", "generate_self_signed", "local_names", "load_into",
    "read_certificate", "server_context", "validate",
]
