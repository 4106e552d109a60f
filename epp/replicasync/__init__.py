"""Replica sync: EPP replicas share pending picks and in-flight load over NATS.

A layer beside ``datalayer``: it writes into the block index and the endpoints' load
state, and imports neither scheduling nor extproc."""

from epp.replicasync.settings import check_subject, default_subject, parse_servers
from epp.replicasync.sync import ReplicaSync, ReplicaSyncError, SyncStats

__all__ = ["ReplicaSync", "ReplicaSyncError", "SyncStats", "check_subject",
           "default_subject", "parse_servers"]
