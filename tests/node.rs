//! Node behaviour through the CSI gRPC API, against a real Ceph cluster and a real driver process
//! (controller and node in one, volumes mapped with rbd-fuse + a loop device): data survives
//! restaging, online expansion reaches the filesystem, raw block round trips, published mounts
//! outlive a kill -9 of the plugin, request paths cannot escape kubelet's directory, a
//! single-node volume is fenced to its node, and a dead mapping shows in the volume condition.
//!
//! Every test runs its own driver (own socket, state dir, kubelet dir and node ID) so tests run
//! in parallel with each other and with tests/controller.rs. A drop guard scrubs whatever a
//! failed test left under its root (mounts, loop devices, rbd-fuse daemons) and its images.

mod common;

use common::*;
use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto::{self, volume_capability::access_mode::Mode};
use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::{Code, Status};

const MIB: i64 = 1 << 20;

/// Generous bound for calls that may run mkfs/fsck or start rbd-fuse on a shared machine.
const SLOW: u64 = 180;

// ------------------------------------------------------------------------------- helpers

/// Awaits `fut`, failing the test if it takes longer than `secs`.
async fn within<T>(what: &str, secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s"))
}

/// Runs blocking file I/O on its own thread, failing the test if it hangs (a dead fuse mount
/// can block forever; the thread is then abandoned).
fn io_within<T: Send + 'static>(
    what: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

/// A request carrying a gRPC deadline, as kubelet sends it.
fn with_deadline<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(deadline);
    req
}

/// Awaits a call sent [`with_deadline`]; a little past the deadline the client gives up.
async fn given_up_after<T>(
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<(), Status> {
    match tokio::time::timeout(deadline + Duration::from_secs(5), call).await {
        Ok(r) => r.map(drop),
        Err(_) => Err(Status::deadline_exceeded("the client gave up")),
    }
}

/// Pseudo-random bytes (xorshift64*), seeded from the clock and pid: different every run.
fn random_bytes(n: usize) -> Vec<u8> {
    let mut s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ ((std::process::id() as u64) << 32)
        | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

fn write_synced(path: &Path, data: &[u8]) {
    let (p, d) = (path.to_path_buf(), data.to_vec());
    io_within("writing a file", 60, move || {
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&d).unwrap();
        f.sync_all().unwrap();
    });
}

fn read_all(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    io_within("reading a file", 60, move || {
        std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    })
}

fn statvfs_total(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    io_within("statvfs", 60, move || {
        // SAFETY: statvfs fills the zeroed struct; c is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0, "statvfs");
        s.f_blocks as u64 * s.f_frsize as u64
    })
}

/// Mount points in /proc/self/mountinfo, unescaped.
fn mount_points() -> Vec<PathBuf> {
    let raw = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    raw.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let mut out = String::new();
            let mut rest = m;
            while let Some(i) = rest.find('\\') {
                out.push_str(&rest[..i]);
                let code = rest.get(i + 1..i + 4).unwrap_or("");
                match u8::from_str_radix(code, 8) {
                    Ok(b) if code.len() == 3 => {
                        out.push(b as char);
                        rest = &rest[i + 4..];
                    }
                    _ => {
                        out.push('\\');
                        rest = &rest[i + 1..];
                    }
                }
            }
            out.push_str(rest);
            PathBuf::from(out)
        })
        .collect()
}

fn mounts_under(root: &Path) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(root))
        .collect()
}

/// Loop devices whose backing file lies under `root`, from sysfs.
fn loops_under(root: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n');
            let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
            Path::new(backing)
                .starts_with(root)
                .then(|| format!("/dev/{name} -> {backing}"))
        })
        .collect()
}

/// Live rbd-fuse processes whose command line mentions `needle`.
fn fuse_pids_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.to_str().unwrap().as_bytes();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmd.split(|b| *b == 0);
            let is_fuse = args
                .next()
                .is_some_and(|a0| a0.rsplit(|b| *b == b'/').next() == Some(b"rbd-fuse"));
            is_fuse && cmd.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

/// Nothing of the driver's is left on the machine: no mount under its root, no loop device
/// backed by a file under it, no rbd-fuse serving its state dir.
fn assert_nothing_left(root: &Path) {
    let mounts = mounts_under(root);
    assert!(mounts.is_empty(), "leftover mounts: {mounts:?}");
    let loops = loops_under(root);
    assert!(loops.is_empty(), "leftover loop devices: {loops:?}");
    let pids = fuse_pids_mentioning(&root.join("state"));
    assert!(pids.is_empty(), "leftover rbd-fuse processes: {pids:?}");
}

fn fs_cap(fs: &str) -> proto::VolumeCapability {
    rook_rbd::client::cli::capability(false, fs, false)
}

// ------------------------------------------------------------------------------- the world

