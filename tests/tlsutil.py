"""Test certificates (a CA and the server certificates it issues) and a TLS client probe
that reports what a server presents."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from epp.extproc.certs import CERT_FILE, KEY_FILE, ServerCertificate

_DAY = datetime.timedelta(days=1)


@dataclass
class CertAuthority:
    """A throwaway certificate authority."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path


def make_ca(name: str = "epp test CA") -> CertAuthority:
    """A self-signed CA certificate valid today."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return CertAuthority(key, cert)


def issue(ca: CertAuthority, dns: list[str], ips: tuple[str, ...] = ()) -> ServerCertificate:
    """A server certificate for ``dns`` and ``ips`` signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + _DAY)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return ServerCertificate(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()))


def write_pair(cert_dir: Path, cert: ServerCertificate) -> None:
    """Write ``tls.crt`` and ``tls.key`` (each atomically, as a Secret volume swaps)."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    for name, data in ((CERT_FILE, cert.chain_pem), (KEY_FILE, cert.key_pem)):
        tmp = cert_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(cert_dir / name)


@dataclass
class Handshake:
    """What a TLS server presented to one client connection."""

    alpn: str | None
    serial: int
    version: str | None


def probe(port: int, *, cadata: bytes | None = None, hostname: str = "localhost",
          host: str = "127.0.0.1", alpn: bool = True) -> Handshake:
    """Handshake with ``host:port`` (verifying against ``cadata`` when given, else not
    at all) and report the certificate and protocol. Blocking."""
    if cadata is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cadata=cadata.decode())
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=hostname) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return Handshake(tls.selected_alpn_protocol(),
                         x509.load_der_x509_certificate(der).serial_number, tls.version())
