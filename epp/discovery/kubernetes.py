"""Kubernetes discovery: the pods an InferencePool selects become endpoints, and the
InferenceObjectives that name the pool become admission priorities.

* ``InferencePool`` (``inference.networking.k8s.io/v1``): ``spec.selector.matchLabels``
  picks pods in the pool's namespace; each of ``spec.targetPorts[].number`` is one endpoint
  (a data-parallel rank) per pod, named ``<pod>-rank-<i>``.
* A pod counts only while it matches, its ``Ready`` condition is True, it has an IP and no
  ``deletionTimestamp``.
* ``InferenceObjective`` (``llm-d.ai/v1alpha2``, and the older group
  ``inference.networking.x-k8s.io/v1alpha2``): ``spec.priority`` (unset = 0) for
  objectives whose ``spec.poolRef`` names the pool.
* ``InferenceModelRewrite`` (same two groups): rules that send requests for one model as
  another (``epp.datastore.model_rewrites``), for rewrites whose ``spec.poolRef`` names
  the pool.
* Standalone mode (no CRDs): a fixed label selector and target ports instead of a pool.

Every change is applied with one ``EndpointPool.replace_all`` computed from the whole
current state, so readers never see a half-updated pool (a selector change swaps the set in
one step). RBAC needed in the namespace: get, list and watch on ``pods``,
``inferencepools.inference.networking.k8s.io`` and, with objectives and rewrites,
``inferenceobjectives`` and ``inferencemodelrewrites`` in both ``llm-d.ai`` and
``inference.networking.x-k8s.io``. A missing CRD of either group is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import (
    ApiClient,
    Configuration,
    CoreV1Api,
    CustomObjectsApi,
)

from epp.datastore import DEFAULT_KV_EVENTS_PORT, Endpoint, EndpointPool
from epp.datastore.model_rewrites import ModelRewrite, RewriteRule, RewriteTarget
from epp.discovery.k8s_watch import (
    DEFAULT_BACKOFF_INITIAL_S,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_LIST_TIMEOUT_S,
    DEFAULT_WATCH_TIMEOUT_S,
    TRANSIENT_ERRORS,
    KubeAPIError,
    Reflector,
    Resource,
    WatchErrorCounter,
    WatchExpired,
    error_reason,
    explain,
)
from epp.supervise import Backoff, FailureCounter, LogLimiter, supervised

log = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
POOL_KIND = "InferencePool"
# GIE v1.6 moved InferenceObjective and InferenceModelRewrite to llm-d.ai; installs that
# have not migrated still serve the old group. Both are watched; on a name clash the
# object in the first group of OBJECTIVE_GROUPS wins.
LLMD_GROUP = "llm-d.ai"
OBJECTIVE_GROUP = "inference.networking.x-k8s.io"
OBJECTIVE_GROUPS = (LLMD_GROUP, OBJECTIVE_GROUP)
OBJECTIVE_VERSION = "v1alpha2"
OBJECTIVE_PLURAL = "inferenceobjectives"
REWRITE_PLURAL = "inferencemodelrewrites"
# The served model, when a pod says (annotation first: label values cannot hold "/").
MODEL_KEY = "llm-d.ai/model"
# InferencePool v1 allows 1-8 target ports.
MAX_TARGET_PORTS = 8
# The kind of each watch loop in the background-failure count: one per resource.
WATCH_TASK_PREFIX = "k8s-watch-"
# Answers that retrying cannot fix: fail start-up with the explanation.
_FATAL_AT_START = (401, 403, 404)

ObjectivesSink = Callable[[dict[str, int]], None]
RewritesSink = Callable[[list[ModelRewrite]], None]
ApiClientFactory = Callable[[], Awaitable[ApiClient]]


class DiscoveryError(Exception):
    """Discovery cannot start: the message says what to grant, install or fix."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What discovery needs from an InferencePool (or the standalone flags)."""

    selector: Mapping[str, str]
    target_ports: tuple[int, ...]
    endpoint_picker: str | None = None  # the spec's endpointPickerRef, for logs


@dataclass(frozen=True, slots=True)
class PodView:
    """The parts of a pod that decide its endpoints."""

    name: str
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    serving: bool = False  # Ready, has an IP, not being deleted


