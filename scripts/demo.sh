#!/usr/bin/env bash
# demo.sh — one real volume's whole life on a real (single-node, dev) Ceph cluster, step by step,
# each step with its wall-clock time: create, attach, stage, write, restage and verify, expand
# online, snapshot, clone, and tear everything down again.
#
# Usage: scripts/demo.sh            (or: make demo)
#
# Environment:
#   CEPH_DEV_DIR        the dev cluster's directory (default: <repo>/.dev-cluster). A cluster
#                       already running there is used and left running; otherwise the demo starts
#                       one and stops it at the end (a cluster it created is removed again).
#   CEPH_DEV_MON_PORT   monitor port for a new cluster (see scripts/ceph-dev.sh)
#   DEMO_FS             filesystem of the demo volume (default xfs: ext4 cannot grow online in
#                       containers without CAP_SYS_RESOURCE)
#   DEMO_FAIL_STEP=N    make step N fail, to see (and test) the cleanup after a failure
#
# Everything else lives in a temporary root (/tmp/rook-rbd-demo.XXXXXX: socket, secrets, kubelet
# and state directories, driver log) that is removed at the end. Exits 0 only if every step
# succeeded; on a failure it names the step, shows the driver's last log lines, and still cleans
# up: no mounts, loop devices or rbd-fuse processes are left behind.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
DIR=${CEPH_DEV_DIR:-$REPO/.dev-cluster}
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
DIR=${DIR%/}
cd "$REPO"

BIN=$REPO/target/debug/rook-rbd
FS=${DEMO_FS:-xfs}
NODE=demo-node
POOL=rbd
CEPH_DEV=(bash "$REPO/scripts/ceph-dev.sh")

# ------------------------------------------------------------------ state --
ROOT=            # temporary root
DRIVER_PID=      # the driver we started
CLUSTER_ACTION=  # what the end must do to the cluster: "" (leave it), down, keep-down
VOL='' SNAP='' CLONE_SNAP='' CLONE_VOL=''
IMAGES=()        # RBD image names the demo created
CTX=()           # volume context from CreateVolume, as --context k=v arguments
C_PUBLISHED=0 STAGED=0 MOUNTED=0
STEP=0
IN_STEP=0       # a step's command is running (its line is not finished)
T_START=

# ---------------------------------------------------------------- helpers --
now_us() { local t=${EPOCHREALTIME/[.,]/}; printf '%s' "$((10#$t))"; }
ms_since() { printf '%s' "$((($(now_us) - $1) / 1000))"; }
detail() { printf '       %s\n' "$@"; }
detail_file() { local l; while IFS= read -r l; do detail "$l"; done <"$1"; }
say() { printf '%s\n' "$*"; }
indent() { local l; while IFS= read -r l; do printf '  %s\n' "$l"; done; }

CLIENT=()       # the client command line, set once $ROOT exists
client() { "${CLIENT[@]}" "$@"; }
add_image() { [[ -n "$1" ]] && IMAGES+=("$1"); }

# step LABEL CMD...: runs CMD with stdout in $OUT_FILE and stderr in $ERR_FILE, prints
# "[ n] LABEL   123 ms"; on failure explains and exits (the EXIT trap cleans up).
OUT_FILE='' ERR_FILE=''
step() {
    local label=$1 t rc=0 ms
    shift
    STEP=$((STEP + 1))
    printf '[%2d] %-46s ' "$STEP" "$label"
    t=$(now_us)
    IN_STEP=1
    "$@" >"$OUT_FILE" 2>"$ERR_FILE" || rc=$?
    IN_STEP=0
    ms=$(ms_since "$t")
    if [[ $rc -eq 0 && "${DEMO_FAIL_STEP:-}" == "$STEP" ]]; then
        echo "DEMO_FAIL_STEP=$STEP: failing on purpose" >>"$ERR_FILE"
        rc=99
    fi
    if [[ $rc -ne 0 ]]; then
        printf '%6s ms  FAILED (exit %s)\n' "$ms" "$rc"
        fail "step [$STEP] \"$label\" failed"
    fi
    # The client reports the call's own time ("CreateVolume ok in 21.3 ms"); the step's time
    # also includes starting the client and connecting.
    local call
    call=$(sed -n 's/^[A-Za-z]* ok in \([0-9.]*\) ms$/\1/p' "$ERR_FILE" | tail -n 1)
    if [[ -n "$call" ]]; then printf '%6s ms   (call %s ms)\n' "$ms" "$call"; else printf '%6s ms\n' "$ms"; fi
}

