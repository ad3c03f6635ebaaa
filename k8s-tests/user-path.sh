#!/usr/bin/env bash
# The user's path on a real cluster, each step timed: install with `kubectl apply -f deploy/`
# exactly as the README says, then a PVC's whole life: data that outlives its pod, online
# expansion, a snapshot restored into a new PVC, a raw block PVC, one ReadWriteOnce PVC in two
# pods on the node, and finally nothing left in Ceph.
# Needs a cluster from k8s-tests/cluster.sh (with images imported). Usage: user-path.sh
set -euo pipefail
TAG=user-path
# shellcheck source=k8s-tests/lib.sh
source "$(dirname "$0")/lib.sh"
NS=user-path

# A pod on busybox that runs a shell snippet against the PVC at /data (or /dev/xvda for block).
pod() { # name pvc script [block]
  local name=$1 pvc=$2 script=$3 block=${4:-}
  local mount="volumeMounts: [{name: v, mountPath: /data}]"
  [[ -n $block ]] && mount="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
  k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: busybox:1.36
      imagePullPolicy: Never
      command: ["sh", "-c", $(printf '%s' "$script" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      $mount
  volumes: [{name: v, persistentVolumeClaim: {claimName: $pvc}}]
EOF
}
wait_pod() { # name condition timeout
  k -n "$NS" wait --for="$2" "pod/$1" --timeout="${3:-180s}" >/dev/null || fail "pod $1 did not reach $2"
}
pvc() { # name size [block] [extra-spec-yaml]
  local mode=Filesystem
  [[ ${3:-} == block ]] && mode=Block
  k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: $mode
  storageClassName: rook-rbd
  resources: {requests: {storage: $2}}
  ${4:-}
EOF
}
pvc_sc() { # name size storageclass
  k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $3
  resources: {requests: {storage: $2}}
EOF
}
wait_bound() {
  k -n "$NS" wait --for=jsonpath='{.status.phase}'=Bound "pvc/$1" --timeout="${2:-180s}" >/dev/null ||
    fail "pvc $1 is not Bound"
}
logs() { k -n "$NS" logs "pod/$1"; }

# ---------------------------------------------------------------- install, as the README says
k apply -f "$REPO/deploy/00-namespace.yaml" >/dev/null
k -n rook-rbd create configmap rook-rbd-config --from-file=config.json="$CEPH/cluster-config.json" >/dev/null
k -n rook-rbd create secret generic rook-rbd-secret --from-literal=userID=csi \
  --from-file=userKey="$CEPH/csi.key" >/dev/null
step "config and secret created"
k apply -f "$REPO/deploy/" >/dev/null
step "kubectl apply -f deploy/"
k -n rook-rbd rollout status daemonset/rook-rbd-node --timeout=180s >/dev/null || fail "node plugin not ready"
k -n rook-rbd rollout status deployment/rook-rbd-controller --timeout=180s >/dev/null || fail "controller not ready"
step "controller and node plugin running"
k get csidriver rbd.csi.ceph.rook.io >/dev/null || fail "no CSIDriver"
for _ in $(seq 120); do
  drivers=$(k get csinode "$E2E_NODE_NAME" -o jsonpath='{.spec.drivers[*].name}' 2>/dev/null || true)
  [[ $drivers == *rbd.csi.ceph.rook.io* ]] && break
  sleep 0.5
done
[[ $drivers == *rbd.csi.ceph.rook.io* ]] || fail "the node plugin never appeared in CSINode $E2E_NODE_NAME"
step "CSIDriver registered and the node plugin in CSINode ($drivers)"

k create namespace "$NS" >/dev/null
# ---------------------------------------------------------------- data outlives its pod
pvc data 1Gi
wait_bound data
step "PVC bound"
pod writer data 'dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null && sync && md5sum /data/blob | cut -d" " -f1 > /data/blob.md5 && cat /data/blob.md5'
wait_pod writer jsonpath='{.status.phase}'=Succeeded
sum=$(logs writer)
[[ $sum =~ ^[0-9a-f]{32}$ ]] || fail "writer printed no checksum: $sum"
step "a pod wrote 8 MiB, md5 $sum"
k -n "$NS" delete pod writer --wait >/dev/null
step "writer pod deleted"
pod reader data 'md5sum /data/blob | cut -d" " -f1'
wait_pod reader jsonpath='{.status.phase}'=Succeeded
got=$(logs reader)
[[ $got == "$sum" ]] || fail "a new pod read md5 $got, the first wrote $sum"
step "a new pod read the same md5"
k -n "$NS" delete pod reader --wait >/dev/null

# ---------------------------------------------------------------- online expansion
# On xfs: growing a mounted ext4 needs CAP_SYS_RESOURCE, which root lacks on this machine (and so
# does a privileged container). The StorageClass is deploy/'s with only the fstype changed.
k get storageclass rook-rbd -o json | python3 -c '
import json, sys
sc = json.load(sys.stdin)
for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "annotations"):
    sc["metadata"].pop(key, None)
sc["metadata"]["name"] = "rook-rbd-xfs"
sc["parameters"]["csi.storage.k8s.io/fstype"] = "xfs"
print(json.dumps(sc))' | k apply -f - >/dev/null
pvc_sc grow 1Gi rook-rbd-xfs
wait_bound grow
pod sizer grow 'while [ ! -f /data/stop ]; do sleep 1; done'
wait_pod sizer condition=Ready
before=$(k -n "$NS" exec sizer -- sh -c 'df -k /data | tail -1 | awk "{print \$2}"')
k -n "$NS" patch pvc grow --type merge -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
for _ in $(seq 180); do
  cap=$(k -n "$NS" get pvc grow -o jsonpath='{.status.capacity.storage}')
  now=$(k -n "$NS" exec sizer -- sh -c 'df -k /data | tail -1 | awk "{print \$2}"')
  [[ $cap == 2Gi && $now -gt $((before * 3 / 2)) ]] && break
  sleep 1
done
[[ $cap == 2Gi ]] || fail "PVC capacity is $cap after expansion to 2Gi"
((now > before * 3 / 2)) || fail "the running pod still sees $now KiB (was $before)"
step "an xfs PVC expanded to 2Gi while mounted; the running pod sees $before -> $now KiB"
k -n "$NS" exec sizer -- touch /data/stop
wait_pod sizer jsonpath='{.status.phase}'=Succeeded
k -n "$NS" delete pod sizer --wait >/dev/null

# ---------------------------------------------------------------- snapshot and restore
k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap}
spec:
  volumeSnapshotClassName: rook-rbd
  source: {persistentVolumeClaimName: data}
