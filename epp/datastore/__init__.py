"""Endpoint state: the one place that holds the pool's endpoints."""

from epp.datastore.endpoint import Endpoint, parse_address
from epp.datastore.metrics import EndpointLoad, EndpointState, ServerMetrics
from epp.datastore.pool import EndpointPool

__all__ = ["Endpoint", "EndpointLoad", "EndpointPool", "EndpointState", "ServerMetrics",
           "parse_address"]
