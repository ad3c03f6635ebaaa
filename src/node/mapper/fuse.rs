//! rbd-fuse plus a loop device: works on any kernel with FUSE and loop support.
//!
//! One rbd-fuse daemon per image exposes the image as a file at
//! `<state_dir>/fuse/<hash>/<image>`; `losetup` turns that file into `/dev/loopN`. The mount point
//! lives in a 0700 directory because rbd-fuse gives the image file mode 0666.
//!
//! rbd-fuse parses only `-c`, `-p`, `-s` (namespace) and `-r`; the cluster identity reaches
//! librados through `CEPH_ARGS` (`--id`, `-m`, `--keyfile`), which it reads with
//! `rados_conf_parse_env`.
//! It daemonizes itself (setsid) once mounted and connects afterwards, in FUSE's init; until
//! that returns every access to the mount point blocks, so all waits here are bounded.
//! The daemon is deliberately not tied to the plugin (own session, the mappers' cgroup): published
//! mounts outlive a restart of the plugin and of its container.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use nix::sys::signal::Signal;

use super::{kill_all, ImageRef, KeyFile, MapRequest, Mapper, MapperConfig, MapperKind, Mapping};
use crate::node::command::{self, CommandSpec};
use crate::node::mount::MountTable;
use crate::node::state::ensure_private_dir;
use crate::node::{blocking, step, NodeError};

/// The fuse type rbd-fuse mounts show in mountinfo.
pub const FUSE_FS_TYPE: &str = "fuse.rbd-fuse";

#[derive(Debug)]
pub struct FuseMapper {
    config: MapperConfig,
    /// Serialises map, unmap and find of one image (they inspect and change its mount and loop
    /// devices). Per image: an unmap waiting on a cluster that is gone holds up no other volume.
    locks: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// The rbd-fuse command line; the key only travels as a key file path inside `CEPH_ARGS`.
pub fn fuse_command(
    req: &MapRequest,
    keyfile: &Path,
    mountpoint: &Path,
) -> Result<CommandSpec, NodeError> {
    let keyfile = keyfile.to_string_lossy();
    let mons = req.monitors.join(",");
    // CEPH_ARGS is split on whitespace.
    if keyfile.contains(char::is_whitespace) || mons.contains(char::is_whitespace) {
        return Err(NodeError::InvalidArgument(
            "monitors and the state directory must not contain whitespace".into(),
        ));
    }
    let mut c = CommandSpec::new("rbd-fuse")
        .env(
            "CEPH_ARGS",
            format!("--id {} -m {} --keyfile {}", req.user, mons, keyfile),
        )
        .args(["-c", "/dev/null", "-p", &req.pool]);
    if let Some(ns) = req.namespace.as_deref().filter(|n| !n.is_empty()) {
        c = c.args(["-s", ns]);
    }
    Ok(c.args(["-r", &req.image])
        .arg(mountpoint.to_string_lossy())
        .detached())
}

/// `losetup --find --show --direct-io=on [--read-only] FILE`; direct I/O avoids caching the
/// image twice (in the loop device and in the fuse file).
pub fn losetup_command(file: &Path, read_only: bool) -> CommandSpec {
    let mut c = CommandSpec::new("losetup").args(["--find", "--show", "--direct-io=on"]);
    if read_only {
        c = c.arg("--read-only");
    }
    c.arg(file.to_string_lossy())
}

impl FuseMapper {
    pub fn new(config: MapperConfig) -> Self {
        Self {
            config,
            locks: Default::default(),
        }
    }