def validate_selector(selector: Any, where: str = "selector") -> dict[str, str]:
    """A non-empty ``matchLabels`` map of strings; raises ValueError naming ``where``."""
    if not isinstance(selector, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in selector.items()):
        raise ValueError(f"{where}: must map label names to values")
    if not selector:
        # An empty selector would select every pod of the namespace, the EPP's own included.
        raise ValueError(f"{where}: must not be empty")
    return dict(selector)


def validate_ports(ports: Sequence[Any], where: str = "targetPorts") -> tuple[int, ...]:
    """1-8 distinct TCP ports; raises ValueError naming ``where``."""
    if isinstance(ports, (str, bytes)) or not 1 <= len(ports) <= MAX_TARGET_PORTS:
        raise ValueError(f"{where}: give 1 to {MAX_TARGET_PORTS} ports")
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{where}: {port!r} is not a TCP port")
    if len(set(ports)) != len(ports):
        raise ValueError(f"{where}: ports must differ")
    return tuple(ports)


def parse_label_selector(text: str) -> dict[str, str]:
    """``app=vllm,tier=gpu`` (the ``--endpoint-selector`` flag) as a label map."""
    selector: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key, value = key.strip(), value.strip().removeprefix("=").strip()  # k=v or k==v
        if not sep or not key:
            raise ValueError(f"label selector {text!r}: expected key=value[,key=value...]")
        selector[key] = value
    return validate_selector(selector, f"label selector {text!r}")


def parse_target_ports(text: str) -> tuple[int, ...]:
    """``8000,8001`` (the ``--endpoint-target-ports`` flag) as ports."""
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"target ports {text!r}: expected port[,port...]") from None
    return validate_ports(ports, f"target ports {text!r}")


def parse_pool_spec(pool: Mapping[str, Any]) -> PoolSpec:
    """The :class:`PoolSpec` of an InferencePool object; ValueError names the bad field."""
    spec = _mapping(pool.get("spec"))
    match_labels = validate_selector(_mapping(spec.get("selector")).get("matchLabels") or {},
                                     "spec.selector.matchLabels")
    raw_ports = spec.get("targetPorts")
    ports = validate_ports([p.get("number") if isinstance(p, Mapping) else p
                            for p in (raw_ports if isinstance(raw_ports, list) else [])],
                           "spec.targetPorts[].number")
    ref = spec.get("endpointPickerRef")
    picker = None
    if isinstance(ref, Mapping) and ref.get("name"):
        port = ref.get("port")
        number = port.get("number") if isinstance(port, Mapping) else None
        picker = f"{ref.get('name')}:{number}" if number else str(ref.get("name"))
    return PoolSpec(match_labels, ports, picker)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def pod_view(pod: Mapping[str, Any]) -> PodView:
    """Reduce a Pod object to :class:`PodView` (malformed pods are not serving)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping):
        labels = {}
    labels = {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}
    annotations = meta.get("annotations") or {}
    model = (annotations.get(MODEL_KEY) if isinstance(annotations, Mapping) else None) \
        or labels.get(MODEL_KEY)
    ip = status.get("podIP") or ""
    try:
        ipaddress.ip_address(ip)
        has_ip = True
    except ValueError:
        has_ip = False
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    deleting = meta.get("deletionTimestamp") is not None
    return PodView(name=str(meta.get("name", "")), ip=ip, labels=labels,
                   model=model if isinstance(model, str) else None,
                   serving=ready and has_ip and not deleting)


def pool_endpoints(pods: Iterable[PodView], spec: PoolSpec,
                   kv_events_port: int | None = None) -> list[Endpoint]:
    """The endpoints of the serving pods that match ``spec``: one per target port.

    ``kv_events`` is set when the publisher's port is not the subscriber's default: with
    several ranks (rank r publishes on base + r) or an explicit ``kv_events_port``.
    """
    explicit = kv_events_port is not None or len(spec.target_ports) > 1
    base = DEFAULT_KV_EVENTS_PORT if kv_events_port is None else kv_events_port
    endpoints: list[Endpoint] = []
    for pod in pods:
        if not pod.serving or any(pod.labels.get(k) != v for k, v in spec.selector.items()):
            continue
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        for rank, port in enumerate(spec.target_ports):
            endpoints.append(Endpoint(
                name=f"{pod.name}-rank-{rank}", address=f"{host}:{port}",
                labels=dict(pod.labels), model=pod.model,
                kv_events=f"tcp://{host}:{base + rank}" if explicit else None))
    return endpoints


def _for_pool(obj: Mapping[str, Any], pool_name: str) -> Mapping[str, Any] | None:
    """The object's spec if its ``spec.poolRef`` names ``pool_name``, else None."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return None
    ref = spec.get("poolRef") or {}
    if not isinstance(ref, Mapping) or ref.get("name") != pool_name:
        return None
    if ref.get("group") not in (None, "", POOL_GROUP) or ref.get("kind") not in (
            None, "", POOL_KIND):
        return None
    return spec


