//! Mapping an RBD image to a local block device: kernel rbd, rbd-nbd, or rbd-fuse plus a loop
//! device, chosen per volume by the StorageClass parameter `mounter`.
//!
//! Credentials reach the tools only through a [`KeyFile`] (mode 0600, created exclusively in a 0700
//! memory-backed directory, deleted right after use) and `--keyfile`; never through argv or logs.
//! The daemons (rbd-fuse, rbd-nbd) start in the mappers' cgroup, outside the plugin container's
//! (see [`cgroup`]), so they outlive it.

pub mod auto;
pub mod cgroup;
pub mod fuse;
pub mod keyfile;
pub mod krbd;
pub mod nbd;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::command::CommandSpec;
use super::NodeError;
use crate::secret::Secret;

pub use auto::AutoProbe;
pub use cgroup::{CgroupSetting, MapperCgroup};
pub use fuse::FuseMapper;
pub use keyfile::{KeyDir, KeyFile};
pub use krbd::KrbdMapper;
pub use nbd::NbdMapper;

/// A concrete mapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapperKind {
    Krbd,
    Nbd,
    Fuse,
}

impl fmt::Display for MapperKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapperKind::Krbd => "krbd",
            MapperKind::Nbd => "nbd",
            MapperKind::Fuse => "fuse",
        })
    }
}

/// The StorageClass `mounter` parameter: a concrete mapper, or `auto` (decided on the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapperChoice {
    Fixed(MapperKind),
    Auto,
}

impl Default for MapperChoice {
    fn default() -> Self {
        MapperChoice::Fixed(MapperKind::Krbd)
    }
}

impl FromStr for MapperChoice {
    type Err = NodeError;
    /// Accepts ceph-csi's spellings; empty means the default (krbd).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "" | "rbd" | "krbd" => MapperChoice::Fixed(MapperKind::Krbd),
            "nbd" | "rbd-nbd" => MapperChoice::Fixed(MapperKind::Nbd),
            "fuse" | "rbd-fuse" => MapperChoice::Fixed(MapperKind::Fuse),
            "auto" => MapperChoice::Auto,
            other => {
                return Err(NodeError::InvalidArgument(format!(
                    "unknown mounter {other:?} (krbd, nbd, fuse or auto)"
                )))
            }
        })
    }
}

/// What to map and how to reach the cluster.
#[derive(Debug, Clone)]
pub struct MapRequest {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub monitors: Vec<String>,
    pub user: String,
    pub key: Secret,
    /// Each mapper's own comma-separated options, from the StorageClass's `mapOptions`.
    pub map_options: HashMap<MapperKind, String>,
    /// The same from `unmapOptions`; the mapper keeps its own in the [`Mapping`].
    pub unmap_options: HashMap<MapperKind, String>,
    pub read_only: bool,
}

impl MapRequest {
    /// `pool[/namespace]/image`, the spec `rbd` and `rbd-nbd` take.
    pub fn image_spec(&self) -> String {
        image_spec(&self.pool, self.namespace.as_deref(), &self.image)
    }

    /// `kind`'s map options, if the StorageClass gave any.
    pub fn map_options_for(&self, kind: MapperKind) -> Option<&str> {
        self.map_options
            .get(&kind)
            .map(String::as_str)
            .filter(|o| !o.is_empty())
    }

    /// `kind`'s unmap options, to record in the mapping.
    pub fn unmap_options_for(&self, kind: MapperKind) -> Option<String> {
        self.unmap_options
            .get(&kind)
            .filter(|o| !o.is_empty())
            .cloned()
    }

    fn validate(&self) -> Result<(), NodeError> {
        let bad = |what: &str| Err(NodeError::InvalidArgument(what.to_string()));
        if self.pool.is_empty() || self.image.is_empty() {
            return bad("pool and image are required");
        }
        for part in [&self.pool, &self.image, &self.user]
            .into_iter()
            .chain(self.namespace.as_ref())
        {
            if part.contains('/') || part.contains('\0') || part.starts_with('-') {
                return bad("pool, namespace, image and user must not contain '/' or NUL, or start with '-'");
            }
        }
        if self.monitors.is_empty() {
            return bad("at least one monitor is required");
        }
        if self.user.is_empty() || self.key.is_empty() {
            return bad("user and key are required");
        }
        Ok(())
    }
}

pub fn image_spec(pool: &str, namespace: Option<&str>, image: &str) -> String {
    match namespace {
        Some(ns) if !ns.is_empty() => format!("{pool}/{ns}/{image}"),
        _ => format!("{pool}/{image}"),
    }
}

