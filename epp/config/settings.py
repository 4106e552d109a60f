"""Process settings for one endpoint picker, validated in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from epp.datalayer import scraper
from epp.datalayer.parser import VLLM_METRICS, EngineMetrics
from epp.extproc.certs import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS, ServerCertificate
from epp.extproc.stream import DEFAULT_MAX_BODY_BYTES
from epp.replicasync.settings import check_subject, default_subject, parse_servers

# Ports of the endpoint-picker protocol (GIE): ext_proc, gRPC health, Prometheus.
DEFAULT_GRPC_PORT = 9002
DEFAULT_HEALTH_PORT = 9003
DEFAULT_METRICS_PORT = 9090
# In-flight streams get this long to finish on SIGTERM; Kubernetes' default
# terminationGracePeriodSeconds is 30 s, so stay well inside it.
DEFAULT_SHUTDOWN_GRACE_S = 15.0
# Scrape defaults are the datalayer's (their derivations live there).
DEFAULT_SCRAPE_INTERVAL_S = scraper.DEFAULT_SCRAPE_INTERVAL_S
DEFAULT_SCRAPE_TIMEOUT_S = scraper.DEFAULT_SCRAPE_TIMEOUT_S
DEFAULT_METRICS_STALE_AFTER_S = scraper.DEFAULT_STALE_AFTER_S
# The InferencePool API group the Kubernetes discovery watches (GIE v1); the upstream
# picker supports only this group too.
DEFAULT_POOL_GROUP = "inference.networking.k8s.io"
SUPPORTED_POOL_GROUPS = (DEFAULT_POOL_GROUP,)
# After SIGTERM, how long the ext_proc server keeps accepting new streams while readiness
# already reports NOT_SERVING (the upstream picker's --drain-timeout, 30 s there). 0 here:
# local runs and tests stop at once; a Deployment behind a Service passes 30s so gateways
# stop dialling this replica before it refuses streams.
DEFAULT_DRAIN_TIMEOUT_S = 0.0
# Largest gRPC message accepted on the ext_proc port (--grpc-max-recv-msg-size). 0 keeps
# each transport's own limit: grpc.aio 8 MiB, h2 one whole request body plus framing.
DEFAULT_GRPC_MAX_RECV_MSG_BYTES = 0
# Processes serving the ext_proc port (--workers). 1 is a single process, no supervisor.
DEFAULT_WORKERS = 1
# More workers than this is a typo, not a deployment: each is a full replica (its own
# index, subscriptions and scrapes of every pod), and a node has far fewer cores.
MAX_WORKERS = 64


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What makes an app one worker of ``epp --workers N``; set by the supervisor, never
    by a flag. A worker binds the ext_proc port with SO_REUSEPORT beside its siblings,
    serves no health port (the supervisor does), and serves ``/metrics`` (and
    ``/debug/explain``) only on ``metrics_socket``, a unix socket in the supervisor's
    private directory, for the supervisor to merge."""

    index: int
    metrics_socket: str
    # The supervisor's self-signed certificate, the same for every worker (None: the
    # worker reads --cert-path itself, or serves cleartext).
    certificate: ServerCertificate | None = None


