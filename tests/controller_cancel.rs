//! Cancellation against a real Ceph cluster: when a client's deadline passes, the driver keeps
//! doing the work, and keeps the operation's key, until the work is over. A retry meanwhile gets
//! `Aborted`, never a second run beside the first (a second flatten, or an undo of a half-made
//! image), and once the first run is over it gets the finished result.

mod common;

use common::*;
use rook_rbd::csi::proto;
use std::time::{Duration, Instant};
use tonic::Code;

const MIB: i64 = 1 << 20;
/// Enough data that a flatten takes seconds on the dev cluster (about 4 s here), far longer
/// than the client deadline below.
const DATA_MIB: i64 = 256;
const CLIENT_DEADLINE: Duration = Duration::from_millis(300);

/// A volume whose first `DATA_MIB` MiB are really written, so a flatten of a clone copies them.
async fn volume_with_data(c: &Cluster, cl: &mut rook_rbd::client::CsiClient) -> String {
    let v = create_volume(cl, create_req(c, &unique("cancel-src"), DATA_MIB * MIB)).await;
    c.write_data(&image_of(&v.volume_id), DATA_MIB as u64);
    v.volume_id
}

/// How often the driver started flattening `image` (from its log).
fn flattens(d: &Driver, image: &str) -> usize {
    std::fs::read_to_string(d.path("driver.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(image) && l.contains("flattening"))
        .count()
}

/// Calls `call` with a deadline shorter than its work, then retries at once and keeps retrying:
/// every answer before the success must be `Aborted`, and the first retry must come while the
/// first call still runs (so it must be `Aborted` too). Returns the successful answer.
async fn abandon_then_retry<T, F, Fut>(mut call: F) -> T
where
    F: FnMut(Option<Duration>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let abandoned = call(Some(CLIENT_DEADLINE)).await;
    let e = match abandoned {
        Ok(_) => {
            panic!("the call finished within {CLIENT_DEADLINE:?}: it cannot test cancellation")
        }
        Err(e) => e,
    };
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "the abandoned call ends by its deadline: {e:?}"
    );
    let started = Instant::now();
    let mut answers = Vec::new();
    loop {
        match call(None).await {
            Ok(v) => {
                assert!(
                    !answers.is_empty(),
                    "the first retry succeeded while the abandoned call was still flattening"
                );
                eprintln!(
                    "{} retries got Aborted, then success after {:?}",
                    answers.len(),
                    started.elapsed()
                );
                return v;
            }
            Err(e) => {
                assert_eq!(
                    e.code(),
                    Code::Aborted,
                    "a retry while the first call runs gets Aborted (after {} earlier Aborted): {e:?}",
                    answers.len()
                );
                answers.push(e);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the abandoned call never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_abandoned_clone_keeps_its_key_until_its_flatten_is_over() {
    let Some(c) = cluster() else { return };
    // Every clone is flattened: the work goes on long after the client's deadline.
    let d = Driver::start(&c, &["--controller", "--max-clone-depth", "0"]);
    let mut cl = d.client().await;
    let src = volume_with_data(&c, &mut cl).await;
    let mut req = create_req(&c, &unique("cancel-clone"), DATA_MIB * MIB);
    req.volume_content_source = volume_source(&src);
    let v = abandon_then_retry(|deadline| {
        let mut cl = cl.clone();
        let mut r = tonic::Request::new(req.clone());
        if let Some(t) = deadline {
            r.set_timeout(t);
        }
        async move { cl.controller.create_volume(r).await }
    })
    .await
    .into_inner()
    .volume
    .unwrap();

    let image = image_of(&v.volume_id);
    assert_eq!(c.images().iter().filter(|i| **i == image).count(), 1);
    assert_eq!(flattens(&d, &image), 1, "exactly one flatten of {image}");
    let info = c.rbd(&["info", &format!("rbd/{image}")]);
    assert!(!info.contains("parent:"), "flattened:\n{info}");

    delete_volume(&c, &mut cl, &v.volume_id).await;
    delete_volume(&c, &mut cl, &src).await;
}

#[tokio::test]
async fn an_abandoned_snapshot_keeps_its_key_until_its_flatten_is_over() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller", "--max-clone-depth", "0"]);
    let mut cl = d.client().await;
    let src = volume_with_data(&c, &mut cl).await;
    let req = proto::CreateSnapshotRequest {
        source_volume_id: src.clone(),
        name: unique("cancel-snap"),
        secrets: c.secrets(),
        parameters: Default::default(),
    };
    let s = abandon_then_retry(|deadline| {
        let mut cl = cl.clone();
        let mut r = tonic::Request::new(req.clone());
        if let Some(t) = deadline {
            r.set_timeout(t);
        }
        async move { cl.controller.create_snapshot(r).await }
    })
    .await
    .into_inner()
    .snapshot
    .unwrap();
    assert!(s.ready_to_use);

    let image = image_of(&s.snapshot_id);
    assert_eq!(c.images().iter().filter(|i| **i == image).count(), 1);
    assert_eq!(flattens(&d, &image), 1, "exactly one flatten of {image}");
    assert!(
        c.all_snaps(&image).contains(&image),
        "the snapshot image holds its snapshot"
    );

    delete_snapshot(&c, &mut cl, &s.snapshot_id).await;
    delete_volume(&c, &mut cl, &src).await;
}
