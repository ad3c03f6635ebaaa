//! StorageClass parameters and cluster-config settings from ceph-csi, against a real cluster and a
//! real driver process: what is not implemented is refused by name and leaves nothing behind,
//! striping shapes the image, and a cluster entry's `rbd.radosNamespace` puts every image (and
//! the node registry) in that RADOS namespace, through create, stage, publish and delete.

mod common;

use common::*;
use rook_rbd::csi::proto;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// `rbd info --format json` of an image spec.
fn info(c: &Cluster, spec: &str) -> serde_json::Value {
    serde_json::from_str(&c.rbd(&["info", "--format", "json", spec])).unwrap()
}

#[tokio::test]
async fn unimplemented_ceph_csi_parameters_are_refused_by_name_and_make_no_image() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    for (key, value) in [
        ("encrypted", "true"),
        ("encryptionKMSID", "vault-tokens"),
        ("topologyConstrainedPools", r#"[{"poolName":"rbd"}]"#),
        ("thickProvision", "true"),
        ("BaseReadIops", "100"),
        ("mapOptions", "krbd:lock_on_read;xyz:opt"),
        ("unmapOptions", "nbd:id=admin"),
        ("objectSize", "3000000"),
        ("stripeUnit", "65536"),
    ] {
        let name = unique("refused");
        let mut req = create_req(&c, &name, MIB);
        req.parameters.insert(key.into(), value.into());
        let e = cl
            .controller
            .create_volume(req)
            .await
            .expect_err(&format!("{key}: {value} was accepted"));
        assert_eq!(e.code(), Code::InvalidArgument, "{key}: {e:?}");
        assert!(
            e.message().contains(key),
            "{key}: the message does not name it: {}",
            e.message()
        );
        let image = rook_rbd::volume::naming::volume_image(None, &name);
        assert!(
            !c.images().contains(&image),
            "{key}: an image was made anyway"
        );
    }
}

