"""Kubernetes discovery against an in-test API server speaking the real list/watch protocol
(resourceVersion, ADDED/MODIFIED/DELETED/BOOKMARK, watch timeouts, 410 Gone), through
kubernetes-asyncio's own client. Tests wait on pool changes, never on fixed sleeps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes_asyncio.client import ApiClient, Configuration

from epp.datastore import Endpoint, EndpointPool
from epp.discovery.kubernetes import (
    ApiClientFactory,
    DiscoveryError,
    KubernetesDiscovery,
    parse_label_selector,
    parse_target_ports,
)
from epp.requestcontrol.admission import OBJECTIVE_HEADER, Admission, SaturationDetector
from tests.k8sfake import FakeKubeServer, make_objective, make_pod, make_pool

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

NS = "default"
POOL = "vllm-pool"
APP = {"app": "vllm"}
TIMEOUT = 5.0
FAST_RETRY: dict[str, Any] = {"backoff_initial_s": 0.02, "backoff_max_s": 0.2}


def client_factory(server: FakeKubeServer) -> ApiClientFactory:
    async def make() -> ApiClient:
        return ApiClient(Configuration(host=server.url))
    return make


def names(pool: EndpointPool) -> set[str]:
    return {e.name for e in pool.snapshot()}


def addresses(pool: EndpointPool) -> set[str]:
    return {e.address for e in pool.snapshot()}


async def until(pool: EndpointPool, predicate: Callable[[], bool],
                timeout: float = TIMEOUT) -> None:
    """Wait for a pool change after which ``predicate()`` holds."""
    changed = asyncio.Event()

    def listener(_: tuple[Endpoint, ...]) -> None:
        changed.set()

    pool.add_listener(listener)
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"timed out; pool is {sorted(names(pool))}") from None
    finally:
        pool.remove_listener(listener)


async def eventually(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll something that is not the pool (the fake server's request log)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def swaps(history: list[frozenset[str]]) -> list[frozenset[str]]:
    """Distinct consecutive states of the pool."""
    out: list[frozenset[str]] = []
    for state in history:
        if not out or out[-1] != state:
            out.append(state)
    return out


@dataclass
class Harness:
    server: FakeKubeServer
    pool: EndpointPool
    discovery: KubernetesDiscovery
    history: list[frozenset[str]]  # endpoint names after every pool notification
    objectives: list[dict[str, int]]  # what the sink received


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeKubeServer]:
    s = FakeKubeServer()
    await s.start()
    yield s
    await s.stop()


StartDiscovery = Callable[..., Awaitable[Harness]]


@pytest_asyncio.fixture
async def start_discovery(server: FakeKubeServer) -> AsyncIterator[StartDiscovery]:
    started: list[KubernetesDiscovery] = []

    async def start(**overrides: Any) -> Harness:
        pool = EndpointPool()
        history: list[frozenset[str]] = []
        objectives: list[dict[str, int]] = []
        pool.add_listener(lambda snap: history.append(frozenset(e.name for e in snap)))
        kwargs: dict[str, Any] = {"namespace": NS, "pool_name": POOL,
                                  "objectives_sink": objectives.append,
                                  "api_client_factory": client_factory(server), **FAST_RETRY}
        kwargs.update(overrides)
        discovery = KubernetesDiscovery(pool, **kwargs)
        await discovery.start()
        started.append(discovery)
        return Harness(server, pool, discovery, history, objectives)

    yield start
    for discovery in started:
        await discovery.stop()


def seed(server: FakeKubeServer, ports: list[int] | None = None) -> None:
    """The pool and two ready pods, a and b."""
    server.apply("inferencepools", make_pool(POOL, APP, ports or [8000]))
    server.apply("pods", make_pod("a", "10.0.0.1", APP))
    server.apply("pods", make_pod("b", "10.0.0.2", APP))


def set_ready(ready: bool) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["status"]["conditions"] = [{"type": "Ready", "status": str(ready)}]
    return change


# --- initial sync ---------------------------------------------------------------------------


async def test_start_lists_only_ready_matching_pods(server: FakeKubeServer,
                                                    start_discovery: StartDiscovery) -> None:
    server.apply("inferencepools", make_pool(POOL, APP, [8000]))
    server.apply("pods", make_pod("ready", "10.0.0.1", {**APP, "llm-d.ai/role": "decode"},
                                  annotations={"llm-d.ai/model": "Qwen/Qwen3-8B"}))
    server.apply("pods", make_pod("unready", "10.0.0.2", APP, ready=False))
    server.apply("pods", make_pod("other-app", "10.0.0.3", {"app": "web"}))
    server.apply("pods", make_pod("no-ip", None, APP))
    server.apply("pods", make_pod("other-ns", "10.0.0.4", APP, namespace="elsewhere"))
    deleting = make_pod("deleting", "10.0.0.5", APP)
    deleting["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    server.apply("pods", deleting)

    h = await start_discovery()

    assert h.pool.synced
    (endpoint,) = h.pool.snapshot()
    assert endpoint.name == "ready-rank-0"
    assert endpoint.address == "10.0.0.1:8000"
    assert endpoint.labels == {**APP, "llm-d.ai/role": "decode"}
    assert endpoint.role == "decode"
    assert endpoint.model == "Qwen/Qwen3-8B"
    assert endpoint.kv_events is None  # one port: the subscriber's default applies
    assert h.discovery.spec is not None and h.discovery.spec.endpoint_picker == "epp:9002"
    # The first notification already carries the full pool: readiness never sees a partial one.
    assert h.history and h.history[0] == {"ready-rank-0"}


async def test_pool_is_marked_synced_only_after_the_full_sync(
        server: FakeKubeServer) -> None:
    seed(server)
    server.fail("pods", "list", status=503, times=2)  # start-up retries these
    pool = EndpointPool()
    seen: list[tuple[int, bool]] = []
    pool.add_listener(lambda snap: seen.append((len(snap), pool.synced)))
    discovery = KubernetesDiscovery(pool, namespace=NS, pool_name=POOL,
                                    api_client_factory=client_factory(server), **FAST_RETRY)
    assert not pool.synced
    await discovery.start()
    try:
        assert pool.synced and names(pool) == {"a-rank-0", "b-rank-0"}
        assert server.count("list", "pods") == 3
        assert all(n == 2 for n, synced in seen if synced)
    finally:
        await discovery.stop()


# --- pods come and go -------------------------------------------------------------------------


async def test_pods_ready_unready_deleted_mid_traffic(server: FakeKubeServer,
                                                      start_discovery: StartDiscovery) -> None:
    seed(server)
    server.apply("pods", make_pod("c", "10.0.0.3", APP, ready=False))
    h = await start_discovery()
    assert names(h.pool) == {"a-rank-0", "b-rank-0"}

    # Traffic: every step picks round-robin from the snapshot of that moment.
    step = 0
    picks: list[tuple[int, str]] = []
    removed_at: dict[str, int] = {}
    previous = names(h.pool)

    def on_change(snapshot: tuple[Endpoint, ...]) -> None:
        nonlocal previous
        current = {e.name for e in snapshot}
        for name in previous - current:
            removed_at[name] = step  # picks from this step on must not see it
        previous = current

    h.pool.add_listener(on_change)

    async def traffic() -> None:
        nonlocal step
        while True:
            snapshot = h.pool.snapshot()
            if snapshot:
                picks.append((step, snapshot[step % len(snapshot)].name))
            step += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(traffic())
    try:
        server.patch("pods", "c", set_ready(True))  # becomes ready
        await until(h.pool, lambda: "c-rank-0" in names(h.pool))
        server.patch("pods", "b", set_ready(False))  # becomes unready
        await until(h.pool, lambda: "b-rank-0" not in names(h.pool))

        def terminating(pod: dict[str, Any]) -> None:
            pod["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"

        server.patch("pods", "a", terminating)  # graceful deletion starts: out at once
        await until(h.pool, lambda: "a-rank-0" not in names(h.pool))
        server.delete("pods", "a")
        server.delete("pods", "c")  # deleted while ready
        await until(h.pool, lambda: not h.pool.snapshot())
        await asyncio.sleep(0)  # one more traffic step on the empty pool
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert set(removed_at) == {"a-rank-0", "b-rank-0", "c-rank-0"}
    for name, at in removed_at.items():
        assert any(n == name for s, n in picks if s < at), f"{name} never served traffic"
        late = [s for s, n in picks if n == name and s >= at]
        assert not late, f"{name} picked after its removal was processed"


async def test_pod_ip_and_label_changes_update_the_endpoint(
        server: FakeKubeServer, start_discovery: StartDiscovery) -> None:
    seed(server)
    h = await start_discovery()
    kept_state = h.pool.get("a-rank-0")
    assert kept_state is not None

    def add_role(pod: dict[str, Any]) -> None:
        pod["metadata"]["labels"]["llm-d.ai/role"] = "prefill"

    server.patch("pods", "a", add_role)
    await until(h.pool, lambda: (e := h.pool.get("a-rank-0")) is not None and e.role == "prefill")
    relabelled = h.pool.get("a-rank-0")
    assert relabelled is not None and relabelled.state is kept_state.state  # same server

    def new_ip(pod: dict[str, Any]) -> None:
        pod["status"]["podIP"] = "10.0.9.9"

    server.patch("pods", "a", new_ip)
    await until(h.pool, lambda: "10.0.9.9:8000" in addresses(h.pool))
    assert addresses(h.pool) == {"10.0.9.9:8000", "10.0.0.2:8000"}

    def leave_selector(pod: dict[str, Any]) -> None:
        pod["metadata"]["labels"]["app"] = "something-else"

    server.patch("pods", "a", leave_selector)
    await until(h.pool, lambda: names(h.pool) == {"b-rank-0"})


# --- the pool's spec ----------------------------------------------------------------------------


async def test_selector_change_swaps_the_set_in_one_step(
        server: FakeKubeServer, start_discovery: StartDiscovery) -> None:
    blue, green = {**APP, "track": "blue"}, {**APP, "track": "green"}
    server.apply("inferencepools", make_pool(POOL, blue, [8000]))
    for i in range(3):
        server.apply("pods", make_pod(f"blue-{i}", f"10.0.1.{i + 1}", blue))
        server.apply("pods", make_pod(f"green-{i}", f"10.0.2.{i + 1}", green))
    h = await start_discovery()
    blue_set = frozenset(f"blue-{i}-rank-0" for i in range(3))
    green_set = frozenset(f"green-{i}-rank-0" for i in range(3))
    assert names(h.pool) == blue_set

    def to_green(pool: dict[str, Any]) -> None:
        pool["spec"]["selector"]["matchLabels"] = green

    server.patch("inferencepools", POOL, to_green)
    await until(h.pool, lambda: names(h.pool) == green_set)
    assert swaps(h.history) == [blue_set, green_set]  # never empty, never mixed


async def test_target_ports_are_ranks(server: FakeKubeServer,
                                      start_discovery: StartDiscovery) -> None:
    server.apply("inferencepools", make_pool(POOL, APP, [8000, 8001]))
    server.apply("pods", make_pod("a", "10.0.0.1", APP))
    server.apply("pods", make_pod("v6", "fd00::7", APP))
    h = await start_discovery()

    by_name = {e.name: e for e in h.pool.snapshot()}
    assert {n: (e.address, e.kv_events) for n, e in by_name.items()} == {
        "a-rank-0": ("10.0.0.1:8000", "tcp://10.0.0.1:5557"),
        "a-rank-1": ("10.0.0.1:8001", "tcp://10.0.0.1:5558"),
        "v6-rank-0": ("[fd00::7]:8000", "tcp://[fd00::7]:5557"),
        "v6-rank-1": ("[fd00::7]:8001", "tcp://[fd00::7]:5558"),
    }

    def one_port(pool: dict[str, Any]) -> None:
        pool["spec"]["targetPorts"] = [{"number": 9000}]

    server.patch("inferencepools", POOL, one_port)
    await until(h.pool, lambda: names(h.pool) == {"a-rank-0", "v6-rank-0"})
    assert addresses(h.pool) == {"10.0.0.1:9000", "[fd00::7]:9000"}
    assert len(swaps(h.history)) == 2  # both ranks gone and ports changed in one step


async def test_explicit_kv_events_port_per_rank(server: FakeKubeServer,
                                                start_discovery: StartDiscovery) -> None:
    seed(server, ports=[8000, 8001])
    h = await start_discovery(kv_events_port=5556)
    a0, a1 = h.pool.get("a-rank-0"), h.pool.get("a-rank-1")
    assert a0 is not None and a0.kv_events == "tcp://10.0.0.1:5556"
    assert a1 is not None and a1.kv_events == "tcp://10.0.0.1:5557"


async def test_invalid_pool_edit_keeps_the_last_good_spec(
        server: FakeKubeServer, start_discovery: StartDiscovery,
        caplog: pytest.LogCaptureFixture) -> None:
    seed(server)
    h = await start_discovery()

    def break_ports(pool: dict[str, Any]) -> None:
        pool["spec"]["targetPorts"] = [{"number": 70000}]

    def add_port(pool: dict[str, Any]) -> None:
        pool["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8001}]

    with caplog.at_level(logging.ERROR, logger="epp.discovery"):
        server.patch("inferencepools", POOL, break_ports)
        server.patch("inferencepools", POOL, add_port)
        await until(h.pool, lambda: len(h.pool) == 4)
    assert "invalid spec" in caplog.text and "70000" in caplog.text
    assert swaps(h.history) == [frozenset({"a-rank-0", "b-rank-0"}),
                                frozenset({"a-rank-0", "a-rank-1", "b-rank-0", "b-rank-1"})]


async def test_pool_deleted_then_recreated(server: FakeKubeServer,
                                           start_discovery: StartDiscovery) -> None:
    seed(server)
    h = await start_discovery()
    server.delete("inferencepools", POOL)
    await until(h.pool, lambda: not h.pool.snapshot())
    assert h.discovery.spec is None
    server.apply("inferencepools", make_pool(POOL, APP, [8000]))
    await until(h.pool, lambda: names(h.pool) == {"a-rank-0", "b-rank-0"})


# --- watch trouble -------------------------------------------------------------------------------


@pytest.mark.parametrize("abrupt", [False, True], ids=["eof", "connection-cut"])
async def test_watch_drop_resumes_from_last_resource_version(
        server: FakeKubeServer, start_discovery: StartDiscovery, abrupt: bool) -> None:
    seed(server)
    h = await start_discovery()
    server.apply("pods", make_pod("c", "10.0.0.3", APP))
    await until(h.pool, lambda: "c-rank-0" in names(h.pool))
    seen_rv = str(server.resource_version)
    lists, watches = server.count("list", "pods"), server.count("watch", "pods")

    assert server.drop_watches(abrupt=abrupt) >= 2
    server.delete("pods", "b")  # happens while no watch is open: replayed from history
    await until(h.pool, lambda: names(h.pool) == {"a-rank-0", "c-rank-0"})

    assert server.count("watch", "pods") == watches + 1
    assert server.last("watch", "pods").resource_version == seen_rv
    assert server.count("list", "pods") == lists  # resumed, not relisted


async def test_watch_timeout_renews_the_watch(server: FakeKubeServer,
                                              start_discovery: StartDiscovery) -> None:
    seed(server)
    h = await start_discovery(watch_timeout_s=1)
    assert server.last("watch", "pods").timeout_seconds == "1"
    await eventually(lambda: server.count("watch", "pods") >= 2)  # the server ended the first
    server.apply("pods", make_pod("c", "10.0.0.3", APP))
    await until(h.pool, lambda: "c-rank-0" in names(h.pool))
    assert server.count("list", "pods") == 1


async def test_bookmark_advances_the_resume_version(server: FakeKubeServer,
                                                    start_discovery: StartDiscovery) -> None:
    seed(server)
    h = await start_discovery()
    # Unrelated changes move the global resourceVersion past what the pod watch has seen.
    server.apply("inferenceobjectives", make_objective("chat", POOL, 1))
    await eventually(lambda: h.objectives[-1] == {"chat": 1})
    bookmark_rv = str(server.resource_version)
    assert server.last("watch", "pods").resource_version != bookmark_rv
    watches = server.count("watch", "pods")

    server.send_bookmarks()
    server.compact()  # only the bookmarked version is still watchable
    server.drop_watches()  # streams end after the bookmark: it is read first
    await eventually(lambda: server.count("watch", "pods") == watches + 1)
    assert server.last("watch", "pods").resource_version == bookmark_rv
    assert server.count("list", "pods") == 1  # no 410, so no relist


@pytest.mark.parametrize("as_http_status", [False, True], ids=["error-event", "http-410"])
async def test_410_gone_relists_and_swaps_in_one_step(
        server: FakeKubeServer, start_discovery: StartDiscovery, as_http_status: bool) -> None:
    seed(server)
    h = await start_discovery()
    server.gone_as_http_status = as_http_status
    lists = server.count("list", "pods")

    server.drop_watches()
    server.delete("pods", "a")
    server.apply("pods", make_pod("c", "10.0.0.3", APP))
    server.compact()  # the events above are gone from history: the re-watch gets 410
    await until(h.pool, lambda: names(h.pool) == {"b-rank-0", "c-rank-0"})

    assert server.count("list", "pods") == lists + 1
    assert swaps(h.history) == [frozenset({"a-rank-0", "b-rank-0"}),
                                frozenset({"b-rank-0", "c-rank-0"})]
    server.apply("pods", make_pod("d", "10.0.0.4", APP))  # and it watches on after the relist
    await until(h.pool, lambda: "d-rank-0" in names(h.pool))


async def test_transient_watch_errors_back_off_and_recover(
        server: FakeKubeServer, start_discovery: StartDiscovery,
        caplog: pytest.LogCaptureFixture) -> None:
    seed(server)
    h = await start_discovery()
    watches = server.count("watch", "pods")
    server.fail("pods", "watch", status=500, times=3)
    with caplog.at_level(logging.WARNING, logger="epp.discovery"):
        server.drop_watches(abrupt=True)
        server.apply("pods", make_pod("c", "10.0.0.3", APP))
        await until(h.pool, lambda: "c-rank-0" in names(h.pool))
    assert server.count("watch", "pods") == watches + 4  # three failures, then success
    assert names(h.pool) == {"a-rank-0", "b-rank-0", "c-rank-0"}
    assert "injected failure" in caplog.text


# --- errors that need a human --------------------------------------------------------------------


@pytest.mark.parametrize(("plural", "verb", "qualified"), [
    ("pods", "list", "pods"),
    ("pods", "watch", "pods"),
    ("inferencepools", "list", "inferencepools.inference.networking.k8s.io"),
    ("inferenceobjectives", "watch", "inferenceobjectives.inference.networking.x-k8s.io"),
])
async def test_rbac_forbidden_fails_start_with_a_clear_error(
        server: FakeKubeServer, plural: str, verb: str, qualified: str) -> None:
    seed(server)
    server.forbid(plural, verb)
    pool = EndpointPool()
    discovery = KubernetesDiscovery(pool, namespace=NS, pool_name=POOL,
                                    objectives_sink=lambda _: None,
                                    api_client_factory=client_factory(server), **FAST_RETRY)
    with pytest.raises(DiscoveryError) as err:
        await discovery.start()
    message = str(err.value)
    assert f"Forbidden: Kubernetes denied {verb} on {qualified} in namespace 'default'" \
        in message
    assert "get, list and watch" in message and "system:serviceaccount" in message
    assert not pool.synced and not pool.snapshot()
    await discovery.stop()  # harmless after a failed start


async def test_rbac_revoked_while_running_keeps_endpoints_and_recovers(
        server: FakeKubeServer, start_discovery: StartDiscovery,
        caplog: pytest.LogCaptureFixture) -> None:
    seed(server)
    h = await start_discovery()
    watches = server.count("watch", "pods")
    server.forbid("pods", "watch")
    with caplog.at_level(logging.ERROR, logger="epp.discovery"):
        server.drop_watches()
        await eventually(lambda: server.count("watch", "pods") >= watches + 2)
    assert "Forbidden: Kubernetes denied watch on pods" in caplog.text
    assert caplog.text.count("denied watch on pods") == 1  # repeats are not re-logged
    assert names(h.pool) == {"a-rank-0", "b-rank-0"}  # the last good state stays
    server.allow("pods", "watch")
    server.apply("pods", make_pod("c", "10.0.0.3", APP))
    await until(h.pool, lambda: "c-rank-0" in names(h.pool))


async def test_missing_pool_object_fails_start(server: FakeKubeServer) -> None:
    server.apply("pods", make_pod("a", "10.0.0.1", APP))
    discovery = KubernetesDiscovery(EndpointPool(), namespace=NS, pool_name=POOL,
                                    api_client_factory=client_factory(server))
    with pytest.raises(DiscoveryError, match=r"InferencePool default/vllm-pool not found"):
        await discovery.start()


async def test_missing_pool_crd_fails_start(server: FakeKubeServer) -> None:
    server.uninstall("inferencepools")
    discovery = KubernetesDiscovery(EndpointPool(), namespace=NS, pool_name=POOL,
                                    api_client_factory=client_factory(server))
    with pytest.raises(DiscoveryError,
                       match=r"does not serve inferencepools\.inference\.networking\.k8s\.io "
                             r"\(inference\.networking\.k8s\.io/v1\).*CRD installed"):
        await discovery.start()


async def test_invalid_pool_spec_fails_start(server: FakeKubeServer) -> None:
    pool = make_pool(POOL, APP, [8000])
    pool["spec"]["targetPorts"] = []
    server.apply("inferencepools", pool)
    discovery = KubernetesDiscovery(EndpointPool(), namespace=NS, pool_name=POOL,
                                    api_client_factory=client_factory(server))
    with pytest.raises(DiscoveryError, match=r"invalid spec: spec\.targetPorts"):
        await discovery.start()


# --- objectives -----------------------------------------------------------------------------------


async def test_objectives_feed_admission_priorities(server: FakeKubeServer,
                                                    start_discovery: StartDiscovery) -> None:
    seed(server)
    server.apply("inferenceobjectives", make_objective("critical", POOL, 10))
    server.apply("inferenceobjectives", make_objective("batch", POOL, -1))
    server.apply("inferenceobjectives", make_objective("plain", POOL))  # unset: 0
    server.apply("inferenceobjectives", make_objective("elsewhere", "another-pool", 5))
    admission = Admission({}, SaturationDetector(5, 0.8, 0.5))
    h = await start_discovery(objectives_sink=admission.set_objectives)

    def priority(name: str) -> int:
        return admission.priority({OBJECTIVE_HEADER: name})

    assert [priority(n) for n in ("critical", "batch", "plain", "elsewhere")] == [10, -1, 0, 0]

    def raise_batch(objective: dict[str, Any]) -> None:
        objective["spec"]["priority"] = 3

    server.patch("inferenceobjectives", "batch", raise_batch)
    server.delete("inferenceobjectives", "critical")
    await eventually(lambda: priority("batch") == 3 and priority("critical") == 0)
    assert h.objectives == []  # the sink given to start_discovery was replaced


async def test_missing_objective_crd_is_not_fatal(server: FakeKubeServer,
                                                  start_discovery: StartDiscovery,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    seed(server)
    server.uninstall("inferenceobjectives")
    with caplog.at_level(logging.WARNING, logger="epp.discovery"):
        h = await start_discovery()
    assert h.objectives == [{}]
    assert names(h.pool) == {"a-rank-0", "b-rank-0"}
    assert "priority 0" in caplog.text


# --- standalone mode and configuration -----------------------------------------------------------


async def test_standalone_selector_without_crds(server: FakeKubeServer,
                                                start_discovery: StartDiscovery) -> None:
    server.uninstall("inferencepools")
    server.uninstall("inferenceobjectives")
    server.apply("pods", make_pod("a", "10.0.0.1", APP))
    server.apply("pods", make_pod("web", "10.0.0.9", {"app": "web"}))
    h = await start_discovery(pool_name=None, selector=parse_label_selector("app=vllm"),
                              target_ports=parse_target_ports("8000,8001"))
    assert addresses(h.pool) == {"10.0.0.1:8000", "10.0.0.1:8001"}
    server.apply("pods", make_pod("b", "10.0.0.2", APP))
    await until(h.pool, lambda: len(h.pool) == 4)
    assert server.count("list", "inferencepools") == 0
    assert server.count("list", "inferenceobjectives") == 0


async def test_kubeconfig_file(server: FakeKubeServer, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    seed(server)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: epp, user: {{token: not-checked}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: epp, namespace: {NS}}}}}]
current-context: fake
""")
    pool = EndpointPool()
    discovery = KubernetesDiscovery(pool, namespace=NS, pool_name=POOL,
                                    kubeconfig=str(kubeconfig))
    await discovery.start()
    try:
        assert names(pool) == {"a-rank-0", "b-rank-0"}
    finally:
        await discovery.stop()

    broken = KubernetesDiscovery(pool, namespace=NS, pool_name=POOL,
                                 kubeconfig=str(tmp_path / "missing"))
    with pytest.raises(DiscoveryError, match="cannot load Kubernetes credentials"):
        await broken.start()


@pytest.mark.parametrize(("kwargs", "error"), [
    ({}, "give pool_name, or selector and target_ports"),
    ({"pool_name": POOL, "selector": APP, "target_ports": [8000]}, "not both"),
    ({"selector": APP}, "needs both selector and target_ports"),
    ({"selector": {}, "target_ports": [8000]}, "must not be empty"),
    ({"selector": APP, "target_ports": list(range(8000, 8009))}, "1 to 8 ports"),
    ({"selector": APP, "target_ports": [8000, 8000]}, "ports must differ"),
    ({"pool_name": POOL, "kv_events_port": 0}, "not a TCP port"),
])
async def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        KubernetesDiscovery(EndpointPool(), namespace=NS, **kwargs)


@pytest.mark.parametrize(("text", "ok"), [
    ("app=vllm", {"app": "vllm"}),
    ("app = vllm, tier==gpu", {"app": "vllm", "tier": "gpu"}),
    ("app", None),
    ("=x", None),
])
async def test_parse_label_selector(text: str, ok: dict[str, str] | None) -> None:
    if ok is None:
        with pytest.raises(ValueError, match="key=value"):
            parse_label_selector(text)
    else:
        assert parse_label_selector(text) == ok
