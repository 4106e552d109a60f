#!/usr/bin/env bash
# Delete the kind cluster made by up.sh (and everything in it).
set -euo pipefail

CLUSTER_NAME="${CLUSTER_NAME:-epp}"

command -v kind >/dev/null 2>&1 || { echo "down.sh: error: kind is not on PATH" >&2; exit 1; }

if kind get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"; then
  kind delete cluster --name "${CLUSTER_NAME}"
  echo "deleted kind cluster ${CLUSTER_NAME}"
else
  echo "no kind cluster named ${CLUSTER_NAME}: nothing to do"
fi
