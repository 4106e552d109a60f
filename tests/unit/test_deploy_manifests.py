"""Offline checks of ``deploy/``: manifests, Dockerfile, kind scripts, Grafana dashboard.

Nothing here talks to a cluster or a registry. The kustomizations are composed by a small
resolver below that supports exactly what ``deploy/kustomize`` uses — ``resources``
(files and directories, recursively) and ``patches`` given as a ``path`` to a
strategic-merge patch of maps only — and refuses anything else, so its output is what
``kustomize build`` gives; when ``kubectl`` is installed a test compares the two.

On the composed objects: schema checks of the core kinds, then the relationships that make
the deployment work (the InferencePool selects the model-server pods and reaches the EPP's
ext_proc port, the KV-event topics name the addresses the EPP knows pods by, the RBAC is
exactly what the EPP watches, the EndpointPickerConfig compiles, ...).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp import cli as epp_cli
from epp.config.picker_config import load_picker_config
from epp.sim import cli as sim_cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
BASES = ("epp", "inferencepool", "gateway", "prometheus")
OVERLAYS = ("sim", "vllm", "pd")
NAMESPACE = "llm-inference"
EPP_DEPLOYMENT = "epp"
# Files in kustomize directories that are not Kubernetes objects.
NOT_OBJECTS = {KUSTOMIZE / "base/prometheus/prometheus-scrape-config.yaml"}
# Kubernetes-discovery flags of `epp` that another change is adding; accepted as known
# until the CLI has them, then parsed like every other flag.
PENDING_EPP_FLAGS = {"--pool-namespace", "--endpoint-selector", "--endpoint-target-ports",
                     "--kubeconfig"}
# Stand-ins for downward-API values when expanding $(VAR) in container args.
FAKE_POD_IP = "10.244.1.7"
GPU = "nvidia.com/gpu"
ROLE_LABEL = "llm-d.ai/role"
PRECISE = "precise-prefix-cache-scorer"

# The series the EPP exports (and the KV-event ones being added); the dashboard may use
# nothing else.
EPP_SERIES = {
    "inference_objective_request_total",
    "inference_objective_request_error_total",
    "inference_objective_request_duration_seconds_bucket",
    "inference_objective_input_tokens_bucket",
    "inference_pool_ready_pods",
    "inference_extension_scheduler_e2e_duration_seconds_bucket",
    "inference_extension_plugin_duration_seconds_bucket",
    "epp_endpoint_picks_total",
    "epp_prefix_cache_hit_ratio_bucket",
    "epp_kv_index_prediction_error_tokens_bucket",
    "epp_kv_index_mispredictions_total",
    "epp_pd_decision_total",
    "epp_kv_events_received_total",
    "epp_kv_events_applied_total",
    "epp_kv_events_dropped_total",
    "epp_kv_event_replays_total",
    "epp_kv_index_blocks",
}


# --------------------------------------------------------------------------------------
# A kustomize subset


class KustomizeError(Exception):
    """The kustomization uses something this resolver does not reproduce, or is invalid."""


KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}


def load_documents(path: Path) -> list[Any]:
    """Every non-empty YAML document of a file."""
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def object_id(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", ""),
            meta.get("name", ""))


def _merge_patch(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    # Strategic merge restricted to maps: lists would need the schema's merge keys.
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"{where}.{key}: patch directives are not supported")
        if isinstance(value, list):
            raise KustomizeError(f"{where}.{key}: lists in patches are not supported "
                                 "(their strategic merge depends on the schema)")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_patch(target[key], value, f"{where}.{key}")
        else:
            target[key] = copy.deepcopy(value)


def kustomize_build(directory: Path, _stack: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """``kustomize build directory`` for the subset described in the module docstring."""
    directory = directory.resolve()
    if directory in _stack:
        raise KustomizeError(f"{directory}: cycle in resources")
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    if k.get("kind") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind must be Kustomization")
    objects: list[dict[str, Any]] = []
    for ref in k.get("resources") or []:
        if "://" in ref or ref.startswith("github.com/"):
            raise KustomizeError(f"{kfile}: remote resource {ref!r} is not supported")
        path = directory / ref
        if path.is_dir():
            objects.extend(kustomize_build(path, (*_stack, directory)))
        elif path.is_file():
            for doc in load_documents(path):
                if not isinstance(doc, dict):
                    raise KustomizeError(f"{path}: a document is not a mapping")
                objects.append(doc)
        else:
            raise KustomizeError(f"{kfile}: resource {ref!r} does not exist")
    for i, entry in enumerate(k.get("patches") or []):
        if not isinstance(entry, dict) or set(entry) != {"path"}:
            raise KustomizeError(f"{kfile}: patches[{i}]: only {{path: FILE}} is supported")
        patch_docs = load_documents(directory / entry["path"])
        if len(patch_docs) != 1 or not isinstance(patch_docs[0], dict):
            raise KustomizeError(f"{kfile}: patches[{i}]: one object per patch file")
        patch = patch_docs[0]
        matches = [o for o in objects if object_id(o) == object_id(patch)]
        if len(matches) != 1:
            raise KustomizeError(f"{kfile}: patches[{i}]: no single target {object_id(patch)}")
        _merge_patch(matches[0], patch, entry["path"])
    ids = [object_id(o) for o in objects]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise KustomizeError(f"{kfile}: duplicate objects {sorted(dupes)}")
    return objects


def _canonical(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(o, sort_keys=True) for o in objects)


# --------------------------------------------------------------------------------------
# Views of composed objects


class Manifests:
    """The objects of one composition, looked up by kind and name."""

    def __init__(self, objects: list[dict[str, Any]]) -> None:
        self.objects = objects

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) <= 1, f"two {kind}s named {name}"
        return found[0] if found else None

    def get(self, kind: str, name: str) -> dict[str, Any]:
        obj = self.find(kind, name)
        assert obj is not None, f"no {kind} named {name!r}"
        return obj

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")

    def pool(self) -> dict[str, Any]:
        pools = self.of_kind("InferencePool")
        assert len(pools) == 1, "expected one InferencePool"
        return pools[0]

    def pool_workloads(self) -> list[dict[str, Any]]:
        selector = self.pool()["spec"]["selector"]["matchLabels"]
        return [w for w in self.workloads() if labels_match(selector, template_labels(w))]

    def epp_config_text(self) -> str:
        """The EndpointPickerConfig the EPP container is given with --config-file."""
        epp = self.get("Deployment", EPP_DEPLOYMENT)
        pod = epp["spec"]["template"]["spec"]
        container = epp_container(epp)
        path = flag_value(container.get("args", []), "--config-file")
        assert path, "the EPP is not given --config-file"
        for mount in container.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            if path.startswith(prefix):
                volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
                assert "configMap" in volume, f"{path} is not on a ConfigMap volume"
                key = path[len(prefix):]
                config_map = self.get("ConfigMap", volume["configMap"]["name"])
                assert key in config_map.get("data", {}), (
                    f"ConfigMap {config_map['metadata']['name']} has no key {key!r}")
                return str(config_map["data"][key])
        raise AssertionError(f"--config-file {path} is not under any volume mount")

    def epp_config(self) -> dict[str, Any]:
        doc = yaml.safe_load(self.epp_config_text())
        assert isinstance(doc, dict)
        return doc


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def template_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def serving_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers that run for the pod's life: main ones and native sidecars."""
    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return list(pod.get("containers", [])) + sidecars


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    """name (or str(number) when unnamed) -> containerPort."""
    return {str(p.get("name", p["containerPort"])): p["containerPort"]
            for p in container.get("ports", [])}


