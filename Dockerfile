# syntax=docker/dockerfile:1
#
# rook-rbd: Ceph RBD CSI driver, operator and tools in one binary.
#
#   docker build -t rook-rbd:latest .
#
# BuildKit is required (the default builder since Docker 23): the build stage
# uses cache mounts so that rebuilding after a source change recompiles only
# this crate, not every dependency.

############################################################################
# Build stage
############################################################################
FROM rust:1-bookworm AS build

# protobuf-compiler, libprotobuf-dev: tonic-prost-build compiles the CSI protobufs in
#                    build.rs; the well-known types (descriptor.proto) come with -dev.
# librbd-dev / librados-dev: build.rs links against librbd and librados.
# Versions are not pinned (DL3008): Debian bookworm only ships the current
# point release of each package, so a pinned version stops resolving as soon
# as a security update lands. The base image tag is what pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        protobuf-compiler \
        libprotobuf-dev \
        librbd-dev \
        librados-dev \
        pkg-config \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependency layer: only the manifests, so this layer (and the downloaded
# crates in it) is reused by any build where Cargo.toml/Cargo.lock are
# unchanged, even without a BuildKit cache.
COPY Cargo.toml Cargo.lock ./
# vendor/ holds the patched h2 that Cargo.toml's [patch.crates-io] names (vendor/README.md).
COPY vendor ./vendor
RUN cargo fetch --locked

# Sources. .dockerignore keeps target/, .git and .dev-cluster out.
COPY . .

# The target/ directory lives in a BuildKit cache mount, so compiled
# dependencies survive between builds; the binary is copied out of it in
# the same RUN because cache mounts are not part of the image. (The cargo
# registry is deliberately not a cache mount: it would hide the crates that
# the `cargo fetch` layer above already holds.)
RUN --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --offline --bin rook-rbd \
 && install -D -m 0755 target/release/rook-rbd /usr/local/bin/rook-rbd

############################################################################
# Runtime stage
############################################################################
FROM debian:bookworm-slim

ARG VERSION=0.1.0
ARG REVISION=unknown

LABEL org.opencontainers.image.title="rook-rbd" \
      org.opencontainers.image.description="Ceph RBD block storage for Kubernetes: CSI driver (rbd.csi.ceph.rook.io), operator and tools" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# ceph-common        rbd CLI (krbd map/unmap), ceph.conf handling; pulls in
#                    librbd1 and librados2, which the binary links against
#                    (listed explicitly so that dependency is visible here).
# rbd-nbd, rbd-fuse  user-space mounters (mounter: nbd / fuse).
# e2fsprogs, xfsprogs mkfs / fsck / resize for ext4 and xfs.
# util-linux         mount, umount, blkid, findmnt, lsblk, nsenter.
# fuse3              fusermount3 for rbd-fuse.
# kmod               modprobe, so `rbd map` can load the rbd/nbd modules
#                    from the host's /lib/modules.
# ca-certificates    TLS to the Kubernetes API server and monitors.
# Versions are not pinned: see the note on DL3008 in the build stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        ceph-common \
        librbd1 \
        librados2 \
        rbd-nbd \
        rbd-fuse \
        e2fsprogs \
        xfsprogs \
        util-linux \
        fuse3 \
        kmod \
        ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /usr/local/bin/rook-rbd /usr/local/bin/rook-rbd

# No USER directive, on purpose: the same image runs the node plugin, which
# must be root and privileged (deploy/11-node.yaml) to map RBD devices,
# format and mount filesystems and propagate mounts into the kubelet's
# directory. The controller Deployment (deploy/10-controller.yaml) needs no
# root and drops it through its pod securityContext (runAsNonRoot, uid 65534)
# instead of baking a user in here.
ENTRYPOINT ["/usr/local/bin/rook-rbd"]
