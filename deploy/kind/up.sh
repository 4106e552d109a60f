#!/usr/bin/env bash
# Bring up a kind cluster with kgateway, the Gateway API and Inference Extension CRDs, and
# the sim overlay (the EPP and three simulated vLLM pods), then print a curl to try.
# Re-running it reuses the cluster and upgrades in place (rebuilds and reloads the image).
#
# Needs: docker, kind, kubectl, helm. Versions can be overridden from the environment.
set -euo pipefail

CLUSTER_NAME="${CLUSTER_NAME:-epp}"
IMAGE="${IMAGE:-epp:dev}"
LOCAL_PORT="${LOCAL_PORT:-8080}"
GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-v1.4.1}"
# GIE v1.5.0 is the newest Inference Extension release with published manifests; it is
# built against Gateway API v1.4/v1.5 (not v1.6). kgateway 2.1.x is the last line whose
# Envoy data plane serves InferencePools (2.2 moved them to the agentgateway data plane),
# and it dials the picker over TLS on 9002, as our EPP serves by default.
GIE_VERSION="${GIE_VERSION:-v1.5.0}"
KGATEWAY_VERSION="${KGATEWAY_VERSION:-v2.1.1}"
# Fixed by the manifests (deploy/kustomize/base).
NAMESPACE=llm-inference
GATEWAY=inference-gateway

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)"
OVERLAY="${ROOT}/deploy/kustomize/overlays/sim"
CONTEXT="kind-${CLUSTER_NAME}"

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'up.sh: error: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not on PATH (install it: $2)"; }
k() { kubectl --context "${CONTEXT}" "$@"; }

need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"
docker info >/dev/null 2>&1 || die "cannot talk to the docker daemon"

log "kind cluster ${CLUSTER_NAME}"
if kind get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"; then
  echo "already exists: reusing it"
else
  kind create cluster --name "${CLUSTER_NAME}" --wait 120s
fi

log "Gateway API CRDs ${GATEWAY_API_VERSION}"
k apply --server-side --force-conflicts -f \
  "https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml"

log "Gateway API Inference Extension CRDs ${GIE_VERSION} (InferencePool, InferenceObjective)"
k apply --server-side --force-conflicts -f \
  "https://github.com/kubernetes-sigs/gateway-api-inference-extension/releases/download/${GIE_VERSION}/manifests.yaml"

log "kgateway ${KGATEWAY_VERSION} with the inference extension"
helm upgrade --install --kube-context "${CONTEXT}" --create-namespace --namespace kgateway-system \
  --version "${KGATEWAY_VERSION}" kgateway-crds oci://cr.kgateway.dev/kgateway-dev/charts/kgateway-crds
helm upgrade --install --kube-context "${CONTEXT}" --namespace kgateway-system \
  --version "${KGATEWAY_VERSION}" kgateway oci://cr.kgateway.dev/kgateway-dev/charts/kgateway \
  --set inferenceExtension.enabled=true --wait --timeout 5m

log "image ${IMAGE} (Dockerfile; the first build downloads the dependencies)"
docker build -f "${ROOT}/Dockerfile" -t "${IMAGE}" "${ROOT}"
kind load docker-image "${IMAGE}" --name "${CLUSTER_NAME}"

log "sim overlay into namespace ${NAMESPACE}"
existed=false
if k -n "${NAMESPACE}" get deployment epp >/dev/null 2>&1; then existed=true; fi
k apply -k "${OVERLAY}"
if [[ "${existed}" == true ]]; then
  # Same tag, new image: restart so the pods run what was just loaded.
  k -n "${NAMESPACE}" rollout restart deployment/epp deployment/epp-sim
fi
k -n "${NAMESPACE}" rollout status deployment/epp-sim --timeout=180s
k -n "${NAMESPACE}" rollout status deployment/epp --timeout=180s

log "gateway ${GATEWAY}"
k -n "${NAMESPACE}" wait --for=condition=Accepted "gateway/${GATEWAY}" --timeout=120s
# kgateway creates the proxy Deployment (named after the Gateway) once it accepts it.
for _ in $(seq 1 60); do
  if k -n "${NAMESPACE}" get "deployment/${GATEWAY}" >/dev/null 2>&1; then break; fi
  sleep 2
done
k -n "${NAMESPACE}" rollout status "deployment/${GATEWAY}" --timeout=180s

address="$(k -n "${NAMESPACE}" get "gateway/${GATEWAY}" \
  -o jsonpath='{.status.addresses[0].value}' 2>/dev/null || true)"

body='{"model": "qwen3", "prompt": "Write a haiku about caches.", "max_tokens": 16}'
log "ready"
if [[ -n "${address}" ]]; then
  echo "The gateway has an address (${address}). Try:"
  echo
  echo "  curl -i http://${address}/v1/completions -H 'Content-Type: application/json' -d '${body}'"
else
  echo "The gateway has no external address (kind has no load balancer). In another shell:"
  echo
  echo "  kubectl --context ${CONTEXT} -n ${NAMESPACE} port-forward service/${GATEWAY} ${LOCAL_PORT}:80"
  echo
  echo "then:"
  echo
  echo "  curl -i http://localhost:${LOCAL_PORT}/v1/completions -H 'Content-Type: application/json' -d '${body}'"
fi
echo
echo "The x-sim-endpoint response header names the pod that served the request; repeat the"
echo "same prompt and it stays on the pod that holds its prefix. Tear down: deploy/kind/down.sh"
