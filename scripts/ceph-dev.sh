#!/usr/bin/env bash
# ceph-dev.sh — single-node development Ceph cluster (1 mon, 1 mgr, 1 bluestore
# OSD on a sparse file) bound to 127.0.0.1, living entirely in one directory.
#
# Usage:
#   scripts/ceph-dev.sh up     [DIR]   start (or create) the cluster, wait until usable
#   scripts/ceph-dev.sh down   [DIR]   stop its daemons; remove the data unless KEEP=1
#   scripts/ceph-dev.sh status [DIR]   show daemons and `ceph -s`
#   scripts/ceph-dev.sh env    [DIR]   print `export ...` lines for `eval "$(...)"`
#   scripts/ceph-dev.sh kill-daemon  mon|mgr|osd [DIR]   SIGKILL one daemon (a crash), wait until gone
#   scripts/ceph-dev.sh stop-daemon  mon|mgr|osd [DIR]   SIGTERM one daemon, wait until gone
#   scripts/ceph-dev.sh start-daemon mon|mgr|osd [DIR]   start it again, wait until it serves
#   scripts/ceph-dev.sh wait-clean   [DIR]   wait until every PG is active+clean
#
# DIR defaults to $CEPH_DEV_DIR, else <repo>/.dev-cluster.
#
# Environment:
#   CEPH_DEV_DIR        default cluster directory
#   CEPH_DEV_ADDR       the address every daemon binds for a *new* cluster (default
#                       127.0.0.1; the Kubernetes e2e stage uses its netns's node address)
#   CEPH_DEV_MON_PORT   monitor (msgr2) port for a *new* cluster (default: 3300, or the
#                       first free port in 3301-3399 if 3300 is taken and this is unset)
#   CEPH_DEV_OSD_SIZE   sparse size of the OSD block file for a new cluster (default 10G)
#   KEEP=1              `down` keeps the data; a later `up` restarts the same cluster
#   CEPH_DEV_NO_INSTALL=1  never run apt-get (fail if packages are missing)
#   CEPH_DEV_WAIT       seconds `wait-clean` waits (default 120)
#
# Files written into DIR (secrets are mode 0600):
#   ceph.conf                     cluster config (mon_host = v2:127.0.0.1:PORT)
#   ceph.client.admin.keyring     admin keyring (found automatically via ceph.conf)
#   ceph.client.csi.keyring       keyring of client.csi (mon/osd/mgr 'profile rbd')
#   admin.key, csi.key            bare base64 keys (for --keyfile / CSI secrets)
#   cluster-config.json           ceph-csi style: [{"clusterID": FSID, "monitors": [...]}]
#   secrets.yaml                  csi-sanity --csi.secrets (uses client.admin)
#   params.yaml                   csi-sanity --csi.testvolumeparameters (clusterID, pool)
#   mon/ mgr/ osd/ osd.0.block run/ log/ crash/   daemon state, sockets, pid files, logs
#
# Daemons only ever get `-c DIR/ceph.conf`; `down` only touches processes whose
# command line carries exactly that config path.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

PACKAGES=(ceph-mon ceph-mgr ceph-osd ceph-common rbd-fuse rbd-nbd)
MON_ID=a
MGR_ID=x
OSD_ID=0
POOL=rbd
ADDR=${CEPH_DEV_ADDR:-127.0.0.1}

log() { printf '[ceph-dev] %s\n' "$*" >&2; }
die() { printf '[ceph-dev] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
    exit 2
}

now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- packages --

ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ "${CEPH_DEV_NO_INSTALL:-0}" == 1 ]] && die "missing packages: ${missing[*]} (CEPH_DEV_NO_INSTALL=1)"
    [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]}; run as root or install them"
    log "installing missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >&2
}

# --------------------------------------------------------------- processes --

# PIDs of live ceph daemons (mon/mgr/osd) whose argv contains exactly "$CONF".
cluster_pids() {
    local pid
    for pid in $(pgrep -x 'ceph-(mon|mgr|osd)' || true); do
        has_conf_arg "$pid" && echo "$pid"
    done
    return 0
}

