"""Endpoint state: the one place that holds the pool's endpoints."""

from epp.datastore.endpoint import DEFAULT_KV_EVENTS_PORT, Endpoint, parse_address
from epp.datastore.metrics import EndpointLoad, EndpointState, PrefillRate, ServerMetrics
from epp.datastore.pool import EndpointPool

__all__ = ["DEFAULT_KV_EVENTS_PORT", "Endpoint", "EndpointLoad", "EndpointPool", "EndpointState", "PrefillRate", "ServerMetrics",
           "parse_address"]