def pod_port_numbers(pod: dict[str, Any]) -> set[int]:
    return {n for c in serving_containers(pod) for n in container_ports(c).values()}


def epp_container(epp: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(epp)["containers"]
    assert len(containers) == 1, "the EPP pod should run one container"
    return dict(containers[0])


def flag_value(args: list[str], flag: str) -> str | None:
    """Value of ``--flag=value`` or ``--flag value``; None when absent."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
        if arg == flag:
            assert i + 1 < len(args), f"{flag} has no value"
            return args[i + 1]
    return None


def has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def env_values(container: dict[str, Any], namespace: str) -> dict[str, str]:
    """The container's env with downward-API fields replaced by stand-in values."""
    values: dict[str, str] = {}
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = expand(str(env["value"]), values)
            continue
        field = (env.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        if field == "status.podIP":
            values[env["name"]] = FAKE_POD_IP
        elif field == "metadata.namespace":
            values[env["name"]] = namespace
        else:
            values[env["name"]] = f"<{env['name']}>"
    return values


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; an undefined variable is an error here (Kubernetes
    would pass the reference through literally, which is never what a manifest means)."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in values, f"$({m.group(1)}) is not defined in the container env"
        return values[m.group(1)]
    return _VAR_REF.sub(sub, text)


def expanded_args(workload: dict[str, Any], container: dict[str, Any]) -> list[str]:
    values = env_values(container, workload["metadata"].get("namespace", ""))
    return [expand(str(a), values) for a in container.get("args", [])]


def plugin(config: dict[str, Any], plugin_type: str) -> dict[str, Any] | None:
    found = [p for p in config.get("plugins", []) if p.get("type") == plugin_type]
    return found[0] if found else None


def build_overlay(name: str) -> Manifests:
    return Manifests(kustomize_build(KUSTOMIZE / "overlays" / name))


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Manifests]:
    return request.param, build_overlay(request.param)


# --------------------------------------------------------------------------------------
# Files parse; the resolver is faithful


def _yaml_files() -> Iterator[Path]:
    for sub in ("kustomize", "kind", "grafana"):
        yield from sorted((DEPLOY / sub).rglob("*.yaml"))


def test_every_yaml_file_parses_and_every_object_is_named() -> None:
    files = list(_yaml_files())
    assert len(files) >= 15
    for path in files:
        docs = load_documents(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path.name == "kustomization.yaml" or path in NOT_OBJECTS:
                continue
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind"
            assert doc.get("metadata", {}).get("name"), f"{path}: metadata.name"


def test_every_manifest_file_is_used_by_its_kustomization() -> None:
    for kfile in KUSTOMIZE.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text(encoding="utf-8"))
        used = {kfile.parent / r for r in k.get("resources", [])}
        used |= {kfile.parent / p["path"] for p in k.get("patches", [])}
        for path in kfile.parent.glob("*.yaml"):
            if path.name != "kustomization.yaml" and path not in NOT_OBJECTS:
                assert path in used, f"{path} is not referenced by {kfile}"


@pytest.mark.parametrize("path", [f"base/{b}" for b in BASES] + [f"overlays/{o}" for o in OVERLAYS])
def test_resolver_output_equals_kubectl_kustomize(path: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    directory = KUSTOMIZE / path
    ours = kustomize_build(directory)
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode != 0 and "unknown command" in done.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert done.returncode == 0, done.stderr
    theirs = [d for d in yaml.safe_load_all(done.stdout) if d is not None]
    assert _canonical(ours) == _canonical(theirs)


def _write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text, encoding="utf-8")


_CM = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: n}\ndata: {a: '1', b: '2'}\n"
_KUST = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"


def test_resolver_merges_map_patches_and_follows_bases(tmp_path: Path) -> None:
    _write(tmp_path, {
        "base/kustomization.yaml": _KUST + "resources: [cm.yaml]\n",
        "base/cm.yaml": _CM,
        "over/kustomization.yaml": _KUST + "resources: [../base]\npatches: [{path: p.yaml}]\n",
        "over/p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: n}\n"
                       "data: {b: '3', a: null}\n",
    })
    [cm] = kustomize_build(tmp_path / "over")
    assert cm["data"] == {"b": "3"}


@pytest.mark.parametrize(("files", "error"), [
    ({"kustomization.yaml": _KUST + "resources: [cm.yaml]\nnamespace: x\n", "cm.yaml": _CM},
     "unsupported fields"),
    ({"kustomization.yaml": _KUST + "resources: [cm.yaml]\npatches: [{path: p.yaml}]\n",
      "cm.yaml": _CM,
      "p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: n}\n"
                "binaryData: [1]\n"},
     "lists in patches"),
    ({"kustomization.yaml": _KUST + "resources: [cm.yaml]\npatches: [{path: p.yaml}]\n",
      "cm.yaml": _CM,
      "p.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: n}\n"},
     "no single target"),
    ({"kustomization.yaml": _KUST + "resources: [cm.yaml, cm2.yaml]\n", "cm.yaml": _CM,
      "cm2.yaml": _CM}, "duplicate objects"),
    ({"kustomization.yaml": _KUST + "resources: [missing.yaml]\n"}, "does not exist"),
])
def test_resolver_refuses_what_it_does_not_reproduce(tmp_path: Path, files: dict[str, str],
                                                     error: str) -> None:
    _write(tmp_path, files)
    with pytest.raises(KustomizeError, match=error):
        kustomize_build(tmp_path)


