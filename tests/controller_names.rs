//! Names against a real Ceph cluster: each image carries the request name that made it, an image
//! marked for another request (or visibly someone else's) is never adopted, and custom
//! `volumeNamePrefix` values survive a driver restart.

mod common;

use common::*;
use rook_rbd::csi::proto;
use rook_rbd::volume::naming::{snapshot_image, volume_image};
use tonic::Code;

const MIB: i64 = 1 << 20;
const NAME_KEY: &str = "rook-rbd.name";

fn meta(c: &Cluster, image: &str, key: &str) -> Option<String> {
    let out = std::process::Command::new("rbd")
        .arg("-c")
        .arg(c.dir.join("ceph.conf"))
        .args(["image-meta", "get", &format!("rbd/{image}"), key])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test]
async fn every_volume_clone_and_snapshot_carries_the_name_that_made_it() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let name = unique("mark");
    let mut req = create_req(&c, &name, 16 * MIB);
    // What the external-provisioner adds with --extra-create-metadata.
    req.parameters
        .insert("csi.storage.k8s.io/pv/name".into(), name.clone());
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "claim".into());
    let v = create_volume(&mut cl, req).await;
    let image = image_of(&v.volume_id);
    assert_eq!(meta(&c, &image, NAME_KEY), Some(name.clone()));
    assert_eq!(meta(&c, &image, "csi.storage.k8s.io/pv/name"), Some(name));
    assert_eq!(
        meta(&c, &image, "csi.storage.k8s.io/pvc/name").as_deref(),
        Some("claim")
    );

    // A clone inherits its parent's metadata in librbd; its mark must be its own.
    let clone_name = unique("mark-clone");
    let mut req = create_req(&c, &clone_name, 16 * MIB);
    req.volume_content_source = volume_source(&v.volume_id);
    let clone = create_volume(&mut cl, req).await;
    let clone_image = image_of(&clone.volume_id);
    assert_eq!(meta(&c, &clone_image, NAME_KEY), Some(clone_name));
    assert_eq!(
        meta(&c, &clone_image, "csi.storage.k8s.io/pv/name"),
        None,
        "the parent's PV name does not carry over"
    );

    let snap_name = unique("mark-snap");
    let s = create_snapshot(&c, &mut cl, &v.volume_id, &snap_name).await;
    assert_eq!(
        meta(&c, &image_of(&s.snapshot_id), NAME_KEY),
        Some(snap_name)
    );

    delete_snapshot(&c, &mut cl, &s.snapshot_id).await;
    delete_volume(&c, &mut cl, &clone.volume_id).await;
    delete_volume(&c, &mut cl, &v.volume_id).await;
}

/// Makes `name`'s image by hand, as another driver sharing the pool would, with one piece of
/// metadata, then asks this driver for `name`: it must refuse, and leave the image as it was.
async fn refused_over_a_foreign_image(prefix: &str, key: &str, value: &str) {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let name = unique(prefix);
    let image = volume_image(None, &name);
    let spec = format!("rbd/{image}");
    c.rbd(&["create", &spec, "--size", "16M"]);
    c.rbd(&["image-meta", "set", &spec, key, value]);
    let e = cl
        .controller
        .create_volume(create_req(&c, &name, 16 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(meta(&c, &image, key).as_deref(), Some(value));
    if key != NAME_KEY {
        assert_eq!(meta(&c, &image, NAME_KEY), None, "left unmarked");
    }
    c.rbd(&["rm", &spec]);
}

/// Two requests whose images collide (here the image another driver made for another name).
#[tokio::test]
async fn create_refuses_an_image_marked_with_another_name() {
    refused_over_a_foreign_image("collide", NAME_KEY, "someone-else").await;
}

/// No mark, but Kubernetes metadata naming another PV: not ours either.
#[tokio::test]
async fn create_refuses_an_unmarked_image_that_names_another_pv() {
    refused_over_a_foreign_image(
        "foreign-pv",
        "csi.storage.k8s.io/pv/name",
        "pvc-of-another-cluster",
    )
    .await;
}

/// An image from the previous version of this driver (which marked only when Kubernetes metadata
/// came along) has no mark and nothing that contradicts it: it is adopted, and marked.
#[tokio::test]
async fn an_unmarked_image_with_nothing_against_it_is_adopted_and_marked() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let name = unique("old-driver");
    let image = volume_image(None, &name);
    c.rbd(&["create", &format!("rbd/{image}"), "--size", "16M"]);
    let v = create_volume(&mut cl, create_req(&c, &name, 16 * MIB)).await;
    assert_eq!(image_of(&v.volume_id), image);
    assert_eq!(meta(&c, &image, NAME_KEY), Some(name));
    delete_volume(&c, &mut cl, &v.volume_id).await;
}

#[tokio::test]
async fn create_snapshot_refuses_a_snapshot_image_marked_with_another_name() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let src = create_volume(
        &mut cl,
        create_req(&c, &unique("snap-collide-src"), 16 * MIB),
    )
    .await;
    let src_image = image_of(&src.volume_id);
    let name = unique("snap-collide");
    let image = snapshot_image(&name);
    // What a complete snapshot of `src` looks like, but made for someone else.
    c.rbd(&["snap", "create", &format!("rbd/{src_image}@hand")]);
    c.rbd(&[
        "clone",
        &format!("rbd/{src_image}@hand"),
        &format!("rbd/{image}"),
    ]);
    c.rbd(&["snap", "create", &format!("rbd/{image}@{image}")]);
    c.rbd(&[
        "image-meta",
        "set",
        &format!("rbd/{image}"),
        NAME_KEY,
        "someone-else",
    ]);

    let e = cl
        .controller
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: src.volume_id.clone(),
            name: name.clone(),
            secrets: c.secrets(),
            parameters: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(meta(&c, &image, NAME_KEY).as_deref(), Some("someone-else"));

    c.rbd(&["snap", "rm", &format!("rbd/{image}@{image}")]);
    c.rbd(&["rm", &format!("rbd/{image}")]);
    c.rbd(&["snap", "rm", &format!("rbd/{src_image}@hand")]);
    delete_volume(&c, &mut cl, &src.volume_id).await;
}

#[tokio::test]
async fn a_volume_with_a_custom_prefix_is_still_listed_after_a_driver_restart() {
    let Some(c) = cluster() else { return };
    let mut d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let prefix = format!("pfx{}-", std::process::id());
    let mut req = create_req(&c, &unique("prefixed"), 16 * MIB);
    req.parameters
        .insert("volumeNamePrefix".into(), prefix.clone());
    let v = create_volume(&mut cl, req).await;
    assert!(image_of(&v.volume_id).starts_with(&prefix));

    let listed = |cl: rook_rbd::client::CsiClient| async move {
        let mut cl = cl;
        let mut ids = Vec::new();
        let mut token = String::new();
        loop {
            let page = cl
                .controller
                .list_volumes(proto::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            ids.extend(
                page.entries
                    .into_iter()
                    .map(|e| e.volume.unwrap().volume_id),
            );
            if page.next_token.is_empty() {
                return ids;
            }
            token = page.next_token;
        }
    };
    assert!(listed(cl.clone()).await.contains(&v.volume_id));

    d.restart();
    let mut cl = d.client().await;
    assert!(
        listed(cl.clone()).await.contains(&v.volume_id),
        "a restarted driver still lists the {prefix} volume"
    );
    delete_volume(&c, &mut cl, &v.volume_id).await;
}
