#!/usr/bin/env bash
# A whole single-node Kubernetes v1.34 cluster in a network namespace of its own, for the e2e
# stage: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (Debian's),
# kubelet and kube-proxy, with a bridge CNI for pods, plus a real Ceph dev cluster bound to the
# node's address inside the same namespace.
#
#   cluster.sh up        start everything; returns when the node is Ready and Ceph is up
#   cluster.sh down      stop everything started by `up` (by recorded PID), remove its state
#                        and check that nothing is left behind (exit 1 if something is)
#   cluster.sh kubectl   kubectl as cluster admin, inside the namespace
#   cluster.sh exec CMD  run CMD inside the namespace with KUBECONFIG and PATH set
#   cluster.sh env       print the variables other scripts use
#
# The namespace ("rook-rbd-e2e") has no route out: every address used is loopback or inside it.
# The node address 10.87.0.1 lives on the namespace's own lo (this kernel has no dummy module);
# pods are in 10.88.0.0/16 on bridge rrbd0, services in 10.96.0.0/24.
#
# kubelet's root is /var/lib/kubelet, so deploy/ applies unchanged; it is made a shared bind
# mount (Bidirectional propagation needs that) and removed again by `down`. Everything else
# lives in $E2E_RUN (default: $ROOK_RBD_CACHE/e2e-run). Run `up` under `tini -s` or let it
# start its own: PID 1 on this machine does not reap, and containerd's shims need a reaper.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${ROOK_RBD_CACHE:-$HOME/.cache/rook-rbd}
RUN=${E2E_RUN:-$CACHE/e2e-run}
NETNS=rook-rbd-e2e
NODE_IP=10.87.0.1
NODE_NAME=e2e-node
POD_CIDR=10.88.0.0/16
SVC_CIDR=10.96.0.0/24
KUBELET_DIR=/var/lib/kubelet
NS=(nsenter --net=/run/netns/$NETNS)
PKI=$RUN/pki
log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bin_dir() { "$HERE/tools.sh" bin; }

kubectl_() { "${NS[@]}" "$(bin_dir)/kubectl" --kubeconfig "$PKI/admin.kubeconfig" "$@"; }

make_pki() {
  [[ -f $PKI/ca.crt ]] && return
  mkdir -p "$PKI"
  (
    cd "$PKI"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=rook-rbd-e2e-ca" 2>/dev/null
    cert() { # name CN O SANs
      local n=$1 cn=$2 o=$3 san=${4:-}
      openssl req -newkey rsa:2048 -nodes -keyout "$n.key" -out "$n.csr" -subj "/CN=$cn${o:+/O=$o}" 2>/dev/null
      if [[ -n $san ]]; then
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >"$n.ext"
      else
        printf 'extendedKeyUsage=clientAuth\n' >"$n.ext"
      fi
      openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$n.crt" -days 30 -extfile "$n.ext" 2>/dev/null
      rm -f "$n.csr" "$n.ext"
    }
    cert apiserver kube-apiserver "" "IP:127.0.0.1,IP:$NODE_IP,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert admin admin system:masters
    cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
    cert kubelet "system:node:$NODE_NAME" system:nodes "IP:127.0.0.1,IP:$NODE_IP,DNS:$NODE_NAME"
    cert kube-controller-manager system:kube-controller-manager ""
    cert kube-scheduler system:kube-scheduler ""
    cert kube-proxy system:kube-proxy ""
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    for u in admin kubelet kube-controller-manager kube-scheduler kube-proxy; do
      cat >"$u.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://$NODE_IP:6443", certificate-authority: $PKI/ca.crt}}]
users: [{name: $u, user: {client-certificate: $PKI/$u.crt, client-key: $PKI/$u.key}}]
contexts: [{name: e2e, context: {cluster: e2e, user: $u}}]
current-context: e2e
EOF
    done
  )
}

