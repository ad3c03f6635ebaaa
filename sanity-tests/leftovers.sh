#!/usr/bin/env bash
# Fails if tests left anything on the machine: mounts or loop devices from test roots, rbd-fuse
# processes, or stray rook-rbd drivers.
set -uo pipefail
bad=0
mounts=$(grep -E '/tmp/rook-rbd-|rbd-fuse|/rook-rbd-test' /proc/self/mountinfo || true)
[[ -n $mounts ]] && { echo "leftover mounts:"; echo "$mounts"; bad=1; }
loops=$(losetup --list --noheadings -O NAME,BACK-FILE 2>/dev/null | grep -E 'rook-rbd|fuse' || true)
[[ -n $loops ]] && { echo "leftover loop devices:"; echo "$loops"; bad=1; }
# Live ones only: an exited rbd-fuse stays a zombie until PID 1 reaps it (some container init
# processes never do), and a zombie holds no mount, device or cluster connection.
fuse=$(ps -C rbd-fuse -o pid=,stat=,args= | awk '$2 !~ /^Z/' || true)
[[ -n $fuse ]] && { echo "leftover rbd-fuse processes:"; echo "$fuse"; bad=1; }
drivers=$(pgrep -af 'rook-rbd csi' || true)
[[ -n $drivers ]] && { echo "leftover drivers:"; echo "$drivers"; bad=1; }
((bad)) && exit 1
echo "no leftover mounts, loop devices, rbd-fuse processes or drivers"
