#!/usr/bin/env bash
# Installs the snapshot.storage.k8s.io CRDs and the snapshot-controller, as a cluster operator
# would, from the external-snapshotter release the sidecars were built from (its module in the
# Go module cache: the CRDs come with the client module, the controller's manifests with the main
# one). They are cluster add-ons, not part of deploy/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${ROOK_RBD_CACHE:-$HOME/.cache/rook-rbd}
VERSION=v8.7.0
k() { "$HERE/cluster.sh" kubectl "$@"; }
moddir() {
  GOMODCACHE=$CACHE/go/mod GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$1" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'
}
main=$(moddir "github.com/kubernetes-csi/external-snapshotter/v8@$VERSION")
client=$(moddir "github.com/kubernetes-csi/external-snapshotter/client/v8@$VERSION")
for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
  k apply -f "$client/config/crd/snapshot.storage.k8s.io_$crd.yaml" >/dev/null
done
k wait --for=condition=Established --timeout=60s \
  crd/volumesnapshotclasses.snapshot.storage.k8s.io crd/volumesnapshotcontents.snapshot.storage.k8s.io \
  crd/volumesnapshots.snapshot.storage.k8s.io >/dev/null
# The release's manifests name the release's image; ours is tagged the same and never pulled.
for f in rbac-snapshot-controller.yaml setup-snapshot-controller.yaml; do
  sed -e 's/imagePullPolicy: .*/imagePullPolicy: Never/' \
    -e "s#image: registry.k8s.io/sig-storage/snapshot-controller:.*#image: registry.k8s.io/sig-storage/snapshot-controller:$VERSION#" \
    "$main/deploy/kubernetes/snapshot-controller/$f" | k apply -f - >/dev/null
done
k -n kube-system rollout status deployment/snapshot-controller --timeout=180s >/dev/null
echo "snapshot CRDs and snapshot-controller $VERSION ready"