EOF
k -n "$NS" wait --for=jsonpath='{.status.readyToUse}'=true volumesnapshot/snap --timeout=180s >/dev/null ||
  fail "snapshot not ready"
step "VolumeSnapshot ready"
pvc restored 1Gi "" "dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}"
wait_bound restored
pod restorer restored 'md5sum /data/blob | cut -d" " -f1'
wait_pod restorer jsonpath='{.status.phase}'=Succeeded
got=$(logs restorer)
[[ $got == "$sum" ]] || fail "the restored PVC holds md5 $got, not $sum"
step "a PVC restored from the snapshot holds the same md5"
k -n "$NS" delete pod restorer --wait >/dev/null

# ---------------------------------------------------------------- raw block
pvc raw 64Mi block
wait_bound raw
pod blockio raw 'dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null; dd if=/tmp/x of=/dev/xvda bs=1M count=4 conv=fsync 2>/dev/null; a=$(md5sum < /tmp/x); b=$(dd if=/dev/xvda bs=1M count=4 2>/dev/null | md5sum); [ "$a" = "$b" ] && echo same || echo differ' block
wait_pod blockio jsonpath='{.status.phase}'=Succeeded
[[ $(logs blockio) == same ]] || fail "raw block read back differs"
step "a raw block PVC: written and read back through /dev/xvda"
k -n "$NS" delete pod blockio --wait >/dev/null

# ---------------------------------------------------------------- one RWO PVC, two pods, one node
pod first data 'echo one > /data/first; while [ ! -f /data/stop2 ]; do sleep 1; done'
pod second data 'while [ ! -f /data/first ]; do sleep 1; done; cat /data/first; touch /data/stop2'
wait_pod second jsonpath='{.status.phase}'=Succeeded
[[ $(logs second) == one ]] || fail "the second pod did not see the first pod's file"
wait_pod first jsonpath='{.status.phase}'=Succeeded
step "two pods on the node shared one ReadWriteOnce PVC"

# ---------------------------------------------------------------- everything goes, nothing stays
k delete namespace "$NS" --wait --timeout=300s >/dev/null || fail "namespace $NS did not go"
k delete storageclass rook-rbd-xfs >/dev/null
for _ in $(seq 120); do
  [[ -z $(k get pv -o name) ]] && break
  sleep 1
done
[[ -z $(k get pv -o name) ]] || fail "PVs left: $(k get pv -o name)"
for _ in $(seq 120); do
  images=$(rbd_ ls rbd 2>/dev/null || true)
  trash=$(rbd_ trash ls rbd 2>/dev/null || true)
  [[ -z $images && -z $trash ]] && break
  sleep 1
done
[[ -z $images ]] || fail "images left in pool rbd: $images"
[[ -z $trash ]] || fail "images left in the RBD trash: $trash"
step "everything deleted: no PV, and rbd ls / rbd trash ls show nothing"
echo "[user-path] PASS in $((SECONDS - T0)) s"
