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
    create_snapshot(c, cl, source, &unique("del-snap"))
        .await
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

/// Deletes as a provisioner does: again, once a second, while the volume is in use
/// (FailedPrecondition), for at most `limit`.
async fn delete_while_in_use(
    cl: &mut CsiClient,
    c: &Cluster,
    id: &str,
    limit: Duration,
) -> Result<(), tonic::Status> {
    let start = Instant::now();
    loop {
        match delete(cl, c, id).await {
            Err(e) if e.code() == Code::FailedPrecondition && start.elapsed() < limit => {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            r => return r,
        }
    }
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
    let Some(c) = cluster() else { return };
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
    let Some(c) = cluster() else { return };
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

/// Trash entries of the pool, (image ID, name).
fn trash_entries(c: &Cluster) -> Vec<(String, String)> {
    c.trash()
        .iter()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

fn image_id(c: &Cluster, image: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&c.rbd(&["info", "--format", "json", &format!("rbd/{image}")]))
            .unwrap();
    info["id"].as_str().unwrap().to_string()
}

/// DeleteVolume returns once the image is in the trash; the image stays there, restorable, until
/// the deferment ends, and then goes, with its record.
#[tokio::test]
async fn a_deleted_volume_waits_in_the_trash_until_its_deferment_ends_then_goes() {
    let Some(c) = cluster() else { return };
    let deferment = Duration::from_secs(8);
    let d = Driver::start(&c, &["--controller", "--trash-deferment", "8"]);
    let mut cl = d.client().await;
    let vol = create(&mut cl, &c, &unique("deferred")).await;
    let image = image_of(&vol);
    let id = image_id(&c, &image);
    let t0 = Instant::now();
    delete(&mut cl, &c, &vol).await.unwrap();
    assert!(!c.images().contains(&image), "gone from the pool at once");
    assert!(trash_entries(&c).contains(&(id.clone(), image.clone())));
    assert!(
        records(&c).contains(&(format!("rook-rbd.trash.{id}"), image.clone())),
        "recorded by image ID"
    );
    until_deferment_ends(t0 + deferment, || {
        let there = trash_names(&c).contains(&image);
        let seen = t0.elapsed();
        async move { (!there).then(|| format!("purged {seen:?} after the delete")) }
    })
    .await;
    assert!(purged(&c, &[image]).await, "never purged");
}

/// The trash entry a delete leaves is one librbd takes for its own: `rbd trash restore` brings
/// the image back under its name, whole, and a second delete trashes it again.
#[tokio::test]
async fn a_deleted_volume_can_be_restored_with_rbd_trash_restore() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller", "--trash-deferment", "3600"]);
    let mut cl = d.client().await;
    let vol = create(&mut cl, &c, &unique("restore")).await;
    let image = image_of(&vol);
    let id = image_id(&c, &image);
    delete(&mut cl, &c, &vol).await.unwrap();
    assert!(!c.images().contains(&image), "gone from the pool at once");
    assert!(trash_entries(&c).contains(&(id.clone(), image.clone())));
    // Refused for an entry still "moving", and for one whose name librbd still lists.
    c.rbd(&["trash", "restore", &format!("rbd/{id}")]);
    assert!(c.images().contains(&image), "restored under its name");
    assert_eq!(image_id(&c, &image), id, "the same image");
    delete(&mut cl, &c, &vol).await.unwrap();
    assert!(!c.images().contains(&image), "trashed again");
    assert!(trash_entries(&c).contains(&(id.clone(), image.clone())));
    c.rbd(&["trash", "rm", "--force", &format!("rbd/{id}")]);
    c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.trash.{id}")]);
}

/// A kill -9 loses no purge: the restarted driver finds the records and purges what is due,
/// with no new delete to remind it.
#[tokio::test]
async fn purges_resume_after_a_kill_9() {
    let Some(c) = cluster() else { return };
    let mut d = Driver::start(&c, &["--controller", "--trash-deferment", "3"]);
    let mut cl = d.client().await;
    let mut images = Vec::new();
    for i in 0..3 {
        let vol = create(&mut cl, &c, &unique(&format!("resume{i}"))).await;
        delete(&mut cl, &c, &vol).await.unwrap();
        images.push(image_of(&vol));
    }
    d.kill9();
    // Past the deferment with no driver running: nothing purges them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let trash = trash_names(&c);
    assert!(images.iter().all(|i| trash.contains(i)), "{trash:?}");
    d.restart();
    assert!(purged(&c, &images).await, "purges did not resume");
}

/// kill -9 at many points inside DeleteVolume (before the record, between the record and the
/// move, after the move), restart, retry: every image is purged, no record is left, and the
/// hand-trashed images beside them are untouched.
#[tokio::test]
async fn kill_9_during_delete_then_retry_leaks_nothing() {
    let Some(c) = cluster() else { return };
    let foreign = Foreign::trash(&c);
    let mut d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let mut images = Vec::new();
    for (i, delay_ms) in [0u64, 1, 2, 4, 8, 15, 30, 60].into_iter().enumerate() {
        let vol = create(&mut cl, &c, &unique(&format!("delcrash{i}"))).await;
        let mut doomed = cl.clone();
        let req = proto::DeleteVolumeRequest {
            volume_id: vol.clone(),
            secrets: c.secrets(),
        };
        let call = tokio::spawn(async move { doomed.controller.delete_volume(req).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        d.kill9();
        let _ = call.await;
        d.restart();
        cl = d.client().await;
        // A kill inside librbd's open leaves the dead process's watch on the image until the
        // OSD times it out (30 s): in use until then, as for rbd_remove.
        if let Err(e) = delete_while_in_use(&mut cl, &c, &vol, Duration::from_secs(60)).await {
            panic!("retry after a kill at {delay_ms} ms: {e:?}");
        }
        images.push(image_of(&vol));
    }
    assert!(purged(&c, &images).await, "left behind");
    assert!(
        foreign.missing().is_empty(),
        "swept {:?}",
        foreign.missing()
    );
}

/// A deleted volume's name is free at once: the same request name makes a new, empty image,
/// never the trashed one, and ListVolumes shows only the live one.
#[tokio::test]
async fn a_name_is_free_again_as_soon_as_its_volume_is_deleted() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller", "--trash-deferment", "3"]);
    let mut cl = d.client().await;
    let name = unique("reuse");
    let first = create(&mut cl, &c, &name).await;
    let image = image_of(&first);
    let first_id = image_id(&c, &image);
    delete(&mut cl, &c, &first).await.unwrap();
    let listed = |cl: &mut CsiClient| {
        let mut cl = cl.clone();
        let vol = first.clone();
        async move {
            cl.controller
                .list_volumes(proto::ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .entries
                .iter()
                .filter(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == vol))
                .count()
        }
    };
    assert_eq!(listed(&mut cl).await, 0, "a trashed volume is not listed");
    let second = create(&mut cl, &c, &name).await;
    assert_eq!(second, first, "IDs come from names");
    assert_ne!(
        image_id(&c, &image),
        first_id,
        "a new image, not the trashed one"
    );
    assert_eq!(listed(&mut cl).await, 1);
    delete(&mut cl, &c, &second).await.unwrap();
    assert!(purged(&c, &[image]).await, "left behind");
}

/// Writes a record object by hand, as the driver would.
fn put_record(c: &Cluster, id: &str, name: &str) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let rec = serde_json::json!({"name": name, "deleted_at": 0, "purge_after": 0});
    std::fs::write(tmp.path(), rec.to_string()).unwrap();
    let obj = format!("rook-rbd.trash.{id}");
    c.rados(&["-p", "rbd", "put", &obj, tmp.path().to_str().unwrap()]);
}

/// A record acts only together with the trash entry it was written for: a record on a live image
/// (a crash between the record and the move) leaves the image alone until the CO's retry, and a
/// record whose name is not the trash entry's is not ours and moves nothing.
#[tokio::test]
async fn a_record_without_its_trash_entry_removes_nothing() {
    let Some(c) = cluster() else { return };
    let mut d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let live = create(&mut cl, &c, &unique("rec-live")).await;
    let live_image = image_of(&live);
    put_record(&c, &image_id(&c, &live_image), &live_image);
    let foreign = Foreign::trash(&c);
    let (fid, _) = trash_entries(&c)
        .into_iter()
        .find(|(_, n)| *n == foreign.names[0])
        .unwrap();
    put_record(&c, &fid, "csi-vol-some-other-name");
    // A fresh process scans the pool; a delete after it shows its purger has run a pass since.
    d.restart();
    cl = d.client().await;
    let probe = create(&mut cl, &c, &unique("rec-probe")).await;
    delete(&mut cl, &c, &probe).await.unwrap();
    assert!(purged(&c, &[image_of(&probe)]).await);
    assert!(
        c.images().contains(&live_image),
        "a live image with a record was removed"
    );
    assert!(
        foreign.missing().is_empty(),
        "swept {:?}",
        foreign.missing()
    );
    // The CO's retry completes the delete.
    delete(&mut cl, &c, &live).await.unwrap();
    assert!(purged(&c, &[live_image]).await);
    c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.trash.{fid}")]);
}

/// A librbd client opens the image (taking its watch and exclusive lock), then is killed: the OSD
/// keeps its watch until it times out (30 s).
async fn leave_a_dead_clients_watch(c: &Cluster, image: &str) {
    let spec = format!("rbd/{image}");
    let mut reader = std::process::Command::new("rbd")
        .arg("-c")
        .arg(c.dir.join("ceph.conf"))
        .args(["bench", "--io-type", "read", "--io-total", "1T", &spec])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || c
            .rbd(&["status", &spec])
            .contains("watcher="))
        .await
    );
    reader.kill().unwrap();
    reader.wait().unwrap();
}