/// A live mapping; stored in the staging state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub mapper: MapperKind,
    pub device: PathBuf,
    /// fuse only: where rbd-fuse exposes the image as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse_mountpoint: Option<PathBuf>,
    /// The daemon serving the device (rbd-fuse, rbd-nbd), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// This mapper's `unmapOptions`, kept for the unmap (NodeUnstage carries no volume context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmap_options: Option<String>,
}

impl Mapping {
    /// The same mapping, unmapped with the options recorded in `recorded` (a mapping found on the
    /// system knows no options of its own).
    pub fn with_unmap_options_of(self, recorded: &Mapping) -> Mapping {
        Mapping {
            unmap_options: recorded.unmap_options.clone(),
            ..self
        }
    }
}

/// Identifies an image for [`Mapper::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub pool: &'a str,
    pub namespace: Option<&'a str>,
    pub image: &'a str,
}

impl<'a> From<&'a MapRequest> for ImageRef<'a> {
    fn from(r: &'a MapRequest) -> Self {
        ImageRef {
            pool: &r.pool,
            namespace: r.namespace.as_deref(),
            image: &r.image,
        }
    }
}

/// One way of turning an image into a block device.
#[allow(async_fn_in_trait)]
pub trait Mapper {
    fn kind(&self) -> MapperKind;
    /// Maps the image; returns the existing mapping if it is already mapped.
    async fn map(&self, req: &MapRequest) -> Result<Mapping, NodeError>;
    /// Unmaps; a mapping that is already gone is success.
    async fn unmap(&self, mapping: &Mapping) -> Result<(), NodeError>;
    /// The existing mapping of the image, if any (after a repeated stage or a plugin restart).
    async fn find(&self, image: &ImageRef<'_>) -> Result<Option<Mapping>, NodeError>;
    /// Breaks the I/O path of a mapping whose cluster is gone, so that what waits on it (an
    /// unmount flushing dirty pages) fails instead of waiting forever. Loses unwritten data.
    async fn force(&self, mapping: &Mapping) -> Result<(), NodeError>;
}

/// Settings shared by all mappers.
#[derive(Debug, Clone)]
pub struct MapperConfig {
    /// Root of the plugin's private state (fuse mount points).
    pub state_dir: PathBuf,
    /// Where key files are written for the tools: memory-backed, see [`KeyDir`].
    pub key_dir: PathBuf,
    pub command_timeout: Duration,
    /// How long rbd-fuse may take to connect and expose the image.
    pub fuse_connect_timeout: Duration,
    /// How long an unmount of a fuse mount point may block before it is forced.
    pub unmount_timeout: Duration,
    /// Where the daemons run; `None`: in the plugin's own cgroups.
    pub cgroup: Option<Arc<MapperCgroup>>,
}

impl MapperConfig {
    /// A daemon's command, started outside the plugin's cgroups when there is a mappers' cgroup.
    pub(crate) fn daemon(&self, spec: CommandSpec) -> Result<CommandSpec, NodeError> {
        Ok(match &self.cgroup {
            Some(cg) => spec.in_cgroups(cg.procs_files()?),
            None => spec,
        })
    }
}

/// All mappers, dispatching on [`MapperKind`].
#[derive(Debug)]
pub struct Mappers {
    pub krbd: KrbdMapper,
    pub nbd: NbdMapper,
    pub fuse: FuseMapper,
    pub probe: AutoProbe,
}

impl Mappers {
    pub fn new(config: MapperConfig, probe: AutoProbe) -> Self {
        Self {
            krbd: KrbdMapper::new(config.clone()),
            nbd: NbdMapper::new(config.clone()),
            fuse: FuseMapper::new(config),
            probe,
        }
    }

    /// Resolves `auto` on this node.
    pub fn resolve(&self, choice: MapperChoice) -> MapperKind {
        match choice {
            MapperChoice::Fixed(k) => k,
            MapperChoice::Auto => self.probe.choose(),
        }
    }

    pub async fn map(&self, kind: MapperKind, req: &MapRequest) -> Result<Mapping, NodeError> {
        req.validate()?;
        match kind {
            MapperKind::Krbd => self.krbd.map(req).await,
            MapperKind::Nbd => self.nbd.map(req).await,
            MapperKind::Fuse => self.fuse.map(req).await,
        }
    }

    pub async fn unmap(&self, mapping: &Mapping) -> Result<(), NodeError> {
        match mapping.mapper {
            MapperKind::Krbd => self.krbd.unmap(mapping).await,
            MapperKind::Nbd => self.nbd.unmap(mapping).await,
            MapperKind::Fuse => self.fuse.unmap(mapping).await,
        }
    }

    pub async fn find(
        &self,
        kind: MapperKind,
        image: &ImageRef<'_>,
    ) -> Result<Option<Mapping>, NodeError> {
        match kind {
            MapperKind::Krbd => self.krbd.find(image).await,
            MapperKind::Nbd => self.nbd.find(image).await,
            MapperKind::Fuse => self.fuse.find(image).await,
        }
    }

