# Sourced by the test scripts that need a real driver (sanity-tests/run.sh, tests/interop/run.sh).
# `start_driver ROOT NODE_ID` starts `rook-rbd csi` ($BIN, controller and node in one process) for
# the dev cluster in $DIR with client.admin's key in ROOT/secret, serving on $SOCK (ROOT/csi.sock)
# and logging to $LOG (ROOT/driver.log), and stops it on exit; `stop_driver` stops it sooner.
start_driver() {
  local root=$1 node=$2
  mkdir -p "$root/kubelet" "$root/secret"
  chmod 700 "$root/secret"
  printf admin >"$root/secret/userID"
  install -m 0600 "$DIR/admin.key" "$root/secret/userKey"
  SOCK=$root/csi.sock
  LOG=$root/driver.log
  "$BIN" csi --endpoint "unix://$SOCK" --node-id "$node" \
    --cluster-config "$DIR/cluster-config.json" --secret-dir "$root/secret" \
    --kubelet-dir "$root/kubelet" --state-dir "$root/state" >"$LOG" 2>&1 &
  DRIVER=$!
  trap 'stop_driver' EXIT
  for _ in $(seq 100); do [[ -S $SOCK ]] && break; sleep 0.05; done
}

stop_driver() {
  kill -TERM "$DRIVER" 2>/dev/null || true
  wait "$DRIVER" 2>/dev/null || true
}
