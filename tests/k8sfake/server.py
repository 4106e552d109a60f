"""An in-test Kubernetes API server that speaks the real list/watch protocol.

It serves pods, InferencePools, and InferenceObjectives and InferenceModelRewrites in both
their API groups on a free loopback port (aiohttp). Tests name a resource by its plural,
qualified by the group where the plural is served twice: ``inferenceobjectives`` is the
old ``inference.networking.x-k8s.io`` group, ``inferenceobjectives.llm-d.ai`` the new one
(likewise ``inferencemodelrewrites``):

* LIST ``GET .../namespaces/{ns}/{plural}`` -> ``{"items": [...], "metadata":
  {"resourceVersion": "N"}}``; ``fieldSelector=metadata.name=X`` and equality
  ``labelSelector`` are honoured;
* GET of one object ``.../{plural}/{name}``;
* WATCH (``watch=true``) streams newline-delimited ``{"type", "object"}`` events:
  everything after ``resourceVersion`` from a bounded history, then live events, until
  ``timeoutSeconds``; BOOKMARK events when ``allowWatchBookmarks`` is set; a version older
  than the history answers 410 Gone (an ERROR event, as the API server's watch cache does,
  or the HTTP status when ``gone_as_http_status``).

It also answers ``TokenReview`` and ``SubjectAccessReview`` (POST, authentication.k8s.io
and authorization.k8s.io v1) from :attr:`FakeKubeServer.tokens` (token -> user) and
:attr:`FakeKubeServer.access` (user -> allowed ``(verb, path)`` of non-resource URLs).

Tests change objects with :meth:`FakeKubeServer.apply` / :meth:`delete` (synchronous:
no watcher can run between two calls), and inject trouble: :meth:`drop_watches`,
:meth:`compact`, :meth:`forbid`, :meth:`fail`, :meth:`uninstall`.
"""

from __future__ import annotations

from pathlib import Path

