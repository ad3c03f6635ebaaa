#!/usr/bin/env bash
# node-floor.sh — the floor for the bench's node scenario: what NodeStage+NodePublish and
# NodeUnpublish+NodeUnstage do with the fuse mapper, as plain commands, with the same options the
# driver uses (src/node/mapper/fuse.rs, src/node/fs.rs). `rook-rbd bench --floor` times each step.
#
# Usage: node-floor.sh stage|unstage
# Environment (set by the bench):
#   FLOOR_DIR       a private work directory (fuse mountpoint, staging and target live here)
#   FLOOR_POOL FLOOR_IMAGE FLOOR_USER FLOOR_MONITORS FLOOR_KEYFILE
set -euo pipefail

: "${FLOOR_DIR:?}" "${FLOOR_POOL:?}" "${FLOOR_IMAGE:?}" "${FLOOR_USER:?}" "${FLOOR_MONITORS:?}" "${FLOOR_KEYFILE:?}"
mp=$FLOOR_DIR/fuse
staging=$FLOOR_DIR/staging
target=$FLOOR_DIR/target
file=$mp/$FLOOR_IMAGE

stage() {
    mkdir -p "$mp" "$staging" "$target"
    chmod 700 "$mp"
    # rbd-fuse daemonises once its FUSE mount is up; the image file shows once it has connected.
    CEPH_ARGS="--id $FLOOR_USER -m $FLOOR_MONITORS --keyfile $FLOOR_KEYFILE" \
        rbd-fuse -c /dev/null -p "$FLOOR_POOL" -r "$FLOOR_IMAGE" "$mp"
    local i
    for ((i = 0; i < 3000; i++)); do
        [[ -f $file ]] && break
        sleep 0.01
    done
    [[ -f $file ]] || { echo "rbd-fuse did not expose $file" >&2; exit 1; }
    local dev
    dev=$(losetup --find --show --direct-io=on "$file")
    printf '%s\n' "$dev" >"$FLOOR_DIR/loopdev"
    mkfs.ext4 -F -m0 -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$dev" >/dev/null 2>&1
    mount -t ext4 "$dev" "$staging"
    mount --bind "$staging" "$target"
}

unstage() {
    if mountpoint -q "$target"; then umount "$target"; fi
    if mountpoint -q "$staging"; then umount "$staging"; fi
    if [[ -f $FLOOR_DIR/loopdev ]]; then
        losetup -d "$(cat "$FLOOR_DIR/loopdev")" 2>/dev/null || true
        rm -f "$FLOOR_DIR/loopdev"
    fi
    # The rbd-fuse serving exactly this mountpoint (the path is unique to this run).
    local pids i
    pids=$(pgrep -f -x "rbd-fuse -c /dev/null -p $FLOOR_POOL -r $FLOOR_IMAGE $mp" || true)
    # A loop device detaches asynchronously; the fuse unmount may see it busy for a moment.
    for ((i = 0; i < 200; i++)); do
        mountpoint -q "$mp" || break
        umount "$mp" 2>/dev/null && break
        sleep 0.01
    done
    # rbd-fuse exits after its unmount; wait so the image has no watcher left, as the driver does.
    # A zombie (rbd-fuse daemonised, so init reaps it, maybe late) holds nothing any more.
    for pid in $pids; do
        for ((i = 0; i < 500; i++)); do
            [[ -e /proc/$pid ]] || break
            grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && break
            sleep 0.01
        done
    done
    rmdir "$target" "$staging" "$mp" 2>/dev/null || true
}

case "${1:-}" in
    stage) stage ;;
    unstage) unstage ;;
    *) echo "usage: $0 stage|unstage" >&2; exit 2 ;;
esac