#[tokio::test]
async fn striping_parameters_shape_the_image() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let mut req = create_req(&c, &unique("striped"), 64 * MIB);
    req.parameters.extend(HashMap::from([
        ("objectSize".to_string(), "8388608".to_string()),
        ("stripeUnit".to_string(), "65536".to_string()),
        ("stripeCount".to_string(), "4".to_string()),
    ]));
    let v = cl
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let i = info(&c, &format!("rbd/{}", image_of(&v.volume_id)));
    assert_eq!(i["order"], 23, "{i}");
    assert_eq!(i["object_size"], 8 << 20, "{i}");
    assert_eq!(i["stripe_unit"], 65536, "{i}");
    assert_eq!(i["stripe_count"], 4, "{i}");
    cl.controller
        .delete_volume(rook_rbd::csi::proto::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

// ------------------------------------------------------------------------ radosNamespace

/// A RADOS namespace of the dev cluster's pool `rbd`, and cluster configs that use it, removed
/// with everything in it on drop (also when the test failed half-way).
struct Namespace {
    c: Cluster,
    name: String,
    dir: tempfile::TempDir,
    /// Node registrations to remove from the namespace.
    nodes: Vec<String>,
}

impl Namespace {
    fn create(c: Cluster) -> Namespace {
        let name = unique("ns");
        c.rbd(&["namespace", "create", &format!("rbd/{name}")]);
        let dir = tempfile::tempdir().unwrap();
        Namespace {
            c,
            name,
            dir,
            nodes: vec![],
        }
    }

    /// The dev cluster's config plus an entry `tenant` on the same monitors whose `rbd` settings
    /// are `rbd`; returns the file's path.
    fn config(&self, file: &str, rbd: serde_json::Value) -> PathBuf {
        let raw = std::fs::read_to_string(self.c.dir.join("cluster-config.json")).unwrap();
        let mut entries: Vec<serde_json::Value> = serde_json::from_str(&raw).unwrap();
        let mut tenant = entries[0].clone();
        tenant["clusterID"] = "tenant".into();
        tenant["rbd"] = rbd;
        entries.push(tenant);
        let path = self.dir.path().join(file);
        std::fs::write(&path, serde_json::to_string(&entries).unwrap()).unwrap();
        path
    }

    fn ns_config(&self, file: &str) -> PathBuf {
        self.config(file, serde_json::json!({ "radosNamespace": self.name }))
    }

    fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    fn images(&self) -> Vec<String> {
        self.c
            .rbd(&["ls", &self.spec()])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn params(&self) -> HashMap<String, String> {
        HashMap::from([
            ("clusterID".to_string(), "tenant".to_string()),
            ("pool".to_string(), "rbd".to_string()),
            ("mounter".to_string(), "fuse".to_string()),
        ])
    }

    fn rados(&self, args: &[&str]) -> std::process::Output {
        Command::new("timeout")
            .args(["30", "rados", "-c"])
            .arg(self.c.dir.join("ceph.conf"))
            .args(["-p", "rbd", "-N", &self.name])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let rbd = |args: &[&str]| {
            Command::new("timeout")
                .args(["60", "rbd", "-c"])
                .arg(self.c.dir.join("ceph.conf"))
                .args(args)
                .output()
                .unwrap()
        };
        let spec = self.spec();
        let listed = rbd(&["ls", &spec]);
        for image in String::from_utf8_lossy(&listed.stdout).lines() {
            let img = format!("{spec}/{image}");
            rbd(&["snap", "purge", "--no-progress", &img]);
            rbd(&["rm", "--no-progress", &img]);
        }
        rbd(&["trash", "purge", "--no-progress", &spec]);
        // The node plugin registers in every configured entry: the namespace and the default.
        for n in &self.nodes {
            let obj = format!("rook-rbd.node.{n}");
            self.rados(&["rm", &obj]);
            let _ = Command::new("timeout")
                .args(["30", "rados", "-c"])
                .arg(self.c.dir.join("ceph.conf"))
                .args(["-p", "rbd", "rm", &obj])
                .output();
        }
        let out = rbd(&["namespace", "remove", &spec]);
        if !out.status.success() {
            eprintln!(
                "could not remove namespace {spec}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Undoes what a node test that failed half-way left under the driver's root: mounts, loop
/// devices, rbd-fuse daemons.
struct Scrub(PathBuf);

impl Drop for Scrub {
    fn drop(&mut self) {
        use rook_rbd::node::mapper::fuse::{fuse_pids, loop_devices_backed_by};
        use rook_rbd::node::mount::{unmount, MountTable};
        let mounts: Vec<PathBuf> = MountTable::load()
            .map(|t| t.under(&self.0).map(|e| e.mount_point.clone()).collect())
            .unwrap_or_default();
        let pids: Vec<u32> = mounts.iter().flat_map(|m| fuse_pids(m)).collect();
        for m in mounts.iter().rev() {
            let _ = unmount(m, true);
        }
        for dev in loop_devices_backed_by(&self.0) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        for pid in pids {
            // SAFETY: kill(2) of an rbd-fuse serving a mount under this test's root.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

async fn create_in(
    cl: &mut rook_rbd::client::CsiClient,
    c: &Cluster,
    params: HashMap<String, String>,
    source: Option<proto::VolumeContentSource>,
) -> Result<proto::Volume, tonic::Status> {
    let mut req = create_req(c, &unique("nsvol"), 16 * MIB);
    req.parameters = params;
    req.volume_content_source = source;
    Ok(cl
        .controller
        .create_volume(req)
        .await?
        .into_inner()
        .volume
        .unwrap())
}

async fn delete(cl: &mut rook_rbd::client::CsiClient, c: &Cluster, volume_id: &str) {
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_cluster_entry_with_a_rados_namespace_keeps_every_image_and_the_node_registry_there() {
    let Some(c) = cluster() else { return };
    let mut ns = Namespace::create(c);
    let config = ns.ns_config("config.json");
    let node = unique("nsnode");
    ns.nodes.push(node.clone());
    let d = Driver::start_with_config(&ns.c, &config, &["--node-id", &node]);
    let _scrub = Scrub(d.root.path().to_path_buf());
    let mut cl = d.client().await;
    let c = cluster().unwrap();

    // The node plugin registers in the namespace, where a user limited to it can write.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ns
        .rados(&["stat", &format!("rook-rbd.node.{node}")])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "node never registered in {}; see {}",
            ns.spec(),
            d.path("driver.log").display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let v = create_in(&mut cl, &c, ns.params(), None).await.unwrap();
    let image = image_of(&v.volume_id);
    assert!(
        !c.images().contains(&image),
        "the image is in the default namespace"
    );
    assert!(ns.images().contains(&image), "{:?}", ns.images());
    // The ID names the namespace (the `0002` form, see volume::id).
    let prefix = format!(
        "0002-0006-tenant-0003-rbd-{:04x}-{}-",
        ns.name.len(),
        ns.name
    );
    assert!(v.volume_id.starts_with(&prefix), "{}", v.volume_id);

    // Fencing record, stage and publish through rbd-fuse, data round trip, teardown.
    let cap = mount_cap();
    cl.controller
        .controller_publish_volume(proto::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.clone(),
            volume_capability: Some(cap.clone()),
            readonly: false,
            secrets: c.secrets(),
            volume_context: v.volume_context.clone(),
        })
        .await
        .unwrap();
    let staging = d.path("kubelet/staging/ns");
    let target = d.path("kubelet/pods/p/ns");
    cl.node
        .node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            secrets: c.secrets(),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    cl.node
        .node_publish_volume(proto::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let file = target.join("data");
    let body = format!("written through {}", v.volume_id);
    std::fs::write(&file, &body).unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), body);
    let watchers = c.rbd(&[
        "status",
        "--format",
        "json",
        &format!("{}/{image}", ns.spec()),
    ]);
    assert!(
        watchers.contains("\"watchers\":[{"),
        "rbd-fuse does not hold the namespaced image: {watchers}"
    );
    cl.node
        .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    cl.node
        .node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    cl.controller
        .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();

    // Listing sees it; a snapshot and a volume restored from it stay in the namespace.
    let listed = cl
        .controller
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().unwrap().volume_id == v.volume_id),
        "ListVolumes misses {}",
        v.volume_id
    );
    let snap = create_snapshot(&c, &mut cl, &v.volume_id, &unique("nssnap")).await;
    let snap_image = image_of(&snap.snapshot_id);
    assert!(ns.images().contains(&snap_image), "{:?}", ns.images());
    let snaps = cl
        .controller
        .list_snapshots(proto::ListSnapshotsRequest {
            source_volume_id: v.volume_id.clone(),
            secrets: c.secrets(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        snaps
            .entries
            .iter()
            .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.as_str())
            .collect::<Vec<_>>(),
        [snap.snapshot_id.as_str()]
    );
    let restored = create_in(
        &mut cl,
        &c,
        ns.params(),
        Some(proto::VolumeContentSource {
            r#type: Some(proto::volume_content_source::Type::Snapshot(
                proto::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        }),
    )
    .await
    .unwrap();
    assert!(ns.images().contains(&image_of(&restored.volume_id)));

    cl.controller
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
    delete(&mut cl, &c, &restored.volume_id).await;
    delete(&mut cl, &c, &v.volume_id).await;
    assert!(
        ns.images().is_empty(),
        "left in the namespace: {:?}",
        ns.images()
    );
}

#[tokio::test]
async fn a_volume_keeps_its_namespace_when_the_cluster_config_changes() {
    let Some(c) = cluster() else { return };
    let ns = Namespace::create(c);
    let c = cluster().unwrap();
    // One config file, rewritten between driver restarts.
    let plain = ns.config("config.json", serde_json::json!({}));
    let mut d = Driver::start_with_config(&c, &plain, &["--controller"]);
    let mut cl = d.client().await;
    let before = create_in(&mut cl, &c, ns.params(), None).await.unwrap();
    assert!(c.images().contains(&image_of(&before.volume_id)));

    ns.ns_config("config.json");
    d.restart();
    let mut cl = d.client().await;
    let after = create_in(&mut cl, &c, ns.params(), None).await.unwrap();
    assert!(ns.images().contains(&image_of(&after.volume_id)));
    // The volume made before still resolves to where it is: deleting it removes its image
    // instead of missing it in the new namespace and reporting success.
    delete(&mut cl, &c, &before.volume_id).await;
    assert!(
        !c.images().contains(&image_of(&before.volume_id)),
        "DeleteVolume left the image made before the config change"
    );
    delete(&mut cl, &c, &after.volume_id).await;
    assert!(ns.images().is_empty(), "{:?}", ns.images());

    // A namespace that does not exist is a configuration error the caller can read.
    ns.config(
        "config.json",
        serde_json::json!({ "radosNamespace": "no-such-ns" }),
    );
    d.restart();
    let mut cl = d.client().await;
    let e = create_in(&mut cl, &c, ns.params(), None)
        .await
        .expect_err("created in a namespace that does not exist");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("rbd/no-such-ns"), "{}", e.message());
}