import asyncio
import copy
import itertools
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_NAMESPACE = "default"
POOL_GROUP = "inference.networking.k8s.io"
OBJECTIVE_GROUP = "inference.networking.x-k8s.io"
LLMD_GROUP = "llm-d.ai"


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    key: str = ""  # how tests name it: the plural, qualified when served by two groups

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = {
    k.key or k.plural: k for k in (
        Kind("", "v1", "pods", "Pod"),
        Kind(POOL_GROUP, "v1", "inferencepools", "InferencePool"),
        Kind(OBJECTIVE_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective"),
        Kind(LLMD_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective",
             "inferenceobjectives.llm-d.ai"),
        Kind(OBJECTIVE_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite"),
        Kind(LLMD_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite",
             "inferencemodelrewrites.llm-d.ai"),
    )
}


def _key(kind: Kind) -> str:
    return kind.key or kind.plural


@dataclass
class Request:
    """One request the server answered (for assertions)."""

    verb: str  # list, watch, get
    plural: str
    resource_version: str | None
    timeout_seconds: str | None
    field_selector: str | None


@dataclass(eq=False)  # hashed by identity: watchers live in a set
class _Watcher:
    plural: str
    matches: Callable[[dict[str, Any]], bool]
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


_CLOSE = "close"  # end the stream cleanly (as at a timeout)
_ABORT = "abort"  # cut the connection mid-stream


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def _selector_terms(text: str | None) -> list[tuple[str, str]]:
    terms = []
    for part in (text or "").split(","):
        if part.strip():
            key, _, value = part.partition("=")
            terms.append((key.strip(), value.lstrip("=").strip()))
    return terms


def _field(obj: dict[str, Any], path: str) -> Any:
    value: Any = obj
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


class FakeKubeServer:
    """Objects with a global resourceVersion counter, a bounded event history, and
    watches that follow it. Use inside a running event loop: ``await start()``."""

    def __init__(self, *, history_limit: int = 1000) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # plural, ns, name
        self.requests: list[Request] = []
        self.gone_as_http_status = False
        self._rv = 100
        self._history: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=history_limit)
        self._compacted = self._rv  # watches from an older version get 410
        self._watchers: set[_Watcher] = set()
        self._installed = set(KINDS)
        self._forbidden: set[tuple[str, str]] = set()
        self._failures: dict[tuple[str, str], list[int]] = {}
        self._uids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.tokens: dict[str, dict[str, Any]] = {}  # bearer token -> TokenReview user
        self.access: dict[str, set[tuple[str, str]]] = {}  # username -> {(verb, path)}
        self.reviews: list[dict[str, Any]] = []  # every review body received, in order

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/{plural}", self._collection)
        app.router.add_get("/api/v1/namespaces/{ns}/{plural}/{name}", self._one)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}", self._collection)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
                           self._one)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews",
                            self._access_review)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig at ``path`` that points a client (the EPP) at this server."""
        path.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{self.url}"}}}}]
users: [{{name: epp, user: {{token: t}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: epp}}}}]
current-context: fake
""")
        return path

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- objects ----------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(self, plural: str, name: str, namespace: str = DEFAULT_NAMESPACE
            ) -> dict[str, Any] | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def apply(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED); returns the stored copy."""
        kind = KINDS[plural]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns = meta.setdefault("namespace", DEFAULT_NAMESPACE)
        key = (plural, ns, meta["name"])
        old = self.objects.get(key)
        meta["uid"] = old["metadata"]["uid"] if old else f"uid-{next(self._uids)}"
        meta["resourceVersion"] = str(self._next_rv())
        meta.setdefault("creationTimestamp", f"2026-01-01T00:00:{self._rv % 60:02d}Z")
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        self.objects[key] = obj
        self._emit(plural, "MODIFIED" if old else "ADDED", obj)
        return copy.deepcopy(obj)

    def patch(self, plural: str, name: str, change: Callable[[dict[str, Any]], None],
              namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
        """Apply ``change`` to a copy of the stored object and store it (MODIFIED)."""
        obj = self.get(plural, name, namespace)
        assert obj is not None, f"no {plural} {namespace}/{name}"
        change(obj)
        return self.apply(plural, obj)

    def delete(self, plural: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Remove an object (DELETED, carrying a new resourceVersion)."""
        obj = self.objects.pop((plural, namespace, name))
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(plural, "DELETED", obj)

    # --- trouble ------------------------------------------------------------------------

    def drop_watches(self, *, abrupt: bool = False) -> int:
        """End every open watch, cleanly (EOF, as at a timeout) or by cutting the
        connection. The watchers stop receiving events at once. Returns how many."""
        watchers, self._watchers = self._watchers, set()
        for w in watchers:
            w.queue.put_nowait(_ABORT if abrupt else _CLOSE)
        return len(watchers)

    def compact(self) -> None:
        """Forget the history: a watch from any version before now gets 410 Gone."""
        self._history.clear()
        self._compacted = self._rv

    def send_bookmarks(self) -> None:
        """A BOOKMARK at the current resourceVersion to every watch that allows them."""
        for w in self._watchers:
            if w.bookmarks:
                w.queue.put_nowait(self._bookmark(w.plural))

    def forbid(self, plural: str, verb: str = "list") -> None:
        """Answer ``verb`` on ``plural`` with 403 Forbidden until :meth:`allow`."""
        self._forbidden.add((plural, verb))

    def allow(self, plural: str, verb: str = "list") -> None:
        self._forbidden.discard((plural, verb))

    def fail(self, plural: str, verb: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` ``verb`` requests on ``plural`` with ``status``."""
        self._failures.setdefault((plural, verb), []).extend([status] * times)

    def uninstall(self, plural: str) -> None:
        """As if the resource's CRD were not installed: its paths answer 404."""
        self._installed.discard(plural)

    def count(self, verb: str, plural: str) -> int:
        return sum(1 for r in self.requests if r.verb == verb and r.plural == plural)

    def last(self, verb: str, plural: str) -> Request:
        return [r for r in self.requests if r.verb == verb and r.plural == plural][-1]

    # --- internals ----------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, plural: str, event_type: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        if len(self._history) == self._history.maxlen:
            self._compacted = self._history[0][0]
        self._history.append((rv, plural, event))
        for w in self._watchers:
            if w.plural == plural and w.matches(obj):
                w.queue.put_nowait(event)

    def _bookmark(self, plural: str) -> dict[str, Any]:
        kind = KINDS[plural]
        return {"type": "BOOKMARK", "object": {
            "kind": kind.kind, "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self._rv)}}}

    def _resolve(self, request: web.Request) -> Kind | web.Response:
        info = request.match_info
        kind = next((k for k in KINDS.values() if k.plural == info["plural"]
                     and k.group == info.get("group", "")
                     and k.version == info.get("version", "v1")), None)
        if kind is None or _key(kind) not in self._installed:
            return web.json_response(_status(404, "NotFound",
                                             "the server could not find the requested resource"),
                                     status=404)
        return kind

    def _refuse(self, kind: Kind, verb: str, ns: str) -> web.Response | None:
        if (_key(kind), verb) in self._forbidden:
            message = (f'{kind.plural} is forbidden: User "system:serviceaccount:{ns}:epp" '
                       f'cannot {verb} resource "{kind.plural}" in API group "{kind.group}" '
                       f'in the namespace "{ns}"')
            return web.json_response(_status(403, "Forbidden", message), status=403)
        pending = self._failures.get((_key(kind), verb))
        if pending:
            code = pending.pop(0)
            return web.json_response(_status(code, "InternalError", "injected failure"),
                                     status=code)
        return None

    def _matcher(self, ns: str, query: Any) -> Callable[[dict[str, Any]], bool]:
        fields = _selector_terms(query.get("fieldSelector"))
        labels = _selector_terms(query.get("labelSelector"))

        def matches(obj: dict[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            return (meta.get("namespace") == ns
                    and all(str(_field(obj, k)) == v for k, v in fields)
                    and all((meta.get("labels") or {}).get(k) == v for k, v in labels))
        return matches

    async def _token_review(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.reviews.append(body)
        user = self.tokens.get((body.get("spec") or {}).get("token", ""))
        status: dict[str, Any] = {"authenticated": user is not None}
        if user is not None:
            status["user"] = user
        return web.json_response({**body, "status": status})

    async def _access_review(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.reviews.append(body)
        spec = body.get("spec") or {}
        attrs = spec.get("nonResourceAttributes") or {}
        allowed = (attrs.get("verb"), attrs.get("path")) in self.access.get(
            spec.get("user", ""), set())
        return web.json_response({**body, "status": {"allowed": allowed}})

    async def _one(self, request: web.Request) -> web.StreamResponse:
        kind = self._resolve(request)
        if isinstance(kind, web.Response):
            return kind
        ns, name = request.match_info["ns"], request.match_info["name"]
        self.requests.append(Request("get", _key(kind), None, None, None))
        refused = self._refuse(kind, "get", ns)
        if refused is not None:
            return refused
        obj = self.objects.get((_key(kind), ns, name))
        if obj is None:
            return web.json_response(
                _status(404, "NotFound", f'{kind.plural} "{name}" not found'), status=404)
        return web.json_response(obj)

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        kind = self._resolve(request)
        if isinstance(kind, web.Response):
            return kind
        q = request.query
        verb = "watch" if _truthy(q.get("watch")) else "list"
        ns = request.match_info["ns"]
        self.requests.append(Request(verb, _key(kind), q.get("resourceVersion"),
                                     q.get("timeoutSeconds"), q.get("fieldSelector")))
        refused = self._refuse(kind, verb, ns)
        if refused is not None:
            return refused
        matches = self._matcher(ns, q)
        if verb == "list":
            items = [copy.deepcopy(o) for (p, _, _), o in sorted(self.objects.items())
                     if p == _key(kind) and matches(o)]
            return web.json_response({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                                      "metadata": {"resourceVersion": str(self._rv)},
                                      "items": items})
        return await self._watch(request, kind, matches)

    async def _watch(self, request: web.Request, kind: Kind,
                     matches: Callable[[dict[str, Any]], bool]) -> web.StreamResponse:
        q = request.query
        since = q.get("resourceVersion") or "0"
        watcher = _Watcher(_key(kind), matches, _truthy(q.get("allowWatchBookmarks")))
        backlog: list[Any] = []
        if since == "0":  # "any version": start with the current state
            backlog = [{"type": "ADDED", "object": copy.deepcopy(o)}
                       for (p, _, _), o in sorted(self.objects.items())
                       if p == _key(kind) and matches(o)]
        elif int(since) < self._compacted:
            gone = _status(410, "Expired",
                           f"too old resource version: {since} ({self._compacted})")
            if self.gone_as_http_status:
                return web.json_response(gone, status=410)
            backlog = [{"type": "ERROR", "object": gone}, _CLOSE]
        else:
            backlog = [e for rv, p, e in self._history
                       if rv > int(since) and p == _key(kind) and matches(e["object"])]
        if not backlog or backlog[-1] != _CLOSE:
            self._watchers.add(watcher)  # no await since the backlog was taken: no gap
        for item in backlog:
            watcher.queue.put_nowait(item)

        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(q.get("timeoutSeconds") or 1800)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if watcher.bookmarks:
                        await resp.write(json.dumps(self._bookmark(_key(kind))).encode() + b"\n")
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    continue
                if item == _CLOSE:
                    break
                if item == _ABORT:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                await resp.write(json.dumps(item).encode() + b"\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self._watchers.discard(watcher)
        return resp


# --- object builders ---------------------------------------------------------------------


def make_pod(name: str, ip: str | None, labels: dict[str, str], *, ready: bool = True,
             namespace: str = DEFAULT_NAMESPACE,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Running pod with a Ready condition."""
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                         "annotations": dict(annotations or {})},
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
            "status": status}


def make_pool(name: str, selector: dict[str, str], ports: list[int], *,
              namespace: str = DEFAULT_NAMESPACE, epp: str = "epp") -> dict[str, Any]:
    """An InferencePool (v1)."""
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": dict(selector)},
                     "targetPorts": [{"number": p} for p in ports],
                     "endpointPickerRef": {"group": "", "kind": "Service", "name": epp,
                                           "port": {"number": 9002}}}}


def make_objective(name: str, pool: str, priority: int | None = None, *,
                   namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """An InferenceObjective (v1alpha2) for ``pool``."""
    spec: dict[str, Any] = {"poolRef": {"group": POOL_GROUP, "kind": "InferencePool",
                                        "name": pool}}
    if priority is not None:
        spec["priority"] = priority
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def make_rewrite(name: str, pool: str, rules: list[dict[str, Any]], *,
                 namespace: str = DEFAULT_NAMESPACE,
                 created: str | None = None) -> dict[str, Any]:
    """An InferenceModelRewrite (v1alpha2) for ``pool``; ``rules`` as the API writes them
    (``{"matches": [{"model": {"value": m}}], "targets": [{"modelRewrite": t}]}``)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if created is not None:
        meta["creationTimestamp"] = created
    return {"metadata": meta,
            "spec": {"poolRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": pool},
                     "rules": rules}}