write_configs() {
  mkdir -p "$RUN"/{containerd,cni,cni-ipam,logs,pids,pod-logs,flex}
  cat >"$RUN/containerd/config.toml" <<EOF
version = 2
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
[grpc]
  address = "$RUN/containerd.sock"
[ttrpc]
  address = "$RUN/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$RUN/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  # Root lacks CAP_SYS_RESOURCE here: kubelet's oom_score_adj of -998 would fail every sandbox.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
EOF
  cat >"$RUN/cni/10-rook-rbd-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "rook-rbd-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "rrbd0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "$RUN/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  # Pods resolve nothing: no cluster DNS, and no route out of the namespace either.
  echo "nameserver 127.0.0.1" >"$RUN/resolv.conf"
  cat >"$RUN/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$RUN/containerd.sock
failSwapOn: false
resolvConf: $RUN/resolv.conf
# No DNS server runs; a cluster DNS address keeps pods on the ClusterFirst policy (lookups fail).
clusterDNS: [10.96.0.10]
clusterDomain: cluster.local
podLogsDir: $RUN/pod-logs
volumePluginDir: $RUN/flex
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
failCgroupV1: false
EOF
}

# Waits up to $2 seconds for command $1.. to succeed.
wait_for() {
  local what=$1 secs=$2
  shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "$what: not ready after ${secs}s"
    sleep 0.3
  done
}

