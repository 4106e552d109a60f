"""Build, start and stop one endpoint picker. No module-level state: two apps can share
a process (the tests do)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST

from epp.config import ConfigError, EppSettings
from epp.config.picker_config import PickerConfig, load_picker_config
from epp.datalayer.parser import VLLM_METRICS, EngineMetrics
from epp.datalayer.scraper import MetricsScraper
from epp.datastore import Endpoint, EndpointPool
from epp.datastore.model_rewrites import ModelRewrites
from epp.discovery.kubernetes import KubernetesDiscovery, load_api_client
from epp.discovery.static import StaticDiscovery, load_endpoints_file
from epp.errors import RequestError
from epp.extproc.certs import CertificateError, ExtProcTls
from epp.extproc.h2server import H2ExtProcServer
from epp.extproc.server import ExtProcServicer, add_to_server
from epp.kvcache.service import KVCacheService
from epp.observability.collectors import KVEventsCollector, KVIndexCollector, PoolCollector
from epp.observability.exposition import render_latest
from epp.observability.health import HealthReporter
from epp.observability.metrics_auth import MetricsAuthenticator
from epp.observability.replica_sync import ReplicaSyncCollector
from epp.observability.tracing import NO_TRACING, Tracing, TracingError, setup_tracing
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import Admission, SaturationDetector
from epp.replicasync import ReplicaSync, ReplicaSyncError, parse_servers
from epp.requestcontrol.director import Director
from epp.scheduling.registry import PluginDeps
from epp.supervise import LogLimiter, supervised

log = logging.getLogger(__name__)

# Debug endpoint on the metrics port (off by default: it reveals pool internals).
EXPLAIN_PATH = "/debug/explain"
# A handler of the metrics port's HTTP server.
HttpHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_GRPC_OPTIONS = [
    # A 62,000-byte body chunk plus headers fits easily; allow Envoy's larger messages.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    # A second process on our port is a mistake unless it is a sibling worker.
    ("grpc.so_reuseport", 0),
]


class App:
    """One endpoint picker: pool, discovery, director, gRPC and metrics servers."""

    def __init__(self, settings: EppSettings) -> None:
        self.settings = settings
        self.pool = EndpointPool()
        self.metrics = EppMetrics()
        self.health = HealthReporter()
        self.picker_config = build_picker_config(settings, self.metrics)
        sat = self.picker_config.saturation
        detector = SaturationDetector(
            sat.queue_depth_threshold, sat.kv_cache_util_threshold,
            settings.metrics_stale_after_s if sat.stale_after_s is None else sat.stale_after_s)
        admission = Admission(self.picker_config.objectives, detector)
        cfg = self.picker_config
        # The precise scorer names its settings; the runner owns the services behind it.
        failed = self.metrics.count_background_failure
        self.kv_services = [KVCacheService(kv, on_task_failure=failed)
                            for kv in cfg.kv_settings]
        self.replica_sync = self._build_replica_sync()
        # Replica sync runs after the KV services' feedback: it shares the pick they made.
        sync_hooks = [self.replica_sync] if self.replica_sync is not None else []
        self.director = Director(
            self.pool, cfg.scheduler, admission, self.metrics,
            producers=[*(s.producer for s in self.kv_services),
                       *(s.fallback for s in self.kv_services), *cfg.producers],
            pre_request=[*cfg.pre_request, *(s.feedback for s in self.kv_services),
                         *sync_hooks],
            response_complete=[*cfg.response_complete,
                               *(s.feedback for s in self.kv_services), *sync_hooks],
            first_bytes=sync_hooks,
            allow_test_header=settings.enable_test_endpoint_selection,
            model_rewrites=ModelRewrites(random.Random(settings.seed)),
            emit_endpoint_scores=settings.emit_endpoint_scores)
        self.tracer: Tracing = NO_TRACING
        if settings.tracing:
            try:
                self.tracer = setup_tracing()
            except TracingError as exc:
                raise ConfigError(str(exc)) from None
            self.director.tracer = self.tracer
        self.discovery: StaticDiscovery | KubernetesDiscovery = self._build_discovery(admission)
        self.scraper = MetricsScraper(self.pool, interval_s=settings.metrics_scrape_interval_s,
                                      timeout_s=settings.metrics_scrape_timeout_s,
                                      stale_after_s=settings.metrics_stale_after_s,
                                      scheme=cfg.metrics_source.scheme,
                                      path=cfg.metrics_source.path,
                                      verify_tls=cfg.metrics_source.verify_tls,
                                      on_task_failure=failed,
                                      metric_names=_engine_metrics(settings, cfg))
        # A worker's page is for its supervisor only, which checks tokens itself.
        self.metrics_auth = MetricsAuthenticator(
            lambda: load_api_client(settings.kubeconfig)) \
            if settings.metrics_endpoint_auth and settings.worker is None else None
        self._grpc: grpc.aio.Server | None = None
        self._h2: H2ExtProcServer | None = None
        self._health_server: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.tls: ExtProcTls | None = None  # None: the ext_proc port speaks cleartext h2c
        self._tls_watch: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._endpoint_names: set[str] = set()
        self._stopped = asyncio.Event()

    def _build_replica_sync(self) -> ReplicaSync | None:
        s = self.settings
        if s.replica_sync_url is None:
            return None
        try:
            return ReplicaSync(
                servers=parse_servers(s.replica_sync_url), subject=s.sync_subject,
                endpoints=self.pool.get,
                indexes=[k.index for k in self.kv_services if k.settings.pending_picks],
                on_task_failure=self.metrics.count_background_failure)
        except ReplicaSyncError as exc:
            raise ConfigError(str(exc)) from None

    def _build_discovery(self, admission: Admission) -> StaticDiscovery | KubernetesDiscovery:
        s = self.settings
        if s.endpoints_file is not None:
            return StaticDiscovery(self.pool, s.endpoints_file, s.endpoints_reload_s,
                                   on_task_failure=self.metrics.count_background_failure)
        configured = dict(self.picker_config.objectives)

        def objectives_sink(found: dict[str, int]) -> None:
            admission.set_objectives({**configured, **found})  # CRDs override the config

        standalone = s.endpoint_selector is not None
        return KubernetesDiscovery(
            self.pool, namespace=s.pool_namespace,
            pool_name=None if standalone else s.pool_name,
            selector=dict(s.endpoint_selector) if s.endpoint_selector else None,
            target_ports=list(s.endpoint_target_ports) if s.endpoint_target_ports else None,
            objectives_sink=objectives_sink, kubeconfig=s.kubeconfig,
            rewrites_sink=self.director.model_rewrites.replace,
            on_task_failure=self.metrics.count_background_failure,
            on_watch_error=self.metrics.count_watch_error,
            kv_events_port=next((k.settings.kv_events_port for k in self.kv_services), None))

    async def start(self) -> None:
        """Start serving. Discovery errors (a bad endpoints file) propagate."""
        s = self.settings
        await self._start_tls()
        await self.health.start()
        self.pool.add_listener(self._on_pool_change)
        # Plugins and producers that keep per-endpoint state forget departed pods.
        for part in (*self.picker_config.producers, *self.picker_config.plugins.values(),
                     *(s.fallback for s in self.kv_services)):
            listener = getattr(part, "on_pool_change", None)
            if callable(listener):
                self.pool.add_listener(listener)
        await self.discovery.start()
        await self.scraper.start()
        for service in self.kv_services:
            await service.start(self.pool)
            self.metrics.registry.register(KVEventsCollector(
                service.event_stats, service.index.__len__))
            self.metrics.registry.register(KVIndexCollector(service.index,
                                                            service.feedback.counts))
        self.metrics.registry.register(PoolCollector(
            self.settings.pool_label, self.pool.snapshot, self.settings.metrics_stale_after_s))
        if self.replica_sync is not None:
            await self.replica_sync.start()
            self.metrics.registry.register(ReplicaSyncCollector(self.replica_sync,
                                                                self.pool.snapshot))

        worker = s.worker
        if s.extproc_server == "grpc":
            # grpc takes the first of repeated options: replace the default, don't append.
            replaced = {"grpc.so_reuseport": int(worker is not None)}
            if s.grpc_max_recv_msg_bytes:
                replaced["grpc.max_receive_message_length"] = s.grpc_max_recv_msg_bytes
            options = [*(o for o in _GRPC_OPTIONS if o[0] not in replaced),
                       *replaced.items()]
            self._grpc = grpc.aio.server(options=options)
            servicer = ExtProcServicer(self.director, max_body_bytes=s.max_body_bytes)
            add_to_server(servicer, self._grpc)
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._grpc)
            self.grpc_port = self._bind(self._grpc, s.grpc_port,
                                        self.tls.grpc_credentials() if self.tls else None)
            await self._grpc.start()
        else:
            self._h2 = H2ExtProcServer(self.director, max_body_bytes=s.max_body_bytes,
                                       ssl_context=self.tls.ssl_context() if self.tls else None)
            self._h2.on_tls_failure = self.metrics.count_tls_failure
            if s.grpc_max_recv_msg_bytes:
                self._h2.max_message = s.grpc_max_recv_msg_bytes
            self.grpc_port = await self._h2.start(s.bind_address, s.grpc_port,
                                                  reuse_port=worker is not None)
        if worker is None:  # a worker's supervisor serves health for all of them
            self._health_server, self.health_port = await start_health_server(
                self.health, s.bind_address, s.health_port)
        self.metrics_port = await self._start_metrics()
        self._on_pool_change(self.pool.snapshot())
        if worker is None:
            log.info("endpoint picker serving: ext_proc :%d, health :%d, metrics :%d",
                     self.grpc_port, self.health_port, self.metrics_port)
        else:
            log.info("worker %d serving: ext_proc :%d (shared), metrics on %s",
                     worker.index, self.grpc_port, worker.metrics_socket)

    async def _start_tls(self) -> None:
        """Prepare the ext_proc port's certificate (the health port stays cleartext:
        kubelet's gRPC probes do not speak TLS) and follow its rotations if asked."""
        s = self.settings
        if not s.secure_serving:
            if s.cert_path is not None:
                log.warning("--cert-path is ignored: --secure-serving=false serves "
                            "cleartext h2c")
            log.info("ext_proc serves cleartext h2c (--secure-serving=false)")
            return
        if s.enable_cert_reload and s.cert_path is None and s.worker is None:
            log.warning("--enable-cert-reload is ignored without --cert-path: the "
                        "self-signed certificate lives as long as the process")
        if s.worker is not None and s.worker.certificate is not None:
            # The supervisor's certificate: every worker presents the same one.
            self.tls = ExtProcTls(s.worker.certificate, min_version=s.tls_min_version,
                                  self_signed=True)
            log.info("ext_proc serves %s", self.tls.describe())
            return
        self.tls = await create_tls(s)
        log.info("ext_proc serves %s", self.tls.describe())
        if self.tls.reloader is not None:
            self._tls_watch = asyncio.get_running_loop().create_task(supervised(
                self.tls.watch, task="cert-reload", what=str(s.cert_path),
                logs=LogLimiter(log), count=self.metrics.count_background_failure))

    def _bind(self, server: grpc.aio.Server, port: int,
              credentials: grpc.ServerCredentials | None = None) -> int:
        address = f"{self.settings.bind_address}:{port}"
        bound = server.add_secure_port(address, credentials) if credentials is not None \
            else server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {self.settings.bind_address}:{port}")
        return bound

    async def _start_metrics(self) -> int:
        self._http, port = await start_metrics_http(
            self.settings, self._metrics_handler, self._explain_handler, self.metrics_auth)
        return port

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        # On the loop (collectors read live state the loop mutates), in slices short
        # enough that routing barely notices (a thread would hold the GIL for 5 ms turns).
        body = await render_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _explain_handler(self, request: web.Request) -> web.Response:
        """Debug: how this request would be scheduled (nothing is routed)."""
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        headers[":path"] = request.query.get("path", "/v1/chat/completions")
        try:
            result = await self.director.explain(headers, body or None)
        except RequestError as exc:
            return web.Response(status=exc.status, body=exc.body(),
                                content_type="application/json")
        return web.json_response(result, dumps=lambda o: json.dumps(o, indent=2))

    def _on_pool_change(self, endpoints: tuple[Endpoint, ...]) -> None:
        self.metrics.ready_pods.labels(self.settings.pool_label).set(len(endpoints))
        self.health.set_pool_state(synced=self.pool.synced, has_endpoints=bool(endpoints))
        names = {e.name for e in endpoints}
        for gone in self._endpoint_names - names:
            self.metrics.forget_endpoint(gone)
        self._endpoint_names = names
        self.metrics.serve_models({e.model for e in endpoints if e.model})

    async def stop(self) -> None:
        """Graceful stop: report NOT_SERVING, let in-flight streams finish (bounded)."""
        await self.health.shutting_down()
        grace = self.settings.shutdown_grace_s
        servers = [s for s in (self._grpc, self._health_server) if s is not None]
        stops = [s.stop(grace) for s in servers]
        if self._h2 is not None:
            stops.append(self._h2.stop(grace))
        await asyncio.gather(*stops)
        if self.replica_sync is not None:  # after the streams: their completions go out
            await self.replica_sync.stop()
        await self.discovery.stop()
        await self.scraper.stop()
        for service in self.kv_services:
            await service.stop()
        if self._http is not None:
            await self._http.cleanup()
        if self.metrics_auth is not None:
            await self.metrics_auth.close()
        await asyncio.to_thread(self.tracer.shutdown)  # flush buffered spans
        if self._tls_watch is not None:
            self._tls_watch.cancel()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait until :meth:`stop` completes."""
        await self._stopped.wait()


def _engine_metrics(settings: EppSettings, cfg: PickerConfig) -> EngineMetrics:
    """The metric names to scrape: a ``core-metrics-extractor``'s ``defaultEngine`` or the
    metric-name flags (vLLM's names when neither is given); both naming different ones
    is refused."""
    named = cfg.engine_metrics
    if named is None:
        return settings.engine_metrics
    if settings.engine_metrics not in (VLLM_METRICS, named):
        raise ConfigError("core-metrics-extractor defaultEngine and the model-server "
                          "metric-name flags name different metrics; give one of them")
    return named


def build_picker_config(settings: EppSettings, metrics: EppMetrics) -> PickerConfig:
    """Compile the EndpointPickerConfig named by the settings (or the built-in one)."""
    deps = PluginDeps(seed=settings.seed,
                      allow_test_header=settings.enable_test_endpoint_selection,
                      metrics_stale_after_s=settings.metrics_stale_after_s,
                      pd_decisions=metrics.count_pd_decision)
    if settings.config_file is not None:
        try:
            with open(settings.config_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"--config-file: cannot read {settings.config_file}: {exc}") from None
        return load_picker_config(text, source=settings.config_file, deps=deps,
                                  timer=metrics.observe_plugin)
    kv_events = settings.kv_events or (settings.endpoints_file is not None and any(
        e.kv_events for e in load_endpoints_file(settings.endpoints_file)))
    return load_picker_config(settings.config_text, source="--config-text", deps=deps,
                              timer=metrics.observe_plugin, kv_events=kv_events)


def build_app(settings: EppSettings) -> App:
    """Construct (not start) an endpoint picker from settings."""
    return App(settings)


async def create_tls(settings: EppSettings) -> ExtProcTls:
    """The ext_proc port's TLS: ``--cert-path``'s certificate or a new self-signed one.
    ConfigError when the certificate cannot be read."""
    try:
        # Off the loop: file reads, a hostname lookup, key generation.
        return await asyncio.to_thread(
            ExtProcTls.create, settings.cert_path, enable_reload=settings.enable_cert_reload,
            min_version=settings.tls_min_version)
    except CertificateError as exc:
        raise ConfigError(str(exc)) from None


async def start_health_server(health: HealthReporter, bind_address: str,
                              port: int) -> tuple[grpc.aio.Server, int]:
    """Start the cleartext gRPC health port on ``bind_address:port``; the bound port is
    returned. OSError when the port is taken."""
    server = grpc.aio.server(options=_GRPC_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    bound = server.add_insecure_port(f"{bind_address}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {bind_address}:{port}")
    await server.start()
    return server, bound


async def start_metrics_http(settings: EppSettings, metrics: HttpHandler,
                             explain: HttpHandler,
                             auth: MetricsAuthenticator | None) -> tuple[web.AppRunner, int]:
    """Start the metrics port's HTTP server: ``GET /metrics``, ``POST /debug/explain``
    with ``--enable-explain``, behind ``auth`` when given. A worker serves it on its
    unix socket (port 0 returned); anything else on ``bind_address:metrics_port``
    (the bound port returned)."""
    app = web.Application(middlewares=[auth.middleware] if auth is not None else [])
    app.router.add_get("/metrics", metrics)
    if settings.enable_explain:
        app.router.add_post(EXPLAIN_PATH, explain)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        if settings.worker is not None:
            await web.UnixSite(runner, settings.worker.metrics_socket).start()
            return runner, 0
        site = web.TCPSite(runner, settings.bind_address, settings.metrics_port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    sockets = getattr(site._server, "sockets", None)  # aiohttp exposes them only here
    assert sockets
    return runner, int(sockets[0].getsockname()[1])


def settle_heap() -> None:
    """Once a process's app has started: collect, then move every surviving object into
    the collector's permanent generation (``gc.freeze``), so full collections never walk
    them again. They are most of the heap (modules, protobuf descriptors, the Kubernetes
    client's models, the picker's configuration), and walking them made every full
    collection a 40-50 ms stall of the event loop (benchmarks/scrape.py). Process-wide:
    called by the process entry points, not by :class:`App`."""
    gc.collect()
    gc.freeze()


async def serve_until_stopped(app: App, stop_requests: asyncio.Queue[object]) -> None:
    """Serve a started app until the first stop request (SIGTERM, SIGINT); then drain
    (health NOT_SERVING, still accepting streams) for ``drain_timeout_s`` or until a
    second request, and stop gracefully."""
    await stop_requests.get()
    drain = app.settings.drain_timeout_s
    if drain > 0:
        log.info("draining for %.1fs: health NOT_SERVING, still accepting streams", drain)
        await app.health.start_draining()
        try:
            async with asyncio.timeout(drain):
                await stop_requests.get()  # a second request ends the drain early
        except TimeoutError:
            pass
    log.info("shutting down (grace %.1fs)", app.settings.shutdown_grace_s)
    await app.stop()