/// A cluster, a driver serving controller and node under a unique node ID, and everything a
/// test made; scrubbed on drop even when the test failed.
struct Env {
    c: Cluster,
    d: Driver,
    cl: CsiClient,
    node: String,
    /// Volume IDs not yet deleted through the API.
    volumes: Vec<String>,
    /// Node registrations (RADOS objects) to remove.
    nodes: Vec<String>,
    publish_ctx: HashMap<String, HashMap<String, String>>,
    /// The driver's --key-dir, removed with the test (a killed driver cannot remove it).
    key_root: PathBuf,
}

impl Env {
    async fn start(c: Cluster) -> Env {
        Self::start_with_env(c, &[]).await
    }

    /// A driver whose process gets extra environment (a test's tool wrappers first in PATH).
    async fn start_with_env(c: Cluster, env: &[(&str, &str)]) -> Env {
        let node = unique("node");
        let key_root = PathBuf::from(format!("/dev/shm/rook-rbd-test-{node}"));
        let d = Driver::start_with_env(
            &c,
            &["--node-id", &node, "--key-dir", key_root.to_str().unwrap()],
            env,
        );
        let cl = d.client().await;
        let env = Env {
            c,
            d,
            cl,
            node: node.clone(),
            volumes: vec![],
            nodes: vec![node],
            publish_ctx: HashMap::new(),
            key_root,
        };
        env.wait_registered().await;
        env
    }

    /// The node plugin registers in the background; ControllerPublish needs it done.
    async fn wait_registered(&self) {
        let obj = format!("rook-rbd.node.{}", self.node);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new("rados")
                .arg("-c")
                .arg(self.c.dir.join("ceph.conf"))
                .args(["-p", "rbd", "stat", &obj])
                .output()
                .unwrap()
                .status
                .success();
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never registered; see {}",
                self.node,
                self.d.path("driver.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn root(&self) -> PathBuf {
        self.d.root.path().to_path_buf()
    }

    /// A path under the driver's kubelet dir.
    fn kubelet(&self, rel: &str) -> PathBuf {
        self.d.path("kubelet").join(rel)
    }

    async fn create(
        &mut self,
        prefix: &str,
        size: i64,
        cap: proto::VolumeCapability,
    ) -> proto::Volume {
        let mut req = create_req(&self.c, &unique(prefix), size);
        req.volume_capabilities = vec![cap];
        req.parameters.insert("mounter".into(), "fuse".into());
        let v = within(
            "CreateVolume",
            SLOW,
            self.cl.controller.clone().create_volume(req),
        )
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
        assert_eq!(
            v.volume_context.get("mounter").map(String::as_str),
            Some("fuse")
        );
        self.volumes.push(v.volume_id.clone());
        v
    }

    async fn controller_publish_to(
        &mut self,
        v: &proto::Volume,
        cap: &proto::VolumeCapability,
        node: &str,
    ) -> Result<HashMap<String, String>, Status> {
        let req = proto::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: node.into(),
            volume_capability: Some(cap.clone()),
            readonly: false,
            secrets: self.c.secrets(),
            volume_context: v.volume_context.clone(),
        };
        let ctx = within(
            "ControllerPublishVolume",
            SLOW,
            self.cl.controller.clone().controller_publish_volume(req),
        )
        .await?
        .into_inner()
        .publish_context;
        if node == self.node {
            self.publish_ctx.insert(v.volume_id.clone(), ctx.clone());
        }
        Ok(ctx)
    }

    async fn controller_publish(&mut self, v: &proto::Volume, cap: &proto::VolumeCapability) {
        let node = self.node.clone();
        let ctx = self.controller_publish_to(v, cap, &node).await.unwrap();
        assert_eq!(ctx.get("attachedNode"), Some(&node));
    }

    async fn stage(
        &self,
        v: &proto::Volume,
        cap: &proto::VolumeCapability,
        staging: &Path,
    ) -> Result<(), Status> {
        self.stage_path(v, cap, staging.to_str().unwrap()).await
    }

    async fn stage_path(
        &self,
        v: &proto::Volume,
        cap: &proto::VolumeCapability,
        staging: &str,
    ) -> Result<(), Status> {
        within(
            "NodeStageVolume",
            SLOW,
            self.cl
                .node
                .clone()
                .node_stage_volume(self.stage_req(v, cap, staging)),
        )
        .await
        .map(drop)
    }