# --------------------------------------------------------------------------------------
# Schema checks of the core kinds

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # IANA_SVC_NAME
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}
_API_VERSIONS = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "Service": "v1",
                 "ServiceAccount": "v1", "ConfigMap": "v1", "Namespace": "v1",
                 "Role": "rbac.authorization.k8s.io/v1",
                 "RoleBinding": "rbac.authorization.k8s.io/v1",
                 "InferencePool": "inference.networking.k8s.io/v1",
                 "Gateway": "gateway.networking.k8s.io/v1",
                 "HTTPRoute": "gateway.networking.k8s.io/v1",
                 "ServiceMonitor": "monitoring.coreos.com/v1"}


def quantity(text: str | float) -> float:
    m = _QUANTITY.match(str(text))
    assert m, f"not a quantity: {text!r}"
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def _check_port_number(value: Any, where: str, errors: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        errors.append(f"{where}: {value!r} is not a port number (an int in 1..65535)")


def _check_probe(probe: dict[str, Any], container: dict[str, Any], where: str,
                 errors: list[str]) -> None:
    ports = container_ports(container)
    handlers = [h for h in ("httpGet", "tcpSocket", "grpc", "exec") if h in probe]
    if len(handlers) != 1:
        errors.append(f"{where}: needs exactly one handler, has {handlers}")
        return
    handler = handlers[0]
    if handler == "exec":
        return
    port = probe[handler]["port"]
    if handler == "grpc":
        _check_port_number(port, f"{where}.grpc.port", errors)
    if isinstance(port, str):
        if port not in ports:
            errors.append(f"{where}: named port {port!r} is not a port of the container")
    elif port not in ports.values():
        errors.append(f"{where}: port {port} is not a port of the container")


def _check_container(c: dict[str, Any], pod: dict[str, Any], where: str,
                     errors: list[str]) -> None:
    where = f"{where}.containers[{c.get('name')}]"
    if not c.get("name") or not _DNS_LABEL.match(c["name"]):
        errors.append(f"{where}: bad name")
    image = c.get("image", "")
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        errors.append(f"{where}: image {image!r} must have a pinned tag")
    if c.get("imagePullPolicy", "IfNotPresent") not in ("Always", "IfNotPresent", "Never"):
        errors.append(f"{where}: bad imagePullPolicy")
    seen: set[Any] = set()
    for p in c.get("ports", []):
        _check_port_number(p.get("containerPort"), f"{where}.ports", errors)
        if "name" in p and (not _PORT_NAME.match(p["name"]) or len(p["name"]) > 15):
            errors.append(f"{where}: port name {p['name']!r} is not an IANA service name")
        if p.get("protocol", "TCP") not in ("TCP", "UDP", "SCTP"):
            errors.append(f"{where}: bad protocol")
        for key in (p.get("name"), p.get("containerPort")):
            if key is not None and key in seen:
                errors.append(f"{where}: duplicate port {key}")
            seen.add(key)
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        if kind in c:
            _check_probe(c[kind], c, f"{where}.{kind}", errors)
    names = [e["name"] for e in c.get("env", [])]
    if len(names) != len(set(names)):
        errors.append(f"{where}: duplicate env names")
    for e in c.get("env", []):
        if ("value" in e) == ("valueFrom" in e):
            errors.append(f"{where}: env {e['name']} needs exactly one of value/valueFrom")
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            errors.append(f"{where}: mounts undefined volume {m['name']!r}")
        if not str(m.get("mountPath", "")).startswith("/"):
            errors.append(f"{where}: mountPath must be absolute")
    resources = c.get("resources", {})
    if not resources.get("requests"):
        errors.append(f"{where}: no resource requests")
    for name, limit in (resources.get("limits") or {}).items():
        request = (resources.get("requests") or {}).get(name)
        if request is not None and quantity(request) > quantity(limit):
            errors.append(f"{where}: {name} request {request} exceeds limit {limit}")
        if "/" in name and request is not None and quantity(request) != quantity(limit):
            errors.append(f"{where}: extended resource {name} needs request == limit")


def _check_workload(w: dict[str, Any], m: Manifests, errors: list[str]) -> None:
    where = f"{w['kind']}/{w['metadata']['name']}"
    spec = w.get("spec", {})
    selector = spec.get("selector", {}).get("matchLabels")
    if not selector:
        errors.append(f"{where}: spec.selector.matchLabels is required")
    elif not labels_match(selector, template_labels(w)):
        errors.append(f"{where}: selector does not match the pod template labels")
    if not isinstance(spec.get("replicas", 1), int) or spec.get("replicas", 1) < 1:
        errors.append(f"{where}: replicas must be an int >= 1")
    pod = pod_spec(w)
    if not pod.get("containers"):
        errors.append(f"{where}: no containers")
    all_containers = pod.get("containers", []) + pod.get("initContainers", [])
    names = [c.get("name") for c in all_containers]
    if len(names) != len(set(names)):
        errors.append(f"{where}: duplicate container names")
    for c in all_containers:
        _check_container(c, pod, where, errors)
    for v in pod.get("volumes", []):
        if "configMap" in v and m.find("ConfigMap", v["configMap"]["name"]) is None:
            errors.append(f"{where}: volume {v['name']} uses a missing ConfigMap")
    account = pod.get("serviceAccountName")
    if account and m.find("ServiceAccount", account) is None:
        errors.append(f"{where}: serviceAccountName {account!r} does not exist")
    for other in m.workloads():
        if other is not w and labels_match(selector or {}, template_labels(other)):
            errors.append(f"{where}: selector also matches {other['metadata']['name']}'s pods")


def _check_service(s: dict[str, Any], m: Manifests, errors: list[str]) -> None:
    where = f"Service/{s['metadata']['name']}"
    selector = s.get("spec", {}).get("selector") or {}
    pods = [pod_spec(w) for w in m.workloads() if labels_match(selector, template_labels(w))]
    if not selector or not pods:
        errors.append(f"{where}: selector selects no pod template")
    ports = s.get("spec", {}).get("ports", [])
    if not ports:
        errors.append(f"{where}: no ports")
    names = [p.get("name") for p in ports]
    if len(ports) > 1 and (None in names or len(set(names)) != len(names)):
        errors.append(f"{where}: several ports need unique names")
    for p in ports:
        _check_port_number(p.get("port"), f"{where}.ports[{p.get('name')}]", errors)
        target = p.get("targetPort", p.get("port"))
        for pod in pods:
            known = {n for c in serving_containers(pod) for n in container_ports(c)}
            if isinstance(target, str) and target not in known:
                errors.append(f"{where}: targetPort {target!r} is not a named port of its pods")
            if isinstance(target, int) and target not in pod_port_numbers(pod):
                errors.append(f"{where}: targetPort {target} is not a port of its pods")


def _check_rbac(m: Manifests, errors: list[str]) -> None:
    for role in m.of_kind("Role"):
        for i, rule in enumerate(role.get("rules", [])):
            for key in ("apiGroups", "resources", "verbs"):
                if not isinstance(rule.get(key), list) or not rule[key]:
                    errors.append(f"Role/{role['metadata']['name']}.rules[{i}].{key}: a list")
    for rb in m.of_kind("RoleBinding"):
        where = f"RoleBinding/{rb['metadata']['name']}"
        ref = rb.get("roleRef", {})
        if ref.get("apiGroup") != "rbac.authorization.k8s.io" or ref.get("kind") != "Role":
            errors.append(f"{where}: roleRef must be an rbac.authorization.k8s.io Role")
        elif m.find("Role", ref.get("name", "")) is None:
            errors.append(f"{where}: Role {ref.get('name')!r} does not exist")
        for subject in rb.get("subjects", []):
            if subject.get("kind") != "ServiceAccount":
                continue
            sa = m.find("ServiceAccount", subject["name"])
            if sa is None or subject.get("namespace") != sa["metadata"].get("namespace"):
                errors.append(f"{where}: subject {subject} is not one of the ServiceAccounts")


def schema_errors(m: Manifests) -> list[str]:
    errors: list[str] = []
    for obj in m.objects:
        kind, name = obj.get("kind", ""), obj["metadata"].get("name", "")
        if kind in _API_VERSIONS and obj.get("apiVersion") != _API_VERSIONS[kind]:
            errors.append(f"{kind}/{name}: apiVersion must be {_API_VERSIONS[kind]}")
        if not _DNS_LABEL.match(name):
            errors.append(f"{kind}/{name}: name is not a DNS label")
        if kind != "Namespace" and obj["metadata"].get("namespace") != NAMESPACE:
            errors.append(f"{kind}/{name}: namespace must be {NAMESPACE}")
        if kind == "ConfigMap":
            for key, value in (obj.get("data") or {}).items():
                if not isinstance(value, str):
                    errors.append(f"ConfigMap/{name}: data.{key} must be a string")
    namespaces = {n["metadata"]["name"] for n in m.of_kind("Namespace")}
    if namespaces != {NAMESPACE}:
        errors.append(f"expected one Namespace {NAMESPACE}, found {sorted(namespaces)}")
    for w in m.workloads():
        _check_workload(w, m, errors)
    for s in m.of_kind("Service"):
        _check_service(s, m, errors)
    _check_rbac(m, errors)
    return errors


def test_overlay_objects_pass_schema_checks(overlay: tuple[str, Manifests]) -> None:
    _, m = overlay
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
            "Service", "InferencePool", "Gateway", "HTTPRoute"} <= {o["kind"] for o in m.objects}
    assert schema_errors(m) == []


