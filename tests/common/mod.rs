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

    /// Runs `rbd` against the cluster and returns stdout.
    pub fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(self.dir.join("ceph.conf"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn rados(&self, args: &[&str]) -> String {
        let out = Command::new("rados")
            .arg("-c")
            .arg(self.dir.join("ceph.conf"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rados {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
}

impl Driver {
    pub fn start(c: &Cluster, extra: &[&str]) -> Driver {
        Self::start_with_config(c, &c.dir.join("cluster-config.json"), extra)
    }

    /// Like `start`, with another cluster config (entries of the dev cluster with other settings).
    pub fn start_with_config(c: &Cluster, config: &Path, extra: &[&str]) -> Driver {
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
        let child = spawn(&args, root.path());
        Driver {
            child,
            root,
            endpoint,
            args,
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
        self.child = spawn(&self.args, self.root.path());
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }
}

fn spawn(args: &[String], root: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("driver.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_rook-rbd"))
        .args(args)
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
