//! Fencing of single-node volumes against a real Ceph cluster: the attachment record holds
//! between two controller processes, NodeStage refuses an image that another client still
//! watches, and a volume force-moved to a new node blocklists the old node's client.

mod common;

use common::*;
use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto::{self, volume_capability::access_mode::Mode};
use tonic::Code;

const MIB: i64 = 1 << 20;

fn publish_req(
    c: &Cluster,
    volume_id: &str,
    node: &str,
    block: bool,
) -> proto::ControllerPublishVolumeRequest {
    proto::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        volume_capability: Some(cap_with_mode(block, Mode::SingleNodeWriter)),
        readonly: false,
        secrets: c.secrets(),
        volume_context: Default::default(),
    }
}

fn unpublish_req(
    c: &Cluster,
    volume_id: &str,
    node: &str,
) -> proto::ControllerUnpublishVolumeRequest {
    proto::ControllerUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        secrets: c.secrets(),
    }
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

async fn delete(cl: &mut CsiClient, c: &Cluster, volume_id: &str) {
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

/// Two controller processes (a leader handover, or two clusters sharing a pool) publish one
/// single-node volume to two nodes at the same instant, 50 times: each time exactly one wins
/// and the other gets FailedPrecondition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_controllers_publish_a_single_node_volume_to_exactly_one_node() {
    let Some(c) = cluster() else { return };
    let d1 = Driver::start(&c, &["--controller"]);
    let d2 = Driver::start(&c, &["--controller"]);
    let (mut cl1, mut cl2) = (d1.client().await, d2.client().await);
    let (a, b) = (unique("race-a"), unique("race-b"));
    c.register_node(&a);
    c.register_node(&b);
    let rounds = 50;
    let mut double_wins = Vec::new();
    for round in 0..rounds {
        let vol = create(&mut cl1, &c, &unique("race")).await;
        let (p1, p2) = (cl1.controller.clone(), cl2.controller.clone());
        let (mut p1, mut p2) = (p1, p2);
        let (r1, r2) = tokio::join!(
            p1.controller_publish_volume(publish_req(&c, &vol, &a, false)),
            p2.controller_publish_volume(publish_req(&c, &vol, &b, false)),
        );
        match (&r1, &r2) {
            (Ok(_), Ok(_)) => double_wins.push(round),
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "round {round}: {e:?}")
            }
            (Err(e1), Err(e2)) => panic!("round {round}: nobody won: {e1:?} / {e2:?}"),
        }
        // The record names exactly the winners, whatever either controller reads.
        let seen = cl2
            .controller
            .controller_get_volume(proto::ControllerGetVolumeRequest {
                volume_id: vol.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .published_node_ids;
        let winners: Vec<&String> = [(&r1, &a), (&r2, &b)]
            .into_iter()
            .filter(|(r, _)| r.is_ok())
            .map(|(_, n)| n)
            .collect();
        if double_wins.last() != Some(&round) {
            assert_eq!(seen.iter().collect::<Vec<_>>(), winners, "round {round}");
        }
        for n in [&a, &b] {
            cl1.controller
                .controller_unpublish_volume(unpublish_req(&c, &vol, n))
                .await
                .unwrap();
        }
        delete(&mut cl1, &c, &vol).await;
    }
    for n in [&a, &b] {
        c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.node.{n}")]);
    }
    eprintln!(
        "{} of {rounds} rounds had two winners: {double_wins:?}",
        double_wins.len()
    );
    assert!(
        double_wins.is_empty(),
        "{} of {rounds} rounds published one single-node volume to two nodes: {double_wins:?}",
        double_wins.len()
    );
}

