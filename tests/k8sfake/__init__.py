"""A fake Kubernetes API server for tests: real list/watch protocol over loopback HTTP."""

from tests.k8sfake.server import (
    DEFAULT_NAMESPACE,
    FakeKubeServer,
    Request,
    make_objective,
    make_pod,
    make_pool,
    make_rewrite,
)

__all__ = ["DEFAULT_NAMESPACE", "FakeKubeServer", "Request", "make_objective", "make_pod",
           "make_pool", "make_rewrite"]
