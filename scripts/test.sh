#!/usr/bin/env bash
# `make test`: lint, unit tests, integration tests, stock gRPC clients of other languages
# (tests/interop) and csi-sanity (mount and block) against a real dev cluster that this script
# starts and always stops. Fails if anything is left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
export CEPH_DEV_DIR=${CEPH_DEV_DIR:-$PWD/.dev-cluster}
step() { printf '\n==> %s\n' "$*"; }
cleanup() {
  local rc=$?
  step "stopping the dev cluster"
  bash scripts/ceph-dev.sh down "$CEPH_DEV_DIR" || rc=1
  if pgrep -af "ceph-(mon|mgr|osd) .*$CEPH_DEV_DIR" >/dev/null; then
    echo "leftover Ceph daemons:"; pgrep -af "ceph-(mon|mgr|osd) .*$CEPH_DEV_DIR"; rc=1
  else
    echo "no Ceph daemons left"
  fi
  exit $rc
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

step "integration tests against the real cluster"
ROOK_RBD_TEST_CEPH_DIR=$CEPH_DEV_DIR cargo test --locked --test '*' -- --test-threads=2

step "interop: grpcio and grpcurl"
bash tests/interop/run.sh

step "csi-sanity (mount)"
bash sanity-tests/run.sh mount
step "csi-sanity (block)"
bash sanity-tests/run.sh block

step "leftovers"
bash sanity-tests/leftovers.sh