# fail MESSAGE: what went wrong, the failing command's output, the driver's last log lines.
fail() {
    exec 1>&2
    say ""
    say "FAILED: $1"
    if [[ -n "$ERR_FILE" && -s "$ERR_FILE" ]]; then say "  its stderr:"; sed 's/^/    /' "$ERR_FILE" | tail -n 30; fi
    if [[ -n "$OUT_FILE" && -s "$OUT_FILE" ]]; then say "  its stdout:"; sed 's/^/    /' "$OUT_FILE" | tail -n 30; fi
    if [[ -n "$ROOT" && -s "$ROOT/driver.log" ]]; then
        say "  the driver log's last lines:"
        tail -n 25 "$ROOT/driver.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/    /'
    fi
    exit 1
}

out() { cat "$OUT_FILE"; }

# creating VAR CALL ARGS...: the next step creates something whose ID goes into VAR. Should the
# demo stop before it learns the ID (a failure, Ctrl-C), the cleanup repeats the call — creates
# are idempotent by name — to learn the ID and delete what was made.
PENDING_VAR='' PENDING_CALL=()
creating() { PENDING_VAR=$1; shift; PENDING_CALL=("$@"); }
created() { printf -v "$PENDING_VAR" '%s' "$(out)"; PENDING_VAR=''; }

# ------------------------------------------------------- step functions --
build() { cargo build --locked; }

# Use the dev cluster if it runs; else start it, and remember to stop it at the end.
CLUSTER_NOTE=
ensure_cluster() {
    if "${CEPH_DEV[@]}" status "$DIR" >/dev/null 2>&1; then
        CLUSTER_NOTE="was already running: using it, and leaving it running"
        return 0
    fi
    if [[ -f "$DIR/ceph.conf" ]]; then
        CLUSTER_ACTION=keep-down
        CLUSTER_NOTE="restarted the stopped cluster; it is stopped again at the end"
    else
        CLUSTER_ACTION=down
        CLUSTER_NOTE="created a new cluster; it is stopped and removed at the end"
    fi
    "${CEPH_DEV[@]}" up "$DIR" 3>&- 4>&-
}

start_driver() {
    mkdir -p "$ROOT/kubelet" "$ROOT/state"
    # NO_COLOR: plain text in the log file. setsid: a Ctrl-C of the demo must not reach the
    # driver, which is still needed to clean up (it stops on SIGINT as well as SIGTERM).
    NO_COLOR=1 setsid "$BIN" csi --endpoint "unix://$ROOT/csi.sock" --node-id "$NODE" \
        --cluster-config "$DIR/cluster-config.json" --secret-dir "$ROOT/secret" \
        --kubelet-dir "$ROOT/kubelet" --state-dir "$ROOT/state" \
        </dev/null >"$ROOT/driver.log" 2>&1 3>&- 4>&- &
    DRIVER_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        [[ -S "$ROOT/csi.sock" ]] && return 0
        if ! kill -0 "$DRIVER_PID" 2>/dev/null; then
            echo "the driver exited before opening its socket" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "no socket at $ROOT/csi.sock after 30 s" >&2
    return 1
}

# Probe until the driver reports ready (it checks the cluster in the background).
probe_ready() {
    local i r
    for ((i = 0; i < 75; i++)); do
        r=$(client probe) || return 1
        if [[ "$r" == *ready=true* ]]; then printf '%s\n' "$r"; return 0; fi
        sleep 0.2
    done
    printf '%s\n' "$r"
    echo "the driver did not become ready within 15 s" >&2
    return 1
}

write_file() {
    dd if=/dev/urandom of="$TARGET/demo-data.bin" bs=1M count=20 conv=fsync status=none &&
        sha256sum "$TARGET/demo-data.bin" | cut -d' ' -f1
}

