#!/usr/bin/env bash
# Debian packages the Kubernetes e2e stage needs, installed only when missing:
# containerd + runc + CNI plugins (the node), iptables (kube-proxy), podman (builds the driver
# image from the project's Dockerfile), mmdebstrap (base images without a registry),
# skopeo (docker-archive for `ctr images import`), busybox-static and gcc (tiny test images and
# the pause binary), tini (a reaper: PID 1 here does not reap), openssl (cluster PKI).
set -euo pipefail
PACKAGES=(containerd runc containernetworking-plugins iptables socat podman mmdebstrap skopeo
  busybox-static tini openssl gcc libc6-dev iproute2 procps util-linux e2fsprogs xfsprogs)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[k8s-deps] installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian enables the containerd service on install; a test cluster runs its own, in its netns.
if command -v systemctl >/dev/null && systemctl is-active -q containerd 2>/dev/null; then
  systemctl stop containerd || true
fi
echo "[k8s-deps] ok"
