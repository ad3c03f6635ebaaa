//! GetCapacity against the real cluster. The free space of a shared OSD moves with everything
//! else the run does (concurrent tests' writes, the OSD's own deferred frees after an earlier
//! binary's deletes: two `make test` runs failed on deltas of it), so the test compares with
//! Ceph's own figure at the same moment and looks at the objects that hold the data.

mod common;

use common::*;
use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto;
use std::time::{Duration, Instant};

const MIB: i64 = 1 << 20;

async fn capacity(cl: &mut CsiClient, c: &Cluster) -> i64 {
    cl.controller
        .get_capacity(proto::GetCapacityRequest {
            parameters: c.params(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .available_capacity
}

/// Ceph's own figure for the pool, as `ceph df` gives it.
fn ceph_max_avail(c: &Cluster) -> i64 {
    let df: serde_json::Value = serde_json::from_str(&c.ceph(&["df", "--format", "json"])).unwrap();
    df["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "rbd")
        .unwrap()["stats"]["max_avail"]
        .as_i64()
        .unwrap()
}

/// GetCapacity says what Ceph says, no more, no less. Both come from the monitors' statistics,
/// which change every few seconds, so a few tries: `ceph df` read before and after agree, and
/// GetCapacity between them equals them.
async fn capacity_is_cephs(cl: &mut CsiClient, c: &Cluster) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..20 {
        let a = ceph_max_avail(c);
        let got = capacity(cl, c).await;
        let b = ceph_max_avail(c);
        if a == b && got == a {
            return Ok(());
        }
        last = format!("GetCapacity {got}, ceph df {a} then {b}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

/// The RADOS objects that hold an image's data (`rbd_data.<id>.*`).
fn data_objects(c: &Cluster, prefix: &str) -> usize {
    c.rados(&["-p", "rbd", "ls"])
        .lines()
        .filter(|o| o.starts_with(prefix))
        .count()
}

/// Space is free only once it is: while a deleted volume waits in the trash its data objects stay,
/// GetCapacity keeps reporting Ceph's figure (which counts them) rather than crediting the deleted
/// volume, and the objects go only with the purge.
#[tokio::test]
async fn capacity_counts_a_deleted_volume_as_used_until_it_is_purged() {
    let Some(c) = cluster() else { return };
    let deferment = Duration::from_secs(20);
    let d = Driver::start(&c, &["--controller", "--trash-deferment", "20"]);
    let mut cl = d.client().await;
    let vol = create_volume(&mut cl, create_req(&c, &unique("cap"), 256 * MIB))
        .await
        .volume_id;
    let image = image_of(&vol);
    c.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4M",
        "--io-total",
        "192M",
        "--io-pattern",
        "seq",
        &format!("rbd/{image}"),
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&c.rbd(&["info", "--format", "json", &format!("rbd/{image}")]))
            .unwrap();
    let prefix = format!("{}.", info["block_name_prefix"].as_str().unwrap());
    let written = data_objects(&c, &prefix);
    assert!(written >= 48, "192 MiB in 4 MiB objects, found {written}");
    capacity_is_cephs(&mut cl, &c).await.unwrap();

    let t0 = Instant::now();
    delete_volume(&c, &mut cl, &vol).await;
    until_deferment_ends(t0 + deferment, || {
        let mut cl = cl.clone();
        let (c, prefix) = (&c, &prefix);
        async move {
            let left = data_objects(c, prefix);
            if left != written {
                return Some(format!(
                    "{:?} into the deferment: {left} of {written} data objects left",
                    t0.elapsed()
                ));
            }
            capacity_is_cephs(&mut cl, c)
                .await
                .err()
                .map(|e| format!("{:?} into the deferment: {e}", t0.elapsed()))
        }
    })
    .await;
    assert!(purged(&c, &[image]).await, "not purged after the deferment");
    assert_eq!(
        data_objects(&c, &prefix),
        0,
        "data objects left after the purge"
    );
    capacity_is_cephs(&mut cl, &c).await.unwrap();
}