verify_file() {
    local sum
    sum=$(sha256sum "$TARGET/demo-data.bin" | cut -d' ' -f1) || return 1
    printf '%s\n' "$sum"
    if [[ "$sum" != "$SUM" ]]; then
        echo "CHECKSUM MISMATCH: wrote $SUM, read back $sum" >&2
        return 1
    fi
}

# Wait (up to 15 s) until neither `rbd ls` nor `rbd trash ls` shows one of the demo's images
# (the driver removes trashed parents in the background once their clones are gone); prints both
# listings.
pool_clean() {
    local conf=$DIR/ceph.conf i img ls trash left
    for ((i = 0; i < 75; i++)); do
        ls=$(timeout 30 rbd -c "$conf" ls "$POOL") || return 1
        trash=$(timeout 30 rbd -c "$conf" trash ls "$POOL") || return 1
        left=()
        for img in "${IMAGES[@]}"; do
            if grep -qw -- "$img" <<<"$ls$trash"; then left+=("$img"); fi
        done
        [[ ${#left[@]} -eq 0 ]] && break
        sleep 0.2
    done
    echo "\$ rbd -c $conf ls $POOL"
    printf '  %s\n' "${ls:-(empty)}"
    echo "\$ rbd -c $conf trash ls $POOL"
    printf '  %s\n' "${trash:-(empty)}"
    if [[ ${#left[@]} -gt 0 ]]; then
        echo "still there after 15 s: ${left[*]}" >&2
        return 1
    fi
}

stop_driver() {
    [[ -n "$DRIVER_PID" ]] || return 0
    local i rc=0
    kill -TERM "$DRIVER_PID" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$DRIVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$DRIVER_PID" 2>/dev/null; then
        echo "driver still running 15 s after SIGTERM; killing it" >&2
        kill -KILL "$DRIVER_PID" 2>/dev/null || true
        rc=1
    fi
    wait "$DRIVER_PID" 2>/dev/null || true
    DRIVER_PID=
    return "$rc"
}

# Mounts, loop devices and rbd-fuse processes of this demo (under $ROOT), one per line.
leftovers() {
    [[ -n "$ROOT" ]] || return 0
    local pid
    awk -v r="$ROOT/" 'index($5, r) == 1 { print "mount " $5 }' /proc/self/mountinfo
    losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v r="$ROOT/" 'index($2, r) == 1 { print "loop " $1 " " $2 }'
    for pid in $(pgrep -x rbd-fuse || true); do
        if grep -qzF -- "$ROOT/" "/proc/$pid/cmdline" 2>/dev/null; then echo "rbd-fuse pid $pid"; fi
    done
    return 0
}

host_clean() {
    local left
    left=$(leftovers)
    [[ -z "$left" ]] && return 0
    echo "left behind:" >&2
    indent <<<"$left" >&2
    return 1
}

# Best effort: whatever the driver left under $ROOT — file system mounts, then loop devices,
# then rbd-fuse mounts and processes.
force_clean() {
    local mp dev pid
    while read -r mp; do
        timeout 20 umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    done < <(awk -v r="$ROOT/" 'index($5, r) == 1 && $0 !~ / - fuse\.rbd-fuse / { print $5 }' /proc/self/mountinfo | tac)
    while read -r dev; do
        losetup -d "$dev" 2>/dev/null || true
    done < <(losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v r="$ROOT/" 'index($2, r) == 1 { print $1 }')
    while read -r mp; do
        timeout 20 umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    done < <(awk -v r="$ROOT/" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | tac)
    for pid in $(pgrep -x rbd-fuse || true); do
        if grep -qzF -- "$ROOT/" "/proc/$pid/cmdline" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
}

# --------------------------------------------------------------- cleanup --
# The interrupted create's ID, by repeating it (retried: while the first call still runs in the
# driver, the repeat is refused as in flight).
relearn_id() {
    local i id
    for ((i = 0; i < 10; i++)); do
        if id=$(timeout 60 "${CLIENT[@]}" "${PENDING_CALL[@]}" 2>/dev/null) && [[ -n "$id" ]]; then
            printf -v "$PENDING_VAR" '%s' "$id"
            return 0
        fi
        sleep 1
    done
    say "  could not learn the ID of: ${PENDING_CALL[*]}"
}

# undo CALL ARGS...: one best-effort client call while cleaning up after a failure.
# A few tries: the interrupted call may still be running in the driver (Aborted meanwhile).
undo() {
    local i
    for ((i = 0; i < 5; i++)); do
        if timeout 60 "${CLIENT[@]}" "$@" >/dev/null 2>&1; then say "  $1 ok"; return 0; fi
        sleep 1
    done
    say "  $1 failed"
}

on_exit() {
    local rc=$? left
    set +e
    # Back to the demo's own stdout and stderr: a signal's trap runs inside a step's redirection.
    exec 1>&3 2>&4
    if [[ $IN_STEP == 1 ]]; then printf 'interrupted\n'; fi
    trap - EXIT INT TERM
    if [[ -n "$DRIVER_PID" ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        if [[ $rc -ne 0 ]]; then say ""; say "cleaning up after the failure (best effort)"; fi
        # Undo what a failed run left, newest first, through the driver itself.
        if [[ -n "$PENDING_VAR" && -z "${!PENDING_VAR}" ]]; then relearn_id; fi
        if [[ $MOUNTED == 1 ]]; then undo umount "$VOL" --target "$TARGET"; fi
        if [[ $STAGED == 1 ]]; then undo unstage "$VOL" --staging-path "$STAGING"; fi
        if [[ $C_PUBLISHED == 1 ]]; then undo unpublish "$VOL" --node "$NODE"; fi
        local id
        for id in "$CLONE_VOL" "$CLONE_SNAP"; do
            if [[ -n "$id" ]]; then undo delete "$id"; fi
        done
        if [[ -n "$SNAP" ]]; then undo delete-snapshot "$SNAP"; fi
        if [[ -n "$VOL" ]]; then undo delete "$VOL"; fi
        stop_driver
    elif [[ -n "$VOL$SNAP$CLONE_VOL$CLONE_SNAP" ]]; then
        say ""
        say "the driver is gone, so these stay in pool $POOL: ${IMAGES[*]}"
    fi
    if [[ -n "$ROOT" ]]; then
        left=$(leftovers)
        if [[ -n "$left" ]]; then
            say "the driver left these behind; removing them:"
            indent <<<"$left"
            force_clean
            sleep 0.5
            rc=1
        fi
        left=$(leftovers)
        if grep -q '^mount ' <<<"$left"; then
            say "still mounted, so $ROOT is kept:"
            indent <<<"$left"
        else
            rm -rf --one-file-system "$ROOT"
        fi
    fi
    case "$CLUSTER_ACTION" in
        down) "${CEPH_DEV[@]}" down "$DIR" >/dev/null 2>&1 && say "dev cluster stopped and removed ($DIR)" ;;
        keep-down) KEEP=1 "${CEPH_DEV[@]}" down "$DIR" >/dev/null 2>&1 && say "dev cluster stopped again (data kept in $DIR)" ;;
    esac
    case "$rc" in
        0) ;;
        130 | 143) say "demo interrupted" ;;
        *) say "demo FAILED" ;;
    esac
    exit "$rc"
}
exec 3>&1 4>&2
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ main --
T_START=$(now_us)
ROOT=$(mktemp -d /tmp/rook-rbd-demo.XXXXXX)
OUT_FILE=$ROOT/step.out
ERR_FILE=$ROOT/step.err
STAGING=$ROOT/kubelet/staging/vol1
TARGET=$ROOT/kubelet/pods/pod1/vol
NAME_SUFFIX=${ROOT##*.}
NAME_SUFFIX=${NAME_SUFFIX,,}
CLIENT=("$BIN" client --endpoint "unix://$ROOT/csi.sock" --secret-dir "$ROOT/secret")

say "rook-rbd demo: one volume's whole life on a real Ceph cluster"
say "  cluster dir $DIR, temporary root $ROOT"
say ""

command -v cargo >/dev/null || fail "cargo is not installed (https://rustup.rs)"
command -v "mkfs.$FS" >/dev/null || fail "mkfs.$FS is missing: run 'make deps'"
command -v rbd-fuse >/dev/null || fail "rbd-fuse is missing: run 'make deps'"

step "build (cargo build --locked)" build

step "dev cluster (scripts/ceph-dev.sh status/up)" ensure_cluster
detail "$CLUSTER_NOTE"
FSID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[0]["clusterID"])' "$DIR/cluster-config.json") ||
    fail "no clusterID in $DIR/cluster-config.json"
detail "fsid $FSID, $(grep -o 'v2:[0-9.:]*' "$DIR/ceph.conf" | head -1)"

mkdir -m 0700 "$ROOT/secret"
printf 'admin' >"$ROOT/secret/userID"
(umask 077 && cat "$DIR/admin.key" >"$ROOT/secret/userKey")

step "start the driver, wait for its socket" start_driver
detail "rook-rbd csi --endpoint unix://$ROOT/csi.sock --node-id $NODE (log: driver.log)"

step "Probe" probe_ready
detail "$(out)"

PARAMS=(--param "clusterID=$FSID" --param "pool=$POOL" --param mounter=auto)
creating VOL create "demo-$NAME_SUFFIX" --size 1G "${PARAMS[@]}"
step "CreateVolume, 1 GiB" client "${PENDING_CALL[@]}"
created
detail "volume $VOL"
while read -r kv; do
    CTX+=(--context "$kv")
    if [[ "$kv" == imageName=* ]]; then add_image "${kv#imageName=}"; fi
done < <(sed -n 's/^  context \([A-Za-z0-9._/-]*=.*\)$/\1/p' "$ERR_FILE")
[[ " ${CTX[*]} " == *" mounter="* ]] || CTX+=(--context mounter=auto)
[[ ${#IMAGES[@]} -gt 0 ]] || fail "CreateVolume returned no imageName in its volume context"
detail "image $POOL/${IMAGES[0]}"

step "ListVolumes" client list
# ID, size in bytes, nodes it is published to
awk -F'\t' '{ printf "%s  %s bytes  published to: %s\n", $1, $2, ($3 == "" ? "(none)" : $3) }' "$OUT_FILE" >"$ROOT/list.txt"
detail_file "$ROOT/list.txt"

C_PUBLISHED=1
step "ControllerPublishVolume to $NODE" client publish "$VOL" --node "$NODE"
detail "publish context: $(paste -sd' ' "$OUT_FILE")"

# What `mounter: auto` picks on this node, as the driver decides it.
if [[ -e /sys/bus/rbd ]]; then MAPPER=krbd
elif [[ -e /sys/block/nbd0 || -e /dev/nbd0 ]]; then MAPPER=nbd
else MAPPER=fuse; fi

STAGED=1
step "NodeStageVolume (auto -> $MAPPER mapper, $FS)" client stage "$VOL" --staging-path "$STAGING" --fs "$FS" "${CTX[@]}"
read -r DEVICE FSTYPE < <(findmnt -n -o SOURCE,FSTYPE --mountpoint "$STAGING") || true
detail "$DEVICE ($FSTYPE) mounted at $STAGING"
case "$DEVICE" in
    /dev/loop*) detail "rbd-fuse exposes the image as a file; a loop device makes it a block device" ;;
    /dev/rbd*) detail "mapped by the kernel's rbd module" ;;
    /dev/nbd*) detail "mapped by rbd-nbd" ;;
esac

MOUNTED=1
step "NodePublishVolume into the pod's directory" client mount "$VOL" --staging-path "$STAGING" --target "$TARGET" "${CTX[@]}"
detail "$TARGET"

step "write 20 MiB of random data, fsync, sha256" write_file
SUM=$(out)
detail "sha256 $SUM"

step "NodeUnpublishVolume" client umount "$VOL" --target "$TARGET"
MOUNTED=0
step "NodeUnstageVolume (unmount, unmap)" client unstage "$VOL" --staging-path "$STAGING"
STAGED=0

STAGED=1
step "NodeStageVolume again" client stage "$VOL" --staging-path "$STAGING" --fs "$FS" "${CTX[@]}"
MOUNTED=1
step "NodePublishVolume again" client mount "$VOL" --staging-path "$STAGING" --target "$TARGET" "${CTX[@]}"
step "read the file back and compare its sha256" verify_file
detail "sha256 $(out): matches"

say "       df -h before expanding:"
df -h "$TARGET" | sed 's/^/         /'
step "ControllerExpandVolume to 2 GiB (online)" client expand "$VOL" 2G
read -r NEW_SIZE NODE_EXP <"$OUT_FILE"
detail "capacity now $NEW_SIZE bytes, $NODE_EXP"
step "NodeExpandVolume (grow $FS while mounted)" client node-expand "$VOL" --path "$TARGET"
say "       df -h after expanding:"
df -h "$TARGET" | sed 's/^/         /'
step "NodeGetVolumeStats" client stats "$VOL" --path "$TARGET"
# unit=1 is bytes, unit=2 inodes
awk '/^unit=1 / { u = "bytes: " } /^unit=2 / { u = "inodes:" } /^unit=/ { sub(/^unit=[0-9]* /, ""); print u, $0 }
     /^abnormal=/ { print "condition:", $0 }' "$OUT_FILE" >"$ROOT/stats.txt"
detail_file "$ROOT/stats.txt"

creating SNAP snapshot "demo-snap-$NAME_SUFFIX" --source "$VOL"
step "CreateSnapshot" client "${PENDING_CALL[@]}"
created
detail "snapshot $SNAP"
add_image "$(sed -n 's/.*-\(csi-snap-[0-9a-f]*\)$/\1/p' <<<"$SNAP")"

creating CLONE_SNAP create "demo-from-snap-$NAME_SUFFIX" --size 2G "${PARAMS[@]}" --from-snapshot "$SNAP"
step "CreateVolume from the snapshot" client "${PENDING_CALL[@]}"
created
detail "volume $CLONE_SNAP"
add_image "$(sed -n 's/^  context imageName=//p' "$ERR_FILE")"

creating CLONE_VOL create "demo-from-vol-$NAME_SUFFIX" --size 2G "${PARAMS[@]}" --from-volume "$VOL"
step "CreateVolume from the volume (clone)" client "${PENDING_CALL[@]}"
created
detail "volume $CLONE_VOL"
add_image "$(sed -n 's/^  context imageName=//p' "$ERR_FILE")"

step "ListSnapshots of the volume" client list-snapshots --source "$VOL"
# snapshot ID, size in bytes, source volume ID
awk -F'\t' '{ printf "%s  %s bytes  of %s\n", $1, $2, $3 }' "$OUT_FILE" >"$ROOT/snaps.txt"
detail_file "$ROOT/snaps.txt"

step "GetCapacity of pool $POOL" client capacity --param "clusterID=$FSID" --param "pool=$POOL"
detail "$(out) bytes available ($(numfmt --to=iec-i --suffix=B "$(out)"))"

step "NodeUnpublishVolume" client umount "$VOL" --target "$TARGET"
MOUNTED=0
step "NodeUnstageVolume" client unstage "$VOL" --staging-path "$STAGING"
STAGED=0
step "ControllerUnpublishVolume from $NODE" client unpublish "$VOL" --node "$NODE"
C_PUBLISHED=0
step "DeleteVolume (clone of the snapshot)" client delete "$CLONE_SNAP"
CLONE_SNAP=
step "DeleteVolume (clone of the volume)" client delete "$CLONE_VOL"
CLONE_VOL=
step "DeleteSnapshot" client delete-snapshot "$SNAP"
SNAP=
step "DeleteVolume" client delete "$VOL"
VOL=

step "rbd ls / rbd trash ls: no demo image left" pool_clean
detail_file "$OUT_FILE"
detail "none of the demo's ${#IMAGES[@]} images is left: ${IMAGES[*]}"

step "stop the driver (SIGTERM)" stop_driver
step "no mounts, loop devices or rbd-fuse left" host_clean

case "$CLUSTER_ACTION" in
    down) step "stop and remove the dev cluster (ours)" "${CEPH_DEV[@]}" down "$DIR" ;;
    keep-down) step "stop the dev cluster again (data kept)" env KEEP=1 "${CEPH_DEV[@]}" down "$DIR" ;;
esac
CLUSTER_ACTION=

say ""
say "all $STEP steps ok; total $(awk -v ms="$(ms_since "$T_START")" 'BEGIN { printf "%.1f", ms / 1000 }') s"
