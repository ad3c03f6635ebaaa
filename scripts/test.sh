#!/usr/bin/env bash
# `make test`: lint, unit tests, integration tests, stock gRPC clients of other languages
# (tests/interop) and csi-sanity (mount and block) against a real dev cluster that this script
# starts and always stops; then the Kubernetes e2e stage (k8s-tests/run.sh: a real single-node
# Kubernetes, `kubectl apply -f deploy/`, the user's path, the storage e2e CI subset, faults).
# Fails if anything is left behind. E2E=0 leaves out the e2e stage, saying so (never under CI).
set -euo pipefail
cd "$(dirname "$0")/.."
export CEPH_DEV_DIR=${CEPH_DEV_DIR:-$PWD/.dev-cluster}
step() { printf '\n==> %s\n' "$*"; }
cleanup() {
  local rc=$?  # first: this is the status the run ends with
  stop_tools
  step "stopping the dev cluster"
  bash scripts/ceph-dev.sh down "$CEPH_DEV_DIR" || rc=1
  if pgrep -af "ceph-(mon|mgr|osd) .*$CEPH_DEV_DIR" >/dev/null; then
    echo "leftover Ceph daemons:"; pgrep -af "ceph-(mon|mgr|osd) .*$CEPH_DEV_DIR"; rc=1
  else
    echo "no Ceph daemons left"
  fi
  exit $rc
}

# The Kubernetes binaries (tools.sh: cached, a few `test -x`; cold, the longest build of the run)
# build in the background from the start, at nice 19, in the CPU time the Rust build and the
# integration tests leave idle. The operator tests wait for them, then the e2e stage uses them.
tools_log=$(mktemp)
setsid bash k8s-tests/tools.sh build >"$tools_log" 2>&1 &
tools_pid=$!
stop_tools() { kill -- -"$tools_pid" 2>/dev/null || true; rm -f "$tools_log"; }
trap stop_tools EXIT
wait_tools() {
  local t=$SECONDS rc=0
  wait "$tools_pid" || rc=$?
  cat "$tools_log"; rm -f "$tools_log"
  ((rc == 0)) || { echo "building the Kubernetes binaries failed (above)"; exit 1; }
  echo "waited $((SECONDS - t)) s for them"
}

step "lint"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings

step "build"
cargo build --locked --all-targets

step "unit tests"
cargo test --locked --lib --bins

step "dev cluster"
trap cleanup EXIT
bash scripts/ceph-dev.sh up "$CEPH_DEV_DIR"

# Every tests/*.rs is a test binary; operator_* run in their own step below.
operator_tests=() integration_tests=()
for f in tests/*.rs; do
  t=$(basename "$f" .rs)
  if [[ $t == operator_* ]]; then operator_tests+=("$t"); else integration_tests+=("$t"); fi
done
step "integration tests against the real cluster"
ROOK_RBD_TEST_CEPH_DIR=$CEPH_DEV_DIR cargo test --locked \
  $(for t in "${integration_tests[@]}"; do printf -- '--test %s ' "$t"; done) -- --test-threads=2

# --- operator, tier 1: a real etcd + kube-apiserver on 127.0.0.1 (tests/apiserver), and the dev
# cluster for the pools. The tests fail, not skip, without the apiserver binaries. Each test binary
# kills its daemons and removes its state at exit: in a TMPDIR of this run's own, no process may
# name it and nothing may be left in it.
step "operator tests against a real kube-apiserver + etcd (Kubernetes binaries: tools.sh)"
wait_tools
op_tmp=$(mktemp -d)
TMPDIR=$op_tmp ROOK_RBD_REQUIRE_APISERVER=1 ROOK_RBD_TEST_CEPH_DIR=$CEPH_DEV_DIR \
  cargo test --locked $(for t in "${operator_tests[@]}"; do printf -- '--test %s ' "$t"; done)
if pgrep -af -- "$op_tmp" || [[ -n $(ls -A "$op_tmp") ]]; then
  echo "left behind by the operator tests (above, and in $op_tmp):"; ls -A "$op_tmp"; exit 1
fi
rmdir "$op_tmp"; echo "no apiserver or etcd left"
# --- end operator ---------------------------------------------------------------------------

step "interop: grpcio and grpcurl"
bash tests/interop/run.sh

step "csi-sanity (mount)"
bash sanity-tests/run.sh mount
step "csi-sanity (block)"
bash sanity-tests/run.sh block

step "leftovers"
bash sanity-tests/leftovers.sh

# The dev cluster goes first: the e2e stage starts a Ceph of its own inside its network namespace.
trap - EXIT
(cleanup)

if [[ ${E2E:-1} == 0 ]]; then
  [[ -z ${CI:-} ]] || { echo "CI must run the e2e stage (E2E=0 is for local runs)" >&2; exit 1; }
  step "Kubernetes e2e: left out (E2E=0); \`make e2e\` runs it alone"
else
  step "Kubernetes e2e (k8s-tests/run.sh)"
  bash k8s-tests/run.sh
fi
