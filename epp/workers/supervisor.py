"""The supervisor of ``epp --workers N``: the one process the operator starts.

It does little on its own event loop: starts workers and watches their pipes, answers
gRPC health, and on a scrape of ``/metrics`` fetches every worker's page concurrently
(each with a deadline) and merges them in a thread.

- **Start**: the configuration is built once here (errors are reported once, before any
  worker starts); the ext_proc port is held with a bound, non-listening SO_REUSEPORT
  socket (a port in use fails here; port 0 becomes one number for every worker); the
  self-signed certificate, when there is no ``--cert-path``, is made here and handed to
  every worker, so all present the same one. ``/metrics`` answers once every worker
  serves; a worker that cannot start stops the others and ``epp`` exits non-zero with
  its message.
- **A worker dies**: logged with its exit code or signal, counted in
  ``epp_worker_restarts_total{worker}``, restarted after a backoff (0.5 s doubling to
  30 s; back to 0.5 s once a worker has served a minute). The others keep serving.
- **Health** (port 9003): ``liveness`` while the supervisor runs; ``readiness`` (and
  ext_proc's service name, ``""``) SERVING while at least one worker's pool is synced and
  has endpoints; ``inference-extension`` while at least one worker's pool has synced.
  NOT_SERVING from the first SIGTERM (the drain) on, as for a single process.
- **SIGTERM**: forwarded to every worker, each of which drains and stops as a single
  process does (a second SIGTERM ends the drain early, here as there); workers still
  running after the drain, the grace and :data:`STOP_MARGIN_S` are killed.
- **/metrics**: the merged page (:mod:`epp.workers.merge`) plus the supervisor's own
  ``epp_worker_*`` series. A worker that does not answer within
  :data:`WORKER_METRICS_TIMEOUT_S` is skipped (``epp_worker_metrics_skipped_total``)
  and its previous page stands in, so summed counters never go backwards.
- **/debug/explain** (with ``--enable-explain``): forwarded to a ready worker, in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import aiohttp
import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from epp.config import EppSettings
from epp.config.settings import WorkerRole
from epp.discovery.kubernetes import load_api_client
from epp.extproc.certs import ServerCertificate
from epp.observability.health import HealthReporter
from epp.observability.metrics_auth import MetricsAuthenticator
from epp.runner import build_app, create_tls, start_health_server, start_metrics_http
from epp.workers.merge import Carry, Page, PageError, merge_pages, parse_page, render_page, \
    sample_total
from epp.workers.worker import WorkerSetup

log = logging.getLogger(__name__)

# How long /metrics waits for one worker's page. A worker renders its page between
# routing work (about 25 ms of CPU with 64 endpoints), so a second means its event loop
# is badly stuck; Prometheus' default scrape timeout (10 s) is far away.
WORKER_METRICS_TIMEOUT_S = 1.0
# /debug/explain forwarded to a worker: it tokenizes (perhaps on a pod) and schedules
# without routing, like a request's first phase, which takes well under this.
EXPLAIN_TIMEOUT_S = 30.0
# Restart backoff of a worker that died: first after half a second (a crash is rare and
# the other workers serve meanwhile), doubling to 30 s while it keeps dying at once.
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A worker that served this long was healthy: its next exit restarts it at the minimum.
STABLE_AFTER_S = 60.0
# On SIGTERM workers drain (--drain-timeout) and let streams finish (--shutdown-grace-
# seconds); this much more covers stopping background tasks and the interpreter's exit
# before a worker still running is killed.
STOP_MARGIN_S = 5.0
# The family whose sum is a worker's routed requests (epp_worker_requests_total).
REQUESTS_FAMILY = "inference_objective_request_total"
# Request headers not forwarded to a worker's /debug/explain (hop-by-hop, or ours).
_NOT_FORWARDED = frozenset({"host", "content-length", "authorization", "connection",
                            "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                            "proxy-authorization"})


class WorkerStartError(Exception):
    """A worker could not start; ``code`` is the exit code ``epp`` returns."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _WorkerPage:
    """A worker's last page, parsed, and which of the slot's processes rendered it."""

    generation: int
    families: Page
    requests: float