# has_conf_arg PID: the process is alive (not a zombie) and has "$CONF" in argv.
has_conf_arg() {
    local arg state=
    [[ -r /proc/$1/cmdline ]] || return 1
    while IFS= read -r -d '' arg; do
        if [[ "$arg" == "$CONF" ]]; then
            read -r _ state _ < <(grep '^State:' "/proc/$1/status" 2>/dev/null) || true
            # (explicit status: a bare `return` inside the EXIT trap would return the trap's $?)
            if [[ "$state" == Z ]]; then return 1; else return 0; fi
        fi
    done < "/proc/$1/cmdline" 2>/dev/null
    return 1
}

# PID of one daemon ("mon.a", "osd.0", ...) of this cluster, if running.
daemon_pid() {
    local pidf="$DIR/run/$1.pid" pid=
    [[ -s "$pidf" ]] || return 1
    read -r pid < "$pidf" || true
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    has_conf_arg "$pid" || return 1
    echo "$pid"
}

# ----------------------------------------------------------------- helpers --

# ceph CLI against this cluster as client.admin, bounded in time.
c() { timeout "${CT:-30}" ceph -c "$CONF" --connect-timeout "${CT:-30}" "$@"; }

mon_port_from_conf() {
    sed -n 's/^[[:space:]]*mon[ _]host[[:space:]]*=.*:\([0-9][0-9]*\).*/\1/p' "$CONF" | head -1
}

mon_addr_from_conf() {
    sed -n 's/^[[:space:]]*public[ _]addr[[:space:]]*=[[:space:]]*\([0-9.]*\).*/\1/p' "$CONF" | head -1
}

fsid_from_conf() {
    sed -n 's/^[[:space:]]*fsid[[:space:]]*=[[:space:]]*\([0-9a-f-]*\).*/\1/p' "$CONF" | head -1
}

