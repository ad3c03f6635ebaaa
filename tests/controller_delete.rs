//! DeleteVolume and the RBD trash against a real Ceph cluster: only images this driver trashed are
//! ever purged, never before their deferment ends, purges resume after a kill -9, and a delete
//! that cannot tell whether the volume exists fails closed.

mod common;

use common::*;
use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto;
use std::time::{Duration, Instant};
use tonic::Code;

const MIB: i64 = 1 << 20;

macro_rules! cluster_or_return {
    () => {
        match cluster() {
            Some(c) => c,
            None => return,
        }
    };
}

async fn create(cl: &mut CsiClient, c: &Cluster, name: &str) -> String {
    cl.controller
        .create_volume(create_req(c, name, 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn snapshot(cl: &mut CsiClient, c: &Cluster, source: &str) -> String {
    cl.controller
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: unique("del-snap"),
            secrets: c.secrets(),
            parameters: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id
}

async fn delete(cl: &mut CsiClient, c: &Cluster, id: &str) -> Result<(), tonic::Status> {
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: c.secrets(),
        })
        .await
        .map(|_| ())
}

async fn delete_snapshot(cl: &mut CsiClient, c: &Cluster, id: &str) -> Result<(), tonic::Status> {
    cl.controller
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            secrets: c.secrets(),
        })
        .await
        .map(|_| ())
}

/// Names of the images in the pool's trash.
fn trash_names(c: &Cluster) -> Vec<String> {
    c.trash()
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Polls until `done` holds, for at most `limit`; returns whether it did.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done()
}

/// Images trashed by hand (as a user or ceph-csi would) under names this driver also uses.
struct Foreign<'a> {
    c: &'a Cluster,
    names: Vec<String>,
}

impl<'a> Foreign<'a> {
    fn trash(c: &'a Cluster) -> Self {
        let tag = unique("foreign");
        let names = vec![
            // ceph-csi's default prefix is ours too.
            format!("csi-vol-{tag}"),
            // Our snapshot-image prefix.
            format!("csi-snap-{tag}"),
            // Deferred by its owner, and with an expired deferment.
            format!("csi-vol-{tag}-deferred"),
            format!("csi-vol-{tag}-expired"),
        ];
        let at = |offset: &str| {
            let out = std::process::Command::new("date")
                .args(["-d", offset, "+%Y-%m-%d %H:%M:%S"])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        for (i, n) in names.iter().enumerate() {
            let spec = format!("rbd/{n}");
            c.rbd(&["create", &spec, "--size", "4M"]);
            match i {
                2 => c.rbd(&["trash", "mv", "--expires-at", &at("+1 hour"), &spec]),
                3 => c.rbd(&["trash", "mv", "--expires-at", &at("-1 hour"), &spec]),
                _ => c.rbd(&["trash", "mv", &spec]),
            };
        }
        Foreign { c, names }
    }

    fn missing(&self) -> Vec<String> {
        let t = trash_names(self.c);
        self.names
            .iter()
            .filter(|n| !t.contains(n))
            .cloned()
            .collect()
    }
}

impl Drop for Foreign<'_> {
    fn drop(&mut self) {
        for l in self.c.trash() {
            let mut f = l.split_whitespace();
            if let (Some(id), Some(name)) = (f.next(), f.next()) {
                if self.names.iter().any(|n| n == name) {
                    self.c
                        .rbd(&["trash", "rm", "--force", &format!("rbd/{id}")]);
                }
            }
        }
    }
}

