#!/usr/bin/env bash
# Faults on the real cluster, after user-path.sh has installed the driver:
#   1. the node plugin pod restarts while a pod has its volume mounted: the mount keeps working
#      and is unmounted cleanly later;
#   2. the controller pod is killed in the middle of a burst of 20 PVCs: all bind, and every
#      image in the pool belongs to a PV (no leak);
#   3. the Ceph OSD is stopped for 60 s: PVCs pend (with events saying why), then bind once it
#      is back, with no restart of anything of ours.
set -euo pipefail
TAG=faults
# shellcheck source=k8s-tests/lib.sh
source "$(dirname "$0")/lib.sh"
NS=faults
k create namespace "$NS" >/dev/null
pvc() { # name
  k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, labels: {fault: "yes"}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: rook-rbd
  resources: {requests: {storage: 64Mi}}
EOF
}
bound_count() {
  k -n "$NS" get pvc -l fault=yes -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Bound$' || true
}

# ---------------------------------------------------------------- 1. node plugin restart
pvc live
k -n "$NS" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: live}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: busybox:1.36
      imagePullPolicy: Never
      command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /data/n; sync; sleep 0.5; done"]
      volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: live}}]
EOF
k -n "$NS" wait --for=condition=Ready pod/live --timeout=180s >/dev/null || fail "pod live not ready"
step "a pod writes to its volume every 0.5 s"
old=$(k -n rook-rbd get pod -l app.kubernetes.io/component=node -o name)
k -n rook-rbd delete "$old" --wait >/dev/null
k -n rook-rbd rollout status daemonset/rook-rbd-node --timeout=180s >/dev/null || fail "node plugin did not come back"
step "node plugin pod deleted and replaced"
a=$(k -n "$NS" exec live -- cat /data/n)
sleep 3
b=$(k -n "$NS" exec live -- cat /data/n)
((b > a)) || fail "writes stopped after the node plugin restart ($a then $b)"
k -n "$NS" exec live -- sh -c 'echo check > /data/after && sync && cat /data/after' | grep -q check ||
  fail "cannot write after the node plugin restart"
step "the mount kept working across the restart ($a -> $b)"
k -n "$NS" delete pod live --wait --timeout=120s >/dev/null || fail "pod live did not go"
pv=$(k -n "$NS" get pvc live -o jsonpath='{.spec.volumeName}')
for _ in $(seq 120); do
  [[ -z $(k get volumeattachment -o jsonpath="{.items[?(@.spec.source.persistentVolumeName==\"$pv\")].metadata.name}") ]] && break
  sleep 1
done
[[ -z $(grep -F "$pv" /proc/self/mountinfo) ]] || fail "mounts of $pv left after the pod went"
step "the new plugin unmounted and detached the volume cleanly"
k -n "$NS" delete pvc live --wait >/dev/null

# ---------------------------------------------------------------- 2. controller killed mid-burst
for i in $(seq 1 20); do pvc "burst-$i"; done
sleep 2
victim=$(k -n rook-rbd get pod -l app.kubernetes.io/component=controller -o name | head -1)
k -n rook-rbd delete "$victim" --grace-period=0 --force >/dev/null 2>&1 || true
step "20 PVCs created; controller pod $victim killed while they provision"
for _ in $(seq 300); do
  [[ $(bound_count) -ge 20 ]] && break
  sleep 1
done
[[ $(bound_count) -ge 20 ]] || fail "only $(bound_count) of 20 PVCs bound"
step "all 20 PVCs bound"
# PVs of earlier steps may still be on their way out: compare once both settle.
for _ in $(seq 60); do
  pv_images=$(k get pv -o jsonpath='{range .items[*]}{.spec.csi.volumeHandle}{"\n"}{end}' | grep -c . || true)
  pool_images=$(rbd_ ls rbd | grep -c . || true)
  ((pool_images == pv_images && pv_images == 20)) && break
  sleep 1
done
((pool_images == pv_images)) || fail "$pool_images images in the pool but $pv_images PVs: $(rbd_ ls rbd)"
step "images in the pool: $pool_images, PVs: $pv_images (no leak)"
k -n "$NS" delete pvc -l fault=yes --wait >/dev/null

# ---------------------------------------------------------------- 3. OSD down for 60 s
"$HERE/cluster.sh" exec bash "$REPO/scripts/ceph-dev.sh" stop-daemon osd "$CEPH" >/dev/null
step "OSD stopped"
for i in 1 2 3; do pvc "osd-$i"; done
sleep 60
[[ $(bound_count) -eq 0 ]] || fail "PVCs bound while the OSD was down"
events=$(k -n "$NS" get events --field-selector involvedObject.kind=PersistentVolumeClaim -o jsonpath='{range .items[*]}{.reason}: {.message}{"\n"}{end}')
grep -q "ProvisioningFailed" <<<"$events" || fail "no ProvisioningFailed events while the OSD was down: $events"
step "60 s without the OSD: 3 PVCs pending, events say why: $(grep ProvisioningFailed <<<"$events" | head -1 | cut -c1-160)"
"$HERE/cluster.sh" exec bash "$REPO/scripts/ceph-dev.sh" start-daemon osd "$CEPH" >/dev/null
step "OSD started again"
for _ in $(seq 300); do
  [[ $(bound_count) -ge 3 ]] && break
  sleep 1
done
[[ $(bound_count) -ge 3 ]] || fail "PVCs still pending after the OSD came back"
restarts=$(k -n rook-rbd get pods -o jsonpath='{range .items[*]}{range .status.containerStatuses[*]}{.restartCount}{"\n"}{end}{end}' | awk '{s+=$1} END {print s+0}')
((restarts == 0)) || fail "driver containers restarted $restarts times during the outage"
step "the 3 PVCs bound with no restart of the driver (container restarts: 0)"
k delete namespace "$NS" --wait --timeout=300s >/dev/null
echo "[faults] PASS in $((SECONDS - T0)) s"
