#!/usr/bin/env bash
# Makes every image the e2e cluster runs, with no registry, and writes them to one docker-archive
# that `ctr images import` loads into the cluster's containerd:
#   - rook-rbd:latest from the project's own Dockerfile (podman build), over locally made
#     stand-ins for its base images: debian:bookworm-slim (mmdebstrap minbase) and rust:1-bookworm
#     (the same plus gcc and this machine's Rust toolchain);
#   - the CSI sidecars and snapshot-controller under their registry.k8s.io/sig-storage names
#     (each a static Go binary on an empty root, built by tools.sh);
#   - pause (compiled from pause.c in the Kubernetes module), busybox (Debian's busybox-static)
#     and agnhost under the names kubelet and the e2e suite ask for.
# Podman's storage lives in the cache, so base images and build layers survive between runs.
# Usage: images.sh OUT.tar
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${ROOK_RBD_CACHE:-$HOME/.cache/rook-rbd}
OUT=${1:?usage: images.sh OUT.tar}
BIN=$("$HERE/tools.sh" bin)
BASE_STAMP=bookworm-r2
W=$CACHE/images
mkdir -p "$W"
# Short names in the Dockerfile (rust:1-bookworm) resolve to docker.io, where our local stand-ins
# are; --pull=never below keeps every registry out of it.
export CONTAINERS_REGISTRIES_CONF=$W/registries.conf
printf 'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n' >"$CONTAINERS_REGISTRIES_CONF"
PODMAN=(/usr/bin/podman --root "$CACHE/podman/storage" --runroot "$CACHE/podman/run"
  --runtime /usr/sbin/runc --cgroup-manager cgroupfs --events-backend file)
podman() { "${PODMAN[@]}" "$@"; }
log() { printf '[images] %s\n' "$*" >&2; }
t0=$SECONDS

# The host's own apt source (deb822), read at run time: the images get what this machine gets.
apt_source() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] && grep -qE '^Suites:.*\bbookworm\b' "$f" && { cat "$f"; return; }
  done
  [[ -f /etc/apt/sources.list ]] && cat /etc/apt/sources.list
}

have_image() { podman image exists "$1"; }

