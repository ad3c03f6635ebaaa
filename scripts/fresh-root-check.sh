#!/usr/bin/env bash
# fresh-root-check.sh — proves that the README's commands need nothing a fresh Debian 12 machine
# lacks: builds a fresh Debian 12 root, clones this repository's HEAD into it, runs the README's
# bootstrap line and then `make demo` inside, and ends with one PASS/FAIL line and the time taken.
#
# Usage: scripts/fresh-root-check.sh   (or: make fresh-root-check), as root, on a Debian host.
#
# The root: `mmdebstrap --variant=important bookworm`, i.e. Priority required + important. That is
#   the base system debian-installer and debootstrap put on every Debian 12 machine before any task
#   is chosen (apt, iproute2, procps, kmod, ...); the "standard" task and cloud images only add to
#   it, so what passes here passes there. Nothing is added to it, not even ca-certificates: the
#   README's bootstrap line and `make deps` have to bring everything, and this is what proves they
#   do. The apt sources are the host's own Debian (bookworm*) entries, read at run time from
#   /etc/apt/sources.list.d/*.sources and /etc/apt/sources.list; no mirror is written here.
#   /etc/hosts gets the two localhost lines that the installer writes on every machine. The host's
#   local CAs (/usr/local/share/ca-certificates, e.g. an egress proxy's) are copied there too: they
#   are part of its network, and take effect only when ca-certificates gets installed.
#
# Toolchains: the project's guide says the machine comes with Rust 1.95 (rustup) and Go 1.26, so
#   they are not installed in the root but made visible read-only: the host's active Rust toolchain
#   (`rustc --print sysroot`) and its GOROOT are bind-mounted read-only at the same paths and put on
#   PATH, with a fresh, empty CARGO_HOME (/root/.cargo) and GOPATH (/root/go) inside, so every crate
#   and Go module is downloaded and built from scratch.
#
# Entering it: `unshare --mount --pid --fork`, then chroot. In the private mount namespace: a proc
#   of the new PID namespace, sysfs read-only, the host's /dev bound recursively (losetup gets new
#   loop devices from /dev/loop-control and they appear there; rbd-fuse needs /dev/fuse), a new
#   devpts instance, fresh tmpfs on /dev/shm and /run, the host's resolv.conf read-only. The network
#   is the host's: package registries for installs, and the dev cluster binds 127.0.0.1 only
#   (ceph-dev.sh picks a free port if a host cluster holds 3300). In the PID namespace pgrep and
#   ceph-dev.sh see only the check's own processes, so no running cluster of the host is ever
#   touched; apt and dpkg work on the root's /var/lib, never the host's. Everything inside runs
#   niced (FRESH_ROOT_NICE, default 10).
#
# Afterwards: processes, mounts and loop devices that `make demo` left are listed (inside the
#   namespace before it ends, and from the host after it has ended) and fail the check; the root is
#   removed unless KEEP=1. The full log is kept next to the work directory (printed at the end).
#
# Environment:
#   KEEP=1               keep the work directory (root, sources, results) for inspection
#   FRESH_ROOT_DIR       where the work directory is made (default /var/tmp)
#   FRESH_ROOT_TIMEOUT   seconds allowed for the bootstrap and `make demo` inside (default 3600)
#   FRESH_ROOT_NICE      niceness of everything that runs in the root (default 10)
#   FRESH_ROOT_COMMAND   what runs in the root after the bootstrap line (default: cd /root/rook-rbd
#                        && make demo); another command checks the checker, e.g. one that leaves a
#                        process, a mount and a loop device behind must FAIL
set -euo pipefail

SUITE=bookworm
# The README's bootstrap line, run verbatim in the root; the check fails if the README drifts.
BOOTSTRAP='apt-get update && apt-get install -y git make'
SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/.." && pwd)
T0=$EPOCHSECONDS

fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
log() { printf '[fresh-root %7s] %s\n' "$(fmt_secs $((EPOCHSECONDS - T0)))" "$*"; }

