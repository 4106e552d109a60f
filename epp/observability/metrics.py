"""Prometheus metrics, on a registry owned by one app (no global registry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Request latency buckets: 5 ms (cached short answers) to 10 min (long generations).
_DURATION_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6,
                     60.0, 120.0, 300.0, 600.0)
# Scheduling buckets: 10 us (one cheap plugin) to 1 s (a pathological cycle).
_SCHED_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                  0.05, 0.1, 0.25, 0.5, 1.0)
# Prediction error buckets in tokens, symmetric around 0 (one block is 16 tokens).
_ERROR_BUCKETS = (-4096.0, -1024.0, -256.0, -64.0, -16.0, -1.0, 0.0, 15.0, 63.0, 255.0,
                  1023.0, 4095.0)
# Token-count buckets: powers of 2 from one token to 128k (the longest contexts served).
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(0, 18))
# Distinct model names given their own series. The ``model`` of a request is chosen by
# the client, so names get a series only once the pool is known to serve them (declared
# by discovery, or answered with a 2xx); a pool serves a few base models and at most a
# few dozen LoRA adapters, so 200 leaves room for both while capping a hostile client
# at ~200 x 45 samples. Everything else shares one series.
MAX_MODEL_LABELS = 200
# The label value of requests for models that have no series of their own.
OTHER_MODEL = "__other__"
# Longest model name given a series: HF repo ids are at most 96 characters, LoRA names
# are shorter; a longer name is no model a pod serves, and a label value is kept in full.
MAX_MODEL_LABEL_CHARS = 256


@dataclass(frozen=True, slots=True)
class ModelSeries:
    """The per-request series of one model, resolved once (``labels()`` is not free and
    these are touched on every request)."""

    requests: Any
    duration: Any
    input_tokens: Any
    output_tokens: Any


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
        self.scheduler_e2e = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Time of one scheduling cycle (all profiles).",
            buckets=_SCHED_BUCKETS, registry=r)
        self.plugin_duration = Histogram(
            "inference_extension_plugin_duration_seconds",
            "Time of one plugin call, by extension point and plugin.",
            ("extension_point", "plugin_type", "plugin_name"), buckets=_SCHED_BUCKETS,
            registry=r)
        self.picks = Counter(
            "epp_endpoint_picks", "Requests sent to each endpoint (primary pick).",
            ("endpoint",), registry=r)
        self.prefix_hit_ratio = Histogram(
            "epp_prefix_cache_hit_ratio",
            "Share of the prompt the chosen endpoint was predicted to hold in cache.",
            ("source",), buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0), registry=r)
        self.index_accuracy = Histogram(
            "epp_kv_index_prediction_error_tokens",
            "Engine-reported cached tokens minus the nearest value the index predicted: "
            "between what the engine confirmed holding and that plus the blocks pending "
            "from requests routed before (0 = within; negative = the index thought more "
            "was cached).",
            buckets=_ERROR_BUCKETS, registry=r)
        self.index_mispredictions = Counter(
            "epp_kv_index_mispredictions",
            "Responses whose cached tokens differ from the prediction by a block or more.",
            ("direction",), registry=r)
        self.index_predictions = Counter(
            "epp_kv_index_predictions",
            "Responses checked against the index's prediction, by outcome: exact (within a "
            "block of what the engine confirmed), pending (above it, as the pending picks "
            "of earlier requests predicted), over, under.", ("outcome",), registry=r)
        self.index_prediction_accuracy = Gauge(
            "epp_kv_index_prediction_accuracy",
            "Share of the last 1,000 checked responses the index predicted within a block "
            "(exact or pending outcome); alert when it falls.", registry=r)
        self.pd_decisions = Counter(
            "epp_pd_decision",
            "Prefill/decode disaggregation decisions, by type (decode-only, prefill-decode).",
            ("decision_type",), registry=r)
        self._models: dict[str, ModelSeries] = {}
        self._served: set[str] = set()  # model names with series of their own
        self._picks: dict[str, Any] = {}
        self._plugin_children: dict[tuple[str, str, str], Histogram] = {}
        self.served_elsewhere = Counter(
            "epp_served_elsewhere",
            "Requests the proxy reported served by an endpoint other than the primary pick "
            "(x-gateway-destination-endpoint-served), by where: fallback (one of the pick's "
            "fallbacks), other (another endpoint of the pool), unknown (not in the pool). "
            "Their load, status and cache-accuracy check go to the endpoint that served.",
            ("where",), registry=r)
        self.tls_failures = Counter(
            "epp_extproc_tls_handshake_failures",
            "Connections to the ext_proc port that failed before HTTP/2 (h2 transport), by "
            "reason: cleartext (the peer spoke h2c or HTTP/1 to the TLS port), "
            "handshake_error (e.g. a protocol or version mismatch), timeout.",
            ("reason",), registry=r)
        self.unreachable_fail_open = Counter(
            "epp_unreachable_fail_open",
            "Scheduling cycles in which every candidate endpoint was unreachable, so all "
            "were kept (fail open) instead of refusing the request.", registry=r)
        self.prefix_degraded = Counter(
            "epp_prefix_match_degraded",
            "Requests routed without the precise prefix match, by reason (deadline: the "
            "prefix step ran out of time; error: a producer raised; unavailable: a "
            "producer had no result, e.g. no tokens).", ("reason",), registry=r)
        self.background_failures = Counter(
            "epp_background_task_failures",
            "Unexpected failures of a supervised background task (each is logged and the "
            "task restarted with backoff), by task kind: scraper, k8s-watch-<resource>, "
            "endpoints-file, kv-index-resize.", ("task",), registry=r)
        self.watch_errors = Counter(
            "epp_discovery_watch_errors",
            "Retried failures of a Kubernetes list or watch, by resource and reason "
            "(connection, timeout, expired: 410 Gone and a relist, http: an error status, "
            "malformed: an unreadable answer, closed-early: a watch ended at once).",
            ("resource", "reason"), registry=r)

    def count_pd_decision(self, decision: str) -> None:
        """The P/D handler's decision counter."""
        self.pd_decisions.labels(decision).inc()

    def count_background_failure(self, task: str) -> None:
        """A supervised background task of kind ``task`` died and is being restarted."""
        self.background_failures.labels(task).inc()

    def count_tls_failure(self, reason: str) -> None:
        """A connection to the ext_proc port failed its TLS handshake."""
        self.tls_failures.labels(reason).inc()

    def count_watch_error(self, resource: str, reason: str) -> None:
        """A Kubernetes list or watch of ``resource`` failed for ``reason`` (retried)."""
        self.watch_errors.labels(resource, reason).inc()

    def model_label(self, name: str) -> str:
        """The label value for requests naming ``name``: itself when the pool serves it,
        else :data:`OTHER_MODEL`."""
        return name if name in self._served else OTHER_MODEL

    def serves(self, name: str) -> bool:
        """Whether ``name`` has series of its own."""
        return name in self._served

    def model(self, name: str) -> ModelSeries:
        """The request series of ``name`` (as model and target model); names the pool is
        not known to serve share the :data:`OTHER_MODEL` series."""
        series = self._models.get(name)
        if series is None:
            label = self.model_label(name)
            series = self._models.get(label)
            if series is None:
                series = ModelSeries(
                    self.requests.labels(label, label),
                    self.request_duration.labels(label, label),
                    self.input_tokens.labels(label, label),
                    self.output_tokens.labels(label, label))
                self._models[label] = series
        return series

    def serve_models(self, names: set[str]) -> None:
        """Models that discovery says the pool serves get series of their own."""
        for name in names - self._served:
            self.confirm_model(name)

    def confirm_model(self, name: str) -> None:
        """A model the pool served (a 2xx answer): give it series, within the cap."""
        if name and name not in self._served and len(self._served) < MAX_MODEL_LABELS \
                and len(name) <= MAX_MODEL_LABEL_CHARS:
            self._served.add(name)

    def forget_endpoint(self, endpoint: str) -> None:
        """A pod left the pool: drop its labelled series."""
        if self._picks.pop(endpoint, None) is not None:
            self.picks.remove(endpoint)

    def pick(self, endpoint: str) -> None:
        """Count a primary pick of ``endpoint``."""
        child = self._picks.get(endpoint)
        if child is None:
            child = self._picks[endpoint] = self.picks.labels(endpoint)
        child.inc()

    def observe_plugin(self, point: str, plugin_type: str, name: str, seconds: float) -> None:
        """The scheduler's plugin timer (children cached: labels() is not free)."""
        key = (point, plugin_type, name)
        child = self._plugin_children.get(key)
        if child is None:
            child = self._plugin_children[key] = self.plugin_duration.labels(*key)
        child.observe(seconds)