/// Volumes published by an earlier version carry their record in image metadata: it still
/// fences, and the first write moves it to the header attribute.
#[tokio::test]
async fn a_record_in_image_metadata_from_an_earlier_version_fences_and_moves_on_first_write() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let (a, b) = (unique("old-a"), unique("old-b"));
    c.register_node(&a);
    c.register_node(&b);
    let vol = create(&mut cl, &c, &unique("legacy")).await;
    let spec = format!("rbd/{}", image_of(&vol));
    let old = format!(r#"[{{"node":"{a}","readonly":false,"exclusive":true}}]"#);
    c.rbd(&["image-meta", "set", &spec, "rook-rbd.attachments", &old]);

    let e = cl
        .controller
        .controller_publish_volume(publish_req(&c, &vol, &b, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&a), "{e:?}");
    let seen = cl
        .controller
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: vol.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .published_node_ids;
    assert_eq!(seen, vec![a.clone()]);

    cl.controller
        .controller_unpublish_volume(unpublish_req(&c, &vol, &a))
        .await
        .unwrap();
    assert!(
        !c.rbd(&["image-meta", "list", &spec])
            .contains("rook-rbd.attachments"),
        "the old copy is gone after the first write"
    );
    cl.controller
        .controller_publish_volume(publish_req(&c, &vol, &b, false))
        .await
        .unwrap();
    cl.controller
        .controller_unpublish_volume(unpublish_req(&c, &vol, &b))
        .await
        .unwrap();
    delete(&mut cl, &c, &vol).await;
    for n in [&a, &b] {
        c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.node.{n}")]);
    }
}

// ------------------------------------------------------------------- node plugins on rbd-fuse

use rook_rbd::ceph::rados::{ConnectParams, Connection};
use rook_rbd::secret::Secret;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Bound for calls that may start rbd-fuse or tear it down on a shared machine.
const SLOW: Duration = Duration::from_secs(180);

async fn within<T>(what: &str, limit: Duration, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {limit:?}"))
}

fn ceph_cli(c: &Cluster, program: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .args(["60", program, "-c"])
        .arg(c.dir.join("ceph.conf"))
        .args(args)
        .output()
        .unwrap()
}