@dataclass(frozen=True, slots=True)
class EppSettings:
    """Everything :func:`epp.runner.build_app` needs. Port 0 picks a free port."""

    endpoints_file: str | None = None
    bind_address: str = "0.0.0.0"
    grpc_port: int = DEFAULT_GRPC_PORT
    health_port: int = DEFAULT_HEALTH_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    pool_name: str | None = None  # the InferencePool to watch (Kubernetes discovery)
    pool_namespace: str = "default"
    endpoint_selector: Mapping[str, str] | None = None  # Kubernetes without CRDs
    endpoint_target_ports: tuple[int, ...] | None = None
    kubeconfig: str | None = None
    config_file: str | None = None
    config_text: str | None = None
    enable_test_endpoint_selection: bool = False
    # ext_proc transport: "h2" (our lean HTTP/2 server) or "grpc" (grpc.aio).
    extproc_server: str = "h2"
    # TLS on the ext_proc port, on by default as in the upstream EPP: a certificate
    # generated at start-up unless cert_path names a directory with tls.crt and tls.key.
    secure_serving: bool = True
    cert_path: str | None = None
    enable_cert_reload: bool = False  # follow rotations of cert_path's files
    tls_min_version: str = DEFAULT_TLS_MIN_VERSION
    enable_explain: bool = False  # POST /debug/explain on the metrics port
    kv_events: bool = False  # engines publish KV events: the default profile is precise
    metrics_scrape_interval_s: float = DEFAULT_SCRAPE_INTERVAL_S
    metrics_scrape_timeout_s: float = DEFAULT_SCRAPE_TIMEOUT_S
    metrics_stale_after_s: float = DEFAULT_METRICS_STALE_AFTER_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    endpoints_reload_s: float = 1.0
    seed: int | None = None
    # --- upstream (llm-d-router) flags -------------------------------------------------
    pool_group: str = DEFAULT_POOL_GROUP
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    # /metrics needs a bearer token that a TokenReview + SubjectAccessReview accept.
    metrics_endpoint_auth: bool = False
    tracing: bool = False  # OpenTelemetry spans of the request path (OTEL_* variables)
    emit_endpoint_scores: bool = False  # per-endpoint scores in the response metadata
    grpc_max_recv_msg_bytes: int = DEFAULT_GRPC_MAX_RECV_MSG_BYTES
    engine_metrics: EngineMetrics = VLLM_METRICS  # which series of a pod's page to read
    # --- several replicas: share pending picks and in-flight load over NATS -------------
    replica_sync_url: str | None = None  # nats://host:4222 (comma-separated: a cluster)
    replica_sync_subject: str | None = None  # None: epp.<pool>.routing
    # --- several processes on one ext_proc port (epp.workers) ------------------------------
    workers: int = DEFAULT_WORKERS
    worker: WorkerRole | None = None  # set in a worker process only

    @property
    def pool_label(self) -> str:
        """The pool's name in metrics."""
        return self.pool_name or "default"

    @property
    def sync_subject(self) -> str:
        """The NATS subject replica sync publishes and listens on."""
        return self.replica_sync_subject or default_subject(self.pool_label)

    def __post_init__(self) -> None:
        if self.endpoints_file is None and self.pool_name is None and \
                self.endpoint_selector is None:
            raise ConfigError(
                "no endpoint discovery configured: pass --endpoints-file (static pool), "
                "--pool-name (InferencePool), or --endpoint-selector with "
                "--endpoint-target-ports")
        if self.endpoints_file is not None and self.endpoint_selector is not None:
            raise ConfigError("--endpoints-file and --endpoint-selector cannot be combined")
        if (self.endpoint_selector is None) != (self.endpoint_target_ports is None):
            raise ConfigError("--endpoint-selector and --endpoint-target-ports go together")
        for name in ("grpc_port", "health_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"{name}: {port} is not a TCP port")
        fixed = [p for p in (self.grpc_port, self.health_port, self.metrics_port) if p]
        if len(set(fixed)) != len(fixed):
            raise ConfigError("grpc_port, health_port and metrics_port must differ")
        if self.extproc_server not in ("h2", "grpc"):
            raise ConfigError(f"extproc_server: {self.extproc_server!r} is not h2 or grpc")
        if self.tls_min_version not in TLS_VERSIONS:
            raise ConfigError(f"--tls-min-version: {self.tls_min_version!r} is not one of "
                              f"{', '.join(TLS_VERSIONS)}")
        if self.secure_serving and self.extproc_server == "grpc" and \
                self.tls_min_version != DEFAULT_TLS_MIN_VERSION:
            raise ConfigError(f"--tls-min-version {self.tls_min_version} needs "
                              "--extproc-server h2: grpc.aio's TLS floor is fixed at 1.2")
        if self.config_file is not None and self.config_text is not None:
            raise ConfigError("give --config-file or --config-text, not both")
        if self.metrics_scrape_interval_s <= 0:
            raise ConfigError("metrics_scrape_interval_s: must be positive")
        if self.metrics_scrape_timeout_s <= 0:
            raise ConfigError("metrics_scrape_timeout_s: must be positive")
        if self.metrics_stale_after_s < self.metrics_scrape_interval_s:
            raise ConfigError("metrics_stale_after_s: must be at least the scrape interval")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes: must be at least 1024")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s: must not be negative")
        if self.pool_group not in SUPPORTED_POOL_GROUPS:
            raise ConfigError(f"--pool-group: {self.pool_group!r} is not supported; the "
                              f"InferencePool group is {DEFAULT_POOL_GROUP}")
        if self.drain_timeout_s < 0:
            raise ConfigError("drain_timeout_s: must not be negative")
        if self.grpc_max_recv_msg_bytes < 0:
            raise ConfigError("grpc_max_recv_msg_bytes: must not be negative")
        if self.replica_sync_url is not None:
            try:
                parse_servers(self.replica_sync_url)
            except ValueError as exc:
                raise ConfigError(f"--replica-sync-url: {exc}") from None
            try:
                check_subject(self.sync_subject)
            except ValueError as exc:
                raise ConfigError(f"--replica-sync-subject: {exc}") from None
        elif self.replica_sync_subject is not None:
            raise ConfigError("--replica-sync-subject needs --replica-sync-url")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers: {self.workers} is not between 1 and {MAX_WORKERS}")