def objective_priority(objective: Mapping[str, Any], pool_name: str) -> int | None:
    """The priority of an InferenceObjective for ``pool_name``; None if it names another
    pool. Unset (or malformed) priority is 0."""
    spec = _for_pool(objective, pool_name)
    if spec is None:
        return None
    priority = spec.get("priority")
    if priority is None:
        return 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        name = (objective.get("metadata") or {}).get("name")
        log.warning("InferenceObjective %s: spec.priority %r is not an integer; using 0",
                    name, priority)
        return 0
    return priority


def model_rewrite(obj: Mapping[str, Any], pool_name: str) -> ModelRewrite | None:
    """An InferenceModelRewrite for ``pool_name`` as :class:`ModelRewrite`; None if it
    names another pool. Malformed matches and targets are dropped with a warning (the
    rest of the object still applies); a rule left without targets does nothing."""
    spec = _for_pool(obj, pool_name)
    if spec is None:
        return None
    meta = _mapping(obj.get("metadata"))
    name = str(meta.get("name", ""))
    rules: list[RewriteRule] = []
    raw_rules = spec.get("rules")
    for i, item in enumerate(raw_rules if isinstance(raw_rules, list) else []):
        raw = _mapping(item)
        models: set[str] = set()
        for match in raw.get("matches") or []:
            model_match = _mapping(_mapping(match).get("model"))
            kind = model_match.get("type") or "Exact"
            value = model_match.get("value")
            if kind != "Exact" or not isinstance(value, str) or not value:
                log.warning("InferenceModelRewrite %s: rules[%d]: ignoring match %r (only "
                            "Exact matches on a model name)", name, i, match)
                continue
            models.add(value)
        if raw.get("matches") and not models:
            continue  # every match was malformed: matching all requests would be wrong
        targets: list[RewriteTarget] = []
        for entry in raw.get("targets") or []:
            target = _mapping(entry)
            rewrite = target.get("modelRewrite")
            weight = target.get("weight")
            if not isinstance(rewrite, str) or not rewrite or not (
                    weight is None or (isinstance(weight, int) and not isinstance(weight, bool)
                                       and weight >= 1)):
                log.warning("InferenceModelRewrite %s: rules[%d]: ignoring target %r", name, i,
                            target)
                continue
            targets.append(RewriteTarget(rewrite, weight))
        rules.append(RewriteRule(frozenset(models), tuple(targets)))
    return ModelRewrite(name, str(meta.get("creationTimestamp") or ""), tuple(rules))


async def load_api_client(kubeconfig: str | None = None) -> ApiClient:
    """An API client from the pod's service account when running in a cluster (and no
    kubeconfig is given), else from ``kubeconfig`` ($KUBECONFIG, ~/.kube/config)."""
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = Configuration()
            kube_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
            return ApiClient(configuration)
        return await kube_config.new_client_from_config(config_file=kubeconfig,
                                                        persist_config=False)
    except (kube_config.ConfigException, OSError, ValueError) as exc:
        where = kubeconfig or "the in-cluster service account or default kubeconfig"
        raise DiscoveryError(f"cannot load Kubernetes credentials from {where}: {exc}") from None


