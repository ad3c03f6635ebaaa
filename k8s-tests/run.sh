#!/usr/bin/env bash
# `make e2e`: rook-rbd on a real single-node Kubernetes v1.34, end to end.
#   1. the Kubernetes binaries and CSI sidecars (built once into the cache, tools.sh);
#   2. the images, rook-rbd's from the project's Dockerfile (images.sh);
#   3. a cluster in its own network namespace, with a real Ceph inside it (cluster.sh);
#   4. the snapshot CRDs and snapshot-controller (cluster add-ons, not part of deploy/);
#   5. the user's path with `kubectl apply -f deploy/` (user-path.sh);
#   6. the Kubernetes storage e2e suite against our driver (storage-e2e.sh), E2E_SUITE=ci|full|none;
#   7. faults on the real cluster (faults.sh), E2E_FAULTS=0 to skip;
#   8. teardown, and a check that nothing is left behind.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${ROOK_RBD_CACHE:-$HOME/.cache/rook-rbd}
export ROOK_RBD_CACHE=$CACHE
T0=$SECONDS
say() { printf '\n==> [e2e %ss] %s\n' "$((SECONDS - T0))" "$*"; }

say "dependencies"
bash "$HERE/deps.sh"
say "Kubernetes binaries and CSI sidecars (cache: $CACHE/k8s)"
t=$SECONDS
bash "$HERE/tools.sh" build
echo "tools ready in $((SECONDS - t)) s"
say "images"
IMAGES=$CACHE/e2e-images.tar
bash "$HERE/images.sh" "$IMAGES"

cleanup() {
  local rc=$?
  say "teardown"
  if ! bash "$HERE/cluster.sh" down; then
    echo "e2e: something was left behind" >&2
    rc=1
  fi
  rm -f "$IMAGES"
  say "e2e finished in $((SECONDS - T0)) s (exit $rc)"
  exit $rc
}
trap cleanup EXIT
say "cluster"
E2E_IMAGES=$IMAGES bash "$HERE/cluster.sh" up

say "snapshot CRDs and snapshot-controller"
bash "$HERE/snapshot-controller.sh"

say "the user's path"
bash "$HERE/user-path.sh"

case ${E2E_SUITE:-ci} in
  none) say "storage e2e suite: skipped (E2E_SUITE=none)" ;;
  *)
    say "Kubernetes storage e2e suite (${E2E_SUITE:-ci})"
    bash "$HERE/storage-e2e.sh" "${E2E_SUITE:-ci}"
    ;;
esac

if [[ ${E2E_FAULTS:-1} == 1 ]]; then
  say "faults"
  bash "$HERE/faults.sh"
else
  say "faults: skipped (E2E_FAULTS=0)"
fi