# Fields of the custom resources we write (GIE InferencePool v1, Gateway API v1,
# Prometheus Operator v1): a misspelt field would be pruned or rejected by the API server.
_CRD_FIELDS: dict[str, dict[str, set[str]]] = {
    "InferencePool": {"spec": {"selector", "targetPorts", "endpointPickerRef", "appProtocol"},
                      "spec.endpointPickerRef": {"group", "kind", "name", "port",
                                                 "failureMode"},
                      "spec.selector": {"matchLabels"}},
    "Gateway": {"spec": {"gatewayClassName", "listeners", "addresses", "infrastructure"}},
    "HTTPRoute": {"spec": {"parentRefs", "hostnames", "rules"}},
    "ServiceMonitor": {"spec": {"selector", "namespaceSelector", "endpoints", "jobLabel",
                                "targetLabels", "podTargetLabels", "sampleLimit"}},
}
_ROUTE_RULE_FIELDS = {"name", "matches", "filters", "backendRefs", "timeouts"}


def _at(obj: dict[str, Any], path: str) -> dict[str, Any]:
    for key in path.split("."):
        obj = obj[key]
    return obj


def test_custom_resources_use_only_their_fields() -> None:
    objects = [o for name in OVERLAYS for o in build_overlay(name).objects]
    objects += kustomize_build(KUSTOMIZE / "base/prometheus")
    seen = set()
    for obj in objects:
        for path, allowed in _CRD_FIELDS.get(obj["kind"], {}).items():
            assert set(_at(obj, path)) <= allowed, f"{obj['kind']}.{path}: unknown fields"
            seen.add(obj["kind"])
        if obj["kind"] == "InferencePool":
            ref = obj["spec"]["endpointPickerRef"]
            assert isinstance(ref["port"]["number"], int)  # required for kind Service
            assert ref.get("failureMode", "FailClose") in ("FailOpen", "FailClose")
            assert obj["spec"].get("appProtocol", "http") in ("http", "kubernetes.io/h2c")
            ports = [p["number"] for p in obj["spec"]["targetPorts"]]
            assert len(ports) == len(set(ports)) and all(set(p) == {"number"}
                                                         for p in obj["spec"]["targetPorts"])
        if obj["kind"] == "HTTPRoute":
            for rule in obj["spec"]["rules"]:
                assert set(rule) <= _ROUTE_RULE_FIELDS
        if obj["kind"] == "Gateway":
            for listener in obj["spec"]["listeners"]:
                assert listener["protocol"] in ("HTTP", "HTTPS")
                errors: list[str] = []
                _check_port_number(listener["port"], "listener", errors)
                assert not errors
    assert seen == set(_CRD_FIELDS)


