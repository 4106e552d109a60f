"""The ``epp`` command: flags -> settings -> :func:`epp.runner.build_app`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import uvloop

from epp.config import ConfigError, EppSettings
from epp.config import settings as defaults
from epp.config.goflags import parse_byte_size, parse_go_bool, parse_go_duration
from epp.datalayer.parser import VLLM_METRICS, EngineMetrics
from epp.discovery.kubernetes import (
    DiscoveryError,
    parse_label_selector,
    parse_target_ports,
)
from epp.discovery.static import EndpointsFileError
from epp.extproc.certs import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS
from epp.observability.logsetup import ENCODERS, configure_logging, verbosity_level
from epp.runner import build_app, serve_until_stopped, settle_heap
from epp.workers.supervisor import WorkerStartError, supervise

log = logging.getLogger("epp")

# Flags of the upstream (llm-d-router) picker that mean nothing here: accepted so its
# Helm chart and manifests run unchanged; when given, one log line says why it is ignored.
IGNORED_UPSTREAM_FLAGS = {
    "ha_enable_leader_election": "replicas here are active-active: each one routes and "
    "reports ready on its own, so there is no leader to elect",
    "health_checking": "gRPC health is always served on --grpc-health-port (and on the "
    "ext_proc port with --extproc-server grpc)",
    "refresh_prometheus_metrics_interval": "/metrics is computed when it is scraped, "
    "there is nothing to flush",
    "enable_pprof": "Go's pprof profiler has no equivalent here",
    "grpc_max_send_msg_size": "responses are sent as body chunks of at most 62,000 bytes",
    "allow_experimental_plugins": "every plugin type this picker has is always available",
    "zap_stacktrace_level": "tracebacks are logged with errors that carry one",
    "zap_time_encoding": "timestamps are always RFC 3339 (UTC) in json, local in console",
}
# --zap-log-level names (zap's), as Python levels.
_ZAP_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "error": logging.ERROR,
               "panic": logging.CRITICAL}


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that turns a parser's ``ValueError`` into a usage error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


_bool = _typed(parse_go_bool)
_duration = _typed(parse_go_duration)
_size = _typed(parse_byte_size)


def _add_bool(p: argparse.ArgumentParser, flag: str, default: bool | None, help: str) -> None:
    """A Go-style boolean: bare ``--flag`` is true, ``--flag=true|false`` as the chart
    renders it."""
    p.add_argument(flag, nargs="?", const=True, default=default, type=_bool,
                   metavar="true|false", help=help)


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    """TLS on the ext_proc port, named and defaulted as in the upstream EPP."""
    _add_bool(p, "--secure-serving", True, "serve ext_proc over TLS (default true; "
              "--secure-serving=false serves cleartext h2c)")
    p.add_argument("--cert-path", default=None, help="directory with tls.crt and tls.key "
                   "for the ext_proc port (default: a self-signed certificate generated at "
                   "start-up)")
    _add_bool(p, "--enable-cert-reload", False, "pick up a rotated certificate in "
              "--cert-path without a restart (new handshakes present it)")
    p.add_argument("--tls-min-version", choices=sorted(TLS_VERSIONS),
                   default=DEFAULT_TLS_MIN_VERSION, help="lowest TLS version accepted on the "
                   "ext_proc port (1.3 needs --extproc-server h2)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line flags."""
    p = argparse.ArgumentParser(prog="epp", description=__doc__)
    p.add_argument("--endpoints-file", help="static pool: YAML file of endpoints "
                   "(reloaded when it changes)")
    p.add_argument("--endpoints-reload-seconds", type=float, default=1.0,
                   help="how often the endpoints file is checked for changes (0: never)")
    p.add_argument("--pool-name", default=None,
                   help="InferencePool to watch (Kubernetes discovery); also the metrics pool "
                   "label")
    p.add_argument("--pool-namespace", default=None,
                   help="namespace of the InferencePool, its pods and InferenceObjectives "
                   "(default: $NAMESPACE, else $POD_NAMESPACE, else default)")
    p.add_argument("--pool-group", default=defaults.DEFAULT_POOL_GROUP,
                   help="API group of the InferencePool (only inference.networking.k8s.io)")
    p.add_argument("--endpoint-selector",
                   help="Kubernetes without CRDs: pod label selector, e.g. app=vllm,tier=gpu")
    p.add_argument("--endpoint-target-ports",
                   help="with --endpoint-selector: model-server ports, one endpoint (rank) "
                   "each, e.g. 8000,8001")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: the in-cluster service "
                   "account in a pod, else $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--bind-address", default="0.0.0.0", help="address all servers bind")
    p.add_argument("--grpc-port", type=int, default=defaults.DEFAULT_GRPC_PORT,
                   help="ext_proc gRPC port")
    p.add_argument("--grpc-health-port", type=int, default=defaults.DEFAULT_HEALTH_PORT,
                   help="gRPC health port (services liveness, readiness, ext_proc)")
    p.add_argument("--metrics-port", type=int, default=defaults.DEFAULT_METRICS_PORT,
                   help="Prometheus /metrics port")
    p.add_argument("--config-file", help="EndpointPickerConfig YAML (default: built-in)")
    p.add_argument("--config-text", help="EndpointPickerConfig YAML given inline")
    p.add_argument("--kv-events", action="store_true",
                   help="engines publish KV events: the built-in profile uses the precise "
                   "prefix-cache scorer (also implied by kvEvents in the endpoints file)")
    p.add_argument("--extproc-server", choices=["h2", "grpc"], default="h2",
                   help="ext_proc transport: h2 (lean HTTP/2, default) or grpc (grpc.aio)")
    p.add_argument("--workers", type=int, default=defaults.DEFAULT_WORKERS,
                   help="processes serving the ext_proc port (SO_REUSEPORT), each a full "
                   "replica with its own discovery, KV-event subscriptions and index; "
                   "health and /metrics (merged) are served once, by a supervisor that "
                   "restarts workers that die (default 1: a single process)")
    _add_tls_flags(p)
    p.add_argument("--enable-explain", action="store_true",
                   help="serve POST /debug/explain on the metrics port: how a request body "
                   "would be scheduled, with every plugin's scores (reveals pool internals)")
    p.add_argument("--enable-test-endpoint-selection", action="store_true",
                   help="let the test-epp-endpoint-selection header steer picks "
                   "(GIE conformance tests only; never in production)")
    p.add_argument("--metrics-scrape-interval", "--refresh-metrics-interval",
                   dest="metrics_scrape_interval", type=_duration,
                   default=defaults.DEFAULT_SCRAPE_INTERVAL_S,
                   help="time between scrapes of each endpoint's /metrics (Go duration, "
                   "e.g. 100ms; a bare number is seconds)")
    p.add_argument("--metrics-scrape-timeout", type=_duration,
                   default=defaults.DEFAULT_SCRAPE_TIMEOUT_S, help="timeout of one scrape")
    p.add_argument("--metrics-staleness-threshold", type=_duration,
                   default=defaults.DEFAULT_METRICS_STALE_AFTER_S,
                   help="metrics older than this are not trusted (e.g. 2s, 500ms)")
    for flag, default, what in (
            ("--total-queued-requests-metric", VLLM_METRICS.waiting, "queued requests"),
            ("--total-running-requests-metric", VLLM_METRICS.running, "running requests"),
            ("--kv-cache-usage-percentage-metric", VLLM_METRICS.kv_cache_usage,
             "the fraction of KV cache in use (0..1; empty: not published)"),
            ("--lora-info-metric", VLLM_METRICS.lora_info,
             "LoRA adapters, vLLM label format (empty: none)"),
            ("--cache-info-metric", VLLM_METRICS.cache_info,
             "cache config (block_size, num_gpu_blocks labels; empty: none)")):
        p.add_argument(flag, default=str(default),
                       help=f"model-server metric for {what}: name or name{{label=value}}")
    p.add_argument("--max-request-body-bytes", type=int,
                   default=defaults.DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413")
    p.add_argument("--shutdown-grace-seconds", type=float,
                   default=defaults.DEFAULT_SHUTDOWN_GRACE_S,
                   help="on SIGTERM, after the drain, how long in-flight streams may take "
                   "to finish")
    p.add_argument("--drain-timeout", type=_duration, default=defaults.DEFAULT_DRAIN_TIMEOUT_S,
                   help="on SIGTERM, report NOT_SERVING but keep accepting streams this "
                   "long (Go duration, e.g. 30s)")
    p.add_argument("--grpc-max-recv-msg-size", type=_size, default=None,
                   help="largest gRPC message accepted on the ext_proc port (e.g. 10MiB)")
    _add_bool(p, "--metrics-endpoint-auth", None,
              "require a bearer token on /metrics, checked with a Kubernetes TokenReview "
              "and SubjectAccessReview (default: true in a pod with Kubernetes discovery)")
    _add_bool(p, "--tracing", False, "OpenTelemetry spans of the request path, exported "
              "as the OTEL_* variables say (needs the epp[tracing] extra)")
    _add_bool(p, "--emit-endpoint-scores", False,
              "per-endpoint scheduler scores in the response metadata")
    p.add_argument("--replica-sync-url", default=None,
                   help="NATS server(s), e.g. nats://nats:4222: EPP replicas behind one "
                   "gateway share pending picks and in-flight load over it (default: off; "
                   "needs the epp[sync] extra)")
    p.add_argument("--replica-sync-subject", default=None,
                   help="NATS subject of replica sync (default: epp.<pool name>.routing)")
    # Upstream flags accepted and ignored (IGNORED_UPSTREAM_FLAGS says why).
    _add_bool(p, "--ha-enable-leader-election", None, "accepted; replicas are active-active")
    _add_bool(p, "--health-checking", None, "accepted; health is always served")
    _add_bool(p, "--enable-pprof", None, "accepted and ignored")
    _add_bool(p, "--allow-experimental-plugins", None, "accepted and ignored")
    p.add_argument("--refresh-prometheus-metrics-interval", type=_duration, default=None,
                   help="accepted and ignored")
    p.add_argument("--grpc-max-send-msg-size", type=_size, default=None,
                   help="accepted and ignored")
    p.add_argument("--seed", type=int, default=None, help="random seed for the picker")
    p.add_argument("--log-level", default=None,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default INFO; overrides -v)")
    p.add_argument("-v", "--v", dest="verbosity", type=int, default=None,
                   help="upstream verbosity: 2 or less is INFO, more is DEBUG")
    p.add_argument("--zap-encoder", choices=ENCODERS, default=None,
                   help="log format: json (one object per line) or console (default)")
    p.add_argument("--zap-log-level", default=None,
                   help="zap level: debug, info, error, panic, or a verbosity number")
    _add_bool(p, "--zap-devel", None,
              "zap development mode: console logs (false: json unless --zap-encoder)")
    p.add_argument("--zap-stacktrace-level", default=None, help="accepted and ignored")
    p.add_argument("--zap-time-encoding", default=None, help="accepted and ignored")
    return p.parse_args(argv)


def log_level_from_args(args: argparse.Namespace) -> int:
    """The Python log level: ``--log-level``, else ``--zap-log-level``, else ``-v``."""
    if args.log_level is not None:
        return int(getattr(logging, args.log_level))
    zap = args.zap_log_level
    if zap is not None:
        if zap.strip().isdigit():
            return verbosity_level(int(zap))
        if zap.lower() not in _ZAP_LEVELS:
            raise ConfigError(f"--zap-log-level: {zap!r} is not debug, info, error, panic "
                              "or a number")
        return _ZAP_LEVELS[zap.lower()]
    if args.verbosity is not None:
        return verbosity_level(args.verbosity)
    return logging.INFO


def log_encoder_from_args(args: argparse.Namespace) -> str:
    """``--zap-encoder``, else json when ``--zap-devel=false`` (zap's production mode)."""
    if args.zap_encoder is not None:
        return str(args.zap_encoder)
    return "json" if args.zap_devel is False else "console"


def pool_namespace_from(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """``--pool-namespace``, else ``$NAMESPACE`` (the upstream chart sets it), else
    ``$POD_NAMESPACE``, else ``default``."""
    for value in (args.pool_namespace, env.get("NAMESPACE"), env.get("POD_NAMESPACE")):
        if value:
            return str(value)
    return "default"


def metrics_auth_from(args: argparse.Namespace, env: Mapping[str, str]) -> bool:
    """``--metrics-endpoint-auth`` when given. Otherwise on where the upstream picker has
    it on and it can work: in a pod (the service account can ask for reviews) that
    discovers endpoints through Kubernetes; off with a static endpoints file or outside
    a cluster, where there may be no API server to ask."""
    if args.metrics_endpoint_auth is not None:
        return bool(args.metrics_endpoint_auth)
    in_pod = bool(env.get("KUBERNETES_SERVICE_HOST")) and args.kubeconfig is None
    return in_pod and args.endpoints_file is None


def ignored_flags(args: argparse.Namespace) -> list[str]:
    """One line per upstream flag given here that has no effect, saying why."""
    lines = []
    for dest, reason in IGNORED_UPSTREAM_FLAGS.items():
        value = getattr(args, dest)
        if value is not None and value is not False:
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"--{dest.replace('_', '-')}={shown} accepted and ignored: {reason}")
    return lines


def settings_from_args(args: argparse.Namespace) -> EppSettings:
    """Validated settings from parsed flags."""
    try:
        selector = parse_label_selector(args.endpoint_selector) if args.endpoint_selector \
            else None
        ports = tuple(parse_target_ports(args.endpoint_target_ports)) \
            if args.endpoint_target_ports else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        engine_metrics = EngineMetrics.from_specs(
            args.total_queued_requests_metric, args.total_running_requests_metric,
            args.kv_cache_usage_percentage_metric, args.lora_info_metric,
            args.cache_info_metric)
    except ValueError as exc:
        raise ConfigError(f"model-server metric flags: {exc}") from None
    return EppSettings(
        pool_namespace=pool_namespace_from(args, os.environ),
        pool_group=args.pool_group,
        drain_timeout_s=args.drain_timeout,
        metrics_endpoint_auth=metrics_auth_from(args, os.environ),
        tracing=bool(args.tracing),
        emit_endpoint_scores=bool(args.emit_endpoint_scores),
        grpc_max_recv_msg_bytes=args.grpc_max_recv_msg_size or 0,
        engine_metrics=engine_metrics,
        endpoint_selector=selector,
        endpoint_target_ports=ports,
        kubeconfig=args.kubeconfig,
        endpoints_file=args.endpoints_file,
        bind_address=args.bind_address,
        grpc_port=args.grpc_port,
        health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        pool_name=args.pool_name,
        config_file=args.config_file,
        config_text=args.config_text,
        enable_test_endpoint_selection=args.enable_test_endpoint_selection,
        kv_events=args.kv_events,
        enable_explain=args.enable_explain,
        extproc_server=args.extproc_server,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        enable_cert_reload=args.enable_cert_reload,
        tls_min_version=args.tls_min_version,
        metrics_scrape_interval_s=args.metrics_scrape_interval,
        metrics_scrape_timeout_s=args.metrics_scrape_timeout,
        metrics_stale_after_s=args.metrics_staleness_threshold,
        max_body_bytes=args.max_request_body_bytes,
        shutdown_grace_s=args.shutdown_grace_seconds,
        seed=args.seed,
        endpoints_reload_s=args.endpoints_reload_seconds,
        replica_sync_url=args.replica_sync_url,
        replica_sync_subject=args.replica_sync_subject,
        workers=args.workers,
    )


async def serve(settings: EppSettings) -> None:
    """Run until SIGTERM or SIGINT; drain (NOT_SERVING, still serving) for
    ``drain_timeout_s`` or until a second signal, then stop gracefully."""
    app = build_app(settings)
    await app.start()
    settle_heap()
    signals = asyncio.Queue[object]()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    await serve_until_stopped(app, signals)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``epp`` console script."""
    args = parse_args(argv)
    try:
        configure_logging(log_encoder_from_args(args), log_level_from_args(args))
    except ConfigError as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return 2
    for line in ignored_flags(args):
        log.info("%s", line)
    try:
        settings = settings_from_args(args)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            if settings.workers > 1:
                runner.run(supervise(settings, log_encoder=log_encoder_from_args(args),
                                     log_level=log_level_from_args(args)))
            else:
                runner.run(serve(settings))
    except WorkerStartError as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return exc.code
    except (ConfigError, EndpointsFileError, DiscoveryError) as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return 1
    return 0