@dataclass(slots=True)
class _Slot:
    """One worker position (``worker`` label ``index``): its current process, if any."""

    index: int
    socket_path: str
    session: aiohttp.ClientSession
    process: subprocess.Popen[bytes] | None = None
    generation: int = 0  # which process of this slot (one more per start)
    serving: bool = False
    synced: bool = False
    endpoints: bool = False
    error: tuple[int, str] | None = None  # from the process's error event
    started_at: float = 0.0
    backoff_s: float = RESTART_BACKOFF_MIN_S
    page: _WorkerPage | None = None
    carried_requests: float = 0.0  # requests counted by this slot's exited processes
    restart: asyncio.TimerHandle | None = None

    @property
    def ready(self) -> bool:
        return self.serving and self.synced and self.endpoints


class _SupervisorCollector:
    """Per-worker state read at scrape time."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        slots = self._supervisor.slots
        ready = GaugeMetricFamily("epp_worker_ready", "1 while the worker's pool is synced "
                                  "and has endpoints (the supervisor is ready while any "
                                  "worker is).", labels=["worker"])
        requests = CounterMetricFamily(
            "epp_worker_requests", "Requests each worker routed (its share of "
            "inference_objective_request_total, restarts included): how evenly the "
            "ext_proc connections are spread.", labels=["worker"])
        for slot in slots:
            ready.add_metric([str(slot.index)], 1.0 if slot.ready else 0.0)
            counted = slot.page.requests if slot.page is not None else 0.0
            requests.add_metric([str(slot.index)], slot.carried_requests + counted)
        yield ready
        yield requests
        yield CounterMetricFamily(
            "epp_worker_metrics_carry_dropped", "Series of exited workers not carried "
            "into the merged sums because the carried series reached their bound.",
            value=self._supervisor.carry.dropped)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening (so it takes no
    connections): the workers bind beside it, nothing else can take the port while the
    supervisor runs, and port 0 resolves to one number. OSError when the port is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot bind the ext_proc port {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the ext_proc port {host}:{port}: {exc}") from None
    return sock


def describe_exit(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Starts, watches and stops the workers; serves health and the merged metrics."""

    def __init__(self, settings: EppSettings, *, log_encoder: str, log_level: int) -> None:
        self.settings = settings
        self._log_encoder = log_encoder
        self._log_level = log_level
        self.health = HealthReporter()
        self.registry = CollectorRegistry()
        self.restarts = Counter("epp_worker_restarts", "Workers restarted after they "
                                "exited unexpectedly.", ["worker"], registry=self.registry)
        self.skipped = Counter(
            "epp_worker_metrics_skipped", "Scrapes of /metrics that went on without a "
            "worker's fresh page (its previous one stood in), by reason: timeout, error "
            "(no answer or a bad status), malformed.", ["worker", "reason"],
            registry=self.registry)
        self.registry.register(_SupervisorCollector(self))
        self.metrics_auth = MetricsAuthenticator(
            lambda: load_api_client(settings.kubeconfig)) \
            if settings.metrics_endpoint_auth else None
        self.slots: list[_Slot] = []
        self.carry = Carry()
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._certificate: ServerCertificate | None = None
        self._reserved: socket.socket | None = None
        self._dir: str | None = None
        self._health_server: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._scrape_lock = asyncio.Lock()
        self._stopping = False
        self._startup: asyncio.Future[None] | None = None
        self._exited = asyncio.Event()  # set whenever a worker exits
        self._tasks: set[asyncio.Task[None]] = set()
        self._explain_turn = 0

    # --- start ---------------------------------------------------------------------

    async def start(self) -> None:
        """Validate, bind, start every worker and wait until all serve. Raises
        ConfigError (bad configuration), OSError (a port), WorkerStartError."""
        s = self.settings
        await self._validate()
        self._reserved = reserve_port(s.bind_address, s.grpc_port)
        self.grpc_port = int(self._reserved.getsockname()[1])
        await self.health.start()
        self._health_server, self.health_port = await start_health_server(
            self.health, s.bind_address, s.health_port)
        self._dir = tempfile.mkdtemp(prefix="epp-workers-")  # 0700: the pages are private
        for index in range(s.workers):
            connector = aiohttp.UnixConnector(
                path=os.path.join(self._dir, f"worker-{index}.sock"), force_close=True)
            self.slots.append(_Slot(index, connector.path,
                                    aiohttp.ClientSession(connector=connector)))
            self.restarts.labels(str(index))
        self._startup = asyncio.get_running_loop().create_future()
        for slot in self.slots:
            await self._spawn(slot)
        try:
            await self._startup
        finally:
            self._startup = None
        self.metrics_port = await self._start_metrics()
        log.info("endpoint picker serving with %d workers: ext_proc :%d (shared, "
                 "SO_REUSEPORT), health :%d, metrics :%d", s.workers, self.grpc_port,
                 self.health_port, self.metrics_port)

    async def _validate(self) -> None:
        """Build the configuration once, here, so an error is reported once; make the
        certificate every worker will present."""
        s = self.settings
        app = build_app(s)  # constructs only: config, plugins, endpoints file
        await asyncio.to_thread(app.tracer.shutdown)
        if s.secure_serving:
            tls = await create_tls(s)
            log.info("ext_proc serves %s, in every worker", tls.describe())
            if s.cert_path is None:
                self._certificate = tls.certificate
                if s.enable_cert_reload:
                    log.warning("--enable-cert-reload is ignored without --cert-path: the "
                                "self-signed certificate lives as long as the supervisor")

    def _worker_settings(self, slot: _Slot) -> EppSettings:
        return dataclasses.replace(
            self.settings, grpc_port=self.grpc_port, metrics_endpoint_auth=False,
            worker=WorkerRole(slot.index, slot.socket_path, self._certificate))

    async def _spawn(self, slot: _Slot) -> None:
        slot.restart = None
        if self._stopping:  # a restart that came due as the supervisor began to stop
            return
        slot.generation += 1
        slot.serving = slot.synced = slot.endpoints = False
        slot.error = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.socket_path)  # a dead worker's socket
        setup = WorkerSetup(self._worker_settings(slot), self._log_encoder, self._log_level)
        loop = asyncio.get_running_loop()
        try:
            # subprocess (vfork + exec), not the loop's spawn (fork): gRPC's fork
            # handlers would log a warning at every start with our health server up.
            process = subprocess.Popen([sys.executable, "-m", "epp.workers"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as exc:
            slot.error = (1, f"cannot start a worker process: {exc}")
            self._on_exit(slot, 1)
            return
        assert process.stdin is not None and process.stdout is not None
        slot.process = process
        slot.started_at = time.monotonic()
        status = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(status),
                                     process.stdout)
        self._track(self._watch(slot, process, status, setup.encode()))

    def _track(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, slot: _Slot, process: subprocess.Popen[bytes],
                     status: asyncio.StreamReader, setup: bytes) -> None:
        assert process.stdin is not None
        try:  # in a thread: a pipe takes 64 KiB before the worker reads it
            await asyncio.to_thread(_write_setup, process.stdin, setup)
        except OSError:
            pass  # the worker died at once; its exit is reported below
        while True:
            try:
                line = await status.readline()
            except ValueError:  # a line over the stream limit: not one of ours
                continue
            if not line:
                break
            self._on_message(slot, line)
        code = await asyncio.to_thread(process.wait)  # its stdout closed: it is exiting
        process.stdin.close()
        self._on_exit(slot, code)

    def _on_message(self, slot: _Slot, line: bytes) -> None:
        try:
            message = json.loads(line)
            event = message["event"]
        except (ValueError, KeyError, TypeError):
            log.warning("worker %d sent an unreadable status line", slot.index)
            return
        if event == "serving":
            slot.serving = True
            if self._startup is not None and not self._startup.done() and \
                    all(s.serving for s in self.slots):
                self._startup.set_result(None)
        elif event == "pool":
            slot.synced = bool(message.get("synced"))
            slot.endpoints = bool(message.get("endpoints"))
        elif event == "error":
            slot.error = (int(message.get("code", 1)), str(message.get("message", "")))
        self._update_health()

    def _on_exit(self, slot: _Slot, code: int) -> None:
        was_serving = slot.serving
        slot.process = None
        slot.serving = slot.synced = slot.endpoints = False
        self._update_health()
        self._exited.set()
        why = slot.error[1] if slot.error else ""
        if self._startup is not None and not self._startup.done():
            exit_code = slot.error[0] if slot.error else 1
            message = why or (f"worker {slot.index} exited before serving "
                              f"({describe_exit(code)}; its log is above)")
            self._startup.set_exception(WorkerStartError(message, exit_code))
            self._stopping = True  # a failed start stops the others: no restarts
            return
        if self._stopping:
            if code != 0:
                log.warning("worker %d stopped (%s)", slot.index, describe_exit(code))
            return
        uptime = time.monotonic() - slot.started_at
        if was_serving and uptime >= STABLE_AFTER_S:
            slot.backoff_s = RESTART_BACKOFF_MIN_S
        delay = slot.backoff_s
        slot.backoff_s = min(slot.backoff_s * 2, RESTART_BACKOFF_MAX_S)
        self.restarts.labels(str(slot.index)).inc()
        log.warning("worker %d exited (%s%s) after %.1fs; restarting it in %.1fs",
                    slot.index, describe_exit(code), f": {why}" if why else "", uptime,
                    delay)
        slot.restart = asyncio.get_running_loop().call_later(
            delay, lambda: self._track(self._spawn(slot)))

    def _update_health(self) -> None:
        self.health.set_pool_state(
            synced=any(s.serving and s.synced for s in self.slots),
            has_endpoints=any(s.ready for s in self.slots))

    # --- run and stop ---------------------------------------------------------------

    async def serve(self, stop_requests: asyncio.Queue[object]) -> None:
        """Serve until the first stop request, then drain and stop every worker (a
        second request is forwarded too: it ends the workers' drain early)."""
        await stop_requests.get()
        s = self.settings
        self._stopping = True
        log.info("stopping %d workers", sum(slot.process is not None for slot in self.slots))
        if s.drain_timeout_s > 0:
            log.info("draining for %.1fs: health NOT_SERVING, workers still accept streams",
                     s.drain_timeout_s)
            await self.health.start_draining()
        else:
            await self.health.shutting_down()
        budget = s.drain_timeout_s + s.shutdown_grace_s + STOP_MARGIN_S
        await self._stop_workers(budget, stop_requests)
        await self.close()
        log.info("every worker stopped")

    async def _stop_workers(self, budget_s: float,
                            stop_requests: asyncio.Queue[object] | None) -> None:
        """SIGTERM every worker (again on each further stop request), wait up to
        ``budget_s`` for all to exit, then kill what is left."""
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        self._signal_all(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        while any(s.process is not None for s in self.slots) and loop.time() < deadline:
            self._exited.clear()
            waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._exited.wait())]
            if stop_requests is not None:
                waits.append(asyncio.ensure_future(stop_requests.get()))
            done, pending = await asyncio.wait(waits, timeout=deadline - loop.time(),
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if len(waits) > 1 and waits[1] in done:
                log.info("second stop request: ending the workers' drain")
                self._signal_all(signal.SIGTERM)
        left = [s for s in self.slots if s.process is not None]
        for slot in left:
            log.warning("worker %d still running after %.1fs: killing it", slot.index,
                        budget_s)
            assert slot.process is not None
            with contextlib.suppress(ProcessLookupError):
                slot.process.kill()
        while any(s.process is not None for s in self.slots):
            self._exited.clear()
            await self._exited.wait()

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    async def abort(self) -> None:
        """Stop after a failed start: workers stop without a drain, then everything
        else closes."""
        self._stopping = True
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        await self.health.shutting_down()
        if any(s.process is not None for s in self.slots):
            self._signal_all(signal.SIGTERM)  # the first starts a drain, the second ends it
            await self._stop_workers(self.settings.shutdown_grace_s + STOP_MARGIN_S, None)
        await self.close()

    async def close(self) -> None:
        """Close the servers, sessions, the held port and the private directory."""
        await self.health.shutting_down()
        if self._health_server is not None:
            await self._health_server.stop(1.0)
        if self._http is not None:
            await self._http.cleanup()
        if self.metrics_auth is not None:
            await self.metrics_auth.close()
        for slot in self.slots:
            await slot.session.close()
        for task in list(self._tasks):
            task.cancel()
        if self._reserved is not None:
            self._reserved.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # --- /metrics and /debug/explain -----------------------------------------------

    async def _start_metrics(self) -> int:
        self._http, port = await start_metrics_http(
            self.settings, self._metrics_handler, self._explain_handler, self.metrics_auth)
        return port

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        async with self._scrape_lock:  # one merge at a time: the carry changes between
            body = await self.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def scrape(self) -> bytes:
        """The merged page of every worker plus the supervisor's own series."""
        self._fold_exited()
        live = [(slot, slot.generation) for slot in self.slots
                if slot.process is not None and slot.serving]
        results = await asyncio.gather(*(self._fetch(slot) for slot, _ in live))
        fresh: list[tuple[_Slot, int, bytes, Page | None]] = []
        stale: list[Page] = []
        for (slot, generation), result in zip(live, results, strict=True):
            previous = slot.page.families if slot.page is not None and \
                slot.page.generation == generation else None
            if isinstance(result, bytes):
                fresh.append((slot, generation, result, previous))
                continue
            self.skipped.labels(str(slot.index), result).inc()
            if previous is not None:
                stale.append(previous)
        parsed, text = await asyncio.to_thread(
            _parse_and_merge, [(raw, prev) for _, _, raw, prev in fresh], stale, self.carry)
        for (slot, generation, _, _), page in zip(fresh, parsed, strict=True):
            if page is None:
                self.skipped.labels(str(slot.index), "malformed").inc()
            else:  # kept even if the worker exited meanwhile: the next scrape carries it
                slot.page = _WorkerPage(generation, page, sample_total(page, REQUESTS_FAMILY))
        return text.encode() + generate_latest(self.registry)

    def _fold_exited(self) -> None:
        """Carry over the last page of every worker process that has exited."""
        for slot in self.slots:
            page = slot.page
            if page is None or (slot.process is not None and
                                page.generation == slot.generation):
                continue
            self.carry = self.carry.add(page.families)
            slot.carried_requests += page.requests
            slot.page = None

    async def _fetch(self, slot: _Slot) -> bytes | str:
        try:
            async with asyncio.timeout(WORKER_METRICS_TIMEOUT_S):
                async with slot.session.get("http://worker/metrics") as response:
                    if response.status != 200:
                        return "error"
                    return await response.read()
        except TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError):
            return "error"

    async def _explain_handler(self, request: web.Request) -> web.Response:
        ready = [s for s in self.slots if s.ready]
        if not ready:
            return web.json_response({"error": "no worker is ready"}, status=503)
        self._explain_turn += 1
        slot = ready[self._explain_turn % len(ready)]
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _NOT_FORWARDED}
        try:
            async with asyncio.timeout(EXPLAIN_TIMEOUT_S):
                async with slot.session.post(f"http://worker{request.path_qs}", data=body,
                                             headers=headers) as response:
                    answer = await response.read()
                    return web.Response(status=response.status, body=answer,
                                        content_type=response.content_type)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return web.json_response(
                {"error": f"worker {slot.index} did not answer: {exc!r}"}, status=502)