port_in_use() {
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

wait_until() { # wait_until SECONDS DESCRIPTION CMD...
    local limit=$1 what=$2 start
    shift 2
    start=$(now)
    while ! "$@" >/dev/null 2>&1; do
        if awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
            log "timed out after ${limit}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

osd_up_in() {
    local s
    s=$(CT=5 c osd dump -f json 2>/dev/null) || return 1
    python3 -c '
import json, sys
d = json.load(sys.stdin)
ok = any(o["osd"] == int(sys.argv[1]) and o["up"] == 1 and o["in"] == 1 for o in d["osds"])
sys.exit(0 if ok else 1)' "$OSD_ID" <<<"$s"
}

mon_ok() { CT=3 c mon stat; }

mgr_active() {
    local s
    s=$(CT=5 c mgr stat -f json 2>/dev/null) || return 1
    python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("available") else 1)' <<<"$s"
}

pool_exists() { CT=5 c osd pool ls 2>/dev/null | grep -qx "$POOL"; }

rbd_smoke_test() {
    local img="ceph-dev-smoke-$$"
    timeout 30 rbd -c "$CONF" create "$POOL/$img" --size 64M \
        --image-feature layering,exclusive-lock,object-map,fast-diff,deep-flatten >/dev/null &&
        timeout 30 rbd -c "$CONF" rm "$POOL/$img" >/dev/null 2>&1
}

start_daemon() { # start_daemon TYPE ID ; daemonizes, closes our lock fd
    local type=$1 id=$2
    if daemon_pid "$type.$id" >/dev/null; then return 0; fi
    rm -f "$DIR/run/$type.$id.pid" "$DIR/run/ceph-$type.$id.asok"
    "ceph-$type" -c "$CONF" -i "$id" 9>&- </dev/null >>"$DIR/log/ceph-$type.$id.stdout" 2>&1 ||
        die "ceph-$type.$id failed to start; see $DIR/log/ceph-$type.$id.log"
}

# ----------------------------------------------------------------- configs --

write_conf() {
    local fsid=$1 port=$2 osd_size=$3
    cat >"$CONF" <<EOF
# Generated by scripts/ceph-dev.sh — single-node dev cluster, not for production.
[global]
fsid = $fsid
mon host = v2:$ADDR:$port
public addr = $ADDR
cluster addr = $ADDR
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $DIR/run
crash dir = $DIR/crash

osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mon pg warn min per osd = 0
rbd default clone format = 2

[client]
keyring = $DIR/\$cluster.\$name.keyring
log file = $DIR/log/\$cluster-\$name.log
admin socket = $DIR/run/\$cluster-\$name.\$pid.\$cctid.asok

[mon]
mon data = $DIR/mon/\$cluster-\$id
mon cluster log file = $DIR/log/\$cluster.log
admin socket = $DIR/run/\$cluster-\$name.asok
log file = $DIR/log/\$cluster-\$name.log
pid file = $DIR/run/\$name.pid
mgr initial modules = iostat
mon osd report timeout = 60
paxos propose interval = 0.1

[mgr]
mgr data = $DIR/mgr/\$cluster-\$id
keyring = $DIR/mgr/\$cluster-\$id/keyring
admin socket = $DIR/run/\$cluster-\$name.asok
log file = $DIR/log/\$cluster-\$name.log
pid file = $DIR/run/\$name.pid

[osd]
osd data = $DIR/osd/\$cluster-\$id
keyring = $DIR/osd/\$cluster-\$id/keyring
admin socket = $DIR/run/\$cluster-\$name.asok
log file = $DIR/log/\$cluster-\$name.log
pid file = $DIR/run/\$name.pid
osd objectstore = bluestore
bluestore block path = $DIR/osd.\$id.block
bluestore block create = true
bluestore block size = $osd_size
bluestore fsck on mkfs = false
bluestore fsck on mount = false
bluestore cache autotune = false
bluestore cache size = 268435456
osd memory target = 1073741824
osd op num shards = 2
osd op num threads per shard = 1
EOF
}

write_csi_files() {
    local fsid=$1 port=$2 admin_key
    admin_key=$(ceph-authtool -p -n client.admin "$DIR/ceph.client.admin.keyring")
    (
        umask 077
        ceph-authtool -p -n client.admin "$DIR/ceph.client.admin.keyring" >"$DIR/admin.key"
        ceph-authtool -p -n client.csi "$DIR/ceph.client.csi.keyring" >"$DIR/csi.key"
        {
            echo "# csi-sanity --csi.secrets file (keys of csi-test v5.4.0 CSISecrets)."
            echo "# Uses client.admin; the restricted client.csi key is in csi.key."
            local k
            for k in CreateVolumeSecret DeleteVolumeSecret ControllerPublishVolumeSecret \
                ControllerUnpublishVolumeSecret ControllerValidateVolumeCapabilitiesSecret \
                NodeStageVolumeSecret NodePublishVolumeSecret CreateSnapshotSecret \
                DeleteSnapshotSecret ControllerExpandVolumeSecret ControllerModifyVolumeSecret \
                ListSnapshotsSecret; do
                printf '%s:\n  userID: admin\n  userKey: "%s"\n' "$k" "$admin_key"
            done
        } >"$DIR/secrets.yaml"
    )
    chmod 0600 "$DIR/secrets.yaml" "$DIR/admin.key" "$DIR/csi.key" \
        "$DIR/ceph.client.admin.keyring" "$DIR/ceph.client.csi.keyring"
    printf '[{"clusterID": "%s", "monitors": ["%s:%s"]}]\n' "$fsid" "$ADDR" "$port" >"$DIR/cluster-config.json"
    printf 'clusterID: "%s"\npool: "%s"\n' "$fsid" "$POOL" >"$DIR/params.yaml"
}

# Everything this script may create inside DIR (nothing else is ever deleted).
OWNED=(ceph.conf ceph.client.admin.keyring ceph.client.csi.keyring admin.key csi.key
    cluster-config.json secrets.yaml params.yaml initial.keyring monmap
    mon mgr osd run log crash osd.0.block .ceph-dev .lock)

remove_data() {
    local f
    for f in "${OWNED[@]}"; do
        [[ "$f" == .lock ]] && continue
        rm -rf "${DIR:?}/$f"
    done
    rm -f "$DIR/.lock"
    rmdir "$DIR" 2>/dev/null || true
}

# ---------------------------------------------------------------- commands --

create_cluster() {
    local port=${CEPH_DEV_MON_PORT:-3300} osd_size=${CEPH_DEV_OSD_SIZE:-10G} fsid osd_uuid t
    case "$osd_size" in
        *[Gg]) osd_size=$(( ${osd_size%[Gg]} * 1024 * 1024 * 1024 )) ;;
        *[Mm]) osd_size=$(( ${osd_size%[Mm]} * 1024 * 1024 )) ;;
    esac
    if port_in_use "$port"; then
        if [[ -n "${CEPH_DEV_MON_PORT:-}" ]]; then
            die "port $ADDR:$port (CEPH_DEV_MON_PORT) is already in use"
        fi
        local p
        for ((p = 3301; p < 3400; p++)); do port_in_use "$p" || break; done
        [[ $p -lt 3400 ]] || die "no free monitor port in $ADDR:3300-3399"
        log "port 3300 is in use (another cluster?); using $p instead — read it from cluster-config.json or 'env'"
        port=$p
    fi
    log "creating new cluster in $DIR (mon v2:$ADDR:$port)"
    # leftovers of an earlier, failed attempt
    local f
    for f in "${OWNED[@]}"; do [[ "$f" == .lock ]] || rm -rf "${DIR:?}/$f"; done
    touch "$DIR/.ceph-dev"
    mkdir -p "$DIR/run" "$DIR/log" "$DIR/crash" "$DIR/mon/ceph-$MON_ID" \
        "$DIR/mgr/ceph-$MGR_ID" "$DIR/osd/ceph-$OSD_ID"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$fsid" "$port" "$osd_size"

    # Keys: generated by ceph-authtool straight into files (never on argv or stdout).
    (
        umask 077
        ceph-authtool "$DIR/ceph.client.admin.keyring" --create-keyring --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
        ceph-authtool "$DIR/ceph.client.csi.keyring" --create-keyring --gen-key -n client.csi \
            --cap mon 'profile rbd' --cap osd 'profile rbd' --cap mgr 'profile rbd'
        ceph-authtool "$DIR/osd/ceph-$OSD_ID/keyring" --create-keyring --gen-key -n "osd.$OSD_ID" \
            --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
        ceph-authtool "$DIR/mgr/ceph-$MGR_ID/keyring" --create-keyring --gen-key -n "mgr.$MGR_ID" \
            --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
        ceph-authtool "$DIR/initial.keyring" --create-keyring --gen-key -n mon. --cap mon 'allow *'
        for f in "$DIR/ceph.client.admin.keyring" "$DIR/ceph.client.csi.keyring" \
            "$DIR/osd/ceph-$OSD_ID/keyring" "$DIR/mgr/ceph-$MGR_ID/keyring"; do
            ceph-authtool "$DIR/initial.keyring" --import-keyring "$f"
        done
    ) >/dev/null

    # OSD mkfs does not need the monitor: run it in parallel with mon bring-up.
    t=$(now)
    ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$osd_uuid" --no-mon-config \
        9>&- </dev/null >"$DIR/log/osd-mkfs.log" 2>&1 &
    MKFS_PID=$!

    monmaptool --create --fsid "$fsid" --addv "$MON_ID" "[v2:$ADDR:$port]" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" -i "$MON_ID" --mkfs --monmap "$DIR/monmap" --keyring "$DIR/initial.keyring" \
        >"$DIR/log/mon-mkfs.log" 2>&1 || { cat "$DIR/log/mon-mkfs.log" >&2; die "ceph-mon --mkfs failed"; }
    rm -f "$DIR/initial.keyring" "$DIR/monmap"
    start_daemon mon "$MON_ID"
    start_daemon mgr "$MGR_ID"

    wait_until 20 "monitor quorum" mon_ok ||
        die "monitor did not come up; see $DIR/log/ceph-mon.$MON_ID.log"
    log "mon up ($(elapsed "$t")s)"
    c osd new "$osd_uuid" "$OSD_ID" >/dev/null || die "ceph osd new failed"
    c osd set-require-min-compat-client mimic --yes-i-really-mean-it >/dev/null 2>&1 ||
        c osd set-require-min-compat-client mimic >/dev/null
    c osd pool create "$POOL" 8 8 replicated >/dev/null 2>&1 || true # retried below

    if ! wait "$MKFS_PID"; then
        MKFS_PID=
        tail -n 20 "$DIR/log/osd-mkfs.log" >&2
        die "ceph-osd --mkfs failed"
    fi
    MKFS_PID=
    log "osd mkfs done ($(elapsed "$t")s)"
    start_daemon osd "$OSD_ID"
    write_csi_files "$fsid" "$port"
}