# ------------------------------------------------------------- inside the namespaces --
# Runs as PID 1 of the new PID namespace, in the private mount namespace, still on the host's
# filesystem: mounts what the root needs, runs the README's commands in it, lists leftovers.
inside() {
    local r=$WORK/root d rc
    mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$r/sys"
    mount --rbind /dev "$r/dev"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$r/dev/pts"
    mount --bind "$r/dev/pts/ptmx" "$r/dev/ptmx"
    mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$r/dev/shm"
    mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs "$r/run"
    mkdir -m 1777 "$r/run/lock"
    [[ -e $r/etc/resolv.conf ]] || : >"$r/etc/resolv.conf"
    mount --bind -o ro /etc/resolv.conf "$r/etc/resolv.conf"
    for d in "$RUST_SYSROOT" "$GO_ROOT"; do
        mkdir -p "$r$d"
        mount --bind "$d" "$r$d"
        mount -o remount,bind,ro "$r$d"
    done
    mkdir -p "$r/root/.cargo" "$r/root/go"

    local env=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb
        "PATH=$RUST_SYSROOT/bin:$GO_ROOT/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        CARGO_HOME=/root/.cargo GOPATH=/root/go)
    in_root() { timeout --kill-after=30 "$TIMEOUT" chroot "$r" /usr/bin/env -i "${env[@]}" /bin/bash -c "$1"; }

    log "inside: $(in_root 'cargo --version'), $(in_root 'go version'); files in CARGO_HOME and GOPATH: $(in_root 'find /root/.cargo /root/go -mindepth 1 | wc -l')"
    log "\$ $BOOTSTRAP    (the README's bootstrap line; output in the log)"
    local t=$EPOCHSECONDS
    rc=0
    in_root "$BOOTSTRAP" >>"$LOG" 2>&1 || rc=$?
    echo "bootstrap_rc=$rc bootstrap_s=$((EPOCHSECONDS - t))" >>"$RESULT"
    if ((rc == 0)); then
        log "bootstrap done in $(fmt_secs $((EPOCHSECONDS - t)))"
        log "\$ $COMMAND"
        t=$EPOCHSECONDS
        rc=0
        in_root "$COMMAND" || rc=$?
        echo "demo_rc=$rc demo_s=$((EPOCHSECONDS - t))" >>"$RESULT"
        log "$COMMAND: exit $rc after $(fmt_secs $((EPOCHSECONDS - t)))"
    else
        log "bootstrap FAILED (exit $rc); its last lines:"
        tail -n 15 "$LOG" | sed 's/^/    /'
    fi

    # What is still there now counts against the run; the namespace's end would hide it.
    local procs zombies mounts loops
    # ps straight into a file: a pipeline here would list its own subshell.
    chroot "$r" ps -e -o pid=,ppid=,stat=,args= >"$WORK/ps.txt"
    procs=$(awk '$1 != 1 && !($2 == 1 && $4 == "ps" && $5 == "-e")' "$WORK/ps.txt")
    zombies=$(awk '$3 ~ /^Z/' <<<"$procs")
    procs=$(awk '$3 !~ /^Z/' <<<"$procs")
    mounts=$(awk -v r="$r" -v rs="$RUST_SYSROOT" -v gr="$GO_ROOT" '
        function under(p, d) { return p == r d || index(p, r d "/") == 1 }
        index($5, r "/") == 1 && !under($5, "/proc") && !under($5, "/sys") && !under($5, "/dev") &&
            !under($5, "/run") && !under($5, rs) && !under($5, gr) && $5 != r "/etc/resolv.conf" { print $5 }' /proc/self/mountinfo)
    loops=$(losetup -l -n -O NAME,BACK-FILE | awk -v r="$r/" 'index($2, r) == 1')
    [[ -z $zombies ]] || { log "zombies (exited, waiting for PID 1 to reap them; they hold nothing):"; sed 's/^/    /' <<<"$zombies"; }
    if [[ -z $procs$mounts$loops ]]; then
        log "inside, after it: no processes (but PID 1), mounts or loop devices left"
    fi
    [[ -z $procs ]] || { log "LEFT BEHIND: processes"; sed 's/^/    /' <<<"$procs"; }
    [[ -z $mounts ]] || { log "LEFT BEHIND: mounts"; sed 's/^/    /' <<<"$mounts"; }
    [[ -z $loops ]] || { log "LEFT BEHIND: loop devices (detaching them)"; sed 's/^/    /' <<<"$loops"; }
    # Loop devices outlive the namespace; these are over files in our root, so ours to detach.
    for d in $(awk '{ print $1 }' <<<"$loops"); do losetup -d "$d" || true; done
    printf 'left_procs=%s left_mounts=%s left_loops=%s\n' "$(grep -c . <<<"$procs" || true)" \
        "$(grep -c . <<<"$mounts" || true)" "$(grep -c . <<<"$loops" || true)" >>"$RESULT"
    log "leaving the namespaces (the kernel ends whatever is still in them)"
}

if [[ ${1:-} == --inside ]]; then
    T0=$FRESH_ROOT_T0
    inside
    exit 0
fi

# ------------------------------------------------------------------------ the host --
[[ $(id -u) == 0 ]] || { echo "fresh-root-check: run as root (mmdebstrap, chroot, mounts)" >&2; exit 2; }
TIMEOUT=${FRESH_ROOT_TIMEOUT:-3600}
NICE=${FRESH_ROOT_NICE:-10}
COMMAND=${FRESH_ROOT_COMMAND:-cd /root/rook-rbd && make demo}
WORK=$(mktemp -d "${FRESH_ROOT_DIR:-/var/tmp}/rook-rbd-fresh-root.XXXXXX")
R=$WORK/root
LOG=$WORK.log
RESULT=$WORK/result
FRESH_ROOT_T0=$T0
export WORK LOG RESULT TIMEOUT COMMAND FRESH_ROOT_T0
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

VERDICT='' REASON=''
fail() { VERDICT=FAIL; REASON=$1; exit 1; }

finish() {
    local rc=$? m p own_pids=()
    set +e
    [[ -n $VERDICT ]] || { VERDICT=FAIL; REASON=${REASON:-"the check itself stopped (exit $rc)"}; }
    # From the host, once the namespaces are gone: nothing may still live in or hold the root.
    m=$(awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo)
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/root" 2>/dev/null) == "$R"* ]] && own_pids+=("${p#/proc/}")
    done
    local l
    l=$(losetup -l -n -O NAME,BACK-FILE | awk -v r="$R/" 'index($2, r)')
    if [[ -n $m || ${#own_pids[@]} -gt 0 || -n $l ]]; then
        log "host: LEFT BEHIND after the namespaces ended:"
        [[ -z $m ]] || sed 's/^/    mount /' <<<"$m"
        [[ ${#own_pids[@]} -eq 0 ]] || ps -o pid=,stat=,args= -p "${own_pids[*]}" | sed 's/^/    process /'
        [[ -z $l ]] || sed 's/^/    loop /' <<<"$l"
        VERDICT=FAIL REASON="${REASON:+$REASON; }left mounts, processes or loop devices on the host"
    elif [[ -d $R ]]; then
        log "host: no mounts, processes or loop devices of the root are left"
    fi
    if [[ ${KEEP:-0} == 1 ]]; then
        log "KEEP=1: the root stays in $R"
    elif [[ -n $m ]]; then
        log "$WORK is kept: something is still mounted under it"
    else
        rm -rf --one-file-system "$WORK" && log "removed $WORK"
    fi
    log "full log: $LOG"
    if [[ $VERDICT == PASS ]]; then
        echo "fresh-root-check: PASS: '$COMMAND' in a fresh Debian 12 root ($HEAD_SHORT) in $(fmt_secs $((EPOCHSECONDS - T0)))"
    else
        echo "fresh-root-check: FAIL: $REASON ($HEAD_SHORT) after $(fmt_secs $((EPOCHSECONDS - T0)))"
    fi
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    [[ $VERDICT == PASS ]] && exit 0
    exit 1
}
trap finish EXIT
trap 'REASON=interrupted; exit 130' INT TERM

HEAD_SHA=$(git -C "$REPO" rev-parse HEAD)
HEAD_SHORT=$(git -C "$REPO" rev-parse --short HEAD)
log "fresh-root check of $REPO at HEAD $HEAD_SHA"
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
    log "note: the work tree has uncommitted changes; they are not checked (the clone is of HEAD)"
fi

# Toolchains of the host, bound read-only at the same paths (see the header).
RUST_SYSROOT=$(rustc --print sysroot 2>/dev/null) || fail "no rustc on PATH: the machine's Rust toolchain is expected"
GO_ROOT=$(go env GOROOT 2>/dev/null) || fail "no go on PATH: the machine's Go toolchain is expected"
[[ -x $RUST_SYSROOT/bin/cargo ]] || fail "no cargo in the Rust toolchain $RUST_SYSROOT"
export RUST_SYSROOT GO_ROOT
log "toolchains (read-only inside): $("$RUST_SYSROOT/bin/rustc" --version) at $RUST_SYSROOT; $("$GO_ROOT/bin/go" version) at $GO_ROOT"

if ! command -v mmdebstrap >/dev/null; then
    log "installing mmdebstrap on the host (apt-get install mmdebstrap)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi

# The host's Debian entries (binary, a bookworm suite, not disabled), deb822 and one-line apart.
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk 'BEGIN { RS = ""; ORS = "\n\n" }
        /(^|\n)Types:([^\n]* )?deb( |\n|$)/ && /(^|\n)Suites:[^\n]*'"$SUITE"'/ && !/(^|\n)Enabled: *[Nn]o/' "$f"
done >"$WORK/host.sources"
if [[ -f /etc/apt/sources.list ]]; then
    grep -E "^[[:space:]]*deb[[:space:]].*[[:space:]]$SUITE" /etc/apt/sources.list || true
fi >"$WORK/host.list"
MIRRORS=()
for f in "$WORK/host.sources" "$WORK/host.list"; do [[ -s $f ]] && MIRRORS+=("$f"); done
((${#MIRRORS[@]})) || fail "no $SUITE entry in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
log "apt sources from the host: $(cat "${MIRRORS[@]}" | sed -n 's/^URIs: *//p; s/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' | sort -u | paste -sd' ')"

# --------------------------------------------------------------------------- 1. root --
log "\$ mmdebstrap --variant=important $SUITE $R <host sources>    (output in the log)"
t=$EPOCHSECONDS
mkdir "$R"
nice -n "$NICE" mmdebstrap --variant=important "$SUITE" "$R" "${MIRRORS[@]}" >>"$LOG" 2>&1 ||
    fail "mmdebstrap failed (see $LOG)"
# The host's own CAs (an intercepting egress proxy's, say) belong to its network, not to the
# software: they go where Debian keeps local CAs, and count only once ca-certificates is installed.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$R/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
    log "host's local CAs copied to /usr/local/share/ca-certificates: $(cd /usr/local/share/ca-certificates && ls -- *.crt | paste -sd' ')"
fi
grep -q '^127\.0\.0\.1[[:space:]].*localhost' "$R/etc/hosts" 2>/dev/null ||
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
BUILD_S=$((EPOCHSECONDS - t))
log "root built in $(fmt_secs "$BUILD_S"): $(chroot "$R" dpkg-query -W -f '.\n' | wc -l) packages, $(du -sh --one-file-system "$R" | cut -f1)"
for d in "$RUST_SYSROOT" "$GO_ROOT"; do
    [[ ! -e $R$d ]] || fail "$d exists in the base system; binding the host's toolchain over it would hide it"
done

# -------------------------------------------------------------------------- 2. clone --
git clone --quiet --no-hardlinks "$REPO" "$R/root/rook-rbd"
git -C "$R/root/rook-rbd" checkout --quiet --detach "$HEAD_SHA"
log "cloned HEAD $HEAD_SHORT into /root/rook-rbd"
grep -qF -- "$BOOTSTRAP" "$R/root/rook-rbd/README.md" ||
    fail "README.md no longer contains the bootstrap line this check runs: $BOOTSTRAP"

# ------------------------------------------------------------------- 3. inside it --
log "entering: nice -n $NICE unshare --mount --pid --fork --kill-child, chroot $R"
: >"$RESULT"
rc=0
nice -n "$NICE" unshare --mount --pid --fork --kill-child --propagation private bash "$SCRIPT" --inside || rc=$?
# shellcheck disable=SC1090 # key=value lines written by inside()
source <(tr ' ' '\n' <"$RESULT")
((rc == 0)) || fail "the namespace setup failed (exit $rc)"
[[ ${bootstrap_rc:-1} == 0 ]] || fail "the README's bootstrap line failed (exit ${bootstrap_rc:-?})"
[[ ${demo_rc:-1} == 0 ]] || fail "'$COMMAND' failed (exit ${demo_rc:-?}) after $(fmt_secs "${demo_s:-0}")"
((${left_procs:-1} + ${left_mounts:-1} + ${left_loops:-1} == 0)) ||
    fail "'$COMMAND' passed but left processes ($left_procs), mounts ($left_mounts) or loop devices ($left_loops)"
log "times: root $(fmt_secs "$BUILD_S"), bootstrap $(fmt_secs "$bootstrap_s"), '$COMMAND' $(fmt_secs "$demo_s")"
VERDICT=PASS