    fn stage_req(
        &self,
        v: &proto::Volume,
        cap: &proto::VolumeCapability,
        staging: &str,
    ) -> proto::NodeStageVolumeRequest {
        proto::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: self
                .publish_ctx
                .get(&v.volume_id)
                .cloned()
                .unwrap_or_default(),
            staging_target_path: staging.into(),
            volume_capability: Some(cap.clone()),
            secrets: self.c.secrets(),
            volume_context: v.volume_context.clone(),
        }
    }

    /// NodeStageVolume as kubelet sends it: with a deadline, after which the client gives up.
    async fn stage_with_deadline(
        &self,
        v: &proto::Volume,
        cap: &proto::VolumeCapability,
        staging: &Path,
        deadline: Duration,
    ) -> Result<(), Status> {
        let req = with_deadline(self.stage_req(v, cap, staging.to_str().unwrap()), deadline);
        let mut node = self.cl.node.clone();
        given_up_after(deadline, node.node_stage_volume(req)).await
    }

    /// NodeUnstageVolume with a deadline, after which the client gives up.
    async fn unstage_with_deadline(
        &self,
        volume_id: &str,
        staging: &Path,
        deadline: Duration,
    ) -> Result<(), Status> {
        let req = proto::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.to_str().unwrap().into(),
        };
        let mut node = self.cl.node.clone();
        given_up_after(
            deadline,
            node.node_unstage_volume(with_deadline(req, deadline)),
        )
        .await
    }

    /// Key files in the driver's key dir; each lives only while a mapper tool reads it.
    fn key_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.key_root)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|f| f.path())
            .collect()
    }

    /// State files of staged volumes in the driver's state dir.
    fn staged_records(&self) -> usize {
        std::fs::read_dir(self.d.path("state/staged"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    }

    async fn publish(
        &self,
        v: &proto::Volume,
        cap: &proto::VolumeCapability,
        staging: &Path,
        target: &Path,
    ) -> Result<(), Status> {
        self.publish_paths(v, cap, staging.to_str().unwrap(), target.to_str().unwrap())
            .await
    }

    async fn publish_paths(
        &self,
        v: &proto::Volume,
        cap: &proto::VolumeCapability,
        staging: &str,
        target: &str,
    ) -> Result<(), Status> {
        let req = proto::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: self
                .publish_ctx
                .get(&v.volume_id)
                .cloned()
                .unwrap_or_default(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: Some(cap.clone()),
            readonly: false,
            secrets: Default::default(),
            volume_context: v.volume_context.clone(),
        };
        within(
            "NodePublishVolume",
            SLOW,
            self.cl.node.clone().node_publish_volume(req),
        )
        .await
        .map(drop)
    }

    async fn unpublish(&self, volume_id: &str, target: &str, secs: u64) -> Result<(), Status> {
        let req = proto::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target.into(),
        };
        within(
            "NodeUnpublishVolume",
            secs,
            self.cl.node.clone().node_unpublish_volume(req),
        )
        .await
        .map(drop)
    }

    async fn unstage(&self, volume_id: &str, staging: &Path, secs: u64) -> Result<(), Status> {
        let req = proto::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging.to_str().unwrap().into(),
        };
        within(
            "NodeUnstageVolume",
            secs,
            self.cl.node.clone().node_unstage_volume(req),
        )
        .await
        .map(drop)
    }

    async fn stats(
        &self,
        volume_id: &str,
        path: &Path,
    ) -> Result<proto::NodeGetVolumeStatsResponse, Status> {
        let req = proto::NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path.to_str().unwrap().into(),
            staging_target_path: String::new(),
        };
        within(
            "NodeGetVolumeStats",
            60,
            self.cl.node.clone().node_get_volume_stats(req),
        )
        .await
        .map(|r| r.into_inner())
    }

    /// Unpublish + unstage on the node; all must succeed.
    async fn node_teardown(&self, v: &proto::Volume, staging: &Path, target: &Path) {
        self.unpublish(&v.volume_id, target.to_str().unwrap(), SLOW)
            .await
            .unwrap();
        assert!(!target.exists(), "unpublish leaves the target path behind");
        self.unstage(&v.volume_id, staging, SLOW).await.unwrap();
    }

    /// ControllerUnpublish from this node, then DeleteVolume.
    async fn finish(&mut self, v: &proto::Volume) {
        let req = proto::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: self.node.clone(),
            secrets: self.c.secrets(),
        };
        within(
            "ControllerUnpublishVolume",
            SLOW,
            self.cl.controller.clone().controller_unpublish_volume(req),
        )
        .await
        .unwrap();
        let req = proto::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: self.c.secrets(),
        };
        within(
            "DeleteVolume",
            SLOW,
            self.cl.controller.clone().delete_volume(req),
        )
        .await
        .unwrap();
        assert!(!self.c.images().contains(&image_of(&v.volume_id)));
        self.volumes.retain(|id| *id != v.volume_id);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Best effort, for a test that failed half-way; a passing test has already left nothing.
        self.d.kill9();
        let _ = std::fs::remove_dir_all(&self.key_root);
        let root = self.root();
        let fuse_root = root.join("state").join("fuse");
        let mut points = mounts_under(&root);
        points.reverse();
        for p in points.iter().filter(|p| !p.starts_with(&fuse_root)) {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        for l in loops_under(&root) {
            if let Some(dev) = l.split(' ').next() {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
        for pid in fuse_pids_mentioning(&root.join("state")) {
            // SAFETY: kill(2) of an rbd-fuse this test's driver started (found by its cmdline).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for p in mounts_under(&root).iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        let conf = self.c.dir.join("ceph.conf");
        for id in &self.volumes {
            if let Ok(v) = rook_rbd::volume::VolumeId::decode(id) {
                let _ = Command::new("timeout")
                    .args(["60", "rbd", "-c"])
                    .arg(&conf)
                    .args(["rm", "--no-progress", &format!("rbd/{}", v.image)])
                    .output();
            }
        }
        for n in &self.nodes {
            let _ = Command::new("timeout")
                .args(["30", "rados", "-c"])
                .arg(&conf)
                .args(["-p", "rbd", "rm", &format!("rook-rbd.node.{n}")])
                .output();
        }
    }
}

// ------------------------------------------------------------------------------- tests

#[tokio::test]
async fn data_survives_unstage_and_restage() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = mount_cap();
    let v = env.create("restage", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/v");
    let target = env.kubelet("pods/p/v");

    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    let data = random_bytes(3 * MIB as usize + 12345);
    write_synced(&target.join("data.bin"), &data);
    env.node_teardown(&v, &staging, &target).await;
    assert_nothing_left(&env.root());

    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    let back = read_all(&target.join("data.bin"));
    assert!(
        back == data,
        "the file changed across unstage/restage ({} bytes back, {} written)",
        back.len(),
        data.len()
    );

    env.node_teardown(&v, &staging, &target).await;
    env.finish(&v).await;
    assert_nothing_left(&env.root());
}

#[tokio::test]
async fn online_expansion_is_visible_inside_the_filesystem() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    // mkfs.xfs wants at least 300 MiB (the image is thin). ext4 cannot grow online in this
    // sandbox (no CAP_SYS_RESOURCE), xfs can.
    let cap = fs_cap("xfs");
    let (small, big) = (320 * MIB, 640 * MIB);
    let v = env.create("expand", small, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/v");
    let target = env.kubelet("pods/p/v");
    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    let before = statvfs_total(&target);
    assert!(before > 0 && before <= small as u64, "{before}");

    let r = within(
        "ControllerExpandVolume",
        SLOW,
        env.cl
            .controller
            .clone()
            .controller_expand_volume(proto::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: big,
                    limit_bytes: 0,
                }),
                secrets: env.c.secrets(),
                volume_capability: Some(cap.clone()),
            }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.capacity_bytes, big);
    assert!(r.node_expansion_required);
    // The filesystem does not grow by itself.
    assert_eq!(statvfs_total(&target), before);

    let r = within(
        "NodeExpandVolume",
        SLOW,
        env.cl
            .node
            .clone()
            .node_expand_volume(proto::NodeExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                volume_path: target.to_str().unwrap().into(),
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: big,
                    limit_bytes: 0,
                }),
                staging_target_path: staging.to_str().unwrap().into(),
                volume_capability: Some(cap.clone()),
                secrets: Default::default(),
            }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        r.capacity_bytes, big,
        "NodeExpandVolume reports the device size"
    );

    let after = statvfs_total(&target);
    let grown = after.saturating_sub(before);
    assert!(
        grown >= (big - small) as u64 * 9 / 10 && after <= big as u64,
        "filesystem total {before} -> {after}: expected to grow by about {} bytes",
        big - small
    );
    // The staging mount sees the same filesystem.
    assert_eq!(statvfs_total(&staging), after);

    let st = env.stats(&v.volume_id, &target).await.unwrap();
    let bytes = st
        .usage
        .iter()
        .find(|u| u.unit == proto::volume_usage::Unit::Bytes as i32)
        .expect("a bytes usage entry");
    assert_eq!(
        bytes.total as u64, after,
        "NodeGetVolumeStats total after expansion"
    );
    assert!(bytes.used >= 0 && bytes.available > 0 && bytes.used + bytes.available <= bytes.total);
    let cond = st.volume_condition.expect("volume condition");
    assert!(!cond.abnormal, "{cond:?}");

    // Data still reads after growth.
    let data = random_bytes(MIB as usize);
    write_synced(&target.join("after-grow"), &data);
    assert!(read_all(&target.join("after-grow")) == data);

    env.node_teardown(&v, &staging, &target).await;
    env.finish(&v).await;
    assert_nothing_left(&env.root());
}