MKFS_PID=
UP_OK=1
# On a failed `up`, leave no daemon behind (data and logs stay for inspection).
on_up_exit() {
    [[ "$UP_OK" == 1 ]] && return 0
    log "up failed; stopping what was started (logs kept in $DIR/log; '$0 down $DIR' removes everything)"
    if [[ -n "$MKFS_PID" ]]; then kill "$MKFS_PID" 2>/dev/null || true; wait "$MKFS_PID" 2>/dev/null || true; fi
    stop_daemons || true
}

cmd_up() {
    local t0 fsid port
    t0=$(now)
    ensure_packages
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "another ceph-dev.sh is operating on $DIR"
    UP_OK=0
    trap on_up_exit EXIT

    if [[ -f "$CONF" && -d "$DIR/mon/ceph-$MON_ID" && -f "$DIR/osd/ceph-$OSD_ID/fsid" ]] &&
        daemon_pid "mon.$MON_ID" >/dev/null && daemon_pid "mgr.$MGR_ID" >/dev/null &&
        daemon_pid "osd.$OSD_ID" >/dev/null && CT=5 pool_exists; then
        log "cluster in $DIR is already running"
        echo "cluster already up ($(elapsed "$t0")s)"
        UP_OK=1
        return 0
    fi

    if [[ -f "$CONF" && -f "$DIR/mon/ceph-$MON_ID/store.db/CURRENT" && -f "$DIR/osd/ceph-$OSD_ID/ready" ]]; then
        port=$(mon_port_from_conf)
        if ! daemon_pid "mon.$MON_ID" >/dev/null && port_in_use "$port"; then
            die "port $(mon_addr_from_conf):$port is already in use by another process"
        fi
        log "restarting existing cluster in $DIR"
        start_daemon mon "$MON_ID"
        start_daemon mgr "$MGR_ID"
        start_daemon osd "$OSD_ID"
        wait_until 20 "monitor quorum" mon_ok ||
            die "monitor did not come up; see $DIR/log/ceph-mon.$MON_ID.log"
    else
        create_cluster
    fi

    wait_until 30 "osd.$OSD_ID up+in" osd_up_in ||
        die "osd.$OSD_ID did not come up; see $DIR/log/ceph-osd.$OSD_ID.log"
    log "osd.$OSD_ID up+in ($(elapsed "$t0")s)"
    if ! pool_exists; then
        c osd pool create "$POOL" 8 8 replicated >/dev/null
        rm -f "$DIR/run/pool-initialized"
    fi
    if [[ ! -f "$DIR/run/pool-initialized" ]]; then
        timeout 30 rbd -c "$CONF" pool init "$POOL" || die "rbd pool init $POOL failed"
        touch "$DIR/run/pool-initialized"
    fi
    wait_until 30 "rbd create/rm on pool $POOL" rbd_smoke_test || die "pool $POOL is not usable"
    log "pool $POOL usable ($(elapsed "$t0")s)"
    wait_until 15 "active mgr" mgr_active || log "warning: no active mgr yet (see $DIR/log/ceph-mgr.$MGR_ID.log)"
    local health
    health=$(CT=10 c health 2>/dev/null || echo "unknown")
    log "health: $health"
    UP_OK=1
    echo "cluster up in $(elapsed "$t0")s (dir $DIR, fsid $(fsid_from_conf), mon $(mon_addr_from_conf):$(mon_port_from_conf))"
}