# Runs in the background under tini: starts the daemons in the namespace and waits for SIGTERM.
supervise() {
  local B
  B=$(bin_dir)
  start() { # name cmd...
    local n=$1
    shift
    "${NS[@]}" "$@" >"$RUN/logs/$n.log" 2>&1 &
    echo $! >"$RUN/pids/$n"
  }
  stop_all() {
    local n pid
    for n in kube-proxy kubelet; do
      [[ -f $RUN/pids/$n ]] && kill "$(cat "$RUN/pids/$n")" 2>/dev/null || true
    done
    sleep 1
    # Sandboxes go while containerd is up and this process still reaps the exiting shims.
    timeout 60 "$B/crictl" --runtime-endpoint "unix://$RUN/containerd.sock" rmp -af >/dev/null 2>&1 || true
    for n in kube-scheduler kube-controller-manager kube-apiserver etcd containerd; do
      [[ -f $RUN/pids/$n ]] && kill "$(cat "$RUN/pids/$n")" 2>/dev/null || true
    done
    for _ in $(seq 50); do
      local alive=0
      for f in "$RUN"/pids/*; do
        [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1
      done
      ((alive)) || break
      sleep 0.2
    done
    for f in "$RUN"/pids/*; do
      [[ -f $f ]] || continue
      pid=$(cat "$f")
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$f"
    done
    exit 0
  }
  trap stop_all TERM INT
  start containerd /usr/bin/containerd --config "$RUN/containerd/config.toml"
  start etcd "$B/etcd" --name e2e --data-dir "$RUN/etcd" --listen-client-urls http://127.0.0.1:12379 \
    --advertise-client-urls http://127.0.0.1:12379 --listen-peer-urls http://127.0.0.1:12380 \
    --initial-advertise-peer-urls http://127.0.0.1:12380 --initial-cluster e2e=http://127.0.0.1:12380 \
    --listen-metrics-urls= --unsafe-no-fsync --log-level warn
  start kube-apiserver "$B/kube-apiserver" --etcd-servers=http://127.0.0.1:12379 --bind-address="$NODE_IP" \
    --advertise-address="$NODE_IP" --secure-port=6443 --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" --client-ca-file="$PKI/ca.crt" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-cluster-ip-range="$SVC_CIDR" \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --profiling=false --v=1
  wait_for kube-apiserver 120 "${NS[@]}" "$B/kubectl" --kubeconfig "$PKI/admin.kubeconfig" get --raw /readyz
  start kube-controller-manager "$B/kube-controller-manager" --kubeconfig="$PKI/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$PKI/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$PKI/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" --use-service-account-credentials=true \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SVC_CIDR" --v=1
  start kube-scheduler "$B/kube-scheduler" --kubeconfig="$PKI/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$PKI/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$PKI/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --v=1
  wait_for containerd 60 ctr --address "$RUN/containerd.sock" version
  start kubelet "$B/kubelet" --config="$RUN/kubelet.yaml" --kubeconfig="$PKI/kubelet.kubeconfig" \
    --root-dir="$KUBELET_DIR" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
  start kube-proxy "$B/kube-proxy" --kubeconfig="$PKI/kube-proxy.kubeconfig" --hostname-override="$NODE_NAME" \
    --proxy-mode=iptables --cluster-cidr="$POD_CIDR" --masquerade-all --conntrack-max-per-core=0 \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256 --v=1
  touch "$RUN/supervisor-ready"
  while :; do sleep 3600 & wait $!; done
}

cmd_up() {
  local t0=$SECONDS B
  B=$(bin_dir)
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl crictl; do
    [[ -x $B/$b ]] || die "$B/$b is missing: run k8s-tests/tools.sh build"
  done
  [[ -e /run/netns/$NETNS ]] && die "namespace $NETNS exists: another run is up (cluster.sh down)"
  [[ -e $RUN/pids/supervisor ]] && die "$RUN is in use (cluster.sh down)"
  rm -rf "$RUN"
  mkdir -p "$RUN"
  make_pki
  write_configs
  # The namespace: its own lo with the node address, forwarding for the bridge, nothing else.
  ip netns add "$NETNS"
  "${NS[@]}" ip link set lo up
  "${NS[@]}" ip addr add "$NODE_IP/32" dev lo
  "${NS[@]}" sysctl -qw net.ipv4.ip_forward=1
  # kubelet's root: a shared bind mount, so the node plugin's Bidirectional mounts come back.
  [[ -e /lib/modules ]] || touch "$RUN/lib-modules-absent"
  mkdir -p "$KUBELET_DIR"
  if ! grep -q " $KUBELET_DIR " /proc/self/mountinfo; then
    mount --bind "$KUBELET_DIR" "$KUBELET_DIR"
    echo bind >"$RUN/kubelet-dir-mounted"
  fi
  mount --make-rshared "$KUBELET_DIR"
  log "starting the control plane, containerd, kubelet and kube-proxy in netns $NETNS"
  nohup tini -s -- "$0" supervise >"$RUN/logs/supervisor.log" 2>&1 &
  echo $! >"$RUN/pids/supervisor"
  wait_for "supervisor" 180 test -f "$RUN/supervisor-ready"
  if [[ -n ${E2E_IMAGES:-} ]]; then
    local ti=$SECONDS
    ctr --address "$RUN/containerd.sock" -n k8s.io images import --all-platforms "$E2E_IMAGES" >/dev/null
    log "images imported in $((SECONDS - ti)) s"
  fi
  wait_for "node Ready" 180 kubectl_ wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  wait_for "default service account" 60 kubectl_ -n default get sa default
  log "kubernetes up in $((SECONDS - t0)) s (node $NODE_NAME, $NODE_IP)"
  local tc=$SECONDS
  "${NS[@]}" env CEPH_DEV_ADDR="$NODE_IP" CEPH_DEV_OSD_SIZE=20G bash "$REPO/scripts/ceph-dev.sh" up "$RUN/ceph" >"$RUN/logs/ceph-up.log" 2>&1 ||
    { tail -20 "$RUN/logs/ceph-up.log" >&2; die "ceph did not start"; }
  log "ceph up in $((SECONDS - tc)) s ($(cat "$RUN/ceph/cluster-config.json"))"
}

leftovers() {
  local bad=0 what
  what=$(pgrep -af "$RUN" | grep -v -e "pgrep" -e "cluster.sh" || true)
  [[ -n $what ]] && { log "leftover processes:"; echo "$what" >&2; bad=1; }
  what=$(grep -E " ($RUN|$KUBELET_DIR)[/ ]" /proc/self/mountinfo || true)
  [[ -n $what ]] && { log "leftover mounts:"; echo "$what" >&2; bad=1; }
  what=$(losetup -a | grep -E "$RUN|$KUBELET_DIR" || true)
  [[ -n $what ]] && { log "leftover loop devices:"; echo "$what" >&2; bad=1; }
  [[ -e /run/netns/$NETNS ]] && { log "leftover netns $NETNS"; bad=1; }
  ls /run/netns/cni-* >/dev/null 2>&1 && { log "leftover CNI netns: $(ls /run/netns/cni-*)"; bad=1; }
  [[ -e $RUN ]] && { log "leftover state dir $RUN"; bad=1; }
  [[ -e $KUBELET_DIR ]] && { log "leftover $KUBELET_DIR"; bad=1; }
  if ((bad)); then return 1; fi
  log "nothing left behind: processes, mounts, loop devices, netns, containerd and kubelet state"
}

cmd_down() {
  local t0=$SECONDS
  [[ -d $RUN ]] || { leftovers; return; }
  if [[ -f $RUN/ceph/ceph.conf ]]; then
    "${NS[@]}" bash "$REPO/scripts/ceph-dev.sh" down "$RUN/ceph" >"$RUN/logs/ceph-down.log" 2>&1 || log "ceph down failed: $RUN/logs/ceph-down.log"
  fi
  if [[ -f $RUN/pids/supervisor ]]; then
    local sp
    sp=$(cat "$RUN/pids/supervisor")
    kill "$sp" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$sp" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$sp" 2>/dev/null || true
    rm -f "$RUN/pids/supervisor"
  fi
  # Shims and containers outlive containerd: ask a throw-away containerd (under a reaper) to
  # remove what is left.
  if [[ -n $(ls "$RUN/containerd/state/io.containerd.runtime.v2.task/k8s.io" 2>/dev/null) ]]; then
    log "removing leftover sandboxes"
    tini -s -- "${NS[@]}" /usr/bin/containerd --config "$RUN/containerd/config.toml" >"$RUN/logs/containerd-cleanup.log" 2>&1 &
    local cp=$!
    wait_for "cleanup containerd" 30 ctr --address "$RUN/containerd.sock" version || true
    timeout 60 "$(bin_dir)/crictl" --runtime-endpoint "unix://$RUN/containerd.sock" rmp -af >/dev/null 2>&1 || true
    kill "$cp" 2>/dev/null || true
    wait "$cp" 2>/dev/null || true
  fi
  # Mounts under the run dir and kubelet's root (pod volumes, overlay rootfs, shm), deepest first.
  local m
  for _ in 1 2 3; do
    grep -oE " ($RUN|$KUBELET_DIR)[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do
      [[ $m == "$KUBELET_DIR" ]] && continue
      umount "$m" 2>/dev/null || true
    done
  done
  [[ -f $RUN/kubelet-dir-mounted ]] && umount "$KUBELET_DIR" 2>/dev/null || true
  [[ -e /run/netns/$NETNS ]] && ip netns del "$NETNS"
  for m in /run/netns/cni-*; do [[ -e $m ]] && { umount "$m" 2>/dev/null || true; rm -f "$m"; }; done
  # What kubelet and the runc shim write outside their configured roots.
  find /var/log/containers -maxdepth 1 -type l -lname "$RUN/*" -delete 2>/dev/null || true
  rmdir /var/log/containers 2>/dev/null || true
  if ! grep -qs '^containerd-shim' /proc/[0-9]*/comm; then
    rm -rf /run/containerd/runc/k8s.io /run/containerd/s /run/containerd/fifo
    rmdir /run/containerd/runc /run/containerd 2>/dev/null || true
  fi
  rm -rf /var/lib/cni/results/rook-rbd-e2e-* 2>/dev/null || true
  # The node plugin's mappers cgroup (one per host, kept while empty, like a systemd slice).
  rmdir /sys/fs/cgroup/*/rook-rbd-mappers 2>/dev/null || true
  # hostPath DirectoryOrCreate of the node plugin, on a host without modules.
  [[ -f $RUN/lib-modules-absent ]] && rmdir /lib/modules 2>/dev/null || true
  if ! grep -q " $KUBELET_DIR[/ ]" /proc/self/mountinfo; then
    rm -rf "$KUBELET_DIR"
  fi
  rm -rf "$RUN"
  log "down in $((SECONDS - t0)) s"
  leftovers
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  supervise) supervise ;;
  kubectl) shift; kubectl_ "$@" ;;
  exec) shift; "${NS[@]}" env KUBECONFIG="$PKI/admin.kubeconfig" PATH="$(bin_dir):$PATH" "$@" ;;
  env)
    echo "E2E_RUN=$RUN"
    echo "E2E_NETNS=$NETNS"
    echo "E2E_NODE_IP=$NODE_IP"
    echo "E2E_NODE_NAME=$NODE_NAME"
    echo "KUBECONFIG=$PKI/admin.kubeconfig"
    echo "E2E_BIN=$(bin_dir)"
    ;;
  leftovers) leftovers ;;
  *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
