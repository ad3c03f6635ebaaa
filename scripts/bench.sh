#!/usr/bin/env bash
# bench.sh — what `make bench` runs: a release build, a dev cluster of its own, the driver
# started by the bench (so start-up to a ready Probe is timed), every scenario with the floor,
# and bench-results.json. Everything it starts is stopped on exit, success or not.
#
# Environment:
#   BENCH_CLUSTER_DIR   dev cluster directory (default <repo>/.dev-cluster-bench; removed at the end)
#   BENCH_COUNT BENCH_CONCURRENCY BENCH_NODE_COUNT BENCH_LIST BENCH_RSS_CYCLES BENCH_SCENARIOS
#   BENCH_SCALE_IMAGES  image counts the scale scenario lists at (default 100,1000,10000). The
#                       scale scenario is not in the default set: about 13 min, 10 of them
#                       removing its 9,000 librbd images; add it: BENCH_SCENARIOS=...,scale
#   BENCH_TRASH_DEFERMENT  the driver's --trash-deferment, seconds (default 5)
#   BENCH_JSON          result file (default <repo>/bench-results.json)
#   BENCH_KEEP_CLUSTER=1  leave the cluster running (for repeated runs)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DIR=${BENCH_CLUSTER_DIR:-$REPO/.dev-cluster-bench}
JSON=${BENCH_JSON:-$REPO/bench-results.json}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET/release/rook-rbd
WORK=$(mktemp -d /tmp/rook-rbd-bench.XXXXXX)
DRIVER_STARTED_CLUSTER=0

log() { printf '[bench] %s\n' "$*" >&2; }

free_port() {
    python3 - "$@" <<'PY'
import socket, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
for p in range(lo, hi):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass
    finally:
        s.close()
PY
}

cleanup() {
    local rc=$?
    set +e
    # Anything the driver or the floor script left under our work directory: mounts (deepest
    # first), loop devices over its files, rbd-fuse daemons serving its mountpoints.
    findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r m; do umount -l "$m"; done
    losetup -nl -O NAME,BACK-FILE | awk -v w="$WORK/" 'index($2, w) == 1 { print $1 }' |
        while read -r d; do losetup -d "$d"; done
    for pid in $(pgrep -f -- "rbd-fuse .*$WORK/"); do kill "$pid"; done
    findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r m; do umount -l "$m"; done
    if [[ $DRIVER_STARTED_CLUSTER == 1 && ${BENCH_KEEP_CLUSTER:-0} != 1 ]]; then
        bash scripts/ceph-dev.sh down "$DIR" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "release build"
cargo build --locked --release

# Only a new cluster uses the port; an existing one in $DIR keeps its own.
export CEPH_DEV_MON_PORT=${CEPH_DEV_MON_PORT:-$(free_port 3340 3399)}
DRIVER_STARTED_CLUSTER=1
bash scripts/ceph-dev.sh up "$DIR"
FSID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["clusterID"])' "$DIR/cluster-config.json")

mkdir -p "$WORK/secrets" "$WORK/kubelet"
chmod 700 "$WORK/secrets"
printf admin >"$WORK/secrets/userID"
tr -d '\n' <"$DIR/admin.key" >"$WORK/secrets/userKey"
chmod 600 "$WORK/secrets/"*
METRICS_PORT=$(free_port 19090 19190)
SOCK=$WORK/csi.sock

log "benchmark (driver log: $WORK/driver.log, copied to bench-driver.log)"
set +e
"$BIN" bench \
    --endpoint "unix://$SOCK" \
    --secret-dir "$WORK/secrets" \
    --param clusterID="$FSID" --param pool=rbd --param mounter=fuse \
    --size 1Gi \
    --count "${BENCH_COUNT:-100}" \
    --concurrency "${BENCH_CONCURRENCY:-16}" \
    --node-count "${BENCH_NODE_COUNT:-5}" \
    --list-volumes "${BENCH_LIST:-100}" \
    --rss-cycles "${BENCH_RSS_CYCLES:-1000,2000}" \
    --scenarios "${BENCH_SCENARIOS:-serial,concurrent,list,node,rss,purge}" \
    --scale-images "${BENCH_SCALE_IMAGES:-100,1000,10000}" \
    --trash-deferment "${BENCH_TRASH_DEFERMENT:-5}" \
    --floor --cluster-config "$DIR/cluster-config.json" \
    --kubelet-dir "$WORK/kubelet" \
    --node-floor-script "$REPO/scripts/node-floor.sh" \
    --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" \
    --json "$JSON" \
    --driver-log "$WORK/driver.log" \
    -- "$BIN" csi \
    --endpoint "unix://$SOCK" \
    --node-id bench-node \
    --cluster-config "$DIR/cluster-config.json" \
    --secret-dir "$WORK/secrets" \
    --kubelet-dir "$WORK/kubelet" \
    --state-dir "$WORK/kubelet/state" \
    --trash-deferment "${BENCH_TRASH_DEFERMENT:-5}" \
    --metrics-address "127.0.0.1:$METRICS_PORT"
rc=$?
set -e
cp "$WORK/driver.log" "$REPO/bench-driver.log" 2>/dev/null || true
exit $rc
