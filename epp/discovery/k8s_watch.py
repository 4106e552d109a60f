"""List-then-watch of one Kubernetes resource (what client-go calls a reflector).

The generated kubernetes-asyncio list calls do the HTTP, auth and TLS; this module reads
their raw watch stream (``watch=True, _preload_content=False``) itself, because
``kubernetes_asyncio.watch.Watch`` opens a second HTTP session per watch, converts every
pod into model objects, and turns ERROR events into exceptions without the Status detail.

Protocol, as the API server speaks it:

* LIST returns the items and the collection's ``metadata.resourceVersion``;
* WATCH from that version streams newline-delimited ``{"type", "object"}`` events
  (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) until ``timeoutSeconds``;
* a version older than the server's history answers 410 Gone (an ERROR event or the HTTP
  status): the client must list again.

Failures the protocol expects (a dropped connection, 410, an error status) are retried
here and counted by reason (``on_error``); anything else is a bug that ends
:meth:`Reflector.run` for its supervisor to count and restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp

from epp.supervise import Backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

# client-go spreads watch timeouts over [5, 10) minutes so that a fleet of clients does not
# reconnect at once; the server-side end also renews connections through load balancers.
DEFAULT_WATCH_TIMEOUT_S = 300.0
# A dead TCP connection shows up as silence: the server ends every watch at its timeout,
# so a read idle for that long plus this margin means the connection is gone.
WATCH_READ_MARGIN_S = 30.0
# A LIST of a few thousand pods is a few MB; a minute means the server is in trouble.
DEFAULT_LIST_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Retry quickly after a blip, but never hammer a struggling API server: 0.5 s doubling to
# 30 s, each delay jittered to [50 %, 100 %] so that replicas spread out.
DEFAULT_BACKOFF_INITIAL_S = 0.5
DEFAULT_BACKOFF_MAX_S = 30.0
# A watch that ends cleanly this fast with no event is treated as a failure (backed off),
# so a server that closes watches at once cannot drive a hot reconnect loop.
MIN_HEALTHY_WATCH_S = 1.0

# Errors of the transport (not of the API): worth a retry.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)

Lister = Callable[..., Awaitable[Any]]
# Counts one retried list/watch failure, given the resource (its plural) and a reason.
WatchErrorCounter = Callable[[str, str], None]

# Why a list or watch was retried: a fixed set, as the values of a metric label.
REASON_CONNECTION = "connection"  # refused, reset, DNS, a cut stream
REASON_TIMEOUT = "timeout"  # connect or read timed out
REASON_EXPIRED = "expired"  # 410 Gone: resourceVersion too old, list again
REASON_HTTP = "http"  # the API server answered with an error Status (5xx, 429, 403...)
REASON_MALFORMED = "malformed"  # the answer was not JSON or not a list
REASON_CLOSED_EARLY = "closed-early"  # a watch ended at once without events
WATCH_ERROR_REASONS = (REASON_CONNECTION, REASON_TIMEOUT, REASON_EXPIRED, REASON_HTTP,
                       REASON_MALFORMED, REASON_CLOSED_EARLY)


@dataclass(frozen=True, slots=True)
class Resource:
    """A namespaced resource kind, for requests and for error messages."""

    group: str  # "" for the core API
    version: str
    plural: str
    namespace: str

    @property
    def qualified(self) -> str:
        """``pods`` or ``inferencepools.inference.networking.k8s.io`` (RBAC's spelling)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


class KubeAPIError(Exception):
    """The API server answered a request with a failure Status."""

    def __init__(self, status: int, reason: str, message: str, *, verb: str,
                 resource: Resource) -> None:
        super().__init__(f"{verb} {resource.qualified} in namespace {resource.namespace}: "
                         f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.verb = verb
        self.resource = resource


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is older than the server's history; list again."""


async def status_error(resp: aiohttp.ClientResponse, verb: str,
                       resource: Resource) -> KubeAPIError:
    """The :class:`KubeAPIError` for a non-2xx response (reads its Status body)."""
    reason, message = resp.reason or "", ""
    try:
        body = json.loads(await resp.read())
        if isinstance(body, dict):
            reason = str(body.get("reason") or reason)
            message = str(body.get("message") or "")
    except (ValueError, aiohttp.ClientError):
        pass  # not a Status: the HTTP reason is all there is
    return KubeAPIError(resp.status, reason, message, verb=verb, resource=resource)


def error_reason(exc: BaseException) -> str:
    """The reason label of a retried failure (one of :data:`WATCH_ERROR_REASONS`)."""
    if isinstance(exc, WatchExpired):
        return REASON_EXPIRED
    if isinstance(exc, KubeAPIError):
        return REASON_HTTP
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return REASON_TIMEOUT
    if isinstance(exc, ValueError):
        return REASON_MALFORMED
    return REASON_CONNECTION


def _name(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


def _resource_version(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


class Reflector(Generic[T]):
    """Keeps ``items`` (object name -> ``convert(object)``) equal to the server's state.

    ``on_change()`` runs after every applied event and after every (re)list, in the same
    event-loop step as the change, so its readers never see a half-applied update.
    ``convert`` must not raise: it maps malformed objects to something harmless.
    ``on_error(resource, reason)`` counts each retried failure.
    """

    def __init__(self, resource: Resource, lister: Lister, convert: Callable[[dict[str, Any]], T],
                 on_change: Callable[[], None], *, field_selector: str | None = None,
                 watch_timeout_s: float = DEFAULT_WATCH_TIMEOUT_S,
                 list_timeout_s: float = DEFAULT_LIST_TIMEOUT_S,
                 backoff: Backoff | None = None,
                 on_error: WatchErrorCounter | None = None) -> None:
        self.resource = resource
        self.items: dict[str, T] = {}
        self.resource_version: str | None = None
        self._lister = lister
        self._convert = convert
        self._on_change = on_change
        self._field_selector = field_selector
        self._watch_timeout_s = watch_timeout_s
        self._list_timeout_s = list_timeout_s
        self._backoff = backoff or Backoff(DEFAULT_BACKOFF_INITIAL_S, DEFAULT_BACKOFF_MAX_S)
        self._pending: aiohttp.ClientResponse | None = None  # an opened, unread watch
        self._last_problem: str | None = None
        self._on_error = on_error

    def count_error(self, reason: str) -> None:
        """Count one retried failure of this resource's list or watch."""
        if self._on_error is not None:
            self._on_error(self.resource.plural, reason)

    def _selector_kwargs(self) -> dict[str, Any]:
        return {"field_selector": self._field_selector} if self._field_selector else {}

    async def list(self) -> None:
        """One LIST: replace ``items`` and the resourceVersion, then ``on_change()``."""
        resp = await self._lister(
            _preload_content=False, **self._selector_kwargs(),
            _request_timeout=aiohttp.ClientTimeout(total=self._list_timeout_s,
                                                   sock_connect=DEFAULT_CONNECT_TIMEOUT_S))
        try:
            if resp.status != 200:
                raise await status_error(resp, "list", self.resource)
            body = json.loads(await resp.read())
        finally:
            resp.close()
        items = body.get("items") if isinstance(body, dict) else None
        rv = _resource_version(body)
        if not isinstance(items, list) or rv is None:
            raise ValueError(f"list {self.resource.qualified}: not a list response")
        converted: dict[str, T] = {}
        for obj in items:
            name = _name(obj)
            if name is not None:
                converted[name] = self._convert(obj)
        self.items = converted
        self.resource_version = rv
        self._on_change()

    async def open_watch(self) -> None:
        """Start a WATCH from the current resourceVersion and check the server's answer
        (so a missing ``watch`` permission fails here); :meth:`run` reads it."""
        self.close()
        # Spread timeouts over [t, 2t), as client-go does.
        timeout = max(1, int(self._watch_timeout_s * (1 + random.random())))
        resp = await self._lister(
            watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=timeout, _preload_content=False, **self._selector_kwargs(),
            _request_timeout=aiohttp.ClientTimeout(sock_connect=DEFAULT_CONNECT_TIMEOUT_S,
                                                   sock_read=timeout + WATCH_READ_MARGIN_S))
        if resp.status == 410:
            resp.close()
            raise WatchExpired(f"watch {self.resource.qualified}: 410 Gone")
        if resp.status != 200:
            try:
                raise await status_error(resp, "watch", self.resource)
            finally:
                resp.close()
        self._pending = resp

    def close(self) -> None:
        """Drop an opened watch that has not been read."""
        if self._pending is not None:
            self._pending.close()
            self._pending = None

    async def run(self) -> None:
        """Watch until cancelled: resume from the last resourceVersion after a drop or a
        timeout, list again on 410 Gone, back off (with jitter) on errors.

        Any other exception (a bug in ``convert`` or ``on_change``) propagates, for the
        caller's supervisor; ``items`` keep their last state, and the next ``run()``
        lists again, since an event may have been half-applied."""
        must_list = self.resource_version is None
        expired_in_a_row = 0
        try:
            while True:
                try:
                    if must_list:
                        await self.list()
                        must_list = False
                    if self._pending is None:
                        await self.open_watch()
                    started = time.monotonic()
                    events = await self._read_watch()
                    expired_in_a_row = 0
                    self._recovered()
                    if events or time.monotonic() - started >= MIN_HEALTHY_WATCH_S:
                        self._backoff.reset()
                        continue
                    log.debug("%s: watch ended at once without events", self.resource.qualified)
                    self.count_error(REASON_CLOSED_EARLY)
                except WatchExpired as exc:
                    self.count_error(REASON_EXPIRED)
                    must_list = True
                    expired_in_a_row += 1
                    log.info("%s: %s; listing again", self.resource.qualified, exc)
                    if expired_in_a_row == 1:
                        continue  # the normal case: relist at once
                except KubeAPIError as exc:
                    self.count_error(REASON_HTTP)
                    self._problem(logging.ERROR, explain(exc))
                except TRANSIENT_ERRORS as exc:
                    self.count_error(error_reason(exc))
                    self._problem(logging.WARNING, f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self._backoff.next())
        except Exception:
            self.resource_version = None  # list again after the restart
            raise
        finally:
            self.close()

    async def _read_watch(self) -> int:
        """Apply events of the opened watch until the server ends it; returns how many."""
        resp = self._pending
        assert resp is not None
        self._pending = None
        count = 0
        try:
            async for raw in resp.content:
                line = raw.strip()
                if line:
                    self._apply(json.loads(line))
                    count += 1
        finally:
            resp.close()
        return count

    def _apply(self, event: Any) -> None:
        kind, obj = (event.get("type"), event.get("object")) if isinstance(event, dict) \
            else (None, None)
        if kind == "ERROR":
            status = obj if isinstance(obj, dict) else {}
            code = status.get("code")
            if code == 410:
                raise WatchExpired(str(status.get("message") or "410 Gone"))
            raise KubeAPIError(int(code) if isinstance(code, int) else 500,
                               str(status.get("reason") or "Error"),
                               str(status.get("message") or ""),
                               verb="watch", resource=self.resource)
        rv = _resource_version(obj)
        if kind == "BOOKMARK":
            if rv is not None:
                self.resource_version = rv
            return
        name = _name(obj)
        if name is None or kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("%s: ignoring malformed watch event %r", self.resource.qualified, kind)
            return
        assert isinstance(obj, dict)
        if kind == "DELETED":
            self.items.pop(name, None)
        else:
            self.items[name] = self._convert(obj)
        if rv is not None:
            self.resource_version = rv
        self._on_change()

    def _problem(self, level: int, text: str) -> None:
        # The first report of a problem at its level; repeats only at DEBUG.
        if text != self._last_problem:
            log.log(level, "%s: %s (retrying with backoff)", self.resource.qualified, text)
        else:
            log.debug("%s: %s", self.resource.qualified, text)
        self._last_problem = text

    def _recovered(self) -> None:
        if self._last_problem is not None:
            log.info("%s: watching again", self.resource.qualified)
            self._last_problem = None


def explain(exc: KubeAPIError) -> str:
    """A message for the operator: what failed and what to grant or install."""
    r = exc.resource
    where = f"in namespace {r.namespace!r}"
    if exc.status == 403:
        return (f"Forbidden: Kubernetes denied {exc.verb} on {r.qualified} {where}. Grant the "
                f"endpoint picker's service account the RBAC verbs get, list and watch on "
                f"{r.qualified} (server said: {exc.message or exc.reason})")
    if exc.status == 401:
        return (f"Unauthorized: Kubernetes rejected the credentials for {exc.verb} on "
                f"{r.qualified} {where}; check the kubeconfig or service account token")
    if exc.status == 404:
        api = f"{r.group}/{r.version}" if r.group else r.version
        return (f"Not found: the API server does not serve {r.qualified} ({api}) {where}; "
                f"is the CRD installed? (server said: {exc.message or exc.reason})")
    return (f"{exc.verb} {r.qualified} {where} failed: {exc.status} {exc.reason}"
            f"{': ' + exc.message if exc.message else ''}")