/// Images a user or ceph-csi trashed, with our prefixes, deferred or not, survive every sweep:
/// deletes with dependents (which trash our own images), deletes that free them, and restarts.
#[tokio::test]
async fn foreign_trash_entries_survive_every_sweep() {
    let c = cluster_or_return!();
    let foreign = Foreign::trash(&c);
    let mut d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    for round in 0..3 {
        if round == 1 {
            // A fresh process knows nothing of earlier trash moves.
            d.restart();
            cl = d.client().await;
        }
        let vol = create(&mut cl, &c, &unique("sweep-src")).await;
        let snap = snapshot(&mut cl, &c, &vol).await;
        // The snapshot depends on the volume: the volume waits in the trash.
        delete(&mut cl, &c, &vol).await.unwrap();
        let vol_image = image_of(&vol);
        assert!(!c.images().contains(&vol_image));
        assert!(
            foreign.missing().is_empty(),
            "round {round}: swept {:?}",
            foreign.missing()
        );
        // Its last dependent goes: now it is swept.
        delete_snapshot(&mut cl, &c, &snap).await.unwrap();
        assert!(
            eventually(Duration::from_secs(30), || !trash_names(&c)
                .contains(&vol_image))
            .await,
            "round {round}: our own trashed image was never swept"
        );
        assert!(
            foreign.missing().is_empty(),
            "round {round}: swept {:?}",
            foreign.missing()
        );
    }
}

/// A cluster config with a typo: the real cluster's ID is not in it.
fn typo_config(c: &Cluster) -> (tempfile::TempDir, Cluster) {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("cluster-config.json")).unwrap())
            .unwrap();
    let typo = format!("{}x", c.fsid);
    let bad = serde_json::json!([{"clusterID": typo, "monitors": cfg[0]["monitors"]}]);
    std::fs::write(dir.path().join("cluster-config.json"), bad.to_string()).unwrap();
    let other = Cluster {
        dir: dir.path().to_path_buf(),
        fsid: typo,
        key: c.key.clone(),
    };
    (dir, other)
}

/// A well-formed ID of a cluster that is not in the config may name a volume that exists: OK
/// would leak it, so the delete fails closed (FailedPrecondition, which the provisioner retries
/// until the config is fixed). Malformed IDs and missing pools still succeed.
#[tokio::test]
async fn delete_of_a_volume_in_an_unknown_cluster_fails_closed() {
    let c = cluster_or_return!();
    let good = Driver::start(&c, &["--controller"]);
    let mut gcl = good.client().await;
    let vol = create(&mut gcl, &c, &unique("typo")).await;
    let snap = snapshot(&mut gcl, &c, &vol).await;

    let (_dir, typo) = typo_config(&c);
    let bad = Driver::start(&typo, &["--controller"]);
    let mut bcl = bad.client().await;
    let e = delete(&mut bcl, &c, &vol)
        .await
        .expect_err("must fail closed");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&c.fsid),
        "names the cluster: {}",
        e.message()
    );
    let e = delete_snapshot(&mut bcl, &c, &snap)
        .await
        .expect_err("must fail closed");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(c.images().contains(&image_of(&vol)), "nothing is lost");
    assert!(c.images().contains(&image_of(&snap)), "nothing is lost");

    // Not IDs this driver ever issued: nothing to delete.
    for id in ["fake-vol-id-1", "0001-00zz-x", ""] {
        let r = delete(&mut bcl, &c, id).await;
        match id {
            "" => assert_eq!(r.unwrap_err().code(), Code::InvalidArgument),
            _ => r.unwrap_or_else(|e| panic!("{id}: {e:?}")),
        }
        delete_snapshot(&mut bcl, &c, "fake-snap-id-1")
            .await
            .unwrap();
    }
    // A pool that the (configured) cluster does not have is a deleted pool: its images are gone.
    let in_missing_pool = format!("0001-0024-{}-0007-nopool-csi-vol-1", c.fsid);
    delete(&mut gcl, &c, &in_missing_pool).await.unwrap();
    let snap_in_missing_pool = format!("0001-0024-{}-0007-nopool-csi-snap-1", c.fsid);
    delete_snapshot(&mut gcl, &c, &snap_in_missing_pool)
        .await
        .unwrap();

    delete_snapshot(&mut gcl, &c, &snap).await.unwrap();
    delete(&mut gcl, &c, &vol).await.unwrap();
}
