//! DeleteVolume and the RBD trash against a real Ceph cluster: only images this driver trashed are
//! ever purged.

mod common;

use common::*;
use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto;
use std::time::{Duration, Instant};

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