# stop_pids WHAT SECONDS PID...: SIGTERM, wait up to SECONDS, then SIGKILL and wait.
stop_pids() {
    local what=$1 limit=$2 i p alive=() targets=()
    shift 2
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do
        alive=()
        for p in "$@"; do has_conf_arg "$p" && alive+=("$p"); done
        [[ ${#alive[@]} -eq 0 ]] && return 0
        sleep 0.1
    done
    log "$what still running after ${limit}s, sending SIGKILL: ${alive[*]}"
    targets=("${alive[@]}")
    kill -KILL "${targets[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive=()
        for p in "${targets[@]}"; do has_conf_arg "$p" && alive+=("$p"); done
        [[ ${#alive[@]} -eq 0 ]] && return 0
        sleep 0.1
    done
    die "could not stop: ${alive[*]}"
}

stop_daemons() {
    local pids=() osds=() others=() p
    mapfile -t pids < <(cluster_pids)
    if [[ ${#pids[@]} -gt 0 ]]; then
        log "stopping daemons of $DIR: ${pids[*]}"
        for p in "${pids[@]}"; do
            if [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == ceph-osd ]]; then osds+=("$p"); else others+=("$p"); fi
        done
        # OSDs first: with the monitor still up they report "down" and exit at once
        # (otherwise each waits ~5 s for the monitor before giving up).
        [[ ${#osds[@]} -eq 0 ]] || stop_pids osd 10 "${osds[@]}"
        [[ ${#others[@]} -eq 0 ]] || stop_pids mon/mgr 10 "${others[@]}"
        mapfile -t pids < <(cluster_pids)
        [[ ${#pids[@]} -eq 0 ]] || stop_pids daemons 5 "${pids[@]}"
        log "all daemons stopped"
    else
        log "no daemons running for $DIR"
    fi
    rm -f "$DIR"/run/*.pid "$DIR"/run/ceph-mon.*.asok "$DIR"/run/ceph-mgr.*.asok "$DIR"/run/ceph-osd.*.asok 2>/dev/null || true
}

cmd_down() {
    [[ -d "$DIR" ]] || { log "nothing to do: $DIR does not exist"; return 0; }
    exec 9>>"$DIR/.lock"
    flock -w 120 9 || die "another ceph-dev.sh is operating on $DIR"
    stop_daemons
    if [[ "${KEEP:-0}" == 1 ]]; then
        log "KEEP=1: data kept in $DIR"
    else
        remove_data
        log "removed cluster data in $DIR"
    fi
}

cmd_status() {
    if [[ ! -f "$CONF" ]]; then
        echo "no cluster in $DIR"
        return 3
    fi
    local n pid running=0
    echo "dir:  $DIR"
    echo "fsid: $(fsid_from_conf)  mon: $(mon_addr_from_conf):$(mon_port_from_conf)"
    for n in "mon.$MON_ID" "mgr.$MGR_ID" "osd.$OSD_ID"; do
        if pid=$(daemon_pid "$n"); then
            echo "$n: running (pid $pid)"
            running=$((running + 1))
        else
            echo "$n: stopped"
        fi
    done
    if daemon_pid "mon.$MON_ID" >/dev/null; then
        CT=10 c -s || true
    fi
    [[ $running -eq 3 ]] || return 3
}

cmd_env() {
    [[ -f "$CONF" ]] || die "no cluster config at $CONF (run: $0 up $DIR)"
    local fsid port
    fsid=$(fsid_from_conf)
    port=$(mon_port_from_conf)
    local -a vars=(
        CEPH_DEV_DIR="$DIR"
        CEPH_CONF="$CONF"
        CEPH_FSID="$fsid"
        CEPH_CLUSTER_ID="$fsid"
        CEPH_MON_HOST="$(mon_addr_from_conf):$port"
        CEPH_ADMIN_KEYRING="$DIR/ceph.client.admin.keyring"
        CEPH_ADMIN_KEYFILE="$DIR/admin.key"
        CEPH_CSI_USER=csi
        CEPH_CSI_KEYRING="$DIR/ceph.client.csi.keyring"
        CEPH_CSI_KEYFILE="$DIR/csi.key"
        CEPH_CSI_CLUSTER_CONFIG="$DIR/cluster-config.json"
        CEPH_CSI_SECRETS="$DIR/secrets.yaml"
        CEPH_CSI_PARAMS="$DIR/params.yaml"
        CEPH_POOL="$POOL"
    )
    local v
    for v in "${vars[@]}"; do printf 'export %s=%q\n' "${v%%=*}" "${v#*=}"; done
}

# ---------------------------------------------------------- single daemons --

daemon_name() { # daemon_name TYPE: the one daemon of that type in this cluster
    case "$1" in
        mon) echo "mon.$MON_ID" ;;
        mgr) echo "mgr.$MGR_ID" ;;
        osd) echo "osd.$OSD_ID" ;;
        *) die "unknown daemon type '$1' (mon, mgr or osd)" ;;
    esac
}

# The epoch in which the OSD last came up (0 if the monitor does not answer).
osd_up_from() {
    local s
    s=$(CT=5 c osd dump -f json 2>/dev/null) || { echo 0; return 0; }
    python3 -c '
import json, sys
d = json.load(sys.stdin)
print(next((o["up_from"] for o in d["osds"] if o["osd"] == int(sys.argv[1])), 0))' "$OSD_ID" <<<"$s"
}

# The OSD is up in a map newer than epoch $1, i.e. this instance booted, not the one before it
# (a killed OSD stays "up" until the monitor notices).
osd_rebooted_since() {
    local from
    osd_up_in || return 1
    from=$(osd_up_from)
    [[ "$from" -gt "$1" ]]
}

gone() { ! has_conf_arg "$1"; }

cmd_kill_daemon() { # cmd_kill_daemon SIGNAL TYPE
    local sig=$1 name pid
    name=$(daemon_name "$2")
    [[ -f "$CONF" ]] || die "no cluster config at $CONF"
    exec 9>>"$DIR/.lock"
    flock -w 120 9 || die "another ceph-dev.sh is operating on $DIR"
    if ! pid=$(daemon_pid "$name"); then
        log "$name is not running"
        return 0
    fi
    if [[ "$sig" == KILL ]]; then
        kill -KILL "$pid" 2>/dev/null || true
        wait_until 10 "$name (pid $pid) to die" gone "$pid" ||
            die "$name (pid $pid) survived SIGKILL"
    else
        stop_pids "$name" 10 "$pid"
    fi
    log "$name (pid $pid) stopped with SIG$sig"
}

cmd_start_daemon() { # cmd_start_daemon TYPE
    local type=$1 name t0 from=0
    name=$(daemon_name "$type")
    [[ -f "$CONF" ]] || die "no cluster config at $CONF (run: $0 up $DIR)"
    t0=$(now)
    exec 9>>"$DIR/.lock"
    flock -w 120 9 || die "another ceph-dev.sh is operating on $DIR"
    if daemon_pid "$name" >/dev/null; then
        log "$name is already running"
        return 0
    fi
    [[ "$type" == osd ]] && from=$(osd_up_from)
    start_daemon "$type" "${name#*.}"
    case "$type" in
        mon) wait_until 30 "monitor quorum" mon_ok || die "$name did not come up; see $DIR/log/ceph-$name.log" ;;
        mgr) wait_until 30 "active mgr" mgr_active || die "$name did not come up; see $DIR/log/ceph-$name.log" ;;
        osd) wait_until 60 "$name to boot" osd_rebooted_since "$from" ||
            die "$name did not come up; see $DIR/log/ceph-$name.log" ;;
    esac
    log "$name up ($(elapsed "$t0")s)"
}

all_pgs_clean() {
    local s
    s=$(CT=5 c pg stat -f json 2>/dev/null) || return 1
    python3 -c '
import json, sys
s = json.load(sys.stdin)["pg_summary"]
clean = sum(x["num"] for x in s["num_pg_by_state"] if x["name"] == "active+clean")
sys.exit(0 if s["num_pgs"] > 0 and clean == s["num_pgs"] else 1)' <<<"$s"
}

cmd_wait_clean() {
    local t0
    [[ -f "$CONF" ]] || die "no cluster config at $CONF"
    t0=$(now)
    wait_until "${CEPH_DEV_WAIT:-120}" "every PG active+clean" all_pgs_clean ||
        die "PGs are not all active+clean: $(CT=5 c pg stat 2>&1)"
    log "all PGs active+clean ($(elapsed "$t0")s)"
}

# -------------------------------------------------------------------- main --

[[ $# -ge 1 ]] || usage
CMD=$1
shift
DAEMON=
case "$CMD" in
    kill-daemon | stop-daemon | start-daemon)
        [[ $# -ge 1 ]] || usage
        DAEMON=$1
        shift
        ;;
esac
[[ $# -le 1 ]] || usage
DIR=${1:-${CEPH_DEV_DIR:-$REPO_ROOT/.dev-cluster}}
case "$DIR" in /*) ;; *) DIR="$PWD/$DIR" ;; esac
DIR=${DIR%/}
[[ -n "$DIR" && "$DIR" != / ]] || die "refusing to use / as cluster dir"
# Resolve symlinks so that `up` and `down` agree on the exact "-c DIR/ceph.conf" argument.
if [[ "$CMD" == up ]]; then mkdir -p "$DIR"; fi
if [[ -d "$DIR" ]]; then DIR=$(cd "$DIR" && pwd -P); fi
CONF="$DIR/ceph.conf"

case "$CMD" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    kill-daemon) cmd_kill_daemon KILL "$DAEMON" ;;
    stop-daemon) cmd_kill_daemon TERM "$DAEMON" ;;
    start-daemon) cmd_start_daemon "$DAEMON" ;;
    wait-clean) cmd_wait_clean ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