    async fn lock(&self, mountpoint: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap()
            .entry(mountpoint.to_path_buf())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    pub fn fuse_root(&self) -> PathBuf {
        self.config.state_dir.join("fuse")
    }

    /// A stable, private mount point per image, so a restarted plugin finds it again.
    pub fn mountpoint_for(&self, image: &ImageRef<'_>) -> PathBuf {
        let spec = super::image_spec(image.pool, image.namespace, image.image);
        let digest = Sha256::digest(spec.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.fuse_root().join(hex)
    }

    /// Whether rbd-fuse is still serving this mapping.
    pub fn health(&self, mapping: &Mapping) -> Result<(), String> {
        let Some(mp) = &mapping.fuse_mountpoint else {
            return Err("fuse mapping without a mount point".into());
        };
        let table = MountTable::load().map_err(|e| e.to_string())?;
        if !is_fuse_mount(&table, mp) {
            return Err(format!("rbd-fuse mount {} is gone", mp.display()));
        }
        if fuse_pids(mp).is_empty() {
            return Err(format!("rbd-fuse process for {} is gone", mp.display()));
        }
        match loop_backing_file(&mapping.device) {
            Some(f) if f.starts_with(mp) => Ok(()),
            _ => Err(format!(
                "{} no longer backs onto {}",
                mapping.device.display(),
                mp.display()
            )),
        }
    }

    /// Makes the loop device pick up a grown image (after the controller resized it).
    pub async fn refresh_size(&self, mapping: &Mapping) -> Result<(), NodeError> {
        if let Some(file) = loop_backing_file(&mapping.device) {
            // rbd-fuse reports the image's size on every getattr, but the kernel caches file
            // attributes for up to a second: poll until the file is larger than the loop device
            // (the usual case after ControllerExpand), and give up waiting after 1.5 s.
            let dev_bytes = loop_size_bytes(&mapping.device);
            let deadline = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < deadline {
                let f = file.clone();
                let len = blocking(
                    "stat of rbd-fuse image",
                    self.config.command_timeout,
                    move || Ok(std::fs::metadata(&f).map(|m| m.len()).ok()),
                )
                .await?;
                if matches!((len, dev_bytes), (Some(l), Some(d)) if l > d) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let spec = CommandSpec::new("losetup")
            .arg("--set-capacity")
            .arg(mapping.device.to_string_lossy());
        command::run_ok(&spec, self.config.command_timeout)
            .await
            .map(drop)
    }

    /// Polls (bounded) until rbd-fuse exposes `file`; each probe can block while rbd-fuse connects.
    async fn wait_for_image(&self, file: &Path, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return false;
            }
            let f = file.to_path_buf();
            if let Ok(true) = blocking("waiting for rbd-fuse", remaining, move || {
                Ok(std::fs::metadata(&f).map(|m| m.is_file()).unwrap_or(false))
            })
            .await
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn start_fuse(
        &self,
        req: &MapRequest,
        mountpoint: &Path,
        file: &Path,
    ) -> Result<(), NodeError> {
        let keyfile = KeyFile::create(&self.config.key_dir, &req.key)?;
        let spec = self
            .config
            .daemon(fuse_command(req, keyfile.path(), mountpoint)?)?;
        ensure_private_dir(&self.fuse_root())?;
        ensure_private_dir(mountpoint)?;
        tracing::info!(command = %spec, "starting rbd-fuse");
        if let Err(e) = command::run_ok(&spec, self.config.command_timeout).await {
            self.discard(mountpoint).await;
            return Err(e);
        }
        // The daemon reads the key file while it connects, so it may only go once the image shows.
        let connected = self
            .wait_for_image(file, self.config.fuse_connect_timeout)
            .await;
        drop(keyfile);
        if !connected {
            self.discard(mountpoint).await;
            return Err(NodeError::Unavailable(format!(
                "rbd-fuse did not expose {} within {:?} (cluster unreachable, wrong credentials, or no such image)",
                req.image_spec(), self.config.fuse_connect_timeout
            )));
        }
        Ok(())
    }

    async fn find_unlocked(&self, image: &ImageRef<'_>) -> Result<Option<Mapping>, NodeError> {
        let mp = self.mountpoint_for(image);
        let table = MountTable::load()?;
        if !is_fuse_mount(&table, &mp) {
            return Ok(None);
        }
        let file = mp.join(image.image);
        Ok(loop_devices_backed_by(&file)
            .into_iter()
            .next()
            .map(|dev| Mapping {
                mapper: MapperKind::Fuse,
                device: dev,
                pid: fuse_pids(&mp).first().copied(),
                fuse_mountpoint: Some(mp),
                unmap_options: None,
            }))
    }

    /// Detaches the loop devices over `mountpoint`, unmounts it and waits for its rbd-fuse to
    /// exit, each step to its end: until rbd-fuse has closed the image it may hold writes for
    /// the cluster, and killing it or detaching the mount lazily would drop them.
    async fn teardown(&self, mountpoint: &Path) -> Result<(), NodeError> {
        let t = self.config.unmount_timeout;
        for dev in loop_devices_backed_by(mountpoint) {
            let spec = CommandSpec::new("losetup")
                .arg("-d")
                .arg(dev.to_string_lossy())
                .to_end();
            command::run_ok(&spec, t).await?;
        }
        let pids = fuse_pids(mountpoint);
        if MountTable::load()?.is_mountpoint(mountpoint) {
            // In a child rather than a thread: it can block for as long as rbd-fuse cannot
            // reach its cluster.
            let spec = CommandSpec::new("umount")
                .arg(mountpoint.to_string_lossy())
                .to_end();
            command::run_ok(&spec, t).await?;
        }
        // Unmounted, rbd-fuse closes the image (flushing librbd's cache) and exits.
        step::to_end("rbd-fuse exit", t, async {
            while pids.iter().any(|p| pid_alive(*p)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let _ = std::fs::remove_dir(mountpoint);
        Ok(())
    }

    /// Removes a mount no one has written through (a map that failed half-way, a mount left
    /// without its loop device): bounded, forcing (SIGKILL, lazy unmount) what does not go.
    async fn discard(&self, mountpoint: &Path) {
        let t = self.config.command_timeout;
        for dev in loop_devices_backed_by(mountpoint) {
            let spec = CommandSpec::new("losetup")
                .arg("-d")
                .arg(dev.to_string_lossy());
            if let Err(e) = command::run_ok(&spec, t).await {
                tracing::error!(device = %dev.display(), error = %e, "could not detach loop device");
            }
        }
        let pids = fuse_pids(mountpoint);
        let mounted = MountTable::load()
            .map(|tb| tb.is_mountpoint(mountpoint))
            .unwrap_or(true);
        if mounted {
            let spec = CommandSpec::new("umount").arg(mountpoint.to_string_lossy());
            if let Err(e) = command::run_ok(&spec, self.config.unmount_timeout).await {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %e, "unmount of an unused rbd-fuse failed; forcing");
                kill_all(&pids, Signal::SIGKILL);
                let lazy = CommandSpec::new("umount")
                    .arg("-l")
                    .arg(mountpoint.to_string_lossy());
                if let Err(e) = command::run_ok(&lazy, t).await {
                    tracing::error!(mountpoint = %mountpoint.display(), error = %e, "lazy unmount failed");
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        kill_all(&fuse_pids(mountpoint), Signal::SIGKILL);
        let _ = std::fs::remove_dir(mountpoint);
    }
}

impl Mapper for FuseMapper {
    fn kind(&self) -> MapperKind {
        MapperKind::Fuse
    }

    async fn map(&self, req: &MapRequest) -> Result<Mapping, NodeError> {
        let image = ImageRef::from(req);
        let mp = self.mountpoint_for(&image);
        let _guard = self.lock(&mp).await;
        if let Some(m) = self.find_unlocked(&image).await? {
            return Ok(m);
        }
        let file = mp.join(&req.image);
        let mounted = is_fuse_mount(&MountTable::load()?, &mp);
        // A mount left from before (no loop device yet): reuse it if it still serves the image.
        let reusable = mounted && self.wait_for_image(&file, Duration::from_secs(2)).await;
        if !reusable {
            if mounted {
                self.discard(&mp).await;
            }
            self.start_fuse(req, &mp, &file).await?;
        }
        let out = match command::run_ok(
            &losetup_command(&file, req.read_only),
            self.config.command_timeout,
        )
        .await
        {
            Ok(o) => o,
            Err(e) => {
                self.discard(&mp).await;
                return Err(e);
            }
        };
        let device = PathBuf::from(out.stdout.trim());
        tracing::info!(image = %req.image_spec(), device = %device.display(), "mapped through rbd-fuse");
        Ok(Mapping {
            mapper: MapperKind::Fuse,
            device,
            pid: fuse_pids(&mp).first().copied(),
            fuse_mountpoint: Some(mp),
            unmap_options: None,
        })
    }

    async fn unmap(&self, mapping: &Mapping) -> Result<(), NodeError> {
        let Some(mp) = &mapping.fuse_mountpoint else {
            return Err(NodeError::InvalidArgument(
                "fuse mapping without a mount point".into(),
            ));
        };
        let _guard = self.lock(mp).await;
        self.teardown(mp).await?;
        let left_mounted = MountTable::load()?.is_mountpoint(mp);
        let left_pids = fuse_pids(mp);
        let left_loops = loop_devices_backed_by(mp);
        if left_mounted || !left_pids.is_empty() || !left_loops.is_empty() {
            return Err(NodeError::Unavailable(format!(
                "rbd-fuse at {} not fully stopped (mounted: {left_mounted}, pids: {left_pids:?}, loop devices: {left_loops:?})",
                mp.display()
            )));
        }
        Ok(())
    }

    async fn find(&self, image: &ImageRef<'_>) -> Result<Option<Mapping>, NodeError> {
        let _guard = self.lock(&self.mountpoint_for(image)).await;
        self.find_unlocked(image).await
    }

    /// Kills rbd-fuse: the kernel aborts its FUSE connection, and everything waiting on it
    /// fails. Not under the lock: an unmap holding it may be the very thing that waits.
    async fn force(&self, mapping: &Mapping) -> Result<(), NodeError> {
        let Some(mp) = &mapping.fuse_mountpoint else {
            return Err(NodeError::InvalidArgument(
                "fuse mapping without a mount point".into(),
            ));
        };
        kill_all(&fuse_pids(mp), Signal::SIGKILL);
        Ok(())
    }
}

fn is_fuse_mount(table: &MountTable, mountpoint: &Path) -> bool {
    table
        .at(mountpoint)
        .is_some_and(|e| e.fs_type == FUSE_FS_TYPE)
}

/// The file a loop device is backed by, from sysfs.
pub fn loop_backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    let raw = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(parse_backing_file(&raw)))
}

fn parse_backing_file(raw: &str) -> &str {
    let s = raw.trim_end_matches('\n');
    s.strip_suffix(" (deleted)").unwrap_or(s)
}

/// Loop devices whose backing file is `path` or lies under it.
pub fn loop_devices_backed_by(path: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.starts_with("loop").then_some(name)
        })
        .filter_map(|name| {
            let dev = PathBuf::from(format!("/dev/{name}"));
            loop_backing_file(&dev)
                .filter(|f| f.starts_with(path))
                .map(|_| dev)
        })
        .collect();
    out.sort();
    out
}

/// rbd-fuse processes serving `mountpoint`, found by their command line.
pub fn fuse_pids(mountpoint: &Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let want = mountpoint.as_os_str().as_encoded_bytes();
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| is_fuse_cmdline_for(&c, want))
                .unwrap_or(false)
        })
        .collect()
}

fn is_fuse_cmdline_for(cmdline: &[u8], mountpoint: &[u8]) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    let is_fuse = args
        .next()
        .is_some_and(|a0| a0.rsplit(|b| *b == b'/').next() == Some(b"rbd-fuse"));
    is_fuse && args.any(|a| a == mountpoint)
}

fn pid_alive(pid: u32) -> bool {
    // A zombie has an empty cmdline; it no longer holds anything.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// The loop device's current size, from sysfs (512-byte sectors).
fn loop_size_bytes(device: &Path) -> Option<u64> {
    let name = device.file_name()?.to_str()?;
    let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size")).ok()?;
    sectors.trim().parse::<u64>().ok().map(|s| s * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mapper::sample_request;

    #[test]
    fn fuse_command_passes_identity_through_ceph_args_and_no_key() {
        let req = sample_request();
        let c = fuse_command(&req, Path::new("/s/keys/1.key"), Path::new("/s/fuse/ab")).unwrap();
        assert_eq!(c.program, "rbd-fuse");
        assert_eq!(
            c.args,
            [
                "-c",
                "/dev/null",
                "-p",
                "rbd",
                "-r",
                "csi-vol-1",
                "/s/fuse/ab"
            ]
        );
        assert_eq!(
            c.env,
            [(
                "CEPH_ARGS".to_string(),
                "--id csi -m 10.0.0.1:6789,10.0.0.2:6789 --keyfile /s/keys/1.key".to_string()
            )]
        );
        assert!(c.own_process_group);
        assert!(!c.to_string().contains("AQB"));
        assert!(fuse_command(&req, Path::new("/a b/k"), Path::new("/m")).is_err());
        // An image in a RADOS namespace: `-s` before the image.
        let mut req = req;
        req.namespace = Some("tenant-1".into());
        let c = fuse_command(&req, Path::new("/k"), Path::new("/m")).unwrap();
        assert_eq!(c.args[4..8], ["-s", "tenant-1", "-r", "csi-vol-1"]);
    }

    #[test]
    fn losetup_uses_direct_io_and_read_only_when_asked() {
        assert_eq!(
            losetup_command(Path::new("/m/img"), true).args,
            [
                "--find",
                "--show",
                "--direct-io=on",
                "--read-only",
                "/m/img"
            ]
        );
    }

    #[test]
    fn mountpoints_are_stable_per_image_and_distinct() {
        let m = FuseMapper::new(MapperConfig {
            state_dir: "/s".into(),
            key_dir: "/k".into(),
            command_timeout: Duration::from_secs(1),
            fuse_connect_timeout: Duration::from_secs(1),
            unmount_timeout: Duration::from_secs(1),
            cgroup: None,
        });
        let a = ImageRef {
            pool: "rbd",
            namespace: None,
            image: "a",
        };
        let b = ImageRef {
            image: "b",
            ..a.clone()
        };
        assert_eq!(m.mountpoint_for(&a), m.mountpoint_for(&a));
        assert_ne!(m.mountpoint_for(&a), m.mountpoint_for(&b));
        let in_ns = ImageRef {
            namespace: Some("ns"),
            ..a.clone()
        };
        assert_ne!(m.mountpoint_for(&a), m.mountpoint_for(&in_ns));
        // Mount points of images without a namespace are what they were before namespaces
        // (sha256 of "rbd/a"), so a plugin upgraded under a live mount still finds it.
        assert_eq!(
            m.mountpoint_for(&a),
            Path::new("/s/fuse/0010f51dd5f7475354255f40f4c1652b")
        );
        assert!(m.mountpoint_for(&a).starts_with("/s/fuse"));
    }

    #[test]
    fn recognises_rbd_fuse_command_lines() {
        let c = b"rbd-fuse\0-c\0/dev/null\0-p\0rbd\0-r\0img\0/s/fuse/ab\0";
        assert!(is_fuse_cmdline_for(c, b"/s/fuse/ab"));
        assert!(!is_fuse_cmdline_for(c, b"/s/fuse/a"));
        assert!(is_fuse_cmdline_for(b"/usr/bin/rbd-fuse\0/m\0", b"/m"));
        assert!(!is_fuse_cmdline_for(b"umount\0/s/fuse/ab\0", b"/s/fuse/ab"));
        assert_eq!(parse_backing_file("/m/img (deleted)\n"), "/m/img");
    }
}
