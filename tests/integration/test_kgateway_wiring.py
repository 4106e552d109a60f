"""The EPP behind Envoy wired the way kgateway translates an InferencePool
(``deploy/envoy/envoy-kgateway.yaml``): the pool is a STATIC cluster with subset load
balancing on ``envoy.lb`` ``x-gateway-destination-endpoint``, so the pick is honoured only
through metadata: on the endpoints, and on the request (the picker's dynamic metadata,
accepted through ``receiving_namespaces``, or the destination header copied by
``header_to_metadata``; either one suffices). With it, every pick is served by the picked
pod and a shared prefix stays on its warm pod; with the metadata missing, the subset
fallback round-robins while the EPP keeps picking the warm pod."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from epp.devtools import envoy as envoy_cfg
from epp.devtools.procs import Process, wait_for_http
from epp.devtools.stack import LocalStack, StackPorts
from tests.integration.httputil import Reply, post, request

pytestmark = pytest.mark.integration

SELECT = "test-epp-endpoint-selection"
# The default profile (queue x2, KV x2, approximate prefix x3) plus the conformance filter,
# so a test can also name the pick outright.
CONFIG = """
plugins:
- type: header-based-testing-filter
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
"""


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Four sim pods and the EPP; each test starts its own kgateway-shaped Envoy."""
    work: Path = tmp_path_factory.mktemp("kgateway")
    stack = LocalStack(work, StackPorts.free(4), envoy_concurrency=1,
                       epp_args=["--config-text", CONFIG, "--enable-test-endpoint-selection"])
    try:
        stack.start_sims()
        stack.start_epp()
        yield stack
    finally:
        stack.stop()


Change = Callable[[dict[str, Any]], None]


def _filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def no_receiving_namespaces(config: dict[str, Any]) -> None:
    """The ext_proc filter drops the picker's envoy.lb dynamic metadata."""
    del _filters(config)[0]["typed_config"]["metadata_options"]["receiving_namespaces"]


def no_header_to_metadata(config: dict[str, Any]) -> None:
    """The destination header is not copied into envoy.lb metadata."""
    config_filters = _filters(config)
    config_filters[:] = [f for f in config_filters if "header_to_metadata" not in f["name"]]


def no_request_metadata(config: dict[str, Any]) -> None:
    """Neither: the request never carries the pick as metadata."""
    no_receiving_namespaces(config)
    no_header_to_metadata(config)


def unchanged(config: dict[str, Any]) -> None:
    """kgateway's shape as shipped."""


SERVED = "x-gateway-destination-endpoint-served"


def report_served_endpoint(config: dict[str, Any]) -> None:
    """The protocol's response side, as deploy/envoy/envoy.yaml does it: the router adds
    the upstream host as a response header, header_to_metadata moves it into envoy.lb
    (removing it from the response), and ext_proc forwards envoy.lb to the picker."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    route = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    route["response_headers_to_add"] = [{
        "header": {"key": SERVED, "value": "%UPSTREAM_HOST%"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    filters = _filters(config)
    filters[0]["typed_config"]["metadata_options"]["forwarding_namespaces"]["untyped"].append(
        "envoy.lb")
    to_metadata = next(f for f in filters if "header_to_metadata" in f["name"])
    to_metadata["typed_config"]["response_rules"] = [{
        "header": SERVED, "remove": True,
        "on_header_present": {"metadata_namespace": "envoy.lb", "key": SERVED,
                              "type": "STRING"}}]


def tls_without_alpn(config: dict[str, Any]) -> None:
    """The picker dialled exactly as kgateway's generated cluster does: TLS with an empty
    validation context and no ALPN list (the shipped file asks for h2)."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "endpoint_picker" and "transport_socket" in cluster:
            del cluster["transport_socket"]["typed_config"]["common_tls_context"][
                "alpn_protocols"]


def start_envoy(stack: LocalStack, *, endpoint_metadata: bool = True,
                change: Change = unchanged) -> Process:
    p = stack.ports
    config = envoy_cfg.kgateway_config(p.envoy, p.epp_grpc, p.envoy_admin, stack.sim_addresses,
                                       stack.epp_tls, endpoint_metadata=endpoint_metadata)
    change(config)
    name = f"kgateway-{endpoint_metadata}-{change.__name__}"
    path = envoy_cfg.write_config(config, stack.work_dir / f"{name}.yaml")
    proc = Process(name, [
        envoy_cfg.envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency",
        "1", "--log-level", "warn"], stack.work_dir)
    wait_for_http(f"http://127.0.0.1:{p.envoy_admin}/ready", expect=b"LIVE")
    return proc