def _write_setup(pipe: IO[bytes], setup: bytes) -> None:
    pipe.write(setup)
    pipe.flush()  # and stays open: its end tells the worker the supervisor is gone


def _parse_and_merge(fresh: Sequence[tuple[bytes, Page | None]], stale: Sequence[Page],
                     carry: Carry) -> tuple[list[Page | None], str]:
    """Off the loop: parse the fresh pages (None for a malformed one, whose previous
    page stands in) and render the merge of all of them with the carry."""
    parsed: list[Page | None] = []
    pages = list(stale)
    for raw, previous in fresh:
        try:
            page: Page | None = parse_page(raw.decode())
        except (PageError, UnicodeDecodeError):
            page = None
        parsed.append(page)
        if page is not None:
            pages.append(page)
        elif previous is not None:
            pages.append(previous)
    return parsed, render_page(merge_pages(pages, carry.families).values())


async def supervise(settings: EppSettings, *, log_encoder: str, log_level: int) -> None:
    """Run ``epp --workers N`` until SIGTERM or SIGINT, then drain and stop."""
    supervisor = Supervisor(settings, log_encoder=log_encoder, log_level=log_level)
    stop_requests: asyncio.Queue[object] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requests.put_nowait, sig)
    starting = asyncio.ensure_future(supervisor.start())
    stopped = asyncio.ensure_future(stop_requests.get())
    try:
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        starting.cancel()
        stopped.cancel()
        raise
    if not starting.done():  # a stop request during start-up
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await supervisor.abort()
        return
    if stopped.done():  # it came as start-up finished: serve() must still see it
        stop_requests.put_nowait(stopped.result())
    else:
        stopped.cancel()
    if starting.exception() is not None:
        await supervisor.abort()
        raise starting.exception()  # type: ignore[misc]
    await supervisor.serve(stop_requests)


__all__ = ["EXPLAIN_TIMEOUT_S", "RESTART_BACKOFF_MAX_S", "RESTART_BACKOFF_MIN_S",
           "STABLE_AFTER_S", "STOP_MARGIN_S", "Supervisor", "WORKER_METRICS_TIMEOUT_S",
           "WorkerStartError", "describe_exit", "reserve_port", "supervise"]
