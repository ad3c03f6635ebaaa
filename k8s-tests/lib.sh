# Sourced by user-path.sh and faults.sh after they set TAG: the cluster's variables, kubectl and
# the Ceph tools inside its namespace, timed steps, and a failure that shows what the cluster saw.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
eval "$("$HERE/cluster.sh" env)"
CEPH=$E2E_RUN/ceph
k() { "$HERE/cluster.sh" kubectl "$@"; }
rbd_() { "$HERE/cluster.sh" exec rbd -c "$CEPH/ceph.conf" "$@"; }
ceph_() { "$HERE/cluster.sh" exec ceph -c "$CEPH/ceph.conf" "$@"; }
T0=$SECONDS
STEP_T=$SECONDS
step() {
  printf '[%s %5ss] (+%ss) %s\n' "$TAG" "$((SECONDS - T0))" "$((SECONDS - STEP_T))" "$*"
  STEP_T=$SECONDS
}
fail() {
  echo "[$TAG] FAILED: $*" >&2
  k get pods -A -o wide >&2 || true
  k -n rook-rbd logs -l app.kubernetes.io/component=controller -c rook-rbd --tail=60 >&2 || true
  k -n rook-rbd logs -l app.kubernetes.io/component=node --tail=60 >&2 || true
  k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -30 >&2 || true
  exit 1
}
