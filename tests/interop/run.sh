#!/usr/bin/env bash
# Stock gRPC clients of other languages against a real rook-rbd driver and the dev cluster in
# $CEPH_DEV_DIR: Python grpcio from PyPI with default channel options, and grpcurl through server
# reflection. Each drives Identity, then CreateVolume and DeleteVolume (checked with `rbd`).
#
# Installs what it needs on first use, pinned, into ~/.cache/rook-rbd: a venv with
# tests/interop/requirements.txt (Debian's python3, binary wheels only) and grpcurl built with
# `go install`. The Python stubs are generated from csi-spec/csi.proto into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${CEPH_DEV_DIR:-$PWD/.dev-cluster}
BIN=${ROOK_RBD_BIN:-$PWD/target/debug/rook-rbd}
CACHE=${ROOK_RBD_CACHE:-$HOME/.cache/rook-rbd}
GRPCURL_VERSION=v1.9.3
[[ -x $BIN ]] || { echo "build first: $BIN is missing" >&2; exit 1; }
[[ -f $DIR/cluster-config.json ]] || { echo "no dev cluster in $DIR (make ceph-up)" >&2; exit 1; }

# Debian's python3, so every machine builds the same venv; python3-venv brings ensurepip.
PYTHON=/usr/bin/python3
if ! { [[ -x $PYTHON ]] && "$PYTHON" -c 'import ensurepip' 2>/dev/null; }; then
  echo "[interop] installing python3 python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi
REQS=tests/interop/requirements.txt
VENV=$CACHE/interop-venv-$(sha256sum "$REQS" | cut -c1-12)
if [[ ! -f $VENV/.installed ]]; then
  echo "[interop] installing $(grep -v '^#' "$REQS" | tr '\n' ' ')into $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --only-binary=:all: -r "$REQS"
  touch "$VENV/.installed"
fi
GRPCURL=$CACHE/grpcurl-$GRPCURL_VERSION/grpcurl
if [[ ! -x $GRPCURL ]]; then
  echo "[interop] installing grpcurl $GRPCURL_VERSION"
  command -v go >/dev/null || { echo "go is needed to build grpcurl" >&2; exit 1; }
  GOBIN=$(dirname "$GRPCURL") go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"
fi

ROOT=$(mktemp -d /tmp/rook-rbd-interop.XXXXXX)
mkdir "$ROOT/stubs"
"$VENV/bin/python" -m grpc_tools.protoc -Icsi-spec --python_out="$ROOT/stubs" \
  --grpc_python_out="$ROOT/stubs" csi-spec/csi.proto
source scripts/test-driver.sh
start_driver "$ROOT" interop-node

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
rc=0
for client in grpcio grpcurl; do
  echo "--- $client"
  "$VENV/bin/python" tests/interop/clients.py "$client" --socket "$SOCK" --cluster-dir "$DIR" \
    --version "$VERSION" --stubs "$ROOT/stubs" --grpcurl "$GRPCURL" || rc=1
done
stop_driver
trap - EXIT
if ((rc != 0)); then
  echo "--- driver log (last 40 lines): $LOG"
  tail -40 "$LOG"
  exit 1
fi
rm -rf "$ROOT"
echo "interop: grpcio and grpcurl passed"