    pub async fn force(&self, mapping: &Mapping) -> Result<(), NodeError> {
        match mapping.mapper {
            MapperKind::Krbd => self.krbd.force(mapping).await,
            MapperKind::Nbd => self.nbd.force(mapping).await,
            MapperKind::Fuse => self.fuse.force(mapping).await,
        }
    }

    /// Whether the mapping still serves its device; the reason when it does not.
    pub fn health(&self, mapping: &Mapping) -> Result<(), String> {
        if !mapping.device.exists() {
            return Err(format!("device {} is gone", mapping.device.display()));
        }
        if mapping.mapper == MapperKind::Fuse {
            return self.fuse.health(mapping);
        }
        Ok(())
    }
}

/// Sends `signal` to each of `pids` (daemons found by their command line or recorded at map).
pub(crate) fn kill_all(pids: &[u32], signal: nix::sys::signal::Signal) {
    use nix::unistd::Pid;
    for &pid in pids {
        match nix::sys::signal::kill(Pid::from_raw(pid as i32), signal) {
            Ok(()) => tracing::warn!(pid, %signal, "signalled mapper daemon"),
            Err(e) => tracing::debug!(pid, "kill: {e}"),
        }
    }
}

/// The cluster-identity arguments shared by `rbd` and `rbd-nbd`. `-c /dev/null` keeps a host
/// `/etc/ceph/ceph.conf` (or its absence) out of the picture.
pub(crate) fn cluster_args(req: &MapRequest, keyfile: &Path) -> Vec<String> {
    vec![
        "-c".into(),
        "/dev/null".into(),
        "--id".into(),
        req.user.clone(),
        "-m".into(),
        req.monitors.join(","),
        "--keyfile".into(),
        keyfile.to_string_lossy().into_owned(),
    ]
}

#[cfg(test)]
pub(crate) fn sample_request() -> MapRequest {
    MapRequest {
        pool: "rbd".into(),
        namespace: None,
        image: "csi-vol-1".into(),
        monitors: vec!["10.0.0.1:6789".into(), "10.0.0.2:6789".into()],
        user: "csi".into(),
        key: Secret::new("AQBsecretkey=="),
        map_options: HashMap::new(),
        unmap_options: HashMap::new(),
        read_only: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounter_parameter_accepts_ceph_csi_spellings() {
        use MapperKind::*;
        for (s, want) in [
            ("", MapperChoice::Fixed(Krbd)),
            ("rbd", MapperChoice::Fixed(Krbd)),
            ("krbd", MapperChoice::Fixed(Krbd)),
            ("rbd-nbd", MapperChoice::Fixed(Nbd)),
            ("nbd", MapperChoice::Fixed(Nbd)),
            ("rbd-fuse", MapperChoice::Fixed(Fuse)),
            ("fuse", MapperChoice::Fixed(Fuse)),
            ("auto", MapperChoice::Auto),
        ] {
            assert_eq!(s.parse::<MapperChoice>().unwrap(), want, "{s}");
        }
        assert!("iscsi".parse::<MapperChoice>().is_err());
    }

    #[test]
    fn requests_with_option_like_or_slashed_names_are_rejected() {
        let mut r = sample_request();
        assert!(r.validate().is_ok());
        r.image = "-rf".into();
        assert!(r.validate().is_err());
        let mut r = sample_request();
        r.pool = "a/b".into();
        assert!(r.validate().is_err());
        let mut r = sample_request();
        r.monitors.clear();
        assert!(r.validate().is_err());
    }

    #[test]
    fn unmap_options_survive_in_the_state_file_and_older_files_still_read() {
        let recorded = Mapping {
            mapper: MapperKind::Krbd,
            device: "/dev/rbd0".into(),
            fuse_mountpoint: None,
            pid: None,
            unmap_options: Some("force".into()),
        };
        let json = serde_json::to_string(&recorded).unwrap();
        assert_eq!(serde_json::from_str::<Mapping>(&json).unwrap(), recorded);
        let old: Mapping =
            serde_json::from_str(r#"{"mapper":"krbd","device":"/dev/rbd0"}"#).unwrap();
        assert_eq!(old.unmap_options, None);
        // What unstage finds on the system carries the recorded options to the unmap.
        let found = Mapping {
            unmap_options: None,
            ..recorded.clone()
        };
        assert_eq!(found.with_unmap_options_of(&recorded), recorded);
    }

    #[test]
    fn image_spec_includes_namespace_when_set() {
        assert_eq!(image_spec("p", None, "i"), "p/i");
        assert_eq!(image_spec("p", Some(""), "i"), "p/i");
        assert_eq!(image_spec("p", Some("ns"), "i"), "p/ns/i");
    }
}