base_images() {
  local stamp=$W/base-$BASE_STAMP
  if [[ -f $stamp ]] && have_image docker.io/library/debian:bookworm-slim && have_image docker.io/library/rust:1-bookworm; then
    return
  fi
  log "making base images (once per cache)"
  apt_source >"$W/apt.sources"
  # This machine reaches the package registries through its own CAs (an egress proxy's, in
  # /usr/local/share/ca-certificates): the stand-ins trust what the machine trusts, so the
  # Dockerfile's `cargo fetch` works inside them as it does here.
  local hooks=()
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    hooks=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"'
      --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"'
      --customize-hook='chroot "$1" update-ca-certificates >/dev/null')
  fi
  # debian:bookworm-slim: a minbase root, as the official slim image is.
  nice -n 10 mmdebstrap --quiet --variant=minbase --mode=root --format=tar "${hooks[@]}" \
    --include=ca-certificates bookworm "$W/debian-slim.tar" "$W/apt.sources"
  podman import -q --change 'CMD ["bash"]' "$W/debian-slim.tar" docker.io/library/debian:bookworm-slim >/dev/null
  # rust:1-bookworm: the official image is buildpack-deps (gcc, make, git, curl, ...) plus
  # rustup's toolchain in /usr/local/rustup and /usr/local/cargo. Ours: gcc and friends, and
  # this machine's stable toolchain, at the same paths.
  local root=$W/rust-root
  rm -rf "$root"
  nice -n 10 mmdebstrap --quiet --variant=minbase --mode=root --format=directory "${hooks[@]}" \
    --include=ca-certificates,gcc,libc6-dev,make,git,curl,pkg-config bookworm "$root" "$W/apt.sources"
  local tc
  tc=$(rustc --print sysroot)
  mkdir -p "$root/usr/local/rustup/toolchains" "$root/usr/local/cargo/bin"
  cp -a "$tc/." "$root/usr/local/rustup/toolchains/stable/"
  rm -rf "$root/usr/local/rustup/toolchains/stable/share/doc"
  for b in "$root"/usr/local/rustup/toolchains/stable/bin/*; do
    ln -s "/usr/local/rustup/toolchains/stable/bin/$(basename "$b")" "$root/usr/local/cargo/bin/"
  done
  tar -C "$root" -cf "$W/rust-root.tar" .
  rm -rf "$root"
  podman import \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' "$W/rust-root.tar" docker.io/library/rust:1-bookworm >/dev/null
  rm -f "$W/debian-slim.tar" "$W/rust-root.tar"
  touch "$stamp"
}

# A static binary on an empty root, as NAME with ENTRYPOINT /BINARY.
binary_image() {
  local name=$1 bin=$2 dir
  have_image "$name" && [[ -f $W/stamp-${name//[\/:]/_} && $W/stamp-${name//[\/:]/_} -nt $bin ]] && return
  dir=$(mktemp -d)
  cp "$bin" "$dir/"
  tar -C "$dir" -cf "$dir.tar" .
  podman import -q --change "ENTRYPOINT [\"/$(basename "$bin")\"]" "$dir.tar" "$name" >/dev/null
  rm -rf "$dir" "$dir.tar"
  touch "$W/stamp-${name//[\/:]/_}"
}

busybox_image() {
  local dir
  have_image docker.io/library/busybox:1.36 && return
  dir=$(mktemp -d)
  mkdir -p "$dir"/{bin,etc,tmp,root,proc,sys,dev}
  cp /bin/busybox "$dir/bin/busybox"
  for a in $(/bin/busybox --list); do [[ -e $dir/bin/$a ]] || ln -s busybox "$dir/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$dir/etc/passwd"
  echo 'root:x:0:' >"$dir/etc/group"
  echo 'nobody:x:65534:65534:nobody:/:/bin/false' >>"$dir/etc/passwd"
  tar -C "$dir" -cf "$dir.tar" .
  podman import -q --change 'CMD ["sh"]' "$dir.tar" docker.io/library/busybox:1.36 >/dev/null
  rm -rf "$dir" "$dir.tar"
}

pause_image() {
  have_image registry.k8s.io/pause:3.10.1 && return
  local kdir dir
  kdir=$(GOMODCACHE=$CACHE/go/mod GOFLAGS=-mod=mod go mod download -json k8s.io/kubernetes@v1.34.4 | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  dir=$(mktemp -d)
  gcc -Os -static -DVERSION=3.10.1 -o "$dir/pause" "$kdir/build/pause/linux/pause.c"
  strip "$dir/pause"
  tar -C "$dir" -cf "$dir.tar" .
  podman import -q --change 'ENTRYPOINT ["/pause"]' "$dir.tar" registry.k8s.io/pause:3.10.1 >/dev/null
  rm -rf "$dir" "$dir.tar"
}

base_images
log "building rook-rbd:latest from the Dockerfile"
# --network host: the build's RUN steps reach the package registries exactly as this machine
# does, without a podman bridge on the host.
nice -n 10 "${PODMAN[@]}" build --pull=never --network host --layers -q -t docker.io/library/rook-rbd:latest \
  --build-arg REVISION="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  -f "$REPO/Dockerfile" "$REPO" >/dev/null
for s in csi-provisioner:v6.4.0 csi-attacher:v4.13.0 csi-resizer:v2.3.0 csi-snapshotter:v8.7.0 snapshot-controller:v8.7.0; do
  binary_image "registry.k8s.io/sig-storage/$s" "$BIN/${s%%:*}"
done
pause_image
busybox_image
binary_image registry.k8s.io/e2e-test-images/agnhost:2.56 "$BIN/agnhost"
# The e2e suite's busybox and nginx images: busybox stands in (the specs that run here only use
# a shell, sleep, dd and the like).
for t in registry.k8s.io/e2e-test-images/busybox:1.37.0-1 registry.k8s.io/e2e-test-images/busybox:1.36.1-1 \
  registry.k8s.io/e2e-test-images/nginx:1.14-4 registry.k8s.io/e2e-test-images/nginx:1.15-4; do
  podman tag docker.io/library/busybox:1.36 "$t"
done
IMAGES=(docker.io/library/rook-rbd:latest
  registry.k8s.io/sig-storage/csi-provisioner:v6.4.0 registry.k8s.io/sig-storage/csi-attacher:v4.13.0
  registry.k8s.io/sig-storage/csi-resizer:v2.3.0 registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0
  registry.k8s.io/sig-storage/snapshot-controller:v8.7.0 registry.k8s.io/pause:3.10.1
  docker.io/library/busybox:1.36 registry.k8s.io/e2e-test-images/agnhost:2.56
  registry.k8s.io/e2e-test-images/busybox:1.37.0-1 registry.k8s.io/e2e-test-images/busybox:1.36.1-1
  registry.k8s.io/e2e-test-images/nginx:1.14-4 registry.k8s.io/e2e-test-images/nginx:1.15-4)
rm -f "$OUT"
podman save -q -m --format docker-archive -o "$OUT" "${IMAGES[@]}"
log "images ready in $((SECONDS - t0)) s: $OUT ($(du -h "$OUT" | cut -f1))"
