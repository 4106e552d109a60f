"""Prometheus metrics, on a registry owned by one app (no global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latency buckets: 5 ms (cached short answers) to 10 min (long generations).
_DURATION_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6,
                     60.0, 120.0, 300.0, 600.0)
# Token-count buckets: powers of 2 from one token to 128k (the longest contexts served).
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 18))


class EppMetrics:
    """The endpoint picker's metrics, with the ecosystem's names where they exist."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ("model_name", "target_model_name")
        r = self.registry
        self.requests = Counter(
            "inference_objective_request", "Requests routed, by model.", labels, registry=r)
        self.request_errors = Counter(
            "inference_objective_request_error",
            "Requests that failed, by model and error code.",
            (*labels, "error_code"), registry=r)
        self.request_duration = Histogram(
            "inference_objective_request_duration_seconds",
            "Time from routing a request to the end of its response.",
            labels, buckets=_DURATION_BUCKETS, registry=r)
        self.input_tokens = Histogram(
            "inference_objective_input_tokens", "Prompt tokens per request (from usage).",
            labels, buckets=_TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram(
            "inference_objective_output_tokens", "Completion tokens per request (from usage).",
            labels, buckets=_TOKEN_BUCKETS, registry=r)
        self.ready_pods = Gauge(
            "inference_pool_ready_pods", "Endpoints in the pool.", ("name",), registry=r)
        self.picks = Counter(
            "epp_endpoint_picks", "Requests sent to each endpoint (primary pick).",
            ("endpoint",), registry=r)