def ask(stack: LocalStack, tenant: str, question: str,
        headers: dict[str, str] | None = None) -> Reply:
    system = f"You are the assistant of {tenant}. " + " ".join(
        f"Rule {i} of {tenant}: answer in {i % 7 + 2} words." for i in range(150))
    reply = post(stack.url + "/v1/chat/completions", {
        "model": "qwen3", "max_tokens": 2,
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": question}]}, headers)
    assert reply.status == 200, reply.body
    return reply


def served_by(reply: Reply) -> str:
    return reply.headers["x-sim-endpoint"]


def cached(reply: Reply) -> int:
    return int(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def _counter(stack: LocalStack, name: str, label: str) -> Counter[str]:
    text = request(f"http://127.0.0.1:{stack.ports.epp_metrics}/metrics").body.decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith(f"{name}_total{{"):
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[value] = int(float(line.rsplit(" ", 1)[1]))
    return out


def picks(stack: LocalStack) -> Counter[str]:
    """The EPP's primary picks so far, by endpoint name (from /metrics)."""
    return _counter(stack, "epp_endpoint_picks", "endpoint")


@pytest.mark.parametrize("change", [unchanged, no_receiving_namespaces,
                                    no_header_to_metadata, tls_without_alpn],
                         ids=lambda c: c.__name__)
def test_a_named_pick_reaches_exactly_that_pod(pods: LocalStack, change: Change) -> None:
    envoy = start_envoy(pods, change=change)
    try:
        for address in pods.sim_addresses:
            for i in range(2):
                reply = ask(pods, "named", f"To {address}, {i}?", {SELECT: address})
                assert served_by(reply) == address
    finally:
        envoy.stop()


def test_a_shared_prefix_lands_on_its_warm_pod_every_time(pods: LocalStack) -> None:
    envoy = start_envoy(pods)
    try:
        # The pod reuses its cache for every later request of the tenant.
        first = ask(pods, "tenant-a", "Hello!")
        home = served_by(first)
        assert cached(first) == 0
        later = [ask(pods, "tenant-a", f"Question {i}?") for i in range(12)]
        assert [served_by(r) for r in later] == [home] * 12
        assert all(cached(r) > 0 for r in later)
    finally:
        envoy.stop()


@pytest.mark.parametrize("endpoint_metadata, change", [
    (False, unchanged), (True, no_request_metadata)], ids=["endpoints", "request"])
def test_with_metadata_missing_the_subset_fallback_spreads_requests(
        pods: LocalStack, endpoint_metadata: bool, change: Change) -> None:
    envoy = start_envoy(pods, endpoint_metadata=endpoint_metadata, change=change)
    tenant = f"tenant-{endpoint_metadata}"
    try:
        target = pods.sim_addresses[0]
        before = picks(pods)
        served = Counter(served_by(ask(pods, "named", f"Again {i}?", {SELECT: target}))
                         for i in range(8))
        # The EPP picked sim-0 eight times; Envoy round-robined over the pool anyway.
        assert picks(pods)["sim-0"] - before["sim-0"] == 8
        assert len(served) > 1, served
        # A shared prefix: the EPP keeps picking one pod, the requests land on several,
        # and the ones on cold pods reuse nothing.
        before = picks(pods)
        replies = [ask(pods, tenant, f"Question {i}?") for i in range(8)]
        after = picks(pods)
        assert len({name for name in after if after[name] != before[name]}) == 1
        assert len({served_by(r) for r in replies}) > 1
        assert any(cached(r) == 0 for r in replies[1:])
    finally:
        envoy.stop()


def test_the_endpoint_that_served_is_reported_back_to_the_picker(pods: LocalStack) -> None:
    """Endpoints without metadata make Envoy serve most named picks elsewhere; with the
    served endpoint reported on the response path, the EPP counts every one of them (and
    moves its load there) and none of those that reached the pick."""
    envoy = start_envoy(pods, endpoint_metadata=False, change=report_served_endpoint)
    try:
        target = pods.sim_addresses[0]
        before = _counter(pods, "epp_served_elsewhere", "where")
        replies = [ask(pods, "served", f"Where {i}?", {SELECT: target}) for i in range(8)]
        elsewhere = sum(served_by(r) != target for r in replies)
        assert 0 < elsewhere < 8
        counted = _counter(pods, "epp_served_elsewhere", "where")
        assert counted["other"] - before["other"] == elsewhere
        assert all(SERVED not in r.headers for r in replies)  # not leaked to the client
    finally:
        envoy.stop()
