"""Settings of replica sync: plain values and their checks, importable by the process
settings without the NATS client."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# URL schemes the NATS client dials: plain TCP, or TLS from the first byte.
SERVER_SCHEMES = ("nats", "tls")
NATS_DEFAULT_PORT = 4222
# A subject is dot-separated tokens of printable characters; ``*`` and ``>`` are
# wildcards, which a publisher cannot use.
_TOKEN = re.compile(r"[^\s.*>]+")


def default_subject(pool: str) -> str:
    """The subject the replicas of one pool share: ``epp.<pool>.routing``."""
    return f"epp.{pool}.routing"


def parse_servers(url: str) -> list[str]:
    """``nats://host:port`` (or several, comma-separated: a NATS cluster) as a list;
    raises ``ValueError`` naming what is wrong."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("no NATS server given")
    for server in servers:
        parts = urlsplit(server)
        if parts.scheme not in SERVER_SCHEMES:
            raise ValueError(f"{redact(server)!r}: the scheme must be one of "
                             f"{', '.join(s + '://' for s in SERVER_SCHEMES)}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{redact(server)!r}: the port is not a number") from None
        if not parts.hostname or port == 0:
            raise ValueError(f"{redact(server)!r}: needs host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{redact(server)!r}: takes no path or query")
    return servers


def check_subject(subject: str) -> str:
    """The subject if a publisher can use it; raises ``ValueError`` otherwise."""
    if not subject or not all(_TOKEN.fullmatch(t) for t in subject.split(".")):
        raise ValueError(f"{subject!r} is not a NATS subject to publish on: dot-separated "
                         "non-empty tokens, no spaces, no wildcards (* or >)")
    return subject


def redact(server: str) -> str:
    """A server URL fit for logs: ``scheme://host:port``, without credentials."""
    parts = urlsplit(server)
    try:
        port = parts.port or NATS_DEFAULT_PORT
    except ValueError:
        port = NATS_DEFAULT_PORT
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"