def test_schema_checks_catch_broken_objects() -> None:
    m = build_overlay("sim")
    epp = m.get("Deployment", EPP_DEPLOYMENT)
    container = pod_spec(epp)["containers"][0]
    epp["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9002"
    epp["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = 9999
    epp["spec"]["template"]["spec"]["serviceAccountName"] = "nobody"
    m.get("RoleBinding", "epp")["subjects"][0]["namespace"] = "default"
    errors = "\n".join(schema_errors(m))
    assert "'9002' is not a port number" in errors
    assert "readinessProbe: port 9999 is not a port of the container" in errors
    assert "serviceAccountName 'nobody' does not exist" in errors
    assert "is not one of the ServiceAccounts" in errors
    assert container["name"] == "epp"


# --------------------------------------------------------------------------------------
# The EPP Deployment, its flags and its config


def parse_epp_args(args: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """Parse with the real `epp` parser; flags in PENDING_EPP_FLAGS may still be unknown."""
    try:
        return epp_cli.parse_args(args)
    except SystemExit:
        err = capsys.readouterr().err
    m = re.search(r"unrecognized arguments: (.*)", err)
    assert m, f"epp rejects its Deployment args: {err}"
    unknown = {a.split("=", 1)[0] for a in m.group(1).split() if a.startswith("--")}
    assert unknown <= PENDING_EPP_FLAGS, f"unknown epp flags: {sorted(unknown)}"
    return epp_cli.parse_args([a for a in args if a.split("=", 1)[0] not in unknown])


def test_epp_deployment_flags_match_ports_probes_and_pool(
        overlay: tuple[str, Manifests], capsys: pytest.CaptureFixture[str]) -> None:
    _, m = overlay
    epp = m.get("Deployment", EPP_DEPLOYMENT)
    container = epp_container(epp)
    args = expanded_args(epp, container)
    parsed = parse_epp_args(args, capsys)
    epp_cli.settings_from_args(parsed)  # the EPP's own start-up validation of the flags
    ports = container_ports(container)
    assert ports == {"grpc-ext-proc": parsed.grpc_port, "grpc-health": parsed.grpc_health_port,
                     "metrics": parsed.metrics_port}
    assert (parsed.grpc_port, parsed.grpc_health_port, parsed.metrics_port) == (9002, 9003, 9090)
    assert parsed.pool_name == m.pool()["metadata"]["name"]
    assert flag_value(args, "--pool-namespace") == m.pool()["metadata"]["namespace"]
    assert parsed.endpoints_file is None  # Kubernetes discovery, not a static file
    for kind, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        grpc = container[kind]["grpc"]
        assert (grpc["port"], grpc["service"]) == (parsed.grpc_health_port, service)
    grace = float(flag_value(args, "--shutdown-grace-seconds") or parsed.shutdown_grace_seconds)
    assert pod_spec(epp)["terminationGracePeriodSeconds"] > grace


def test_epp_runs_non_root_read_only_as_the_image_user(overlay: tuple[str, Manifests]) -> None:
    _, m = overlay
    uid = dockerfile_user_id()
    epp_image_pods = [w for w in m.workloads()
                      if any(c["image"] == EPP_IMAGE for c in pod_spec(w)["containers"])]
    assert m.get("Deployment", EPP_DEPLOYMENT) in epp_image_pods
    for w in epp_image_pods:
        pod = pod_spec(w)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            mounts = {v["mountPath"] for v in c.get("volumeMounts", [])}
            assert "/tmp" in mounts  # the only writable path
            cache = dockerfile_env("runtime")["EPP_CACHE_DIR"]
            assert not any(cache.startswith(p.rstrip("/") + "/") or cache == p for p in mounts), (
                "a volume would hide the tokenizer files generated into the image")


def test_epp_service_exposes_the_three_ports(overlay: tuple[str, Manifests]) -> None:
    _, m = overlay
    service = m.get("Service", "epp")
    epp = m.get("Deployment", EPP_DEPLOYMENT)
    assert labels_match(service["spec"]["selector"], template_labels(epp))
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["port"] for p in ports.values()} == {9002, 9003, 9090}
    assert ports["grpc-ext-proc"]["appProtocol"] in ("http2", "grpc", "kubernetes.io/h2c")
    container = container_ports(epp_container(epp))
    for p in ports.values():
        assert container[p["targetPort"]] == p["port"]


def test_rbac_grants_exactly_what_the_epp_watches(overlay: tuple[str, Manifests]) -> None:
    _, m = overlay
    account = pod_spec(m.get("Deployment", EPP_DEPLOYMENT))["serviceAccountName"]
    bindings = [rb for rb in m.of_kind("RoleBinding")
                if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
                in rb["subjects"]]
    assert len(bindings) == 1, f"ServiceAccount {account} should have one RoleBinding"
    role = m.get("Role", bindings[0]["roleRef"]["name"])
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    assert grants == {
        ("", "pods"): {"get", "list", "watch"},
        ("inference.networking.k8s.io", "inferencepools"): {"get", "list", "watch"},
        ("inference.networking.x-k8s.io", "inferenceobjectives"): {"get", "list", "watch"},
        ("inference.networking.x-k8s.io", "inferencemodelrewrites"): {"get", "list", "watch"},
        ("llm-d.ai", "inferenceobjectives"): {"get", "list", "watch"},
        ("llm-d.ai", "inferencemodelrewrites"): {"get", "list", "watch"},
    }
    assert not m.of_kind("ClusterRole") and not m.of_kind("ClusterRoleBinding")


def test_epp_config_compiles(overlay: tuple[str, Manifests]) -> None:
    name, m = overlay
    compiled = load_picker_config(m.epp_config_text(), source=f"overlays/{name} epp-config")
    config = m.epp_config()
    types = {p["type"] for p in config["plugins"]}
    if name == "pd":
        assert set(compiled.scheduler.profiles) == {"decode", "prefill"}
        assert {"pd-profile-handler", "prefill-header-handler", "prefill-filter",
                "decode-filter"} <= types
    else:
        assert set(compiled.scheduler.profiles) == {"default"}
    assert PRECISE in types


def test_base_epp_config_compiles() -> None:
    m = Manifests(kustomize_build(KUSTOMIZE / "base/epp"))
    compiled = load_picker_config(m.epp_config_text(), source="base epp-config")
    assert set(compiled.scheduler.profiles) == {"default"}


def test_sim_config_tokenizes_like_the_sims() -> None:
    m = build_overlay("sim")
    params = (plugin(m.epp_config(), PRECISE) or {})["parameters"]
    assert params["tokenizer"] == {"mode": "local", "source": "qwen3.6"}
    for w in m.pool_workloads():
        for c in pod_spec(w)["containers"]:
            assert flag_value(c["args"], "--tokenizer") == "qwen"  # the same vocabulary


# --------------------------------------------------------------------------------------
# InferencePool, Gateway, HTTPRoute


def test_inferencepool_selects_exactly_the_model_servers(overlay: tuple[str, Manifests]) -> None:
    name, m = overlay
    pool = m.pool()
    assert pool["spec"]["selector"]["matchLabels"], "empty selector"
    selected = m.pool_workloads()
    others = [w for w in m.workloads() if w not in selected]
    assert selected, "the InferencePool selects no pods"
    assert [w["metadata"]["name"] for w in others] == [EPP_DEPLOYMENT]
    assert all(GPU not in json.dumps(w) for w in selected) == (name == "sim")
    for w in selected:
        if name != "sim":
            limits = [c.get("resources", {}).get("limits", {}) for c in pod_spec(w)["containers"]]
            assert any(GPU in lim for lim in limits), f"{w['metadata']['name']} has no GPU"


def test_inferencepool_target_ports_are_served(overlay: tuple[str, Manifests]) -> None:
    _, m = overlay
    targets = [p["number"] for p in m.pool()["spec"]["targetPorts"]]
    assert 1 <= len(targets) <= 8
    for w in m.pool_workloads():
        for port in targets:
            assert port in pod_port_numbers(pod_spec(w)), (
                f"{w['metadata']['name']} does not listen on target port {port}")


def test_endpoint_picker_ref_reaches_the_epp_ext_proc_port(
        overlay: tuple[str, Manifests], capsys: pytest.CaptureFixture[str]) -> None:
    _, m = overlay
    ref = m.pool()["spec"]["endpointPickerRef"]
    assert ref.get("group", "") == "" and ref.get("kind", "Service") == "Service"
    assert ref["failureMode"] == "FailClose"
    service = m.get("Service", ref["name"])
    port = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    epp = m.get("Deployment", EPP_DEPLOYMENT)
    assert labels_match(service["spec"]["selector"], template_labels(epp))
    container = epp_container(epp)
    parsed = parse_epp_args(expanded_args(epp, container), capsys)
    assert container_ports(container)[port["targetPort"]] == parsed.grpc_port


def test_httproute_sends_gateway_traffic_to_the_pool(overlay: tuple[str, Manifests]) -> None:
    _, m = overlay
    [route] = m.of_kind("HTTPRoute")
    for parent in route["spec"]["parentRefs"]:
        assert parent.get("group", "gateway.networking.k8s.io") == "gateway.networking.k8s.io"
        assert parent.get("kind", "Gateway") == "Gateway"
        gateway = m.get("Gateway", parent["name"])
        assert gateway["spec"]["gatewayClassName"] == "kgateway"
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends
    for b in backends:
        assert (b["group"], b["kind"]) == ("inference.networking.k8s.io", "InferencePool")
        assert "port" not in b  # the pool's targetPorts decide
        assert m.find("InferencePool", b["name"]) is m.pool()


# --------------------------------------------------------------------------------------
# KV events: what the pods publish must be what the EPP subscribes to


def _kv_settings(m: Manifests) -> tuple[int, int]:
    params = (plugin(m.epp_config(), PRECISE) or {}).get("parameters") or {}
    kv = params.get("kvEvents") or {}
    return int(kv["port"]), int(kv["port"]) + int(kv["replayPortOffset"])


def served_model_annotation(workload: dict[str, Any]) -> str | None:
    """The model a pod declares to the EPP's Kubernetes discovery (``llm-d.ai/model``)."""
    annotations = workload["spec"]["template"]["metadata"].get("annotations") or {}
    return annotations.get("llm-d.ai/model")


def _model_servers(m: Manifests) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[str]]]:
    for w in m.pool_workloads():
        for c in pod_spec(w)["containers"]:
            yield w, c, expanded_args(w, c)


