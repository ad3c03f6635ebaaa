#!/usr/bin/env bash
# Runs the real csi-sanity v5.4.0 against rook-rbd (controller and node in one process) and the
# dev cluster in $CEPH_DEV_DIR. Usage: sanity-tests/run.sh [mount|block]
#
# Nothing is skipped by flags: every spec csi-sanity has for our advertised capabilities runs.
# Volumes are 256 MiB (thin anyway) so mkfs over the fuse mapper stays quick.
set -euo pipefail
cd "$(dirname "$0")/.."
ACCESS=${1:-mount}
DIR=${CEPH_DEV_DIR:-$PWD/.dev-cluster}
BIN=${ROOK_RBD_BIN:-$PWD/target/debug/rook-rbd}
SANITY=${CSI_SANITY:-${GOBIN:-$HOME/go/bin}/csi-sanity}
[[ -x $BIN ]] || { echo "build first: $BIN is missing" >&2; exit 1; }
[[ -f $DIR/cluster-config.json ]] || { echo "no dev cluster in $DIR (make ceph-up)" >&2; exit 1; }

ROOT=$(mktemp -d /tmp/rook-rbd-sanity.XXXXXX)
source scripts/test-driver.sh
start_driver "$ROOT" sanity-node

set +e
"$SANITY" \
  --csi.endpoint "$SOCK" \
  --csi.stagingdir "$ROOT/kubelet/staging" \
  --csi.mountdir "$ROOT/kubelet/mount" \
  --csi.secrets "$DIR/secrets.yaml" \
  --csi.testvolumeparameters "$DIR/params.yaml" \
  --csi.testvolumeaccesstype "$ACCESS" \
  --csi.testvolumesize 268435456 \
  --csi.testvolumeexpandsize 536870912 \
  --csi.testnodevolumeattachlimit \
  --ginkgo.json-report "$ROOT/report.json" --ginkgo.no-color \
  --ginkgo.timeout 30m >"$ROOT/sanity.log" 2>&1
rc=$?
set -e
stop_driver
trap - EXIT
if ((rc != 0)); then
  grep -E '^\s*\[FAIL\]|^  \[FAILED\]|Summarizing' -A2 "$ROOT/sanity.log" | head -80
  echo "--- driver log (last 40 lines): $LOG"
  tail -40 "$LOG"
fi
# Skips are csi-sanity's own decisions (capabilities we do not advertise); list them openly.
python3 - "$ROOT/report.json" <<'PY' || true
import json, sys
skipped = []
for suite in json.load(open(sys.argv[1])):
    for spec in suite.get("SpecReports", []):
        if spec.get("State") in ("skipped", "pending"):
            name = " ".join(spec.get("ContainerHierarchyTexts") or []) + " " + spec.get("LeafNodeText", "")
            why = (spec.get("Failure") or {}).get("Message", "") or spec.get("State")
            skipped.append(f"  {spec.get('State')}: {name.strip()} -- {why.strip()}")
print("not run, by csi-sanity's own decision:" if skipped else "nothing skipped")
print("\n".join(sorted(set(skipped))))
PY
echo "csi-sanity ($ACCESS):"
grep -E '^Ran [0-9]+ of [0-9]+ Specs|^(SUCCESS|FAIL)!' "$ROOT/sanity.log" || tail -5 "$ROOT/sanity.log"
echo "full log: $ROOT/sanity.log"
exit $rc
