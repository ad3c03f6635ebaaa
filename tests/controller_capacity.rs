//! GetCapacity against the real cluster. Its own test binary, so that nothing else writes or
//! frees space while it looks: the figure is the OSDs' free space, which every concurrent test
//! moves (a run of `make test` failed when a concurrent test's purge freed what this one wrote).

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

/// Space is free only once it is: while a deleted volume waits in the trash its data still
/// takes space and GetCapacity says so (Ceph counts it: no more, no less), and the space comes
/// back only after the purge.
#[tokio::test]
async fn capacity_counts_a_deleted_volume_as_used_until_it_is_purged() {
    let Some(c) = cluster() else { return };
    let deferment = Duration::from_secs(20);
    let d = Driver::start(&c, &["--controller", "--trash-deferment", "20"]);
    let mut cl = d.client().await;
    let before = capacity(&mut cl, &c).await;
    let vol = cl
        .controller
        .create_volume(create_req(&c, &unique("cap"), 256 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
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
    // Ceph's statistics lag the writes by a few seconds.
    let mut live = before;
    let mut cl2 = cl.clone();
    let stats = Instant::now();
    while stats.elapsed() < Duration::from_secs(60) && before - live < 100 * MIB {
        tokio::time::sleep(Duration::from_secs(1)).await;
        live = capacity(&mut cl2, &c).await;
    }
    assert!(
        before - live >= 100 * MIB,
        "192 MiB written, capacity {before} -> {live}"
    );
    // Settle: the figure must be steady before it is compared.
    tokio::time::sleep(Duration::from_secs(6)).await;
    live = capacity(&mut cl, &c).await;
    let t0 = Instant::now();
    delete_volume(&c, &mut cl, &vol).await;
    until_deferment_ends(t0 + deferment, || {
        let mut cl = cl.clone();
        let c = &c;
        async move {
            let now = capacity(&mut cl, c).await;
            ((now - live).abs() >= 48 * MIB).then(|| {
                format!(
                    "{:?} into the deferment: capacity {live} -> {now}",
                    t0.elapsed()
                )
            })
        }
    })
    .await;
    let mut after = live;
    let freed = Instant::now();
    while freed.elapsed() < Duration::from_secs(90) && after - live < 100 * MIB {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after = capacity(&mut cl, &c).await;
    }
    assert!(
        after - live >= 100 * MIB,
        "space never came back: {live} -> {after}"
    );
    assert!(purged(&c, &[image]).await);
}
