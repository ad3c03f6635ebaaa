//! The CSI Node semantics as plain async methods: stage, unstage, publish, unpublish, expand and
//! stats. The gRPC adapter converts messages, calls one method, and maps [`NodeError::code`].
//!
//! Concurrent calls for the *same* volume must be kept apart by the caller (the per-volume
//! in-flight guard of `volume/`, which holds the key until the work is over); calls for
//! different volumes may run in parallel. Steps that change something run to their end (see
//! [`super::step`]), so an undo never runs beside the step it undoes.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::mount::MsFlags;
use serde::{Deserialize, Serialize};

use super::fs::{self, FsStats, FsType, Probe};
use super::mapper::{
    AutoProbe, CgroupSetting, ImageRef, KeyDir, MapRequest, MapperCgroup, MapperChoice,
    MapperConfig, MapperKind, Mappers, Mapping,
};
use super::mount::{self, MountOptions, MountTable};
use super::paths::PathPolicy;
use super::reach::{self, Reach};
use super::state::{ensure_private_dir, StagingState, StateStore};
use super::step::blocking_to_end;
use super::{blocking, NodeError};

/// Block or filesystem access, as recorded in the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessType {
    Mount,
    Block,
}

/// The volume capability's access type, with what a mount needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAccess {
    Mount {
        /// `csi.storage.k8s.io/fstype`; empty means ext4.
        fs_type: String,
        mount_flags: Vec<String>,
        /// StorageClass `mkfsOptions`, whitespace-separated; `None` uses the defaults.
        mkfs_options: Option<String>,
    },
    Block,
}

impl VolumeAccess {
    pub fn access_type(&self) -> AccessType {
        match self {
            VolumeAccess::Mount { .. } => AccessType::Mount,
            VolumeAccess::Block => AccessType::Block,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: String,
    pub access: VolumeAccess,
    pub read_only: bool,
    pub map: MapRequest,
    pub mapper: MapperChoice,
}

#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: String,
    pub target_path: String,
    pub access: AccessType,
    pub read_only: bool,
    pub mount_flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeUsage {
    Filesystem(FsStats),
    Block { total_bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeCondition {
    pub abnormal: bool,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    pub usage: VolumeUsage,
    pub condition: VolumeCondition,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// Private plugin state: staged/ (state files), keys/, fuse/. Outside any volume mount.
    pub state_dir: PathBuf,
    /// Staging and target paths must lie under one of these (kubelet's root dir in production).
    pub allowed_roots: Vec<PathBuf>,
    pub command_timeout: Duration,
    /// mkfs and fsck of a large volume take longer than other commands.
    pub mkfs_timeout: Duration,
    pub fuse_connect_timeout: Duration,
    /// How long an unmount may run before the caller is answered DeadlineExceeded (the unmount
    /// goes on: it may be writing back data).
    pub unmount_timeout: Duration,
    /// A memory-backed directory for key files; `None` tries the defaults (see [`KeyDir`]).
    pub key_dir: Option<PathBuf>,
    /// An unstage stuck on a cluster that is unreachable is forced (losing what was not written)
    /// only once the caller asked again this many times.
    pub force_unstage_after: u32,
    pub auto_probe: AutoProbe,
    /// Where rbd-fuse and rbd-nbd run, so they outlive the plugin's container.
    pub mapper_cgroup: CgroupSetting,
}

impl NodeConfig {
    pub fn new(node_id: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id: node_id.into(),
            state_dir: state_dir.into(),
            allowed_roots: vec![PathBuf::from("/var/lib/kubelet")],
            command_timeout: Duration::from_secs(60),
            mkfs_timeout: Duration::from_secs(600),
            fuse_connect_timeout: Duration::from_secs(20),
            unmount_timeout: Duration::from_secs(10),
            key_dir: None,
            // kubelet backs off from 0.5 s, doubling up to about 2 min: some 4 min of retries.
            force_unstage_after: 10,
            auto_probe: AutoProbe::default(),
            mapper_cgroup: CgroupSetting::default(),
        }
    }
}

#[derive(Debug)]
pub struct NodeDriver {
    config: NodeConfig,
    paths: PathPolicy,
    state: StateStore,
    mappers: Mappers,
    key_dir: KeyDir,
    /// Unstages in progress, as a caller asking again sees them (the volume's key is held).
    unstaging: Mutex<HashMap<String, Unstaging>>,
}

/// An unstage whose teardown may be waiting on the cluster.
#[derive(Debug)]
struct Unstaging {
    mapping: Mapping,
    staging: PathBuf,
    since: Instant,
    retries: u32,
    forced: bool,
}

/// Removes the volume's [`Unstaging`] record when its unstage ends, however it ends.
struct UnstagingRecord<'a> {
    records: &'a Mutex<HashMap<String, Unstaging>>,
    volume_id: String,
}

impl Drop for UnstagingRecord<'_> {
    fn drop(&mut self) {
        self.records.lock().unwrap().remove(&self.volume_id);
    }
}

fn require(value: &str, what: &str) -> Result<(), NodeError> {
    if value.is_empty() {
        Err(NodeError::InvalidArgument(format!("{what} is required")))
    } else {
        Ok(())
    }
}

impl NodeDriver {
    pub fn new(config: NodeConfig) -> Result<Self, NodeError> {
        ensure_private_dir(&config.state_dir)?;
        let state = StateStore::open(config.state_dir.join("staged"))?;
        let key_dir = KeyDir::open(config.key_dir.as_deref(), &config.state_dir)?;
        let mappers = Mappers::new(
            MapperConfig {
                state_dir: config.state_dir.clone(),
                key_dir: key_dir.path().to_path_buf(),
                command_timeout: config.command_timeout,
                fuse_connect_timeout: config.fuse_connect_timeout,
                unmount_timeout: config.unmount_timeout,
                cgroup: MapperCgroup::prepare(&config.mapper_cgroup).map(std::sync::Arc::new),
            },
            config.auto_probe.clone(),
        );
        Ok(Self {
            paths: PathPolicy::new(config.allowed_roots.clone()),
            config,
            state,
            mappers,
            key_dir,
            unstaging: Mutex::default(),
        })
    }

