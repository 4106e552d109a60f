"""The ``epp`` command: flags -> settings -> :func:`epp.runner.build_app`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvloop

from epp.config import ConfigError, EppSettings
from epp.config import settings as defaults
from epp.discovery.kubernetes import (
    DiscoveryError,
    parse_label_selector,
    parse_target_ports,
)
from epp.discovery.static import EndpointsFileError
from epp.extproc.certs import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS
from epp.runner import build_app

log = logging.getLogger("epp")


def _flag_bool(text: str) -> bool:
    """A boolean flag's value as the upstream chart renders it (``--flag=false``)."""
    value = {"true": True, "1": True, "t": True, "false": False, "0": False, "f": False}.get(
        text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true or false)")
    return value


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    """TLS on the ext_proc port, named and defaulted as in the upstream EPP."""
    p.add_argument("--secure-serving", type=_flag_bool, nargs="?", const=True, default=True,
                   metavar="BOOL", help="serve ext_proc over TLS (default true; "
                   "--secure-serving=false serves cleartext h2c)")
    p.add_argument("--cert-path", default=None, help="directory with tls.crt and tls.key "
                   "for the ext_proc port (default: a self-signed certificate generated at "
                   "start-up)")
    p.add_argument("--enable-cert-reload", type=_flag_bool, nargs="?", const=True,
                   default=False, metavar="BOOL", help="pick up a rotated certificate in "
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
    p.add_argument("--pool-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                   help="namespace of the InferencePool, its pods and InferenceObjectives")
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
    _add_tls_flags(p)
    p.add_argument("--enable-explain", action="store_true",
                   help="serve POST /debug/explain on the metrics port: how a request body "
                   "would be scheduled, with every plugin's scores (reveals pool internals)")
    p.add_argument("--enable-test-endpoint-selection", action="store_true",
                   help="let the test-epp-endpoint-selection header steer picks "
                   "(GIE conformance tests only; never in production)")
    p.add_argument("--metrics-scrape-interval", type=float,
                   default=defaults.DEFAULT_SCRAPE_INTERVAL_S,
                   help="seconds between scrapes of each endpoint's /metrics")
    p.add_argument("--metrics-scrape-timeout", type=float,
                   default=defaults.DEFAULT_SCRAPE_TIMEOUT_S, help="timeout of one scrape")
    p.add_argument("--metrics-staleness-threshold", type=float,
                   default=defaults.DEFAULT_METRICS_STALE_AFTER_S,
                   help="metrics older than this (seconds) are not trusted")
    p.add_argument("--max-request-body-bytes", type=int,
                   default=defaults.DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are refused with 413")
    p.add_argument("--shutdown-grace-seconds", type=float,
                   default=defaults.DEFAULT_SHUTDOWN_GRACE_S,
                   help="on SIGTERM, how long in-flight streams may take to finish")
    p.add_argument("--seed", type=int, default=None, help="random seed for the picker")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> EppSettings:
    """Validated settings from parsed flags."""
    try:
        selector = parse_label_selector(args.endpoint_selector) if args.endpoint_selector \
            else None
        ports = tuple(parse_target_ports(args.endpoint_target_ports)) \
            if args.endpoint_target_ports else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return EppSettings(
        pool_namespace=args.pool_namespace,
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
    )


async def serve(settings: EppSettings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    app = build_app(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", settings.shutdown_grace_s)
    await app.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``epp`` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(settings))
    except (ConfigError, EndpointsFileError, DiscoveryError) as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"epp: error: {exc}", file=sys.stderr)
        return 1
    return 0