/// The attachment record as Ceph stores it: an attribute of the image's header object.
fn record_of(c: &Cluster, image: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&c.rbd(&["info", "--format", "json", &format!("rbd/{image}")]))
            .unwrap();
    let header = format!("rbd_header.{}", info["id"].as_str().unwrap());
    let out = ceph_cli(
        c,
        "rados",
        &["-p", "rbd", "getxattr", &header, "rook-rbd.attachments"],
    );
    assert!(out.status.success(), "no record on {header}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn addrs_of(record: &serde_json::Value, list: &str, node: &str) -> Vec<String> {
    record[list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["node"] == node)
                .map(|e| e["addr"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn blocklist(c: &Cluster) -> String {
    let out = ceph_cli(c, "ceph", &["osd", "blocklist", "ls"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image's first 4 KiB as Ceph has them, read past every node's caches.
fn first_block(c: &Cluster, image: &str) -> Vec<u8> {
    let out = ceph_cli(
        c,
        "rbd",
        &["export", "--no-progress", &format!("rbd/{image}"), "-"],
    );
    assert!(out.status.success());
    out.stdout[..4096].to_vec()
}

/// Another Ceph client with the image open read-write (which registers a watch). Fields drop
/// in order: the image closes before its connection shuts down.
struct OtherClient {
    _image: rook_rbd::ceph::Image,
    _conn: Connection,
}

fn open_elsewhere(c: &Cluster, image: &str) -> OtherClient {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.dir.join("cluster-config.json")).unwrap()).unwrap();
    let conn = Connection::connect(&ConnectParams {
        monitors: cfg[0]["monitors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect(),
        user: "admin".into(),
        key: Secret::new(c.key.clone()),
        osd_op_timeout: Duration::from_secs(10),
        mon_op_timeout: Duration::from_secs(10),
        mount_timeout: Duration::from_secs(10),
    })
    .unwrap();
    let img = conn.ioctx("rbd").unwrap().open_image(image).unwrap();
    OtherClient {
        _image: img,
        _conn: conn,
    }
}

async fn create_block(cl: &mut CsiClient, c: &Cluster, prefix: &str) -> String {
    let mut req = create_req(c, &unique(prefix), 16 * MIB);
    req.volume_capabilities = vec![cap_with_mode(true, Mode::SingleNodeWriter)];
    req.parameters.insert("mounter".into(), "fuse".into());
    create_volume(cl, req).await.volume_id
}

/// rbd-fuse processes whose command line mentions `root` (each node plugin's own).
fn fuse_pids_under(root: &Path) -> Vec<i32> {
    let needle = root.to_str().unwrap().as_bytes().to_vec();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    cmd.starts_with(b"rbd-fuse\0") && cmd.windows(needle.len()).any(|w| w == needle)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A node plugin process of its own (node ID, state and kubelet dir) on the fuse mapper.
/// Whatever it left mapped is scrubbed on drop, even when the test failed.
struct NodePlugin {
    d: Driver,
    id: String,
    cl: CsiClient,
    conf: PathBuf,
}

impl NodePlugin {
    async fn start(c: &Cluster, tag: &str) -> NodePlugin {
        let id = unique(tag);
        let d = Driver::start(
            c,
            &["--node", "--node-id", &id, "--default-mounter", "fuse"],
        );
        let cl = d.client().await;
        let obj = format!("rook-rbd.node.{id}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ceph_cli(c, "rados", &["-p", "rbd", "stat", &obj])
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "node {id} never registered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        NodePlugin {
            d,
            id,
            cl,
            conf: c.dir.join("ceph.conf"),
        }
    }

    fn staging(&self) -> String {
        self.d.path("kubelet/staging/v").display().to_string()
    }

    fn target(&self) -> String {
        self.d.path("kubelet/pods/p/dev").display().to_string()
    }

    async fn stage(&self, c: &Cluster, volume_id: &str) -> Result<(), tonic::Status> {
        let req = proto::NodeStageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: self.staging(),
            volume_capability: Some(cap_with_mode(true, Mode::SingleNodeWriter)),
            secrets: c.secrets(),
            ..Default::default()
        };
        within(
            "NodeStage",
            SLOW,
            self.cl.node.clone().node_stage_volume(req),
        )
        .await
        .map(drop)
    }

    async fn unstage(&self, volume_id: &str) -> Result<(), tonic::Status> {
        let req = proto::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: self.staging(),
        };
        within(
            "NodeUnstage",
            SLOW,
            self.cl.node.clone().node_unstage_volume(req),
        )
        .await
        .map(drop)
    }

    /// Publishes the staged raw block device; returns where it is.
    async fn publish(&self, volume_id: &str) -> PathBuf {
        let req = proto::NodePublishVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: self.staging(),
            target_path: self.target(),
            volume_capability: Some(cap_with_mode(true, Mode::SingleNodeWriter)),
            ..Default::default()
        };
        within(
            "NodePublish",
            SLOW,
            self.cl.node.clone().node_publish_volume(req),
        )
        .await
        .unwrap();
        PathBuf::from(self.target())
    }

    async fn unpublish(&self, volume_id: &str) -> Result<(), tonic::Status> {
        let req = proto::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: self.target(),
        };
        within(
            "NodeUnpublish",
            SLOW,
            self.cl.node.clone().node_unpublish_volume(req),
        )
        .await
        .map(drop)
    }
}

impl Drop for NodePlugin {
    fn drop(&mut self) {
        // Best effort, for a test that failed half-way; a passing test has left nothing.
        self.d.kill9();
        let root = self.d.root.path().to_path_buf();
        // Loops first: once the fuse mount is lazily detached, their backing path no longer
        // shows that it lies under our root.
        let loops = Command::new("losetup")
            .args(["-nO", "NAME,BACK-FILE"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for (dev, file) in loops.lines().filter_map(|l| l.split_once(' ')) {
            if Path::new(file.trim()).starts_with(&root) {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&root))
            .collect();
        points.reverse();
        for p in &points {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        for pid in fuse_pids_under(&root) {
            // SAFETY: kill(2) of an rbd-fuse this plugin started (its command line names our root).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("timeout")
            .args(["30", "rados", "-c"])
            .arg(&self.conf)
            .args(["-p", "rbd", "rm", &format!("rook-rbd.node.{}", self.id)])
            .output();
    }
}

/// NodeStage of a single-node volume refuses while another client holds the image, as ceph-csi
/// does; the same stage succeeds once that client is gone, and again while our own mapping
/// holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_stage_of_a_single_node_volume_is_refused_while_another_client_watches_it() {
    let Some(c) = cluster() else { return };
    let ctl = Driver::start(&c, &["--controller"]);
    let mut cl = ctl.client().await;
    let node = NodePlugin::start(&c, "stage-check").await;
    let vol = create_block(&mut cl, &c, "watched").await;
    let image = image_of(&vol);
    cl.controller
        .controller_publish_volume(publish_req(&c, &vol, &node.id, true))
        .await
        .unwrap();

    let other = open_elsewhere(&c, &image);
    let e = node.stage(&c, &vol).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("in use"), "{e:?}");
    assert!(
        fuse_pids_under(node.d.root.path()).is_empty(),
        "a refused stage maps nothing"
    );

    drop(other);
    node.stage(&c, &vol).await.unwrap();
    assert_eq!(fuse_pids_under(node.d.root.path()).len(), 1);
    // A repeated stage: the watcher now is our own rbd-fuse, which does not count.
    node.stage(&c, &vol).await.unwrap();
    assert_eq!(
        addrs_of(&record_of(&c, &image), "clients", &node.id).len(),
        1,
        "the node recorded its client: {}",
        record_of(&c, &image)
    );

    node.unstage(&vol).await.unwrap();
    assert!(addrs_of(&record_of(&c, &image), "clients", &node.id).is_empty());
    cl.controller
        .controller_unpublish_volume(unpublish_req(&c, &vol, &node.id))
        .await
        .unwrap();
    delete(&mut cl, &c, &vol).await;
}

/// What a writer on the old node saw: each round is one 4 KiB write plus fdatasync.
enum Wrote {
    Ok,
    Failed(std::io::Error),
}

/// Writes `A`-blocks to the start of `dev` until told to stop, reporting every round.
fn keep_writing(dev: PathBuf, stop: Arc<AtomicBool>) -> mpsc::Receiver<Wrote> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        while !stop.load(Ordering::Relaxed) {
            let r = f.write_all_at(&[b'A'; 4096], 0).and_then(|_| f.sync_data());
            let sent = tx.send(match r {
                Ok(()) => Wrote::Ok,
                Err(e) => Wrote::Failed(e),
            });
            if sent.is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    rx
}

/// Beyond ceph-csi: node A is lost while it writes to a single-node volume, the volume is
/// force-detached and published to node B. The publish blocklists A's client first, so A's
/// writes fail, B stages and writes, and nothing of A's lands on B's data; once A has unmapped,
/// its NodeUnstage lifts the blocklist entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_force_moved_single_node_volume_fences_the_old_nodes_writes() {
    let Some(c) = cluster() else { return };
    let ctl = Driver::start(&c, &["--controller"]);
    let mut cl = ctl.client().await;
    let a = NodePlugin::start(&c, "lost-a").await;
    let b = NodePlugin::start(&c, "new-b").await;
    let vol = create_block(&mut cl, &c, "moved").await;
    let image = image_of(&vol);

    cl.controller
        .controller_publish_volume(publish_req(&c, &vol, &a.id, true))
        .await
        .unwrap();
    a.stage(&c, &vol).await.unwrap();
    let dev_a = a.publish(&vol).await;
    let a_clients = addrs_of(&record_of(&c, &image), "clients", &a.id);
    assert_eq!(a_clients.len(), 1, "{}", record_of(&c, &image));
    let stop = Arc::new(AtomicBool::new(false));
    let wrote = keep_writing(dev_a, stop.clone());
    for _ in 0..3 {
        match wrote.recv_timeout(Duration::from_secs(60)) {
            Ok(Wrote::Ok) => {}
            Ok(Wrote::Failed(e)) => panic!("A cannot write before the move: {e}"),
            Err(e) => panic!("A's writer is stuck before the move: {e}"),
        }
    }

    // A is lost to the orchestrator: force detach, then attach to B. A still writes.
    cl.controller
        .controller_unpublish_volume(unpublish_req(&c, &vol, &a.id))
        .await
        .unwrap();
    cl.controller
        .controller_publish_volume(publish_req(&c, &vol, &b.id, true))
        .await
        .unwrap();
    let record = record_of(&c, &image);
    assert_eq!(addrs_of(&record, "fenced", &a.id), a_clients, "{record}");
    assert!(blocklist(&c).contains(&a_clients[0]), "{}", blocklist(&c));

    // A's writes fail from now on.
    let deadline = Instant::now() + Duration::from_secs(60);
    let failure = loop {
        assert!(
            Instant::now() < deadline,
            "A's writes still succeed 60 s after the volume moved to B"
        );
        match wrote.recv_timeout(Duration::from_secs(60)) {
            Ok(Wrote::Ok) => continue,
            Ok(Wrote::Failed(e)) => break e,
            Err(_) => panic!("A's writer hangs after the move: no write finished within 60 s"),
        }
    };
    eprintln!(
        "A's write after the fence: {failure} ({:?})",
        failure.raw_os_error()
    );

    // B stages once A's watch is gone (the OSDs drop a blocklisted client's watches).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match b.stage(&c, &vol).await {
            Ok(()) => break,
            Err(e) if e.code() == Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("B cannot stage the moved volume: {e:?}"),
        }
    }
    let dev_b = b.publish(&vol).await;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev_b)
        .unwrap();
    f.write_all_at(&[b'B'; 4096], 0).unwrap();
    f.sync_data().unwrap();
    drop(f);
    // A keeps trying for a while; none of it may land.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if let Ok(Wrote::Ok) = wrote.recv_timeout(Duration::from_millis(200)) {
            panic!("a write of the fenced node A succeeded after B took over");
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(
        first_block(&c, &image) == vec![b'B'; 4096],
        "B's data was overwritten"
    );

    // A unmaps (its plugin comes back, or an operator cleans up): the entry is lifted.
    a.unpublish(&vol).await.unwrap();
    // Its rbd-fuse cannot flush to the cluster any more, so the first unstage waits out its
    // unmount; kubelet asks again, and a fenced node's mapping is then torn down (what it held
    // is lost already: the blocklist refused it).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match a.unstage(&vol).await {
            Ok(()) => break,
            Err(e)
                if matches!(e.code(), Code::DeadlineExceeded | Code::Aborted)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            Err(e) => panic!("unstage of the fenced node: {e:?}"),
        }
    }
    assert!(!blocklist(&c).contains(&a_clients[0]), "{}", blocklist(&c));
    let record = record_of(&c, &image);
    assert!(addrs_of(&record, "fenced", &a.id).is_empty(), "{record}");
    assert!(addrs_of(&record, "clients", &a.id).is_empty(), "{record}");
    assert_eq!(addrs_of(&record, "clients", &b.id).len(), 1, "{record}");

    b.unpublish(&vol).await.unwrap();
    b.unstage(&vol).await.unwrap();
    cl.controller
        .controller_unpublish_volume(unpublish_req(&c, &vol, &b.id))
        .await
        .unwrap();
    delete(&mut cl, &c, &vol).await;
    assert!(fuse_pids_under(a.d.root.path()).is_empty());
    assert!(fuse_pids_under(b.d.root.path()).is_empty());
}
