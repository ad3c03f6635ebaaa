#!/usr/bin/env bash
# Installs what building and testing rook-rbd needs on Debian 12, and nothing when it is all there
# already (then it prints one line). Rust and Go are the machine's own toolchains, not installed
# here. scripts/fresh-root-check.sh proves this list complete in a fresh Debian 12 root.
set -euo pipefail
PACKAGES=(
  # build: protoc, plus the well-known types csi.proto imports (google/protobuf/descriptor.proto,
  # wrappers.proto), which Debian ships in libprotobuf-dev; cargo's linker (cc) and the C runtime
  # files (not pulled in without recommends); the libraries build.rs links.
  protobuf-compiler libprotobuf-dev gcc libc6-dev librbd-dev librados-dev
  # the dev cluster and the mappers (rbd-fuse mounts through FUSE)
  ceph-mon ceph-mgr ceph-osd ceph-common rbd-fuse rbd-nbd fuse3 kmod
  # the node path: mkfs, fsck, resize, blkid, mount, losetup
  e2fsprogs xfsprogs util-linux mount
  # the scripts: python3 (JSON in ceph-dev.sh, demo.sh, bench.sh, sanity-tests/run.sh), ss from
  # iproute2 (free ports in ceph-dev.sh), pgrep and ps from procps; TLS roots for crates.io and the
  # Go module proxy, and git for the proxy's "direct" fallback.
  python3 iproute2 procps ca-certificates git
)
command -v cargo >/dev/null || { echo "[deps] cargo is not on PATH: the machine's Rust toolchain is expected" >&2; exit 1; }
# One dpkg-query for all: `make demo` and `make test` run this every time.
# (It exits 1 when it has never heard of one of them: that one is simply missing.)
installed=" $({ dpkg-query -W -f='${Package}=${Status}\n' "${PACKAGES[@]}" 2>/dev/null || true; } |
  sed -n 's/=install ok installed$//p' | paste -sd' ') "
missing=()
for p in "${PACKAGES[@]}"; do
  [[ $installed == *" $p "* ]] || missing+=("$p")
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
  command -v go >/dev/null || { echo "[deps] go is not on PATH: the machine's Go toolchain is expected (to build csi-sanity)" >&2; exit 1; }
  GOBIN=$GOBIN go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.4.0
fi
# Loop devices for the fuse mapper.
modprobe loop 2>/dev/null || true
echo "[deps] ok"