    /// Where key files for the mappers are written (memory-backed where the host has it).
    pub fn key_dir(&self) -> &Path {
        self.key_dir.path()
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn mappers(&self) -> &Mappers {
        &self.mappers
    }

    /// Volumes staged on this node, from the state files (e.g. for a startup report).
    pub fn staged(&self) -> Result<Vec<StagingState>, NodeError> {
        self.state.list()
    }

    /// NodeStageVolume.
    pub async fn stage(&self, req: StageRequest) -> Result<StagingState, NodeError> {
        require(&req.volume_id, "volume id")?;
        let staging = self.paths.validate(&req.staging_path)?;
        let fs_type = match &req.access {
            VolumeAccess::Mount { fs_type, .. } => Some(fs_type.parse::<FsType>()?),
            VolumeAccess::Block => None,
        };
        let access = req.access.access_type();

        // (a) already staged here, (b) staged elsewhere.
        if let Some(existing) = self.state.load(&req.volume_id)? {
            if existing.staging_path != staging {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already staged at {}",
                    req.volume_id,
                    existing.staging_path.display()
                )));
            }
            if existing.access != access || existing.read_only != req.read_only {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already staged with a different capability ({:?}, read_only {})",
                    req.volume_id, existing.access, existing.read_only
                )));
            }
            if self.staging_intact(&existing)? {
                tracing::debug!(volume.id = %req.volume_id, "already staged");
                return Ok(existing);
            }
            tracing::warn!(volume.id = %req.volume_id, "stale staging state; staging again");
            self.undo_stage(&existing).await?;
        }
        if let Some(other) = self.state.find_by_staging_path(&staging)? {
            return Err(NodeError::AlreadyExists(format!(
                "volume {} is already staged at {}",
                other.volume_id,
                staging.display()
            )));
        }
        if MountTable::load()?.is_mountpoint(&staging) {
            return Err(NodeError::AlreadyExists(format!(
                "something else is mounted at {}",
                staging.display()
            )));
        }

        // (c) map, record, then format and mount.
        let kind = self.mappers.resolve(req.mapper);
        let mapping = self.mappers.map(kind, &req.map).await?;
        let state = StagingState {
            volume_id: req.volume_id.clone(),
            pool: req.map.pool.clone(),
            namespace: req.map.namespace.clone(),
            image: req.map.image.clone(),
            mapping,
            access,
            fs_type,
            staging_path: staging.clone(),
            read_only: req.read_only,
        };
        // Recorded before mounting, so a crash from here on leaves enough for unstage.
        if let Err(e) = self.state.save(&state) {
            self.unmap_logged(&state.mapping).await;
            return Err(e);
        }
        if let (
            VolumeAccess::Mount {
                mount_flags,
                mkfs_options,
                ..
            },
            Some(fs),
        ) = (&req.access, fs_type)
        {
            let mounted = self
                .format_and_mount(
                    &state.mapping.device,
                    &staging,
                    fs,
                    mount_flags,
                    mkfs_options.as_deref(),
                    req.read_only,
                )
                .await;
            if let Err(e) = mounted {
                self.unmap_logged(&state.mapping).await;
                if let Err(re) = self.state.remove(&req.volume_id) {
                    tracing::error!(volume.id = %req.volume_id, error = %re, "cleanup: could not remove state file");
                }
                return Err(e);
            }
        }
        tracing::info!(volume.id = %req.volume_id, device = %state.mapping.device.display(), mapper = %state.mapping.mapper, "staged");
        Ok(state)
    }

    /// NodeUnstageVolume. Not staged is success; works from the state file after a restart.
    pub async fn unstage(&self, volume_id: &str, staging_path: &str) -> Result<(), NodeError> {
        require(volume_id, "volume id")?;
        let staging = self.paths.validate(staging_path)?;
        let Some(state) = self.state.load(volume_id)? else {
            return Ok(());
        };
        if state.staging_path != staging {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume_id} is staged at {}, not {}",
                state.staging_path.display(),
                staging.display()
            )));
        }
        let table = MountTable::load()?;
        let published: Vec<_> = table
            .mounts_of(&state.mapping.device)
            .into_iter()
            .filter(|e| e.mount_point != staging)
            .map(|e| e.mount_point.display().to_string())
            .collect();
        if !published.is_empty() {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume_id} is still published at {}",
                published.join(", ")
            )));
        }
        self.undo_stage(&state).await?;
        tracing::info!(volume.id = %volume_id, "unstaged");
        Ok(())
    }

    /// NodePublishVolume.
    pub async fn publish(&self, req: PublishRequest) -> Result<(), NodeError> {
        require(&req.volume_id, "volume id")?;
        let staging = self.paths.validate(&req.staging_path)?;
        let target = self.paths.validate(&req.target_path)?;
        let state = self.state.load(&req.volume_id)?.ok_or_else(|| {
            NodeError::FailedPrecondition(format!("volume {} is not staged", req.volume_id))
        })?;
        if state.staging_path != staging {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is staged at {}, not {}",
                req.volume_id,
                state.staging_path.display(),
                staging.display()
            )));
        }
        if state.access != req.access {
            return Err(NodeError::InvalidArgument(format!(
                "volume {} was staged for {:?} access, publish asks for {:?}",
                req.volume_id, state.access, req.access
            )));
        }
        let options = MountOptions::parse(&req.mount_flags);
        let read_only = req.read_only || options.read_only();
        let table = MountTable::load()?;

        let source = match req.access {
            AccessType::Mount => {
                let staged = table.at(&staging).ok_or_else(|| {
                    NodeError::FailedPrecondition(format!(
                        "staging path {} is not mounted",
                        staging.display()
                    ))
                })?;
                if let Some(t) = table.at(&target) {
                    if t.dev == staged.dev && t.root == staged.root {
                        return same_mode(&target, t.is_read_only(), read_only);
                    }
                    return Err(NodeError::AlreadyExists(format!(
                        "something else is mounted at {}",
                        target.display()
                    )));
                }
                std::fs::create_dir_all(&target)
                    .map_err(|e| NodeError::io("creating target", &target, e))?;
                staging.clone()
            }
            AccessType::Block => {
                let device = state.mapping.device.clone();
                let dev_meta = std::fs::metadata(&device).map_err(|_| {
                    NodeError::FailedPrecondition(format!(
                        "device {} of volume {} is gone",
                        device.display(),
                        req.volume_id
                    ))
                })?;
                if table.is_mountpoint(&target) {
                    let same = std::fs::metadata(&target).is_ok_and(|m| {
                        m.file_type().is_block_device() && m.rdev() == dev_meta.rdev()
                    });
                    if same {
                        let ro = table.at(&target).is_some_and(|e| e.is_read_only());
                        return same_mode(&target, ro, read_only);
                    }
                    return Err(NodeError::AlreadyExists(format!(
                        "something else is mounted at {}",
                        target.display()
                    )));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| NodeError::io("creating target parent", parent, e))?;
                }
                match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(NodeError::InvalidArgument(format!(
                            "block target {} exists and is not a regular file",
                            target.display()
                        )))
                    }
                    Err(_) => {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&target)
                            .map_err(|e| NodeError::io("creating target file", &target, e))?;
                    }
                }
                device
            }
        };

        let mut flags = options.flags & !MsFlags::MS_RDONLY;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        if !options.data.is_empty() {
            tracing::warn!(volume.id = %req.volume_id, options = %options.data, "filesystem options are ignored on a bind mount");
        }
        let t = target.clone();
        blocking_to_end("bind mount", self.config.command_timeout, move || {
            mount::bind(&source, &t)?;
            if !flags.is_empty() {
                if let Err(e) = mount::remount_bind(&t, flags) {
                    if let Err(ue) = mount::unmount(&t, false) {
                        tracing::error!(target = %t.display(), error = %ue, "cleanup: could not unmount bind");
                    }
                    return Err(e);
                }
            }
            Ok(())
        })
        .await?;
        tracing::info!(volume.id = %req.volume_id, target = %target.display(), read_only, "published");
        Ok(())
    }

    /// NodeUnpublishVolume. A target that does not exist is success.
    pub async fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), NodeError> {
        require(volume_id, "volume id")?;
        let target = self.paths.validate(target_path)?;
        if std::fs::symlink_metadata(&target).is_err() {
            return Ok(());
        }
        if MountTable::load()?.is_mountpoint(&target) {
            self.unmount_to_end(&target).await?;
            if MountTable::load()?.is_mountpoint(&target) {
                return Err(NodeError::FailedPrecondition(format!(
                    "{} is still mounted (stacked mounts?)",
                    target.display()
                )));
            }
        }
        // Never recursive: if anything is still inside, it is not ours to delete.
        let removed = match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(_) => Ok(()),
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(NodeError::io("removing target", &target, e))
            }
            _ => {
                tracing::info!(volume.id = %volume_id, target = %target.display(), "unpublished");
                Ok(())
            }
        }
    }

    /// NodeExpandVolume: grows the device view and the filesystem; returns the device size.
    pub async fn expand(&self, volume_id: &str, volume_path: &str) -> Result<u64, NodeError> {
        require(volume_id, "volume id")?;
        let path = self.paths.validate(volume_path)?;
        let state = self.state.load(volume_id)?.ok_or_else(|| {
            NodeError::NotFound(format!("volume {volume_id} is not staged on this node"))
        })?;
        if std::fs::symlink_metadata(&path).is_err() {
            return Err(NodeError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        if state.mapping.mapper == MapperKind::Fuse {
            self.mappers.fuse.refresh_size(&state.mapping).await?;
        }
        if let (AccessType::Mount, Some(fs)) = (state.access, state.fs_type) {
            fs::expand(fs, &state.mapping.device, &path, self.config.mkfs_timeout).await?;
        }
        let device = state.mapping.device.clone();
        blocking("device size", self.config.command_timeout, move || {
            fs::device_size(&device)
        })
        .await
    }

    /// NodeGetVolumeStats, with a volume condition.
    pub async fn stats(
        &self,
        volume_id: &str,
        volume_path: &str,
    ) -> Result<VolumeStats, NodeError> {
        require(volume_id, "volume id")?;
        let path = self.paths.validate(volume_path)?;
        let meta = std::fs::metadata(&path).map_err(|_| {
            NodeError::NotFound(format!("volume path {} does not exist", path.display()))
        })?;
        let state = self.state.load(volume_id)?;
        let p = path.clone();
        let usage = if meta.file_type().is_block_device() {
            let total = blocking("device size", self.config.command_timeout, move || {
                fs::device_size(&p)
            })
            .await?;
            VolumeUsage::Block { total_bytes: total }
        } else {
            VolumeUsage::Filesystem(
                blocking("statvfs", self.config.command_timeout, move || {
                    fs::stats(&p)
                })
                .await?,
            )
        };
        let mut condition = VolumeCondition::default();
        if let Some(state) = &state {
            if let Err(msg) = self.mappers.health(&state.mapping) {
                condition = VolumeCondition {
                    abnormal: true,
                    message: msg,
                };
            } else if state.access == AccessType::Mount && !state.read_only {
                let table = MountTable::load()?;
                if table
                    .at(&state.staging_path)
                    .is_some_and(|e| e.superblock_read_only())
                {
                    condition = VolumeCondition {
                        abnormal: true,
                        message: "filesystem was remounted read-only after errors".into(),
                    };
                }
            }
        }
        Ok(VolumeStats { usage, condition })
    }

    /// Whether what the state file says is still true: mapping alive and, for mount access,
    /// the staging path mounted from its device.
    fn staging_intact(&self, state: &StagingState) -> Result<bool, NodeError> {
        if self.mappers.health(&state.mapping).is_err() {
            return Ok(false);
        }
        if state.access == AccessType::Block {
            return Ok(true);
        }
        let table = MountTable::load()?;
        Ok(table
            .mounts_of(&state.mapping.device)
            .iter()
            .any(|e| e.mount_point == state.staging_path))
    }

    async fn format_and_mount(
        &self,
        device: &Path,
        staging: &Path,
        fs: FsType,
        mount_flags: &[String],
        mkfs_options: Option<&str>,
        read_only: bool,
    ) -> Result<(), NodeError> {
        std::fs::create_dir_all(staging)
            .map_err(|e| NodeError::io("creating staging dir", staging, e))?;
        let t = self.config.mkfs_timeout;
        match fs::probe(device, self.config.command_timeout).await? {
            Probe::Empty if read_only => {
                return Err(NodeError::FailedPrecondition(
                    "volume has no filesystem and is staged read-only".into(),
                ))
            }
            Probe::Empty => fs::mkfs(fs, device, mkfs_options, t).await?,
            Probe::Filesystem(found) if found != fs.as_str() => {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume holds a {found} filesystem, {fs} was requested"
                )))
            }
            Probe::Filesystem(_) => {
                if !read_only {
                    fs::check(fs, device, t).await?;
                    if fs == FsType::Ext4 {
                        self.grow_to_device(fs, device, staging).await?;
                    }
                }
            }
            Probe::PartitionTable(pt) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume holds a {pt} partition table and no filesystem; not formatting it"
                )))
            }
        }
        let mut options = MountOptions::parse(mount_flags);
        if read_only {
            options.flags |= MsFlags::MS_RDONLY;
        }
        let extra = fs.default_mount_data();
        if !extra.is_empty() && !options.data.split(',').any(|o| o == extra) {
            options.data = [options.data.as_str(), extra]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(",");
        }
        let (d, s) = (device.to_path_buf(), staging.to_path_buf());
        blocking_to_end("mount", self.config.command_timeout, move || {
            mount::mount_fs(&d, &s, fs.as_str(), &options)
        })
        .await?;
        // xfs grows only while mounted.
        if fs == FsType::Xfs && !read_only {
            self.grow_to_device(fs, device, staging).await?;
        }
        Ok(())
    }

    /// A filesystem made on a smaller volume (a snapshot restored, or a volume cloned, into a
    /// larger one) grows to fill its device before anyone uses it, as CSI expects of NodeStage.
    async fn grow_to_device(
        &self,
        fs: FsType,
        device: &Path,
        staging: &Path,
    ) -> Result<(), NodeError> {
        let t = self.config.mkfs_timeout;
        let (span, block) = fs::fs_span(fs, device, staging, t).await?;
        let d = device.to_path_buf();
        let size = blocking("device size", self.config.command_timeout, move || {
            fs::device_size(&d)
        })
        .await?;
        if !fs::needs_growth(size, span, block) {
            return Ok(());
        }
        tracing::info!(device = %device.display(), fs = %fs, from = span, to = size, "growing the filesystem to fill its larger volume");
        match fs {
            FsType::Ext4 => fs::grow_unmounted_ext4(device, t).await,
            FsType::Xfs => fs::expand(fs, device, staging, t).await,
        }
    }

    /// Unmounts staging, unmaps, removes the state file; stops at the first failure so a retry
    /// finds the state file again. Every step runs to its end: an unmount that cannot write
    /// back its dirty pages waits for the cluster (the caller is answered DeadlineExceeded
    /// meanwhile), and nothing is unmapped under it. Only [`NodeDriver::unstage_asked_again`]
    /// ever gives up on that data.
    async fn undo_stage(&self, state: &StagingState) -> Result<(), NodeError> {
        let _record = self.record_unstaging(state);
        if state.access == AccessType::Mount
            && MountTable::load()?.is_mountpoint(&state.staging_path)
        {
            self.unmount_to_end(&state.staging_path).await?;
            if MountTable::load()?.is_mountpoint(&state.staging_path) {
                return Err(NodeError::FailedPrecondition(format!(
                    "{} is still mounted (stacked mounts?)",
                    state.staging_path.display()
                )));
            }
        }
        match state.mapping.mapper {
            // The fuse mount point is derived from the image, so the recorded mapping is safe to
            // tear down even after a reboot.
            MapperKind::Fuse => self.mappers.unmap(&state.mapping).await?,
            // A kernel device name can be reused by another image after a reboot: look it up.
            kind => {
                let image = ImageRef {
                    pool: &state.pool,
                    namespace: state.namespace.as_deref(),
                    image: &state.image,
                };
                if let Some(current) = self.mappers.find(kind, &image).await? {
                    let current = current.with_unmap_options_of(&state.mapping);
                    self.mappers.unmap(&current).await?;
                }
            }
        }
        self.state.remove(&state.volume_id)
    }

    fn record_unstaging(&self, state: &StagingState) -> UnstagingRecord<'_> {
        self.unstaging.lock().unwrap().insert(
            state.volume_id.clone(),
            Unstaging {
                mapping: state.mapping.clone(),
                staging: state.staging_path.clone(),
                since: Instant::now(),
                retries: 0,
                forced: false,
            },
        );
        UnstagingRecord {
            records: &self.unstaging,
            volume_id: state.volume_id.clone(),
        }
    }

    /// NodeUnstageVolume arrived again while the first one still runs (it holds the volume's
    /// key). Once it has waited past the unmount deadline, each such call counts; after
    /// `force_unstage_after` of them, and only if no monitor of `monitors` answers, the
    /// mapping's I/O path is broken so that the stuck teardown fails and ends. That loses what
    /// was not written yet, and is logged as data loss. When this node's client was `fenced`
    /// (blocklisted: nothing it holds can ever be written), it is forced at the first retry.
    /// Returns whether it forced.
    pub async fn unstage_asked_again(
        &self,
        volume_id: &str,
        monitors: &[String],
        fenced: bool,
    ) -> bool {
        let (mapping, staging, retries, waited) = {
            let mut records = self.unstaging.lock().unwrap();
            let Some(u) = records.get_mut(volume_id) else {
                return false;
            };
            if u.forced || u.since.elapsed() < self.config.unmount_timeout {
                return false;
            }
            u.retries += 1;
            if !fenced && u.retries < self.config.force_unstage_after {
                tracing::warn!(volume.id = %volume_id, retries = u.retries, waited = ?u.since.elapsed(), "unstage still waits for its unmount; not forcing yet");
                return false;
            }
            (
                u.mapping.clone(),
                u.staging.clone(),
                u.retries,
                u.since.elapsed(),
            )
        };
        let reach = match fenced {
            true => Reach::Unreachable,
            false => reach::monitors(monitors, Duration::from_secs(3)).await,
        };
        if reach != Reach::Unreachable {
            tracing::warn!(volume.id = %volume_id, ?reach, retries, "unstage still waits for its unmount; not forcing: the cluster is not provably gone");
            return false;
        }
        match self.unstaging.lock().unwrap().get_mut(volume_id) {
            Some(u) if !u.forced => u.forced = true,
            _ => return false,
        }
        tracing::error!(
            volume.id = %volume_id,
            device = %mapping.device.display(),
            staging = %staging.display(),
            mapper = %mapping.mapper,
            retries,
            ?waited,
            fenced,
            "DATA LOSS: forcing unstage: the unmount waited through {retries} retries and {}; writes to the volume that had not reached the cluster (dirty pages of its filesystem, the mapper's cache) are dropped",
            if fenced { "this node's client is fenced from the image (it moved to another node)" } else { "no monitor answers" }
        );
        if let Err(e) = self.mappers.force(&mapping).await {
            tracing::error!(volume.id = %volume_id, error = %e, "forcing the mapping failed");
        }
        true
    }

    /// umount2 off-thread, awaited to its end: a lazy detach would leave dirty pages behind
    /// a filesystem no one can flush, and the unmap after it would drop them.
    async fn unmount_to_end(&self, target: &Path) -> Result<(), NodeError> {
        let t = target.to_path_buf();
        blocking_to_end("unmount", self.config.unmount_timeout, move || {
            mount::unmount(&t, false)
        })
        .await
    }

    async fn unmap_logged(&self, mapping: &Mapping) {
        if let Err(e) = self.mappers.unmap(mapping).await {
            tracing::error!(device = %mapping.device.display(), error = %e, "cleanup: could not unmap");
        }
    }
}

/// An existing publish with the same source: fine if its read-only mode matches the request.
fn same_mode(target: &Path, is_read_only: bool, want_read_only: bool) -> Result<(), NodeError> {
    if is_read_only == want_read_only {
        Ok(())
    } else {
        Err(NodeError::AlreadyExists(format!(
            "{} is already published with read_only {is_read_only}",
            target.display()
        )))
    }
}