class KubernetesDiscovery:
    """Feeds the pool from an InferencePool (``pool_name``) or, standalone, from a label
    ``selector`` and ``target_ports``; feeds ``objectives_sink`` from InferenceObjectives.

    :meth:`start` returns after the first full sync (then the pool is marked synced) and
    raises :class:`DiscoveryError` for what retrying cannot fix; afterwards watches
    resume, relist and back off on their own, keeping the last good state meanwhile.
    ``on_watch_error(resource, reason)`` counts those retries. Each watch loop is
    supervised: one that dies of a bug is counted as ``on_task_failure("k8s-watch-<plural>")``,
    logged and restarted with backoff (it lists again).
    """

    def __init__(self, pool: EndpointPool, *, namespace: str, pool_name: str | None = None,
                 selector: Mapping[str, str] | None = None,
                 target_ports: Sequence[int] | None = None,
                 objectives_sink: ObjectivesSink | None = None,
                 rewrites_sink: RewritesSink | None = None,
                 api_client_factory: ApiClientFactory | None = None,
                 kubeconfig: str | None = None,
                 kv_events_port: int | None = None,
                 watch_timeout_s: float = DEFAULT_WATCH_TIMEOUT_S,
                 list_timeout_s: float = DEFAULT_LIST_TIMEOUT_S,
                 backoff_initial_s: float = DEFAULT_BACKOFF_INITIAL_S,
                 backoff_max_s: float = DEFAULT_BACKOFF_MAX_S,
                 on_task_failure: FailureCounter | None = None,
                 on_watch_error: WatchErrorCounter | None = None) -> None:
        if not namespace:
            raise ValueError("namespace: required")
        standalone = selector is not None or target_ports is not None
        if standalone == (pool_name is not None):
            raise ValueError("give pool_name, or selector and target_ports (standalone), "
                             "not both")
        self._standalone_spec: PoolSpec | None = None
        if standalone:
            if selector is None or target_ports is None:
                raise ValueError("standalone discovery needs both selector and target_ports")
            self._standalone_spec = PoolSpec(validate_selector(selector, "selector"),
                                             validate_ports(list(target_ports), "target_ports"))
        if kv_events_port is not None and not 0 < kv_events_port < 65536:
            raise ValueError(f"kv_events_port: {kv_events_port} is not a TCP port")
        if not 0 < backoff_initial_s <= backoff_max_s:  # now, not at the first error
            raise ValueError("backoff: need 0 < initial_s <= max_s")
        self._pool = pool
        self._namespace = namespace
        self._pool_name = pool_name
        self._objectives_sink = objectives_sink if pool_name is not None else None
        self._rewrites_sink = rewrites_sink if pool_name is not None else None
        if (objectives_sink is not None or rewrites_sink is not None) and pool_name is None:
            log.info("standalone discovery: InferenceObjectives and InferenceModelRewrites "
                     "are not watched")
        self._client_factory = api_client_factory or functools.partial(load_api_client,
                                                                       kubeconfig)
        self._kv_events_port = kv_events_port
        self._watch_timeout_s = watch_timeout_s
        self._list_timeout_s = list_timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._where = (f"InferencePool {namespace}/{pool_name}" if self._standalone_spec is None
                       else "pods " + ",".join(f"{k}={v}" for k, v in
                                               self._standalone_spec.selector.items())
                       + f" in {namespace}")
        self._spec: PoolSpec | None = self._standalone_spec
        self._client: ApiClient | None = None
        self._pods: Reflector[PodView] | None = None
        self._pools: Reflector[dict[str, Any]] | None = None
        # One reflector per API group, in OBJECTIVE_GROUPS order.
        self._objectives: list[Reflector[int | None]] = []
        self._rewrites: list[Reflector[ModelRewrite | None]] = []
        self._published: dict[str, int] | None = None
        self._published_rewrites: list[ModelRewrite] | None = None
        self._live = False  # the first full sync is done: apply changes
        self._tasks: list[asyncio.Task[None]] = []
        self._on_task_failure = on_task_failure
        self._on_watch_error = on_watch_error
        self._logs = LogLimiter(log)

    @property
    def spec(self) -> PoolSpec | None:
        """The pool spec in force (None while the InferencePool does not exist)."""
        return self._spec

    async def start(self) -> None:
        """Connect, list everything, open the watches, fill the pool and mark it synced."""
        if self._client is not None:
            raise RuntimeError("KubernetesDiscovery already started")
        self._client = await self._client_factory()
        try:
            self._build_reflectors(self._client)
            await self._initial_sync()
        except BaseException:
            await self._close()
            raise
        self._live = True
        self._apply()
        self._publish_objectives()
        self._publish_rewrites()
        self._pool.mark_synced()
        log.info("%s: synced, %d endpoints", self._where, len(self._pool))
        self._tasks = [asyncio.create_task(self._supervised_watch(r),
                                           name=WATCH_TASK_PREFIX + r.resource.plural)
                       for r in self._reflectors()]

    def _supervised_watch(self, r: Reflector[Any]) -> Coroutine[Any, Any, None]:
        return supervised(r.run, task=WATCH_TASK_PREFIX + r.resource.plural,
                          what=f"watch of {r.resource.qualified} for {self._where}",
                          logs=self._logs, count=self._on_task_failure,
                          backoff=Backoff(*self._backoff))

    async def stop(self) -> None:
        """Stop watching and close the API client; the pool keeps its endpoints."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    async def _close(self) -> None:
        self._live = False
        for r in self._reflectors():
            r.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def _reflectors(self) -> list[Reflector[Any]]:
        return [r for r in (self._pools, self._pods, *self._objectives, *self._rewrites)
                if r is not None]

    def _build_reflectors(self, client: ApiClient) -> None:
        ns = self._namespace
        core, custom = CoreV1Api(client), CustomObjectsApi(client)

        def reflector(resource: Resource, lister: Any, convert: Any, on_change: Any,
                      **kwargs: Any) -> Reflector[Any]:
            return Reflector(resource, lister, convert, on_change,
                             backoff=Backoff(*self._backoff), on_error=self._on_watch_error,
                             **kwargs,
                             watch_timeout_s=self._watch_timeout_s,
                             list_timeout_s=self._list_timeout_s)

        self._pods = reflector(Resource("", "v1", "pods", ns),
                               functools.partial(core.list_namespaced_pod, ns),
                               pod_view, self._apply)
        if self._pool_name is not None:
            self._pools = reflector(
                Resource(POOL_GROUP, POOL_VERSION, POOL_PLURAL, ns),
                functools.partial(custom.list_namespaced_custom_object, POOL_GROUP,
                                  POOL_VERSION, ns, POOL_PLURAL),
                dict, self._on_pool_change, field_selector=f"metadata.name={self._pool_name}")
        pool_name = self._pool_name
        for group in OBJECTIVE_GROUPS:
            if pool_name is None:
                break  # standalone: no pool for objectives or rewrites to name
            kinds: list[tuple[bool, str, Any, Any, list[Reflector[Any]]]] = [
                (self._objectives_sink is not None, OBJECTIVE_PLURAL, objective_priority,
                 self._publish_objectives, self._objectives),
                (self._rewrites_sink is not None, REWRITE_PLURAL, model_rewrite,
                 self._publish_rewrites, self._rewrites)]
            for wanted, plural, parse, publish, into in kinds:
                if wanted:
                    into.append(reflector(
                        Resource(group, OBJECTIVE_VERSION, plural, ns),
                        functools.partial(custom.list_namespaced_custom_object, group,
                                          OBJECTIVE_VERSION, ns, plural),
                        functools.partial(parse, pool_name=pool_name), publish))

    async def _initial_sync(self) -> None:
        listed: list[Reflector[Any]] = []
        for r in self._reflectors():
            try:
                await self._until_done(r, r.list)
                listed.append(r)
            except KubeAPIError as exc:
                if exc.status == 404 and (r in self._objectives or r in self._rewrites):
                    # These CRDs are optional (in either group): without objectives every
                    # request is priority 0, without rewrites models pass unchanged.
                    log.warning("%s; %s until it appears", explain(exc),
                                "all requests get priority 0" if r in self._objectives
                                else "no model is rewritten")
                    continue
                raise DiscoveryError(explain(exc)) from None
        if self._pools is not None:
            pool = self._pools.items.get(self._pool_name or "")
            if pool is None:
                raise DiscoveryError(
                    f"{self._where} not found: create it, or fix the pool name and namespace")
            try:
                self._spec = parse_pool_spec(pool)
            except ValueError as exc:
                raise DiscoveryError(f"{self._where}: invalid spec: {exc}") from None
        for r in listed:
            try:
                await self._until_done(r, r.open_watch)
            except KubeAPIError as exc:
                raise DiscoveryError(explain(exc)) from None

    async def _until_done(self, r: Reflector[Any], step: Callable[[], Awaitable[None]]) -> None:
        """Run one start-up step, retrying what may pass (network, 5xx, 429); answers that
        retrying cannot fix (401, 403, 404) raise :class:`KubeAPIError`."""
        backoff = Backoff(*self._backoff)
        relist = False
        while True:
            try:
                if relist:
                    await r.list()
                    relist = False
                await step()
                return
            except WatchExpired as exc:
                r.count_error(error_reason(exc))
                relist = True  # the list went stale before the watch opened
                continue
            except KubeAPIError as exc:
                if exc.status in _FATAL_AT_START:
                    raise
                r.count_error(error_reason(exc))
                problem = explain(exc)
            except TRANSIENT_ERRORS as exc:
                r.count_error(error_reason(exc))
                problem = f"{type(exc).__name__}: {exc}"
            log.warning("%s: start-up sync: %s; retrying", r.resource.qualified, problem)
            await asyncio.sleep(backoff.next())

    def _on_pool_change(self) -> None:
        assert self._pools is not None
        pool = self._pools.items.get(self._pool_name or "")
        if pool is None:
            if self._spec is not None and self._live:
                log.warning("%s was deleted: no endpoints until it is back", self._where)
            self._spec = None
        else:
            try:
                spec = parse_pool_spec(pool)
            except ValueError as exc:
                if self._live:
                    log.error("%s: invalid spec, keeping the previous one: %s", self._where, exc)
                return
            if spec != self._spec and self._live:
                log.info("%s: selector %s, target ports %s, endpoint picker %s", self._where,
                         dict(spec.selector), list(spec.target_ports), spec.endpoint_picker)
            self._spec = spec
        self._apply()

    def _apply(self) -> None:
        """Make the pool match the current pods and spec, in one step."""
        if not self._live or self._pods is None:
            return
        spec = self._spec
        endpoints = ([] if spec is None else
                     pool_endpoints(self._pods.items.values(), spec, self._kv_events_port))
        before = {e.name for e in self._pool.snapshot()}
        if self._pool.replace_all(endpoints):
            after = {e.name for e in endpoints}
            log.info("%s: %d endpoints (added %s, removed %s)", self._where, len(after),
                     _few(after - before), _few(before - after))

    def _publish_objectives(self) -> None:
        if not self._live or self._objectives_sink is None:
            return
        objectives: dict[str, int] = {}
        for r in reversed(self._objectives):  # the first group's objects win a clash
            objectives.update((name, p) for name, p in r.items.items() if p is not None)
        if objectives != self._published:
            self._published = objectives
            log.info("%s: %d inference objectives", self._where, len(objectives))
            try:
                self._objectives_sink(dict(objectives))
            except Exception:  # the consumer's bug must not stop the watch
                log.exception("objectives sink failed")


    def _publish_rewrites(self) -> None:
        if not self._live or self._rewrites_sink is None:
            return
        seen: set[str] = set()
        rewrites: list[ModelRewrite] = []
        for r in self._rewrites:  # the first group's objects win a name clash
            for name, rewrite in sorted(r.items.items()):
                if rewrite is not None and name not in seen:
                    seen.add(name)
                    rewrites.append(rewrite)
        if rewrites != self._published_rewrites:
            self._published_rewrites = rewrites
            log.info("%s: %d inference model rewrites", self._where, len(rewrites))
            try:
                self._rewrites_sink(list(rewrites))
            except Exception:  # the consumer's bug must not stop the watch
                log.exception("model rewrites sink failed")


def _few(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" +{len(names) - limit} more" if len(names) > limit else ""
    return f"[{', '.join(shown)}{more}]"
