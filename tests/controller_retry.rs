//! Once CreateVolume or CreateSnapshot may have made an image, a later failing step must answer
//! with a code the sidecar retries (Aborted, Unavailable, DeadlineExceeded): a final code makes
//! the external-provisioner forget the request, and the half-made image leaks. The failure is
//! real: a cephx user that may create and clone images but not write data objects, so the
//! flatten that `--max-clone-depth 0` demands fails after the clone exists.

mod common;

use common::*;
use rook_rbd::csi::proto;
use std::collections::HashMap;
use std::process::Command;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn ceph(c: &Cluster, args: &[&str]) -> String {
    c.ceph(args).trim().to_string()
}

/// A cephx user for pool rbd that may do everything to image metadata objects but only read
/// data objects (`rbd_data.*`): create, clone, resize and metadata work; a flatten does not.
/// Removed on drop.
struct NoDataWrites<'a> {
    c: &'a Cluster,
    name: String,
    key: String,
}

impl<'a> NoDataWrites<'a> {
    fn new(c: &'a Cluster) -> Self {
        let name = format!("nodata-{}", std::process::id());
        let mut osd = String::from("allow r pool=rbd");
        for p in [
            "rbd_directory",
            "rbd_id.",
            "rbd_header.",
            "rbd_object_map.",
            "rbd_info",
            "rbd_children",
            "rbd_trash",
            "rbd_mirroring",
            "rbd_namespace",
            "rbd_task",
            "rook-rbd.",
        ] {
            osd.push_str(&format!(", allow rwx pool=rbd object_prefix {p}"));
        }
        let entity = format!("client.{name}");
        let _ = Command::new("ceph")
            .arg("-c")
            .arg(c.dir.join("ceph.conf"))
            .args(["auth", "del", &entity])
            .output();
        ceph(
            c,
            &[
                "auth",
                "get-or-create",
                &entity,
                "mon",
                "profile rbd",
                "osd",
                &osd,
            ],
        );
        let key = ceph(c, &["auth", "print-key", &entity]);
        Self { c, name, key }
    }

    fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("userID".into(), self.name.clone()),
            ("userKey".into(), self.key.clone()),
        ])
    }
}

impl Drop for NoDataWrites<'_> {
    fn drop(&mut self) {
        let _ = Command::new("ceph")
            .arg("-c")
            .arg(self.c.dir.join("ceph.conf"))
            .args(["auth", "del", &format!("client.{}", self.name)])
            .output();
    }
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Aborted | Code::Unavailable | Code::DeadlineExceeded
    )
}

/// A volume with a few MiB of data, so a flatten of its clone has objects to copy.
async fn volume_with_data(c: &Cluster, cl: &mut rook_rbd::client::CsiClient) -> String {
    let v = create_volume(cl, create_req(c, &unique("retry-src"), 16 * MIB)).await;
    c.write_data(&image_of(&v.volume_id), 16);
    v.volume_id
}

#[tokio::test]
async fn a_clone_whose_flatten_fails_gets_a_retryable_code_and_the_retry_completes_it() {
    let Some(c) = cluster() else { return };
    let user = NoDataWrites::new(&c);
    let d = Driver::start(&c, &["--controller", "--max-clone-depth", "0"]);
    let mut cl = d.client().await;
    let src = volume_with_data(&c, &mut cl).await;
    let name = unique("retry-clone");
    let mut req = create_req(&c, &name, 32 * MIB);
    req.volume_content_source = volume_source(&src);
    let image = rook_rbd::volume::naming::volume_image(None, &name);

    let mut weak = req.clone();
    weak.secrets = user.secrets();
    let e = cl.controller.create_volume(weak).await.unwrap_err();
    assert!(
        c.images().contains(&image),
        "the clone exists before the flatten fails"
    );
    assert!(
        retryable(e.code()),
        "a failure after the clone exists must be retried, not final: {e:?}"
    );

    // The caller retries (here with a user that may write data): the same volume, complete.
    let v = create_volume(&mut cl, req).await;
    assert_eq!(image_of(&v.volume_id), image);
    assert_eq!(v.capacity_bytes, 32 * MIB);
    assert_eq!(c.images().iter().filter(|i| **i == image).count(), 1);
    let info = c.rbd(&["info", &format!("rbd/{image}")]);
    assert!(!info.contains("parent:"), "flattened:\n{info}");
    assert!(info.contains("size 32 MiB"), "{info}");

    delete_volume(&c, &mut cl, &v.volume_id).await;
    delete_volume(&c, &mut cl, &src).await;
}

#[tokio::test]
async fn a_snapshot_whose_flatten_fails_gets_a_retryable_code_and_the_retry_completes_it() {
    let Some(c) = cluster() else { return };
    let user = NoDataWrites::new(&c);
    let d = Driver::start(&c, &["--controller", "--max-clone-depth", "0"]);
    let mut cl = d.client().await;
    let src = volume_with_data(&c, &mut cl).await;
    let name = unique("retry-snap");
    let image = rook_rbd::volume::naming::snapshot_image(&name);
    let req = |secrets| proto::CreateSnapshotRequest {
        source_volume_id: src.clone(),
        name: name.clone(),
        secrets,
        parameters: Default::default(),
    };

    let e = cl
        .controller
        .create_snapshot(req(user.secrets()))
        .await
        .unwrap_err();
    assert!(c.images().contains(&image), "the snapshot image exists");
    assert!(
        retryable(e.code()),
        "a failure after the snapshot image exists must be retried, not final: {e:?}"
    );

    let s = cl
        .controller
        .create_snapshot(req(c.secrets()))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(s.ready_to_use);
    assert_eq!(image_of(&s.snapshot_id), image);
    assert_eq!(s.source_volume_id, src);
    assert!(c.all_snaps(&image).contains(&image));

    delete_snapshot(&c, &mut cl, &s.snapshot_id).await;
    delete_volume(&c, &mut cl, &src).await;
}

/// Before anything is made, a refusal stays final: the caller must not retry what cannot work.
#[tokio::test]
async fn a_user_that_may_not_create_gets_a_final_code_and_nothing_is_made() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let name = unique("readonly");
    let entity = format!("client.ro-{}", std::process::id());
    ceph(
        &c,
        &[
            "auth",
            "get-or-create",
            &entity,
            "mon",
            "profile rbd",
            "osd",
            "profile rbd-read-only pool=rbd",
        ],
    );
    let key = ceph(&c, &["auth", "print-key", &entity]);
    let mut req = create_req(&c, &name, 16 * MIB);
    req.secrets = HashMap::from([
        ("userID".into(), entity.trim_start_matches("client.").into()),
        ("userKey".into(), key),
    ]);
    let e = cl.controller.create_volume(req).await.unwrap_err();
    ceph(&c, &["auth", "del", &entity]);
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let image = rook_rbd::volume::naming::volume_image(None, &name);
    assert!(!c.images().contains(&image));
}
