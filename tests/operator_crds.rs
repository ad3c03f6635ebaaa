//! The checked-in CRDs are what `rook-rbd crdgen` prints today: a change to the Rust types
//! without `make crds` fails here.

use std::process::Command;

#[test]
fn checked_in_crds_yaml_is_what_crdgen_prints() {
    let out = Command::new(env!("CARGO_BIN_EXE_rook-rbd"))
        .arg("crdgen")
        .output()
        .expect("rook-rbd crdgen runs");
    assert!(
        out.status.success(),
        "crdgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = String::from_utf8(out.stdout).expect("crdgen prints UTF-8");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/operator/crds.yaml");
    let checked_in = std::fs::read_to_string(path).expect("deploy/operator/crds.yaml exists");
    if fresh != checked_in {
        let first = fresh
            .lines()
            .zip(checked_in.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| fresh.lines().count().min(checked_in.lines().count()));
        panic!(
            "deploy/operator/crds.yaml is stale (first difference at line {}): run `make crds`",
            first + 1
        );
    }
}
