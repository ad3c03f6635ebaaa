//! Shared helpers for integration tests: the dev cluster named by `ROOK_RBD_TEST_CEPH_DIR`, a real
//! driver process, and the `rbd` CLI for checking what really happened in Ceph.
#![allow(dead_code)]

use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Cluster {
    pub dir: PathBuf,
    pub fsid: String,
    pub key: String,
}

/// The dev cluster, or `None` (with a note) outside `make test`. Under CI a missing cluster fails.
pub fn cluster() -> Option<Cluster> {
    let Some(dir) = std::env::var_os("ROOK_RBD_TEST_CEPH_DIR") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run integration tests with ROOK_RBD_TEST_CEPH_DIR set"
        );
        eprintln!(
            "ROOK_RBD_TEST_CEPH_DIR is not set: run `make test` to run this against a real cluster"
        );
        return None;
    };
    let dir = PathBuf::from(dir);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cluster-config.json")).unwrap())
            .unwrap();
    let fsid = cfg[0]["clusterID"].as_str().unwrap().to_string();
    let key = std::fs::read_to_string(dir.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    Some(Cluster { dir, fsid, key })
}

impl Cluster {
    pub fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("userID".into(), "admin".into()),
            ("userKey".into(), self.key.clone()),
        ])
    }

    pub fn params(&self) -> HashMap<String, String> {
        HashMap::from([
            ("clusterID".into(), self.fsid.clone()),
            ("pool".into(), "rbd".into()),
        ])
    }

    /// Runs a Ceph CLI tool against the cluster; it must succeed. Returns stdout.
    fn tool(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .arg("-c")
            .arg(self.dir.join("ceph.conf"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `rbd` against the cluster and returns stdout.
    pub fn rbd(&self, args: &[&str]) -> String {
        self.tool("rbd", args)
    }

    pub fn rados(&self, args: &[&str]) -> String {
        self.tool("rados", args)
    }

    /// Runs the `ceph` CLI as client.admin, bounded, and returns stdout.
    pub fn ceph(&self, args: &[&str]) -> String {
        let mut all = vec!["--connect-timeout", "30"];
        all.extend_from_slice(args);
        self.tool("ceph", &all)
    }

    /// Writes `mib` MiB of real data from the start of an image (so a flatten has work to do).
    pub fn write_data(&self, image: &str, mib: u64) {
        self.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4M",
            "--io-pattern",
            "seq",
            "--io-total",
            &format!("{mib}M"),
            &format!("rbd/{image}"),
        ]);
    }

    pub fn images(&self) -> Vec<String> {
        self.rbd(&["ls", "rbd"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn trash(&self) -> Vec<String> {
        self.rbd(&["trash", "ls", "rbd"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until none of `images` (image names) is in the pool or its trash, for at most
    /// `limit`; returns the lines of those still there.
    ///
    /// Give it a minute when a driver was killed in the test run: the purger of every driver on
    /// the pool resumes every recorded entry, so a purge that a kill -9 interrupted (in this test or
    /// a concurrent one) leaves that image watched by a dead client until the OSD drops the watch
    /// (`osd_client_watch_timeout`, 30 s), and no purge can remove it before.
    pub async fn left_of(&self, images: &[String], limit: Duration) -> Vec<String> {
        let start = std::time::Instant::now();
        loop {
            let left: Vec<String> = self
                .images()
                .into_iter()
                .chain(self.trash())
                .filter(|l| {
                    let name = l.split_whitespace().last().unwrap_or_default();
                    images.iter().any(|i| i == name)
                })
                .collect();
            if left.is_empty() || start.elapsed() >= limit {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Snapshots of every namespace (user, trash) on an image.
    pub fn all_snaps(&self, image: &str) -> String {
        self.rbd(&["snap", "ls", "--all", &format!("rbd/{image}")])
    }

    /// Simulates a node plugin's registration, for controller-only tests.
    pub fn register_node(&self, node: &str) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), format!("{{\"node\":\"{node}\"}}")).unwrap();
        self.rados(&[
            "-p",
            "rbd",
            "put",
            &format!("rook-rbd.node.{node}"),
            tmp.path().to_str().unwrap(),
        ]);
    }
}

/// A real `rook-rbd csi` process on its own socket; killed on drop.
pub struct Driver {
    pub child: Child,
    pub root: tempfile::TempDir,
    pub endpoint: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Driver {
    pub fn start(c: &Cluster, extra: &[&str]) -> Driver {
        Self::start_full(c, &c.dir.join("cluster-config.json"), extra, &[])
    }

    /// Like [`Driver::start`], with extra environment for the driver process (e.g. a PATH
    /// that puts a test's wrapper of a tool first).
    pub fn start_with_env(c: &Cluster, extra: &[&str], env: &[(&str, &str)]) -> Driver {
        Self::start_full(c, &c.dir.join("cluster-config.json"), extra, env)
    }

    /// Like [`Driver::start`], with another cluster config (entries of the dev cluster with
    /// other settings).
    pub fn start_with_config(c: &Cluster, config: &Path, extra: &[&str]) -> Driver {
        Self::start_full(c, config, extra, &[])
    }

    fn start_full(c: &Cluster, config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Driver {
        let root = tempfile::Builder::new()
            .prefix("rook-rbd-test")
            .tempdir_in("/tmp")
            .unwrap();
        let secret = root.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        std::fs::write(secret.join("userID"), "admin").unwrap();
        std::fs::write(secret.join("userKey"), &c.key).unwrap();
        let endpoint = format!("unix://{}", root.path().join("csi.sock").display());
        let mut args: Vec<String> = vec![
            "csi".into(),
            "--endpoint".into(),
            endpoint.clone(),
            "--cluster-config".into(),
            config.display().to_string(),
            "--secret-dir".into(),
            secret.display().to_string(),
            "--kubelet-dir".into(),
            root.path().join("kubelet").display().to_string(),
            "--state-dir".into(),
            root.path().join("state").display().to_string(),
            "--health-interval".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = spawn(&args, &env, root.path());
        Driver {
            child,
            root,
            endpoint,
            args,
            env,
        }
    }

    pub async fn client(&self) -> CsiClient {
        CsiClient::connect_with_retry(&self.endpoint, Duration::from_secs(10))
            .await
            .unwrap()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same driver again after a kill (same socket, state and arguments).
    pub fn restart(&mut self) {
        self.kill9();
        self.child = spawn(&self.args, &self.env, self.root.path());
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }
}

fn spawn(args: &[String], env: &[(String, String)], root: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("driver.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_rook-rbd"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn mount_cap() -> proto::VolumeCapability {
    rook_rbd::client::cli::capability(false, "ext4", false)
}

pub fn block_cap() -> proto::VolumeCapability {
    rook_rbd::client::cli::capability(true, "", false)
}

pub fn cap_with_mode(
    block: bool,
    mode: proto::volume_capability::access_mode::Mode,
) -> proto::VolumeCapability {
    let mut c = rook_rbd::client::cli::capability(block, "ext4", false);
    c.access_mode = Some(proto::volume_capability::AccessMode { mode: mode as i32 });
    c
}

pub fn create_req(c: &Cluster, name: &str, size: i64) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: c.params(),
        secrets: c.secrets(),
        ..Default::default()
    }
}

/// A name unique to this run, so tests never see each other's volumes.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn image_of(volume_id: &str) -> String {
    rook_rbd::volume::VolumeId::decode(volume_id).unwrap().image
}

/// CreateVolume that must succeed.
pub async fn create_volume(cl: &mut CsiClient, req: proto::CreateVolumeRequest) -> proto::Volume {
    cl.controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

/// DeleteVolume that must succeed.
/// CreateSnapshot of `source` named `name`, which must succeed.
pub async fn create_snapshot(
    c: &Cluster,
    cl: &mut CsiClient,
    source: &str,
    name: &str,
) -> proto::Snapshot {
    cl.controller
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            secrets: c.secrets(),
            parameters: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}

pub async fn delete_volume(c: &Cluster, cl: &mut CsiClient, volume_id: &str) {
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

/// DeleteSnapshot that must succeed.
pub async fn delete_snapshot(c: &Cluster, cl: &mut CsiClient, snapshot_id: &str) {
    cl.controller
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: snapshot_id.into(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

/// A content source naming a volume: the request makes a clone.
pub fn volume_source(volume_id: &str) -> Option<proto::VolumeContentSource> {
    use proto::volume_content_source as vcs;
    Some(proto::VolumeContentSource {
        r#type: Some(vcs::Type::Volume(vcs::VolumeSource {
            volume_id: volume_id.into(),
        })),
    })
}

/// A dev cluster of the test's own, for tests that kill or stop daemons (which would break the
/// shared cluster for every other test). Stopped and removed on drop, even when the test panics.
pub struct PrivateCluster {
    pub cluster: Cluster,
    dir: tempfile::TempDir,
}

const CEPH_DEV: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ceph-dev.sh");

impl PrivateCluster {
    /// Starts a new cluster whose monitor listens on `mon_port` (fixed, so that tests running
    /// at the same time never race for the same free port).
    pub fn up(prefix: &str, mon_port: u16) -> PrivateCluster {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .unwrap();
        let mut me = PrivateCluster {
            cluster: Cluster {
                dir: dir.path().to_path_buf(),
                fsid: String::new(),
                key: String::new(),
            },
            dir,
        };
        let port = mon_port.to_string();
        me.dev_env(&["up"], &[("CEPH_DEV_MON_PORT", &port)]);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(me.path().join("cluster-config.json")).unwrap(),
        )
        .unwrap();
        me.cluster.fsid = cfg[0]["clusterID"].as_str().unwrap().to_string();
        me.cluster.key = read_key(&me.path().join("admin.key"));
        me
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `ceph-dev.sh ARGS... DIR` and asserts that it succeeded.
    pub fn dev(&self, args: &[&str]) {
        self.dev_env(args, &[]);
    }

    fn dev_env(&self, args: &[&str], env: &[(&str, &str)]) {
        let out = Command::new("bash")
            .arg(CEPH_DEV)
            .args(args)
            .arg(self.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ceph-dev.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// CSI secrets of the restricted client.csi user (`profile rbd`).
    pub fn csi_secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("userID".into(), "csi".into()),
            ("userKey".into(), read_key(&self.path().join("csi.key"))),
        ])
    }
}

fn read_key(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(CEPH_DEV)
            .arg("down")
            .arg(self.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl std::ops::Deref for PrivateCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

/// Names of the images in the pool's trash.
pub fn trash_names(c: &Cluster) -> Vec<String> {
    c.trash()
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Polls until `done` holds, for at most `limit`; returns whether it did.
pub async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done()
}

/// The driver's trash record objects of the pool, with the image name each names.
pub fn records(c: &Cluster) -> Vec<(String, String)> {
    c.rados(&["-p", "rbd", "ls"])
        .lines()
        .filter(|o| o.starts_with("rook-rbd.trash."))
        .filter_map(|o| {
            let out = std::process::Command::new("rados")
                .arg("-c")
                .arg(c.dir.join("ceph.conf"))
                .args(["-p", "rbd", "get", o, "-"])
                .output()
                .ok()?;
            // Purged between the listing and the read.
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            Some((o.to_string(), v["name"].as_str()?.to_string()))
        })
        .collect()
}

/// Runs `check` once a second until shortly before `end`; a failure it reports fails the test
/// only if it was seen before `end`, since a slow machine may look too late.
pub async fn until_deferment_ends<F, Fut>(end: std::time::Instant, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let mut checked = 0;
    while std::time::Instant::now() + Duration::from_secs(3) < end {
        let failure = check().await;
        if std::time::Instant::now() < end {
            if let Some(f) = failure {
                panic!("{f}");
            }
            checked += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        checked > 0,
        "the machine was too slow to look before the deferment ended"
    );
}

/// Gone from the pool, the trash and the records, within a minute.
pub async fn purged(c: &Cluster, images: &[String]) -> bool {
    eventually(Duration::from_secs(60), || {
        let (live, trash, recs) = (c.images(), trash_names(c), records(c));
        images
            .iter()
            .all(|i| !live.contains(i) && !trash.contains(i) && !recs.iter().any(|(_, n)| n == i))
    })
    .await
}