/// A client that died with the source open leaves its watch until the OSD times it out (30 s).
/// librbd waits that out when it purges a clone (it opens the parent to detach it), so a delete
/// of the source right after its clones must wait for those purges, not call the source in use.
#[tokio::test]
async fn a_source_deletes_after_its_clones_while_a_dead_clients_watch_lingers() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let src = create(&mut cl, &c, &unique("clonesrc")).await;
    let mut images = vec![image_of(&src)];
    let mut clones = Vec::new();
    for i in 0..2 {
        let mut req = create_req(&c, &unique(&format!("clone{i}")), 16 * MIB);
        req.volume_content_source = volume_source(&src);
        let id = create_volume(&mut cl, req).await.volume_id;
        images.push(image_of(&id));
        clones.push(id);
    }
    leave_a_dead_clients_watch(&c, &image_of(&src)).await;
    for id in &clones {
        delete(&mut cl, &c, id).await.unwrap();
    }
    delete(&mut cl, &c, &src).await.unwrap();
    assert!(purged(&c, &images).await, "left behind");
}

/// librbd's remove waits out a dead client's watch, but removes at once: with a deferment, the
/// delete says the volume is in use until the watch is gone (the CO retries), and then the image
/// waits in the trash, restorable, like any other.
#[tokio::test]
async fn a_deferred_delete_never_removes_outright_while_a_dead_clients_watch_lingers() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller", "--trash-deferment", "600"]);
    let mut cl = d.client().await;
    let vol = create(&mut cl, &c, &unique("deadwatch")).await;
    let image = image_of(&vol);
    let id = image_id(&c, &image);
    leave_a_dead_clients_watch(&c, &image).await;
    delete_while_in_use(&mut cl, &c, &vol, Duration::from_secs(90))
        .await
        .unwrap();
    assert!(
        trash_entries(&c).contains(&(id.clone(), image)),
        "deleted by a trash move, restorable until the deferment ends"
    );
    c.rbd(&["trash", "rm", &id]);
    c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.trash.{id}")]);
}
