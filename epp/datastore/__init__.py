"""Endpoint state: the one place that holds the pool's endpoints."""

from epp.datastore.endpoint import Endpoint, parse_address
from epp.datastore.pool import EndpointPool

__all__ = ["Endpoint", "EndpointPool", "parse_address"]