def test_sim_pods_publish_where_the_epp_subscribes() -> None:
    m = build_overlay("sim")
    port, replay = _kv_settings(m)
    target = m.pool()["spec"]["targetPorts"][0]["number"]
    servers = list(_model_servers(m))
    assert servers
    for w, c, args in servers:
        assert c["command"] == ["epp-sim"]
        parsed = sim_cli.build_parser().parse_args(args)
        config = sim_cli.config_from_args(parsed)  # the sim's own validation
        assert parsed.port == target
        assert parsed.host == "0.0.0.0"
        # epp-sim's topic is kv@<advertise>@<model>: the pool address of the pod.
        assert config.advertise == f"{FAKE_POD_IP}:{target}"
        assert (parsed.kv_events_port, parsed.kv_events_replay_port) == (port, replay)
        assert served_model_annotation(w) == config.served_model_names[0]
        assert {port, replay, target} <= set(container_ports(c).values())
        assert GPU not in json.dumps(c.get("resources", {}))


def _vllm_containers(m: Manifests) -> list[tuple[dict[str, Any], dict[str, Any], list[str]]]:
    return [(w, c, args) for w, c, args in _model_servers(m) if c["image"].startswith("vllm/")]


@pytest.mark.parametrize("name", ["vllm", "pd"])
def test_vllm_pods_publish_kv_events_the_epp_can_attribute(name: str) -> None:
    m = build_overlay(name)
    port, replay = _kv_settings(m)
    target = m.pool()["spec"]["targetPorts"][0]["number"]
    servers = _vllm_containers(m)
    assert len(servers) == len(m.pool_workloads())
    for w, c, args in servers:
        where = f"{w['metadata']['name']}/{c['name']}"
        assert c["command"] == ["vllm", "serve"]
        model = args[0]
        assert not model.startswith("-"), f"{where}: the model is the first argument"
        assert has_flag(args, "--enable-prefix-caching"), where
        assert flag_value(args, "--block-size") == "16", where
        raw = flag_value(args, "--kv-events-config")
        assert raw is not None, f"{where}: no --kv-events-config"
        kv = json.loads(raw)
        assert kv["enable_kv_cache_events"] is True and kv["publisher"] == "zmq"
        assert kv["endpoint"] == f"tcp://*:{port}", f"{where}: PUB must bind the EPP's port"
        assert kv["replay_endpoint"] == f"tcp://*:{replay}", where
        served = flag_value(args, "--served-model-name") or model
        assert served_model_annotation(w) == served, where
        # The topic names the pod by its pool address, whatever port vLLM itself uses.
        assert kv["topic"] == f"kv@{FAKE_POD_IP}:{target}@{served}", where
        env = {e["name"]: e for e in c["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert {port, replay} <= set(container_ports(c).values()), where


def test_vllm_overlay_serves_the_target_port_directly() -> None:
    m = build_overlay("vllm")
    target = m.pool()["spec"]["targetPorts"][0]["number"]
    for _, _, args in _vllm_containers(m):
        assert flag_value(args, "--port") == str(target)
        assert not has_flag(args, "--kv-transfer-config")


def test_pd_pool_has_both_roles_and_decode_sidecars_front_vllm() -> None:
    m = build_overlay("pd")
    target = m.pool()["spec"]["targetPorts"][0]["number"]
    roles: dict[str, list[dict[str, Any]]] = {}
    for w in m.pool_workloads():
        roles.setdefault(template_labels(w).get(ROLE_LABEL, "both"), []).append(w)
    assert set(roles) == {"prefill", "decode"}
    for role, workloads in roles.items():
        for w in workloads:
            pod = pod_spec(w)
            [vllm] = pod["containers"]
            args = expanded_args(w, vllm)
            transfer = json.loads(flag_value(args, "--kv-transfer-config") or "{}")
            assert transfer.get("kv_connector") == "NixlConnector"
            env = {e["name"]: e for e in vllm["env"]}
            assert "VLLM_NIXL_SIDE_CHANNEL_HOST" in env
            nixl = int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"])
            assert nixl in container_ports(vllm).values()
            vllm_port = int(flag_value(args, "--port") or 0)
            if role == "prefill":
                assert vllm_port == target and not pod.get("initContainers")
                continue
            [sidecar] = [c for c in serving_containers(pod) if c is not vllm]
            sargs = sidecar["args"]
            assert "routing-sidecar" in sidecar["image"]
            assert sidecar["restartPolicy"] == "Always"  # a native sidecar
            assert int(flag_value(sargs, "--port") or 0) == target
            assert target in container_ports(sidecar).values()
            assert int(flag_value(sargs, "--vllm-port") or 0) == vllm_port != target
            assert vllm_port in container_ports(vllm).values()
    filters = {p["pluginRef"] for prof in m.epp_config()["schedulingProfiles"]
               for p in prof["plugins"]}
    assert {"prefill-filter", "decode-filter"} <= filters


# --------------------------------------------------------------------------------------
# Prometheus


def test_servicemonitor_scrapes_the_epp_metrics_port() -> None:
    m = Manifests(kustomize_build(KUSTOMIZE / "base/prometheus")
                  + kustomize_build(KUSTOMIZE / "base/epp"))
    [monitor] = m.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [s for s in m.of_kind("Service")
                if labels_match(monitor["spec"]["selector"]["matchLabels"],
                                s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in selected] == ["epp"]
    namespaces = monitor["spec"].get("namespaceSelector", {}).get("matchNames",
                                                                  [NAMESPACE])
    assert selected[0]["metadata"]["namespace"] in namespaces
    ports = {p["name"]: p for p in selected[0]["spec"]["ports"]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports
    epp = m.get("Deployment", EPP_DEPLOYMENT)
    metrics_flag = flag_value(epp_container(epp)["args"], "--metrics-port")
    assert container_ports(epp_container(epp))[ports[endpoint["port"]]["targetPort"]] == int(
        metrics_flag or 0)
    assert endpoint.get("path", "/metrics") == "/metrics"


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def test_plain_prometheus_scrape_config_keeps_the_epp_metrics_endpoints() -> None:
    m = Manifests(kustomize_build(KUSTOMIZE / "base/epp"))
    service = m.get("Service", "epp")
    snippet = yaml.safe_load((KUSTOMIZE / "base/prometheus/prometheus-scrape-config.yaml")
                             .read_text(encoding="utf-8"))
    [job] = snippet["scrape_configs"]
    [sd] = job["kubernetes_sd_configs"]
    assert sd["role"] == "endpoints"
    assert NAMESPACE in sd["namespaces"]["names"]
    meta = {f"__meta_kubernetes_service_label_{_sanitize(k)}": v
            for k, v in service["metadata"]["labels"].items()}
    port_names = {p["name"] for p in service["spec"]["ports"]}
    keeps = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keeps
    for rule in keeps:
        [source] = rule["source_labels"]
        if source == "__meta_kubernetes_endpoint_port_name":
            assert rule["regex"] in port_names and rule["regex"] == "metrics"
        else:
            assert re.fullmatch(rule["regex"], meta[source]), rule
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"pod", "namespace"} <= targets  # the dashboard filters on pod


def test_plain_prometheus_scrape_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    done = subprocess.run([promtool, "check", "config", "--syntax-only",
                           str(KUSTOMIZE / "base/prometheus/prometheus-scrape-config.yaml")],
                          capture_output=True, text=True, timeout=60, check=False)
    if "kubernetes_sd_configs not found" in done.stdout + done.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery")
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------------------
# Grafana

DASHBOARD = DEPLOY / "grafana/epp-dashboard.json"
_PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "rate", "irate", "increase",
                 "histogram_quantile", "by", "without", "on", "ignoring", "group_left",
                 "group_right", "and", "or", "unless", "clamp_min", "clamp_max", "topk",
                 "bottomk", "abs", "vector", "scalar", "time", "offset", "bool"}


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (label matchers, ranges, strings, grouping
    clauses, functions and numbers removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return words - _PROMQL_WORDS


def test_metric_name_extraction() -> None:
    assert metric_names('histogram_quantile(0.9, sum by (le, x) (rate(a_bucket{p=~"$p"}'
                        '[$__rate_interval]))) / sum(b_total{y="c d"})') == {"a_bucket",
                                                                              "b_total"}


def test_dashboard_structure_and_datasource_variable() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(dash):
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h"))
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["title"] and p["targets"], p.get("title")
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"
    # Every $var an expression uses is defined.
    used = {m for e in _exprs(dash) for m in re.findall(r"\$(\w+)", e)}
    assert used - {"__rate_interval"} <= set(variables)


def test_dashboard_uses_only_epp_series_and_covers_them() -> None:
    dash = _dashboard()
    used: set[str] = set()
    for expr in _exprs(dash):
        names = metric_names(expr)
        assert names, f"no series in {expr!r}"
        assert names <= EPP_SERIES, f"unknown series {sorted(names - EPP_SERIES)} in {expr!r}"
        used |= names
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["query"]["query"])
            assert m and m.group(1) in EPP_SERIES, v["query"]
    assert used == EPP_SERIES, f"series without a panel: {sorted(EPP_SERIES - used)}"


def test_dashboard_quantiles_are_over_buckets_by_le() -> None:
    exprs = [e for e in _exprs(_dashboard()) if "histogram_quantile" in e]
    assert len(exprs) >= 8
    for e in exprs:
        assert re.search(r"histogram_quantile\(0\.\d+, sum by \(le\b", e), e
        assert "_bucket{" in e and "[$__rate_interval]" in e, e
    for e in _exprs(_dashboard()):
        if "_total" in e:
            assert "rate(" in e, f"a counter plotted raw: {e}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    substitutions = {"$__rate_interval": "1m", "$epp_pod": ".*", "$model": ".*", "$pool": ".*"}
    rules = []
    for i, expr in enumerate(_exprs(_dashboard())):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:expr:{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}),
                    encoding="utf-8")
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------------------
# Dockerfile and .dockerignore

