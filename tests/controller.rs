//! Controller behaviour against a real Ceph cluster: idempotency, crash safety, fencing, deletes
//! with dependents, and precise codes for bad input.

mod common;

use common::*;
use rook_rbd::csi::proto::{
    self, volume_capability::access_mode::Mode, volume_content_source as vcs,
};
use rook_rbd::volume::naming::volume_image;
use std::time::Duration;
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn create_volume_is_idempotent_for_same_name_and_capacity() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let name = unique("idem");
    let a = cl
        .controller
        .create_volume(create_req(&c, &name, 100 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let b = cl
        .controller
        .create_volume(create_req(&c, &name, 100 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(a.volume_id, b.volume_id);
    assert_eq!(a.capacity_bytes, 100 * MIB);
    let image = image_of(&a.volume_id);
    assert_eq!(c.images().iter().filter(|i| **i == image).count(), 1);

    // Same name, different size: AlreadyExists, and the original is untouched.
    let e = cl
        .controller
        .create_volume(create_req(&c, &name, 200 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(c
        .rbd(&["info", &format!("rbd/{image}")])
        .contains("100 MiB"));

    // Same name, now with a content source: AlreadyExists.
    let src = cl
        .controller
        .create_volume(create_req(&c, &unique("idem-src"), 100 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut req = create_req(&c, &name, 100 * MIB);
    req.volume_content_source = Some(proto::VolumeContentSource {
        r#type: Some(vcs::Type::Volume(vcs::VolumeSource {
            volume_id: src.volume_id.clone(),
        })),
    });
    let e = cl.controller.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    for id in [a.volume_id, src.volume_id] {
        cl.controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id,
                secrets: c.secrets(),
            })
            .await
            .unwrap();
    }
    assert!(!c.images().contains(&image));
}

#[tokio::test]
async fn capacity_is_rounded_up_to_whole_mib() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let v = cl
        .controller
        .create_volume(create_req(&c, &unique("round"), 5 * MIB + 1))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 6 * MIB);
    let mut req = create_req(&c, &unique("round"), 5 * MIB + 1);
    req.capacity_range = Some(proto::CapacityRange {
        required_bytes: 5 * MIB + 1,
        limit_bytes: 5 * MIB + 100,
    });
    assert_eq!(
        cl.controller.create_volume(req).await.unwrap_err().code(),
        Code::OutOfRange
    );
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: v.volume_id,
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_exactly_one_image() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let cl = d.client().await;
    let name = unique("race");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut cl = cl.clone();
        let req = create_req(&c, &name, 64 * MIB);
        tasks.push(tokio::spawn(async move {
            cl.controller.create_volume(req).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                ids.insert(r.into_inner().volume.unwrap().volume_id);
            }
            Err(e) => assert_eq!(
                e.code(),
                Code::Aborted,
                "only Aborted may refuse a concurrent duplicate: {e:?}"
            ),
        }
    }
    assert_eq!(
        ids.len(),
        1,
        "every successful call returns the same volume"
    );
    let id = ids.into_iter().next().unwrap();
    assert_eq!(
        c.images().iter().filter(|i| **i == image_of(&id)).count(),
        1
    );
    let mut cl = cl.clone();
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: id,
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

/// kill -9 the driver at many points inside CreateVolume (a clone from a volume has several
/// steps: temporary snapshot, clone, snapshot removal), restart it, retry: exactly one image, no
/// temporary snapshot left, none of its images left in the trash.
#[tokio::test]
async fn kill_9_during_create_then_retry_leaks_nothing() {
    let Some(c) = cluster() else { return };
    let mut d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let src = cl
        .controller
        .create_volume(create_req(&c, &unique("crash-src"), 64 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let src_image = image_of(&src.volume_id);
    let mut made = Vec::new();
    for (i, delay_ms) in [0u64, 5, 15, 30, 60, 120, 250, 500].into_iter().enumerate() {
        let name = unique(&format!("crash{i}"));
        let mut req = create_req(&c, &name, 64 * MIB);
        if i % 2 == 0 {
            req.volume_content_source = Some(proto::VolumeContentSource {
                r#type: Some(vcs::Type::Volume(vcs::VolumeSource {
                    volume_id: src.volume_id.clone(),
                })),
            });
        }
        let mut doomed = cl.clone();
        let r = req.clone();
        let call = tokio::spawn(async move { doomed.controller.create_volume(r).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        d.kill9();
        let _ = call.await;
        d.restart();
        cl = d.client().await;
        let v = cl
            .controller
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let image = image_of(&v.volume_id);
        assert_eq!(
            c.images().iter().filter(|x| **x == image).count(),
            1,
            "kill after {delay_ms} ms"
        );
        made.push(v.volume_id);
    }
    assert_no_temporary_snapshot(&c, &src_image);
    for id in &made {
        assert!(!claim_left(&c, &image_of(id)), "claim left on {id}");
    }
    let ours: Vec<String> = made
        .iter()
        .chain([&src.volume_id])
        .map(|v| image_of(v))
        .collect();
    for id in made.into_iter().chain([src.volume_id]) {
        cl.controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id,
                secrets: c.secrets(),
            })
            .await
            .unwrap();
    }
    // The source went to the trash while its clones lived, and is swept once they are gone: none
    // of this test's images is left, in the pool or its trash. (Only ours: concurrent tests
    // trash images of their own, some on purpose for good.)
    let left = c.left_of(&ours, Duration::from_secs(60)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A clone's temporary snapshot of its source volume may live on in the trash namespace (clone
/// v2 keeps it while the clone lives), never in the user namespace.
fn assert_no_temporary_snapshot(c: &Cluster, source_image: &str) {
    let snaps = c.all_snaps(source_image);
    assert!(
        !snaps
            .lines()
            .any(|l| l.contains("csi-tmp-") && l.contains("user")),
        "temporary snapshot left in user namespace:\n{snaps}"
    );
}

/// A 16 MiB clone of the volume `source`.
fn clone_req(c: &Cluster, name: &str, source: &str) -> proto::CreateVolumeRequest {
    let mut r = create_req(c, name, 16 * MIB);
    r.volume_content_source = volume_source(source);
    r
}

/// Whether a clone's create left its claim on `image` in the pool: the claim lives only while
/// the create's image may not be recognisable as its own.
fn claim_left(c: &Cluster, image: &str) -> bool {
    let object = format!("rook-rbd.clone.{image}");
    c.rados(&["-p", "rbd", "ls"]).lines().any(|o| o == object)
}

/// A flattened clone has no parent left: its source is known from what the create recorded, so
/// every retry of the same request answers with the same volume, and another source is refused.
#[tokio::test]
async fn a_flattened_clone_answers_every_retry_and_still_refuses_another_source() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller", "--max-clone-depth", "0"]);
    let mut cl = d.client().await;
    let a = create_volume(&mut cl, create_req(&c, &unique("flat-a"), 16 * MIB)).await;
    let b = create_volume(&mut cl, create_req(&c, &unique("flat-b"), 16 * MIB)).await;
    let name = unique("flat-clone");
    let from = |src: &str| clone_req(&c, &name, src);
    let v = create_volume(&mut cl, from(&a.volume_id)).await;
    let image = image_of(&v.volume_id);
    let info = c.rbd(&["info", &format!("rbd/{image}")]);
    assert!(!info.contains("parent:"), "flattened:\n{info}");
    // A reply lost more than once: each retry must find the same volume.
    for retry in 0..3 {
        let again = create_volume(&mut cl, from(&a.volume_id)).await;
        assert_eq!(again.volume_id, v.volume_id, "retry {retry}");
    }
    let e = cl
        .controller
        .create_volume(from(&b.volume_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(c.images().iter().filter(|i| **i == image).count(), 1);
    for id in [v.volume_id, a.volume_id, b.volume_id] {
        delete_volume(&c, &mut cl, &id).await;
    }
}

/// librbd makes a clone's image before it attaches the parent: a crash in between leaves an
/// image with neither parent nor mark, only the create's claim. The state is made by hand here,
/// as librbd leaves it. The retry makes the clone; another source, or an image nobody claimed,
/// is refused and left as it is.
#[tokio::test]
async fn a_clone_cut_off_before_its_parent_was_attached_is_made_again_by_the_retry() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let a = create_volume(&mut cl, create_req(&c, &unique("cut-a"), 16 * MIB)).await;
    let b = create_volume(&mut cl, create_req(&c, &unique("cut-b"), 16 * MIB)).await;
    let from = |name: &str, src: &str| clone_req(&c, name, src);
    let cut_off = |name: &str, src: &proto::Volume| {
        let image = volume_image(None, name);
        c.rbd(&["create", "--size", "16M", &format!("rbd/{image}")]);
        let claim = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(claim.path(), image_of(&src.volume_id)).unwrap();
        let object = format!("rook-rbd.clone.{image}");
        c.rados(&["-p", "rbd", "put", &object, claim.path().to_str().unwrap()]);
        image
    };

    let name = unique("cut-clone");
    let image = cut_off(&name, &a);
    let e = cl
        .controller
        .create_volume(from(&name, &b.volume_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "another source: {e:?}");
    assert!(
        c.images().contains(&image),
        "the other source's image stays"
    );
    let v = create_volume(&mut cl, from(&name, &a.volume_id)).await;
    assert_eq!(image_of(&v.volume_id), image);
    assert_eq!(c.images().iter().filter(|i| **i == image).count(), 1);
    let info = c.rbd(&["info", &format!("rbd/{image}")]);
    assert!(
        info.contains(&format!("parent: rbd/{}", image_of(&a.volume_id))),
        "a real clone now:\n{info}"
    );
    assert!(
        !claim_left(&c, &image),
        "the claim is gone once the clone is marked"
    );
    assert_no_temporary_snapshot(&c, &image_of(&a.volume_id));

    // Nobody's claim: an image made some other way, with data, is never taken for a clone.
    let other = unique("cut-foreign");
    let foreign = volume_image(None, &other);
    c.rbd(&["create", "--size", "16M", &format!("rbd/{foreign}")]);
    c.write_data(&foreign, 4);
    let e = cl
        .controller
        .create_volume(from(&other, &a.volume_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "unclaimed: {e:?}");
    let du = c.rbd(&["du", &format!("rbd/{foreign}")]);
    assert!(du.contains("4 MiB"), "its data is still there:\n{du}");

    c.rbd(&["rm", &format!("rbd/{foreign}")]);
    for id in [v.volume_id, a.volume_id, b.volume_id] {
        delete_volume(&c, &mut cl, &id).await;
    }
}

#[tokio::test]
async fn delete_is_idempotent_and_ignores_unknown_ids() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let v = cl
        .controller
        .create_volume(create_req(&c, &unique("del"), 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    for _ in 0..2 {
        cl.controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: c.secrets(),
            })
            .await
            .unwrap();
    }
    // (A well-formed ID of a cluster not in the config fails closed: see controller_delete.rs.)
    for id in [
        "fake-vol-id-1",
        &format!("0001-0024-{}-0007-nopool-csi-vol-1", c.fsid),
    ] {
        cl.controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: c.secrets(),
            })
            .await
            .unwrap();
    }
    let e = cl
        .controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: String::new(),
            secrets: c.secrets(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn delete_of_a_watched_image_is_refused_with_failed_precondition() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let v = cl
        .controller
        .create_volume(create_req(&c, &unique("watched"), 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let image = image_of(&v.volume_id);
    // A client with the image open holds a watch on its header, as a mapped image does.
    let mut watch = std::process::Command::new("rbd")
        .args([
            "-c",
            c.dir.join("ceph.conf").to_str().unwrap(),
            "bench",
            "--io-type",
            "read",
            "--io-total",
            "1T",
            &format!("rbd/{image}"),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if c.rbd(&["status", &format!("rbd/{image}")])
            .contains("watcher=")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = cl
        .controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: c.secrets(),
        })
        .await;
    let _ = watch.kill();
    let _ = watch.wait();
    let e = refused.expect_err("delete should be refused while watched");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("in use"), "{}", e.message());
    assert!(c.images().contains(&image), "nothing is lost");
    // The watch outlives the killed process until the OSD drops it (osd_client_watch_timeout, 30 s).
    for _ in 0..90 {
        if cl
            .controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: c.secrets(),
            })
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!c.images().contains(&image));
}

#[tokio::test]
async fn snapshots_outlive_their_source_and_everything_is_swept_at_the_end() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let src = cl
        .controller
        .create_volume(create_req(&c, &unique("snapsrc"), 32 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let snap = create_snapshot(&c, &mut cl, &src.volume_id, &unique("snap")).await;
    assert_eq!(snap.source_volume_id, src.volume_id);
    assert!(snap.ready_to_use);
    // The source can go while the snapshot stays.
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: src.volume_id.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
    assert!(!c.images().contains(&image_of(&src.volume_id)));
    // ...and the snapshot still restores, larger than it was.
    let mut req = create_req(&c, &unique("restored"), 64 * MIB);
    req.volume_content_source = Some(proto::VolumeContentSource {
        r#type: Some(vcs::Type::Snapshot(vcs::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = cl
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 64 * MIB);
    assert!(restored.content_source.is_some());
    // Smaller than the snapshot: OutOfRange.
    let mut req = create_req(&c, &unique("restored-small"), 16 * MIB);
    req.volume_content_source = Some(proto::VolumeContentSource {
        r#type: Some(vcs::Type::Snapshot(vcs::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    assert_eq!(
        cl.controller.create_volume(req).await.unwrap_err().code(),
        Code::OutOfRange
    );

    cl.controller
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: restored.volume_id.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
    let ours = [
        image_of(&src.volume_id),
        image_of(&snap.snapshot_id),
        image_of(&restored.volume_id),
    ];
    let left = c.left_of(&ours, Duration::from_secs(60)).await;
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn a_single_node_volume_cannot_be_published_to_a_second_node() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let (a, b) = (unique("node-a"), unique("node-b"));
    c.register_node(&a);
    c.register_node(&b);
    let v = cl
        .controller
        .create_volume(create_req(&c, &unique("fence"), 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let publish = |node: &str, mode: Mode, readonly: bool| proto::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(cap_with_mode(false, mode)),
        readonly,
        secrets: c.secrets(),
        volume_context: Default::default(),
    };
    let ctx = cl
        .controller
        .controller_publish_volume(publish(&a, Mode::SingleNodeWriter, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ctx.publish_context.get("attachedNode"), Some(&a));
    // Again, same node and mode: OK.
    cl.controller
        .controller_publish_volume(publish(&a, Mode::SingleNodeWriter, false))
        .await
        .unwrap();
    // Same node, now read-only: incompatible, AlreadyExists.
    let e = cl
        .controller
        .controller_publish_volume(publish(&a, Mode::SingleNodeWriter, true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Another node: fenced.
    let e = cl
        .controller
        .controller_publish_volume(publish(&b, Mode::SingleNodeWriter, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&a));
    // An unknown node: NotFound.
    let e = cl
        .controller
        .controller_publish_volume(publish("no-such-node", Mode::SingleNodeWriter, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The attachment is visible in ControllerGetVolume and ListVolumes.
    let got = cl
        .controller
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, vec![a.clone()]);
    // After unpublish from A, B may attach.
    for _ in 0..2 {
        cl.controller
            .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: a.clone(),
                secrets: c.secrets(),
            })
            .await
            .unwrap();
    }
    cl.controller
        .controller_publish_volume(publish(&b, Mode::SingleNodeWriter, false))
        .await
        .unwrap();
    cl.controller
        .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: b,
            secrets: c.secrets(),
        })
        .await
        .unwrap();
    // Read-only-many may go to several nodes at once.
    cl.controller
        .controller_publish_volume(publish(&a, Mode::MultiNodeReaderOnly, true))
        .await
        .unwrap();
    let c2 = unique("node-c");
    c.register_node(&c2);
    cl.controller
        .controller_publish_volume(publish(&c2, Mode::MultiNodeReaderOnly, true))
        .await
        .unwrap();
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: v.volume_id,
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_input_gets_precise_codes_and_never_leaks_the_key() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let tried = std::sync::Mutex::new(Vec::<String>::new());
    let check = |req: proto::CreateVolumeRequest, want: Code, why: &'static str| {
        tried.lock().unwrap().push(req.name.clone());
        let mut cl = cl.clone();
        let key = c.key.clone();
        async move {
            let e = cl.controller.create_volume(req).await.expect_err(why);
            assert_eq!(e.code(), want, "{why}: {e:?}");
            assert!(
                !e.message().contains(&key),
                "{why}: the key leaked into the message"
            );
        }
    };
    check(create_req(&c, "", MIB), Code::InvalidArgument, "empty name").await;
    check(
        create_req(&c, &"n".repeat(129), MIB),
        Code::InvalidArgument,
        "129-byte name",
    )
    .await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    r.parameters.insert("mkfsOptions".into(), "-E\u{7}".into());
    check(r, Code::InvalidArgument, "control character in a parameter").await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    r.parameters
        .insert("clusterID".into(), "no-such-cluster".into());
    check(r, Code::InvalidArgument, "unknown clusterID").await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    r.parameters.insert("pool".into(), "nopool".into());
    check(r, Code::InvalidArgument, "unknown pool").await;
    check(
        create_req(&c, &unique("bad"), -1),
        Code::InvalidArgument,
        "negative capacity",
    )
    .await;
    check(
        create_req(&c, &unique("bad"), i64::MAX),
        Code::OutOfRange,
        "absurd capacity",
    )
    .await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    r.secrets.clear();
    check(r, Code::InvalidArgument, "missing secrets").await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    r.secrets.insert("userKey".into(), "not base64!".into());
    check(r, Code::InvalidArgument, "malformed key").await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    let other_key = std::process::Command::new("ceph-authtool")
        .arg("--gen-print-key")
        .output()
        .unwrap()
        .stdout;
    r.secrets.insert(
        "userKey".into(),
        String::from_utf8(other_key).unwrap().trim().to_string(),
    );
    check(r, Code::PermissionDenied, "wrong key").await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    r.volume_capabilities = vec![cap_with_mode(false, Mode::MultiNodeMultiWriter)];
    check(r, Code::InvalidArgument, "multi-writer filesystem").await;
    let mut r = create_req(&c, &unique("bad"), MIB);
    r.volume_capabilities.clear();
    check(r, Code::InvalidArgument, "no capabilities").await;

    // A string field that is not UTF-8 on the wire is the caller's fault, not Internal.
    let e = raw_create_with_invalid_utf8(&d.endpoint).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let images = c.images();
    let made: Vec<String> = tried
        .lock()
        .unwrap()
        .iter()
        .filter(|n| images.contains(&volume_image(None, n)))
        .cloned()
        .collect();
    assert!(
        made.is_empty(),
        "a refused request creates nothing, but these exist: {made:?}"
    );
    let e = cl
        .controller
        .list_volumes(proto::ListVolumesRequest {
            max_entries: 1,
            starting_token: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let e = cl
        .controller
        .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
            volume_id: format!("0001-0024-{}-0003-rbd-csi-vol-00000000000000000000", c.fsid),
            volume_capabilities: vec![mount_cap()],
            secrets: c.secrets(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// Sends a CreateVolumeRequest whose `name` (field 1) holds bytes that are not UTF-8.
async fn raw_create_with_invalid_utf8(endpoint: &str) -> tonic::Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawCreate {
        #[prost(bytes = "vec", tag = "1")]
        name: Vec<u8>,
    }
    let client = rook_rbd::client::CsiClient::connect(endpoint)
        .await
        .unwrap();
    let channel = client.channel.clone();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/csi.v1.Controller/CreateVolume");
    let codec = tonic_prost::ProstCodec::<RawCreate, proto::CreateVolumeResponse>::default();
    grpc.unary(
        tonic::Request::new(RawCreate {
            name: vec![0xff, 0xfe, b'x'],
        }),
        path,
        codec,
    )
    .await
    .unwrap_err()
}

#[tokio::test]
async fn probe_tells_the_truth_and_the_driver_recovers_when_the_cluster_returns() {
    // Needs its own cluster: stopping the shared one would break the other tests.
    let Some(c) = cluster() else { return };
    let own = tempfile::Builder::new()
        .prefix("rook-rbd-probe")
        .tempdir_in("/tmp")
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ceph-dev.sh");
    let dev = |args: &[&str], keep: bool| {
        let st = std::process::Command::new("bash")
            .arg(script)
            .args(args)
            .arg(own.path())
            .env("CEPH_DEV_MON_PORT", "3399")
            .env("KEEP", if keep { "1" } else { "" })
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "ceph-dev.sh {args:?}");
    };
    // Stops the private cluster even when an assertion fails, before its directory goes.
    struct Down<'a>(&'a std::path::Path, &'static str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("bash")
                .arg(self.1)
                .arg("down")
                .arg(self.0)
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
    let _down = Down(own.path(), script);
    dev(&["up"], false);
    drop(c);
    let c = Cluster {
        dir: own.path().to_path_buf(),
        fsid: {
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(own.path().join("cluster-config.json")).unwrap(),
            )
            .unwrap();
            cfg[0]["clusterID"].as_str().unwrap().to_string()
        },
        key: std::fs::read_to_string(own.path().join("admin.key"))
            .unwrap()
            .trim()
            .to_string(),
    };
    let d = Driver::start(
        &c,
        &[
            "--controller",
            "--rados-osd-op-timeout",
            "3",
            "--rados-mon-op-timeout",
            "3",
            "--client-mount-timeout",
            "3",
        ],
    );
    let mut cl = d.client().await;
    let ready = |cl: &mut rook_rbd::client::CsiClient| {
        let mut cl = cl.clone();
        async move {
            cl.identity
                .probe(proto::ProbeRequest {})
                .await
                .unwrap()
                .into_inner()
                .ready
                .unwrap_or(false)
        }
    };
    let probe_cl = cl.clone();
    let wait_for = |want: bool| {
        let cl = probe_cl.clone();
        async move {
            let mut cl = cl;
            for _ in 0..100 {
                if ready(&mut cl).await == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("probe never became ready={want}");
        }
    };
    wait_for(true).await;
    let v = cl
        .controller
        .create_volume(create_req(&c, &unique("outage"), 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();

    dev(&["down"], true);
    wait_for(false).await;
    let t = std::time::Instant::now();
    let e = cl
        .controller
        .create_volume(create_req(&c, &unique("outage"), 16 * MIB))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{e:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "answered in {:?}, before a sidecar gives up",
        t.elapsed()
    );

    dev(&["up"], false);
    wait_for(true).await;
    // Same process, no restart: works again.
    let mut last = None;
    for _ in 0..30 {
        match cl
            .controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: c.secrets(),
            })
            .await
        {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        last.is_none(),
        "the driver did not recover without a restart: {last:?}"
    );
    drop(d);
    dev(&["down"], false);
}

/// librbd copies image metadata into clones; a clone or snapshot of a published volume must not
/// inherit the source's attachment and so be fenced to the source's node.
#[tokio::test]
async fn a_clone_of_a_published_volume_is_not_attached_anywhere() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let (a, b) = (unique("clone-node-a"), unique("clone-node-b"));
    c.register_node(&a);
    c.register_node(&b);
    let src = cl
        .controller
        .create_volume(create_req(&c, &unique("clone-src"), 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let publish = |vol: &str, node: &str| proto::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(cap_with_mode(false, Mode::SingleNodeWriter)),
        readonly: false,
        secrets: c.secrets(),
        volume_context: Default::default(),
    };
    cl.controller
        .controller_publish_volume(publish(&src.volume_id, &a))
        .await
        .unwrap();
    let mut req = create_req(&c, &unique("clone"), 16 * MIB);
    req.volume_content_source = Some(proto::VolumeContentSource {
        r#type: Some(vcs::Type::Volume(vcs::VolumeSource {
            volume_id: src.volume_id.clone(),
        })),
    });
    let clone = cl
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let snap = create_snapshot(&c, &mut cl, &src.volume_id, &unique("clone-snap")).await;
    let got = cl
        .controller
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: clone.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        got.status.unwrap().published_node_ids.is_empty(),
        "the clone inherited an attachment"
    );
    let meta = c.rbd(&[
        "image-meta",
        "list",
        &format!("rbd/{}", image_of(&snap.snapshot_id)),
    ]);
    assert!(
        !meta.contains("rook-rbd.attachments"),
        "the snapshot image inherited an attachment:\n{meta}"
    );
    cl.controller
        .controller_publish_volume(publish(&clone.volume_id, &b))
        .await
        .unwrap();

    for (vol, node) in [(&src.volume_id, &a), (&clone.volume_id, &b)] {
        cl.controller
            .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
                volume_id: vol.clone(),
                node_id: node.clone(),
                secrets: c.secrets(),
            })
            .await
            .unwrap();
    }
    cl.controller
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            secrets: c.secrets(),
        })
        .await
        .unwrap();
    for id in [clone.volume_id, src.volume_id] {
        cl.controller
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id,
                secrets: c.secrets(),
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_storage_class_without_cluster_id_uses_the_only_configured_cluster() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let mut req = create_req(&c, &unique("nocluster"), 16 * MIB);
    let cluster_id = req.parameters.remove("clusterID").unwrap();
    let v = cl
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = rook_rbd::volume::VolumeId::decode(&v.volume_id).unwrap();
    assert_eq!(id.cluster_id, cluster_id);
    assert!(c.images().contains(&id.image));
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: v.volume_id,
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}
