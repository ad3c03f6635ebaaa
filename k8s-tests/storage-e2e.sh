#!/usr/bin/env bash
# The Kubernetes storage e2e suite (e2e.test v1.34.4, "External Storage") against rook-rbd, with
# the driver definition in k8s-tests/e2e/driver.yaml, on a cluster from cluster.sh.
#
#   storage-e2e.sh ci     the fixed CI subset (k8s-tests/e2e/ci-focus.txt): every test suite a
#                         single node runs that CI's 90 minutes can hold
#   storage-e2e.sh full   every External Storage spec for our driver
#
# Specs never run here, and why, are in k8s-tests/e2e/skip.txt (one regexp and its reason per
# line); the script prints each skipped spec with the reason: ours, or the suite's own (a
# capability our driver definition does not claim).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODE=${1:-ci}
eval "$("$HERE/cluster.sh" env)"
OUT=${E2E_REPORT_DIR:-$E2E_RUN/storage-e2e}
mkdir -p "$OUT"
DRIVER=rbd.csi.ceph.rook.io
# Every skip regexp, joined; the reasons stay in the file.
skip=$(grep -vE '^\s*(#|$)' "$HERE/e2e/skip.txt" | cut -f1 | paste -sd'|')
focus="External.Storage \[Driver: $DRIVER\]"
if [[ $MODE == ci ]]; then
  subset=$(grep -vE '^\s*(#|$)' "$HERE/e2e/ci-focus.txt" | paste -sd'|')
  focus="$focus.*($subset)"
fi
echo "focus: $focus"
echo "skip:  $skip"
t0=$SECONDS
set +e
# The ginkgo CLI runs the suite in E2E_PROCS parallel processes (each spec has its own namespace;
# [Serial] specs run alone at the end), as Kubernetes' own CI does: most of a spec's time is spent
# waiting for pods and volumes, not on the CPU.
procs=${E2E_PROCS:-3}
echo "processes: $procs (E2E_PROCS)"
"$HERE/cluster.sh" exec timeout "${E2E_SUITE_TIMEOUT:-4200}" "$E2E_BIN/ginkgo" run \
  --procs="$procs" --focus="$focus" --skip="$skip" \
  --no-color --timeout=2h --poll-progress-after=5m \
  --output-dir="$OUT" --json-report=report.json \
  "$E2E_BIN/e2e.test" -- \
  -kubeconfig="$KUBECONFIG" \
  -storage.testdriver="$HERE/e2e/driver.yaml" \
  -repo-root="$HERE/e2e" \
  -report-dir="$OUT" \
  -node-os-distro=debian \
  -allowed-not-ready-nodes=0 \
  -disable-log-dump >"$OUT/e2e.log" 2>&1
rc=$?
set -e
python3 - "$OUT/report.json" "$HERE/e2e/skip.txt" "$MODE" <<'PY'
import json, os, re, sys
report, skipfile, mode = sys.argv[1:4]
if not os.path.exists(report):
    sys.exit(print(f"no report at {report}: the suite did not finish (see e2e.log)"))
ours = []
for line in open(skipfile):
    if line.strip() and not line.lstrip().startswith("#"):
        rx, _, why = line.rstrip("\n").partition("\t")
        ours.append((re.compile(rx), why.strip()))
counts, failed, skipped, ran = {}, [], [], []
for suite in json.load(open(report)):
    for spec in suite.get("SpecReports") or []:
        if spec.get("LeafNodeType") != "It":
            continue
        name = " ".join((spec.get("ContainerHierarchyTexts") or []) + [spec.get("LeafNodeText", "")])
        if "External Storage" not in name:
            continue
        state = spec.get("State")
        counts[state] = counts.get(state, 0) + 1
        if state != "skipped":
            ran.append((spec.get("RunTime", 0) / 1e9, state, name))
        if state in ("failed", "panicked", "timedout", "aborted", "interrupted"):
            failed.append(name + "\n      " + ((spec.get("Failure") or {}).get("Message", "")[:400]).replace("\n", "\n      "))
        elif state == "skipped":
            why = (spec.get("Failure") or {}).get("Message", "").strip().splitlines()
            why = why[0] if why else ""
            if not why:
                why = next((w for rx, w in ours if rx.search(name)), "")
                why = f"ours: {why}" if why else ("ours: not in the CI subset (make e2e-full runs it)" if mode == "ci" else "not selected")
            else:
                why = f"the suite's: {why}"
            skipped.append((why, name))
print("skipped specs, with the reason:")
by = {}
for why, name in skipped:
    by.setdefault(why, []).append(name)
for why in sorted(by):
    print(f"  {len(by[why]):4d} x {why}")
    if not why.startswith("ours: not in the CI subset"):
        for n in sorted(by[why])[:200]:
            print(f"         {n}")
# Where the suite's time goes: what to look at first when it no longer fits CI's budget.
ran.sort(reverse=True)
print(f"slowest specs (of {len(ran)} run, {sum(r[0] for r in ran):.0f} s of spec time in all):")
for secs, state, name in ran[:15]:
    print(f"  {secs:6.0f} s  {state:8s} {name}")
for f in failed:
    print("FAILED: " + f)
print("spec states:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
PY
grep -E '^Ran [0-9]+ of [0-9]+ Specs|^(SUCCESS|FAIL)!' "$OUT/e2e.log" || tail -20 "$OUT/e2e.log"
echo "storage e2e ($MODE): exit $rc in $((SECONDS - t0)) s; log $OUT/e2e.log"
exit $rc
