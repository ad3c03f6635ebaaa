#!/usr/bin/env bash
# Installs what building and testing rook-rbd needs, and nothing when it is all there already:
# Debian's protoc and Ceph 16.2 (librbd/librados headers, daemons, rbd-fuse, rbd-nbd), the
# filesystem tools, and the real csi-sanity from the Go module proxy.
set -euo pipefail
PACKAGES=(protobuf-compiler librbd-dev librados-dev pkg-config ceph-mon ceph-mgr ceph-osd ceph-common
  rbd-fuse rbd-nbd e2fsprogs xfsprogs util-linux fuse3 kmod)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[deps] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
GOBIN=${GOBIN:-$HOME/go/bin}
if [[ ! -x $GOBIN/csi-sanity ]]; then
  echo "[deps] installing csi-sanity v5.4.0"
  command -v go >/dev/null || { echo "go is needed to build csi-sanity" >&2; exit 1; }
  GOBIN=$GOBIN go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.4.0
fi
# Loop devices for the fuse mapper.
modprobe loop 2>/dev/null || true
echo "[deps] ok"