#[tokio::test]
async fn raw_block_volume_round_trip() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = block_cap();
    let size = 64 * MIB;
    let v = env.create("block", size, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/b");
    let target = env.kubelet("pods/p/volumeDevices/b");
    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    {
        use std::os::unix::fs::FileTypeExt;
        let ft = std::fs::metadata(&target).unwrap().file_type();
        assert!(
            ft.is_block_device(),
            "the target is the block device: {ft:?}"
        );
    }

    // An unaligned offset and length, straddling a 4 MiB object boundary.
    let offset = 4 * MIB as u64 - 1000;
    let data = random_bytes(10_007);
    let (t, d) = (target.clone(), data.clone());
    io_within("writing the block device", 60, move || {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&t)
            .unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&d).unwrap();
        f.sync_all().unwrap();
    });
    let read_at = |path: PathBuf, len: usize| {
        io_within("reading the block device", 60, move || {
            let mut f = std::fs::File::open(&path).unwrap();
            f.seek(SeekFrom::Start(offset)).unwrap();
            let mut buf = vec![0u8; len];
            f.read_exact(&mut buf).unwrap();
            let end = f.seek(SeekFrom::End(0)).unwrap();
            (buf, end)
        })
    };
    let (back, end) = read_at(target.clone(), data.len());
    assert!(back == data, "raw bytes differ right after writing");
    assert_eq!(end, size as u64, "the device is the volume's size");
    let st = env.stats(&v.volume_id, &target).await.unwrap();
    assert_eq!(st.usage.first().map(|u| u.total), Some(size), "{st:?}");
    assert!(!st.volume_condition.unwrap_or_default().abnormal);

    // Through a fresh mapping (new rbd-fuse, new loop device): the bytes are in Ceph.
    env.node_teardown(&v, &staging, &target).await;
    assert_nothing_left(&env.root());
    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    let (back, _) = read_at(target.clone(), data.len());
    assert!(back == data, "raw bytes differ after remapping");

    env.node_teardown(&v, &staging, &target).await;
    env.finish(&v).await;
    assert_nothing_left(&env.root());
}