DOCKERFILE = ROOT / "Dockerfile"  # at the top level, where `docker build .` finds it
EPP_IMAGE = "epp:dev"


def dockerfile_stages() -> list[dict[str, Any]]:
    """[{name, base, instructions: [(INSTRUCTION, text)]}] with ARG defaults substituted
    in FROM lines."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif instruction == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], m.group(1))
            stages.append({"name": m.group(2), "base": base, "instructions": []})
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1]["instructions"].append((instruction, rest.strip()))
    return stages


def _stage(name: str) -> dict[str, Any]:
    return next(s for s in dockerfile_stages() if s["name"] == name)


def _chain(stage: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage and the stages it is built FROM, nearest first."""
    names = {s["name"]: s for s in dockerfile_stages()}
    chain = [stage]
    while chain[-1]["base"] in names:
        chain.append(names[chain[-1]["base"]])
    return chain


def _effective(stage: dict[str, Any], instruction: str) -> str | None:
    for s in _chain(stage):
        values = [rest for ins, rest in s["instructions"] if ins == instruction]
        if values:
            return str(values[-1])
    return None


def dockerfile_env(stage_name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for s in reversed(_chain(_stage(stage_name))):
        for ins, rest in s["instructions"]:
            if ins == "ENV":
                for key, value in re.findall(r"(\w+)=(\S+)", rest):
                    env[key] = value
    return env


def dockerfile_user_id() -> int:
    user = _effective(dockerfile_stages()[-1], "USER")
    assert user, "the image runs as root (no USER)"
    uid = user.split(":")[0]
    assert uid.isdigit(), "USER should be numeric so runAsNonRoot can verify it"
    return int(uid)


def test_dockerfile_default_target_runs_epp_as_non_root_with_three_ports() -> None:
    stages = dockerfile_stages()
    final = stages[-1]  # what `docker build` without --target produces
    assert json.loads(_effective(final, "ENTRYPOINT") or "null") == ["epp"]
    exposed = {int(p) for ins, rest in final["instructions"] if ins == "EXPOSE"
               for p in rest.split()}
    assert exposed == {9002, 9003, 9090}
    assert dockerfile_user_id() != 0
    assert _chain(final)[-1]["base"].startswith("python:3.11-slim")
    assert len(stages) >= 3  # multi-stage: a build stage the runtime copies from


def test_dockerfile_has_an_epp_sim_target_from_the_same_runtime() -> None:
    sims = [s for s in dockerfile_stages()
            if json.loads(_effective(s, "ENTRYPOINT") or "null") == ["epp-sim"]]
    assert len(sims) == 1
    final = dockerfile_stages()[-1]
    assert _effective(sims[0], "USER") == _effective(final, "USER")
    assert _chain(sims[0])[1]["name"] == _chain(final)[1]["name"]


def test_dockerfile_builds_a_wheel_into_a_venv_and_pregenerates_the_tokenizer() -> None:
    stages = dockerfile_stages()
    build = next(s for s in stages
                 if any("ensure_qwen_tokenizer()" in r for i, r in s["instructions"] if i == "RUN"))
    runs = " ".join(r for i, r in build["instructions"] if i == "RUN")
    assert "pip wheel" in runs and "venv /opt/venv" in runs
    cache = dockerfile_env(build["name"])["EPP_CACHE_DIR"]
    runtime_env = dockerfile_env("runtime")
    assert runtime_env["EPP_CACHE_DIR"] == cache  # the path the generated files are at
    assert "/opt/venv/bin" in runtime_env["PATH"]
    copies = [r for i, r in _stage("runtime")["instructions"] if i == "COPY"]
    assert f"--from={build['name']} /opt/venv /opt/venv" in copies
    assert f"--from={build['name']} {cache} {cache}" in copies


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def dockerignored(path: str) -> bool:
    """Whether .dockerignore excludes a context path (a directory excludes its content)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in _dockerignore_patterns():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_existing_files_the_context_keeps() -> None:
    sources: list[str] = []
    for stage in dockerfile_stages():
        for ins, rest in stage["instructions"]:
            if ins == "COPY" and not rest.startswith("--from"):
                sources.extend(rest.split()[:-1])
    assert {"pyproject.toml", "README.md", "epp"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not dockerignored(source), f"COPY {source} is excluded by .dockerignore"
    assert not dockerignored("epp/tokenization/qwen.py")
    for heavy in (".venv", ".venv-vllm", ".git", "epp/__pycache__", "tests"):
        assert dockerignored(heavy), f"{heavy} is sent to the docker daemon"


def test_manifests_run_the_image_the_kind_script_builds() -> None:
    up = (DEPLOY / "kind/up.sh").read_text(encoding="utf-8")
    assert re.search(r'IMAGE="\$\{IMAGE:-' + re.escape(EPP_IMAGE) + r'\}"', up)
    m = build_overlay("sim")
    images = {c["image"] for w in m.workloads() for c in pod_spec(w)["containers"]}
    assert images == {EPP_IMAGE}
    epp_ports = set(container_ports(epp_container(m.get("Deployment", EPP_DEPLOYMENT))).values())
    exposed = {int(p) for ins, rest in dockerfile_stages()[-1]["instructions"]
               if ins == "EXPOSE" for p in rest.split()}
    assert epp_ports == exposed


# --------------------------------------------------------------------------------------
# kind scripts

SCRIPTS = [DEPLOY / "kind/up.sh", DEPLOY / "kind/down.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_kind_script_parses_and_is_strict(script: Path) -> None:
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_kind_script_is_shellcheck_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_up_script_pins_versions_and_matches_the_manifests() -> None:
    up = (DEPLOY / "kind/up.sh").read_text(encoding="utf-8")
    for var in ("GATEWAY_API_VERSION", "GIE_VERSION", "KGATEWAY_VERSION"):
        assert re.search(var + r'="\$\{' + var + r':-v\d+\.\d+\.\d+\}"', up), f"{var} unpinned"
    assert "inferenceExtension.enabled=true" in up
    assert "deploy/kustomize/overlays/sim" in up
    m = build_overlay("sim")
    namespace = re.search(r"^NAMESPACE=(\S+)$", up, re.MULTILINE)
    gateway = re.search(r"^GATEWAY=(\S+)$", up, re.MULTILINE)
    assert namespace and namespace.group(1) == NAMESPACE
    assert gateway and m.find("Gateway", gateway.group(1)) is not None
    for deployment in re.findall(r"deployment/([a-z0-9-]+)", up):
        assert m.find("Deployment", deployment) is not None, deployment
    model = next(flag_value(c["args"], "--model") for w in m.pool_workloads()
                 for c in pod_spec(w)["containers"])
    assert f'"model": "{model}"' in up  # the printed curl asks for the served model
