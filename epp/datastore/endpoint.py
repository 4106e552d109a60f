"""One model-server endpoint (a pod's port, i.e. one data-parallel rank)."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

from epp.datastore.metrics import EndpointState

log = logging.getLogger(__name__)

ROLE_LABEL = "llm-d.ai/role"
# What a gateway answers when it cannot reach the endpoint it was told to use: Envoy's
# local reply for a refused connection or a reset before response headers is 503
# ("upstream connect error or disconnect/reset before headers"). A model server's own
# 503 (overloaded, shutting down) is also a reason to look elsewhere; either way the
# next successful scrape (one interval later) restores the endpoint.
UPSTREAM_UNREACHABLE_STATUS = 503
# vLLM's KVEventsConfig default publisher endpoint is tcp://*:5557 (data-parallel rank r
# publishes on 5557 + r); an endpoint without an explicit ``kv_events`` address uses it.
DEFAULT_KV_EVENTS_PORT = 5557


def parse_address(address: str) -> tuple[str, int]:
    """Split ``ip:port`` (IPv6 as ``[ip]:port``) and validate both parts."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address!r} must be ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"address {address!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"address {address!r}: port must be 1-65535")
    return host, int(port_text)


@dataclass(slots=True, eq=False)
class Endpoint:
    """A model server endpoint as discovery reports it.

    ``address`` is what goes into ``x-gateway-destination-endpoint``; ``kv_events`` is the
    ZMQ address its engine publishes KV events on, when known. Equality is identity (an
    endpoint is an entity with live state); compare specs with :meth:`same_spec`.
    """

    name: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    kv_events: str | None = None
    ip: str = field(init=False)
    port: int = field(init=False)
    state: EndpointState = field(default_factory=EndpointState)

    def __post_init__(self) -> None:
        self.ip, self.port = parse_address(self.address)

    @property
    def role(self) -> str:
        """Role from the ``llm-d.ai/role`` label; unlabelled endpoints serve both."""
        return self.labels.get(ROLE_LABEL, "both")

    def metrics_stale(self, now: float, max_age: float) -> bool:
        """Whether the last successful scrape is older than ``max_age`` seconds."""
        scraped = self.state.metrics.scraped_at
        return scraped == 0.0 or now - scraped > max_age

    def report_response(self, status: int) -> None:
        """The gateway's response status for a request routed here (0: none came).
        ``UPSTREAM_UNREACHABLE_STATUS`` takes the endpoint out of the candidate set until
        it answers a scrape again."""
        if status == UPSTREAM_UNREACHABLE_STATUS and self.state.report_unreachable(
                f"gateway answered {status} for a request routed here"):
            log.warning("endpoint %s (%s) unreachable: the gateway answered %d; routing "
                        "around it until it answers a metrics scrape", self.name,
                        self.address, status)

    def same_spec(self, other: Endpoint) -> bool:
        """Whether discovery would describe both the same way."""
        return (
            self.address == other.address
            and self.labels == other.labels
            and self.model == other.model
            and self.kv_events == other.kv_events
        )