#[tokio::test]
async fn published_mounts_survive_a_kill_9_of_the_plugin_and_cleanup_works_after_restart() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = mount_cap();
    let v = env.create("kill9", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/v");
    let target = env.kubelet("pods/p/v");
    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    let first = random_bytes(MIB as usize + 7);
    write_synced(&target.join("before-kill"), &first);

    env.d.kill9();
    // The workload does not notice: reads and writes go on through the published mount.
    assert!(read_all(&target.join("before-kill")) == first);
    let second = random_bytes(2 * MIB as usize + 3);
    write_synced(&target.join("while-dead"), &second);
    assert!(read_all(&target.join("while-dead")) == second);

    env.d.restart();
    env.cl = env.d.client().await;
    env.node_teardown(&v, &staging, &target).await;
    assert_nothing_left(&env.root());

    // The volume stages again, with both files intact.
    env.stage(&v, &cap, &staging).await.unwrap();
    assert!(read_all(&staging.join("before-kill")) == first);
    assert!(read_all(&staging.join("while-dead")) == second);
    env.unstage(&v.volume_id, &staging, SLOW).await.unwrap();

    env.finish(&v).await;
    assert_nothing_left(&env.root());
}

#[tokio::test]
async fn path_traversal_is_rejected() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = mount_cap();
    let root = env.root();
    let kubelet = env.kubelet("");
    // Decoys outside kubelet's dir but inside this test's root: if a check were missing, the
    // damage would stay here.
    let outside = root.join("outside");
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(outside.join("file"), b"decoy").unwrap();
    let k = kubelet.to_str().unwrap().trim_end_matches('/').to_string();
    let escaping = [
        format!("{k}/../outside/dir"),
        format!("{k}/pods/p/../../../outside/dir"),
        format!("{k}/pods/../pods/p/v"), // `..` that stays inside is still refused
        format!("{k}/../state/fuse"),
        root.join("outside/dir").display().to_string(),
        root.join("state/x").display().to_string(),
        k.clone(),                // the root itself
        format!("{k}X/pods/p/v"), // a sibling sharing the prefix
        "".into(),
    ];
    // For the host's own directories only a volume that cannot be mapped is used, so even a
    // missing check could not mount anything over them.
    let system = [
        format!("{k}/../../etc"),
        format!("{k}/../../../../../../etc"),
        "/etc/passwd".into(),
        "/etc".into(),
        "/".into(),
        // Relative paths would resolve against the driver's working directory.
        "kubelet/pods/p/v".into(),
        "./does-not-exist".into(),
        "does-not-exist/../x".into(),
    ];

    let v = env.create("paths", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let ghost = env.create("paths-ghost", 16 * MIB, cap.clone()).await;
    within(
        "DeleteVolume",
        SLOW,
        env.cl
            .controller
            .clone()
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: ghost.volume_id.clone(),
                secrets: env.c.secrets(),
            }),
    )
    .await
    .unwrap();
    env.volumes.retain(|id| *id != ghost.volume_id);

    let staging = env.kubelet("staging/v");
    let target = env.kubelet("pods/p/v");
    let s = staging.to_str().unwrap().to_string();
    let t = target.to_str().unwrap().to_string();
    let expect_invalid = |r: Result<(), Status>, what: &str| match r {
        Err(e) if e.code() == Code::InvalidArgument => {}
        other => panic!("{what}: want InvalidArgument, got {other:?}"),
    };

    for p in &escaping {
        expect_invalid(
            env.stage_path(&v, &cap, p).await,
            &format!("stage at {p:?}"),
        );
    }
    for p in &system {
        expect_invalid(
            env.stage_path(&ghost, &cap, p).await,
            &format!("stage at {p:?}"),
        );
        expect_invalid(
            env.publish_paths(&ghost, &cap, &s, p).await,
            &format!("publish to {p:?}"),
        );
    }
    // With the volume really staged, a bad target or staging path is the only thing refusing.
    env.stage(&v, &cap, &staging).await.unwrap();
    for p in &escaping {
        expect_invalid(
            env.publish_paths(&v, &cap, &s, p).await,
            &format!("publish to {p:?}"),
        );
        expect_invalid(
            env.publish_paths(&v, &cap, p, &t).await,
            &format!("publish from staging {p:?}"),
        );
        expect_invalid(
            env.unpublish(&v.volume_id, p, SLOW).await,
            &format!("unpublish {p:?}"),
        );
        expect_invalid(
            env.unstage(&v.volume_id, Path::new(p), SLOW).await,
            &format!("unstage {p:?}"),
        );
    }
    for p in [
        format!("{k}/../outside/file"),
        root.join("outside/file").display().to_string(),
        "does-not-exist/v".into(),
    ] {
        expect_invalid(
            env.unpublish(&v.volume_id, &p, SLOW).await,
            &format!("unpublish {p:?}"),
        );
    }
    // Nothing was mounted anywhere but the real staging path (and the volume's rbd-fuse), and no
    // decoy was touched.
    let fuse_root = root.join("state/fuse");
    let mounted: Vec<_> = mounts_under(&root)
        .into_iter()
        .filter(|m| !m.starts_with(&fuse_root))
        .collect();
    assert_eq!(mounted, vec![staging.clone()]);
    for p in [Path::new("/etc"), Path::new("/etc/passwd")] {
        assert!(
            !mount_points().iter().any(|m| m == p),
            "{} is mounted over",
            p.display()
        );
    }
    assert!(Path::new("/etc/passwd").is_file());
    assert_eq!(std::fs::read(outside.join("file")).unwrap(), b"decoy");
    assert!(outside.join("dir").is_dir());
    assert!(!target.exists());

    env.unstage(&v.volume_id, &staging, SLOW).await.unwrap();
    env.finish(&v).await;
    assert_nothing_left(&root);
}

#[tokio::test]
async fn a_second_single_node_writer_publish_to_another_node_is_refused() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = cap_with_mode(false, Mode::SingleNodeWriter);
    let other = unique("other-node");
    env.c.register_node(&other);
    env.nodes.push(other.clone());
    let v = env.create("fence", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/v");
    let target = env.kubelet("pods/p/v");
    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    let data = random_bytes(100_000);
    write_synced(&target.join("mine"), &data);

    let e = env
        .controller_publish_to(&v, &cap, &other)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&env.node), "names the holder: {e:?}");
    // Read-only on the other node is refused too while a writer holds it.
    let ro = cap_with_mode(false, Mode::MultiNodeReaderOnly);
    let e = env
        .controller_publish_to(&v, &ro, &other)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // Publishing again to the holder is idempotent, and the volume is undisturbed.
    env.controller_publish(&v, &cap).await;
    assert!(read_all(&target.join("mine")) == data);

    env.node_teardown(&v, &staging, &target).await;
    env.finish(&v).await;
    assert_nothing_left(&env.root());
}

#[tokio::test]
async fn stats_report_an_abnormal_condition_when_the_mapping_is_gone() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = mount_cap();
    let v = env.create("dead", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/v");
    let target = env.kubelet("pods/p/v");
    env.stage(&v, &cap, &staging).await.unwrap();
    env.publish(&v, &cap, &staging, &target).await.unwrap();
    write_synced(&target.join("f"), b"hello");

    let healthy = env.stats(&v.volume_id, &target).await.unwrap();
    assert!(!healthy.volume_condition.unwrap_or_default().abnormal);

    let pids = fuse_pids_mentioning(&env.root().join("state"));
    assert_eq!(pids.len(), 1, "one rbd-fuse serves the volume: {pids:?}");
    // SAFETY: kill(2) of the rbd-fuse process this test's driver started.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fuse_pids_mentioning(&env.root().join("state")).is_empty() {
        assert!(Instant::now() < deadline, "rbd-fuse did not die");
        std::thread::sleep(Duration::from_millis(100));
    }

    let started = Instant::now();
    match env.stats(&v.volume_id, &target).await {
        Ok(st) => {
            let cond = st.volume_condition.expect("a volume condition");
            assert!(
                cond.abnormal,
                "stats call the volume healthy with rbd-fuse dead: {cond:?}"
            );
            assert!(!cond.message.is_empty());
        }
        Err(e) => assert_ne!(e.code(), Code::Ok, "{e:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    // Cleanup still works, each call bounded.
    let started = Instant::now();
    env.unpublish(&v.volume_id, target.to_str().unwrap(), 30)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    let started = Instant::now();
    env.unstage(&v.volume_id, &staging, 30).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(!target.exists());
    assert_nothing_left(&env.root());

    env.finish(&v).await;
    assert_nothing_left(&env.root());
}

/// The lexical path check is not enough if a directory under kubelet's dir is a symlink to
/// somewhere else: the mount must not land outside.
#[tokio::test]
async fn a_symlink_under_the_kubelet_dir_does_not_carry_a_mount_outside() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = mount_cap();
    let root = env.root();
    let outside = root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(env.kubelet("pods")).unwrap();
    std::os::unix::fs::symlink(&outside, env.kubelet("pods/evil")).unwrap();
    std::os::unix::fs::symlink(&outside, env.kubelet("evil-staging")).unwrap();
    let v = env.create("symlink", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;

    let r = env.stage(&v, &cap, &env.kubelet("evil-staging/s")).await;
    let staged_outside = mount_points().iter().any(|m| m.starts_with(&outside));
    let unstaged = if r.is_ok() {
        env.unstage(&v.volume_id, &env.kubelet("evil-staging/s"), SLOW)
            .await
    } else {
        Ok(())
    };
    let mut wrong = vec![];
    if staged_outside {
        wrong.push(format!(
            "NodeStage through a symlinked staging path mounted outside kubelet's dir (stage: \
             {r:?}; mounts under root: {:?}; unstage at the same path: {unstaged:?})",
            mounts_under(&root)
        ));
    }
    // Put the first one right before going on (the drop guard would, too).
    for m in mounts_under(&outside) {
        let _ = Command::new("umount").arg(&m).status();
    }
    let _ = env
        .unstage(&v.volume_id, &env.kubelet("evil-staging/s"), SLOW)
        .await;
    let staging = env.kubelet("staging/v");
    env.stage(&v, &cap, &staging).await.unwrap();
    let r2 = env
        .publish(&v, &cap, &staging, &env.kubelet("pods/evil/mnt"))
        .await;
    let published_outside = mount_points().iter().any(|m| m.starts_with(&outside));
    if r2.is_ok() {
        let _ = env
            .unpublish(
                &v.volume_id,
                env.kubelet("pods/evil/mnt").to_str().unwrap(),
                SLOW,
            )
            .await;
    }
    if published_outside {
        wrong.push(format!(
            "NodePublish through a symlinked target mounted outside kubelet's dir ({r2:?})"
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    env.unstage(&v.volume_id, &staging, SLOW).await.unwrap();
    env.finish(&v).await;
    assert_nothing_left(&root);
}

/// Sends SIGCONT to the processes it stopped, even when the test panics.
struct Stopped(Vec<i32>);

impl Stopped {
    fn stop(pids: Vec<i32>) -> Self {
        for &p in &pids {
            // SAFETY: kill(2) of an rbd-fuse process this test's driver started.
            assert_eq!(unsafe { libc::kill(p, libc::SIGSTOP) }, 0);
        }
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
    }
}

/// Retries `call` (as kubelet does) until it succeeds; any error before that must be one a
/// caller retries. Returns the codes seen on the way.
async fn retry_until_ok<F, Fut>(what: &str, secs: u64, mut call: F) -> Vec<Code>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen = vec![];
    loop {
        match call().await {
            Ok(()) => return seen,
            Err(e) => {
                assert!(
                    matches!(
                        e.code(),
                        Code::Aborted | Code::DeadlineExceeded | Code::Cancelled
                    ),
                    "{what}: a retry got a final error: {e:?}"
                );
                seen.push(e.code());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} never succeeded: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// kubelet's deadline passes while mkfs still runs: the first stage must go on (mkfs is
/// never killed half-way), every retry is refused until it is over, and then succeeds on a
/// filesystem that fsck accepts, made by exactly one mkfs.
#[tokio::test]
async fn a_stage_retried_while_its_slow_mkfs_runs_is_aborted_until_the_first_finishes() {
    let Some(c) = cluster() else { return };
    // mkfs.ext4 waits for a gate file the test opens: slow for as long as the test wants.
    let tools = tempfile::tempdir().unwrap();
    let gate = tools.path().join("gate");
    let log = tools.path().join("mkfs.log");
    let real = Command::new("sh")
        .args(["-c", "command -v mkfs.ext4"])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    assert!(!real.is_empty(), "mkfs.ext4 not found");
    let wrapper = tools.path().join("mkfs.ext4");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho started >> {log}\nwhile [ ! -e {gate} ]; do sleep 0.1; done\n\
             \"{real}\" \"$@\"\nrc=$?\necho \"finished $rc\" >> {log}\nexit $rc\n",
            log = log.display(),
            gate = gate.display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env = Env::start_with_env(c, &[("PATH", &path)]).await;
    let cap = mount_cap();
    let v = env.create("slowmkfs", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/v");
    let mkfs_runs = |word: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(word))
            .count()
    };

    let first = env
        .stage_with_deadline(&v, &cap, &staging, Duration::from_secs(3))
        .await;
    assert!(first.is_err(), "stage finished before mkfs could run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while mkfs_runs("started") == 0 {
        assert!(Instant::now() < deadline, "mkfs never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first stage is still formatting: every retry is refused, none starts its own work.
    for i in 0..3 {
        let again = env
            .stage_with_deadline(&v, &cap, &staging, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert_eq!(
            again.code(),
            Code::Aborted,
            "retry {i} while mkfs runs: {again:?}"
        );
    }
    assert_eq!(mkfs_runs("started"), 1, "a retry started a second mkfs");

    std::fs::write(&gate, b"").unwrap();
    retry_until_ok("NodeStageVolume", SLOW, || {
        env.stage_with_deadline(&v, &cap, &staging, Duration::from_secs(20))
    })
    .await;
    assert_eq!(mkfs_runs("started"), 1, "mkfs ran more than once");
    assert_eq!(mkfs_runs("finished 0"), 1, "mkfs did not finish cleanly");

    // What the image holds is a filesystem fsck accepts.
    env.unstage(&v.volume_id, &staging, SLOW).await.unwrap();
    let copy = env.root().join("image.raw");
    env.c.rbd(&[
        "export",
        "--no-progress",
        &format!("rbd/{}", image_of(&v.volume_id)),
        copy.to_str().unwrap(),
    ]);
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck -n rejects the filesystem: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    std::fs::remove_file(&copy).unwrap();
    env.finish(&v).await;
    assert_nothing_left(&env.root());
    assert_eq!(env.key_files(), Vec::<PathBuf>::new(), "key files left");
}

/// rbd-fuse hangs (SIGSTOP) while the staged filesystem holds dirty data: unstage must not
/// detach the filesystem or stop rbd-fuse under it. It answers DeadlineExceeded, keeps the
/// staging state and mapping, and succeeds once rbd-fuse is back; the data is on the image.
#[tokio::test]
async fn unstage_against_a_hung_rbd_fuse_keeps_the_volume_staged_until_its_data_is_written() {
    let Some(c) = cluster() else { return };
    let mut env = Env::start(c).await;
    let cap = mount_cap();
    let v = env.create("hung", 64 * MIB, cap.clone()).await;
    env.controller_publish(&v, &cap).await;
    let staging = env.kubelet("staging/v");
    env.stage(&v, &cap, &staging).await.unwrap();
    // Written, never synced: the pages are dirty in the page cache when unstage starts.
    let data = random_bytes(4 * MIB as usize + 777);
    let (p, d) = (staging.join("dirty.bin"), data.clone());
    io_within("writing", 60, move || std::fs::write(p, d).unwrap());

    let state = env.root().join("state");
    let pids = fuse_pids_mentioning(&state);
    assert_eq!(pids.len(), 1, "one rbd-fuse serves the volume: {pids:?}");
    let stopped = Stopped::stop(pids.clone());

    let first = env
        .unstage_with_deadline(&v.volume_id, &staging, Duration::from_secs(40))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::DeadlineExceeded, "{first:?}");
    for i in 0..2 {
        let again = env
            .unstage_with_deadline(&v.volume_id, &staging, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(again.code(), Code::Aborted | Code::DeadlineExceeded),
            "retry {i} with rbd-fuse hung: {again:?}"
        );
    }
    // Nothing was torn down under the dirty filesystem.
    assert_eq!(env.staged_records(), 1, "the staging state is gone");
    assert_eq!(loops_under(&env.root()).len(), 1, "the loop device is gone");
    assert_eq!(fuse_pids_mentioning(&state), pids, "rbd-fuse was stopped");

    drop(stopped);
    retry_until_ok("NodeUnstageVolume", SLOW, || {
        env.unstage_with_deadline(&v.volume_id, &staging, Duration::from_secs(20))
    })
    .await;
    assert_eq!(env.staged_records(), 0);
    assert_nothing_left(&env.root());

    // A fresh map (a new rbd-fuse) reads back what was dirty when unstage began.
    env.stage(&v, &cap, &staging).await.unwrap();
    assert!(read_all(&staging.join("dirty.bin")) == data, "data lost");
    env.unstage(&v.volume_id, &staging, SLOW).await.unwrap();
    env.finish(&v).await;
    assert_nothing_left(&env.root());
    assert_eq!(env.key_files(), Vec::<PathBuf>::new(), "key files left");
}
