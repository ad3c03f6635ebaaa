//! Controller-side volume lifecycle on Ceph, one file per operation: `create` (empty, from a
//! snapshot, from a volume), `delete` (and the trash), `expand`, `attach` (publish with fencing),
//! `registry` (nodes), `snapshot`, `list` (volumes, capacity), `ownership` (image marks and
//! recorded name prefixes). This file holds the types and the plumbing they share.
//!
//! Every operation with side effects runs through [`Controller::run_owned`]: in a task that holds
//! the operation's key until its work is over, even when the caller has stopped waiting.
//!
//! Idempotency comes from deterministic names (`naming`): a retried request finds the image it
//! made before, and a half-made one is completed or removed. Snapshots are images of their own
//! (a clone of the source plus one snapshot), so deleting a source never breaks its snapshots.
//! A deleted volume goes to the RBD trash and is purged in the background (`trash`).

mod attach;
mod create;
mod delete;
mod expand;
mod list;
mod ownership;
mod registry;
mod snapshot;
mod trash;

pub use registry::node_object;

use super::naming::{self, VOLUME_PREFIX};
use super::{
    ClusterConfig, ClusterEntry, Credentials, Error, InFlight, SnapshotId, VolumeId, VolumeParams,
};
use crate::ceph::pool::blocking;
use crate::ceph::{CephError, Connection, ConnectionPool, Image, IoCtx};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

pub const MIB: u64 = 1 << 20;
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Larger requests are refused with OutOfRange rather than handed to librbd.
pub const MAX_SIZE: u64 = 1 << 50;
const ATTACHMENTS_KEY: &str = "rook-rbd.attachments";
/// The request name that made the image (see `ownership`).
const NAME_KEY: &str = "rook-rbd.name";
/// Set by the external-provisioner's --extra-create-metadata; the PV name is the request name.
const PV_NAME_KEY: &str = "csi.storage.k8s.io/pv/name";
/// Per-image metadata that must not carry over from a parent to its clone. The clone's own mark
/// and source replace the parent's, so `NAME_KEY` and `PARENT_KEY` are overwritten, not removed.
const INHERITED_KEYS: [&str; 4] = [
    ATTACHMENTS_KEY,
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    PV_NAME_KEY,
];
/// The source image of a clone, written before its mark: it still names the source once a
/// flatten has detached the parent.
const PARENT_KEY: &str = "rook-rbd.parent";
const NODE_OBJECT_PREFIX: &str = "rook-rbd.node.";
const TRASH_SOURCE_USER: i32 = 0;
/// Blocking tasks ListVolumes spreads its image opens over.
const LIST_PARALLELISM: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub required_bytes: i64,
    pub limit_bytes: i64,
    pub params: VolumeParams,
    pub source: Option<Source>,
    pub creds: Credentials,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub id: VolumeId,
    pub size: u64,
    pub context: HashMap<String, String>,
    pub source: Option<Source>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub source_volume: VolumeId,
    pub size: u64,
    pub created: (i64, i32),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub node: String,
    #[serde(default)]
    pub readonly: bool,
    /// Published with a SINGLE_NODE_* access mode: no other node may attach while it stands.
    #[serde(default)]
    pub exclusive: bool,
}

#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub size: u64,
    pub attachments: Vec<Attachment>,
}

pub struct Page<T> {
    pub entries: Vec<T>,
    pub next_token: String,
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub max_clone_depth: u32,
    pub create_concurrency: usize,
    pub create_queue_timeout: Duration,
    /// How long a deleted volume stays in the RBD trash before it is purged.
    pub trash_deferment: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            max_clone_depth: 8,
            create_concurrency: 32,
            create_queue_timeout: Duration::from_secs(20),
            trash_deferment: Duration::ZERO,
        }
    }
}

pub struct Controller {
    clusters: ClusterConfig,
    pool: Arc<ConnectionPool>,
    /// Used for calls that carry no secrets (ListVolumes, GetCapacity, ControllerGetVolume).
    default_creds: Option<Credentials>,
    inflight: InFlight,
    create_slots: Semaphore,
    cfg: ControllerConfig,
    /// Every image-name prefix this process has created with or read from a pool's record.
    prefixes: Mutex<BTreeSet<String>>,
    /// What this driver moved to the RBD trash, and the purgers that remove it.
    trash: Arc<trash::Trash>,
    /// (cluster, pool[/ns], prefix) known to be recorded in the pool (`ownership`).
    recorded_prefixes: Mutex<HashSet<(String, String, String)>>,
}

/// Rounds a capacity range to a whole number of MiB, honouring both limits.
pub fn size_for(required: i64, limit: i64) -> Result<u64, Error> {
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument(
            "capacity_range bytes must not be negative".into(),
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(Error::InvalidArgument(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = if required == 0 {
        if limit != 0 {
            DEFAULT_SIZE.min(limit / MIB * MIB)
        } else {
            DEFAULT_SIZE
        }
    } else {
        required.div_ceil(MIB) * MIB
    };
    if wanted == 0 || (limit != 0 && wanted > limit) {
        return Err(Error::OutOfRange(format!(
            "no whole number of MiB fits between {required} and {limit} bytes"
        )));
    }
    if wanted > MAX_SIZE {
        return Err(Error::OutOfRange(format!(
            "{wanted} bytes is more than the supported maximum of {MAX_SIZE}"
        )));
    }
    Ok(wanted)
}

pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    if name.len() > 128 {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes; at most 128",
            name.len()
        )));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidArgument(format!(
            "{what} contains control characters"
        )));
    }
    Ok(())
}

impl Controller {
    pub fn new(
        clusters: ClusterConfig,
        pool: Arc<ConnectionPool>,
        default_creds: Option<Credentials>,
        cfg: ControllerConfig,
    ) -> Self {
        let mut prefixes = BTreeSet::new();
        prefixes.insert(VOLUME_PREFIX.to_string());
        Self {
            trash: trash::Trash::new(pool.clone(), clusters.clone()),
            clusters,
            pool,
            default_creds,
            inflight: InFlight::default(),
            create_slots: Semaphore::new(cfg.create_concurrency.max(1)),
            cfg,
            prefixes: Mutex::new(prefixes),
            recorded_prefixes: Default::default(),
        }
    }

    /// Runs `work` as the one operation on `key`, in a task that owns the key until `work` is
    /// over. A gRPC deadline drops the handler future, not the task: a retry gets `Aborted` until
    /// the first attempt has finished, so it never runs beside (or undoes) the call it retries.
    /// Whatever `work` needs (a semaphore permit, say) it must take inside, so the task owns it.
    async fn run_owned<T, Fut>(
        self: &Arc<Self>,
        key: &str,
        work: impl FnOnce(Arc<Self>) -> Fut,
    ) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
        T: Send + 'static,
    {
        self.inflight.run(key, work(self.clone())).await?
    }

    pub fn pool(&self) -> &Arc<ConnectionPool> {
        &self.pool
    }

    pub fn inflight(&self) -> &InFlight {
        &self.inflight
    }

    pub fn clusters(&self) -> &ClusterConfig {
        &self.clusters
    }

    /// Credentials from the request, or the configured ones for calls that carry none.
    pub fn creds(&self, secrets: &HashMap<String, String>) -> Result<Credentials, Error> {
        if secrets.is_empty() {
            return self.default_creds.clone().ok_or_else(|| {
                Error::InvalidArgument(
                    "this call carries no secrets and the driver has no --secret-dir".into(),
                )
            });
        }
        Credentials::from_secrets(secrets)
    }

    fn cluster(&self, id: &str) -> Result<&ClusterEntry, Error> {
        self.clusters.get(id).ok_or_else(|| {
            Error::InvalidArgument(format!("clusterID {id:?} is not in the cluster config"))
        })
    }

    /// librados reports rejected credentials as a connect timeout once client_mount_timeout is
    /// set. If the monitors answer their banner, the credentials were refused; otherwise the
    /// cluster is out of reach.
    async fn explain_connect_failure(
        &self,
        entry: &ClusterEntry,
        user: &str,
        e: CephError,
    ) -> Error {
        if e.op == "rados_connect"
            && e.timed_out()
            && crate::ceph::health::banner_check(&entry.monitors, Duration::from_secs(2))
                .await
                .is_ok()
        {
            return Error::PermissionDenied(format!(
                "cluster {}: the monitors answer, but client.{user} could not authenticate in time (wrong key, or unknown user?)",
                entry.cluster_id
            ));
        }
        Error::ceph(format!(
            "connecting to cluster {} as client.{user}",
            entry.cluster_id
        ))(e)
    }

    pub async fn connect(
        &self,
        cluster_id: &str,
        creds: &Credentials,
    ) -> Result<Arc<Connection>, Error> {
        let entry = self.cluster(cluster_id)?;
        match self
            .pool
            .get(cluster_id, &entry.monitors, &creds.user, &creds.key)
            .await
        {
            Ok(c) => Ok(c),
            Err(e) => Err(self.explain_connect_failure(entry, &creds.user, e).await),
        }
    }

    /// The I/O context of a pool and RADOS namespace (empty: the default); a pool or namespace
    /// that does not exist is an InvalidArgument, not an Internal.
    async fn ioctx(
        &self,
        cluster_id: &str,
        pool: &str,
        namespace: &str,
        creds: &Credentials,
    ) -> Result<Arc<IoCtx>, Error> {
        let conn = self.connect(cluster_id, creds).await?;
        self.pool_ioctx(conn, cluster_id, pool, namespace).await
    }

    /// The I/O context of a volume's pool and namespace.
    async fn volume_ioctx(&self, id: &VolumeId, creds: &Credentials) -> Result<Arc<IoCtx>, Error> {
        self.ioctx(&id.cluster_id, &id.pool, &id.namespace, creds)
            .await
    }

    /// A pool's I/O context on a connection the caller already holds.
    async fn pool_ioctx(
        &self,
        conn: Arc<Connection>,
        cluster_id: &str,
        pool: &str,
        namespace: &str,
    ) -> Result<Arc<IoCtx>, Error> {
        if let Some(io) = conn.cached_ioctx(pool, namespace) {
            return Ok(io);
        }
        let (p, ns) = (pool.to_string(), namespace.to_string());
        let io = blocking(move || conn.ioctx_in(&p, &ns))
            .await
            .map_err(|e| {
                if e.not_found() && e.op == "rbd_namespace_exists" {
                    Error::InvalidArgument(format!(
                        "RADOS namespace {pool}/{namespace} does not exist in cluster {cluster_id} (rbd namespace create {pool}/{namespace})"
                    ))
                } else if e.not_found() {
                    Error::InvalidArgument(format!(
                        "pool {pool:?} does not exist in cluster {cluster_id}"
                    ))
                } else {
                    Error::ceph(format!("opening pool {pool}"))(e)
                }
            })?;
        Ok(io)
    }

    pub(super) fn decode_existing(&self, volume_id: &str) -> Result<VolumeId, Error> {
        if volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let id = VolumeId::decode(volume_id)
            .map_err(|e| Error::NotFound(format!("volume {volume_id} does not exist ({e})")))?;
        if naming::is_snapshot_image(&id.image) || self.clusters.get(&id.cluster_id).is_none() {
            return Err(Error::NotFound(format!(
                "volume {volume_id} does not exist"
            )));
        }
        Ok(id)
    }
}

fn not_found_source(id: &str) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::InvalidArgument(_) => Error::NotFound(format!("source {id} does not exist")),
        e => e,
    }
}

/// For a step after the image may exist. Whatever failed, the caller must retry rather than give
/// up: the external-provisioner forgets a request that got a final code, and the half-made image
/// leaks. A timeout keeps its own code (DeadlineExceeded); anything else becomes Aborted.
fn unfinished(context: impl Into<String>) -> impl FnOnce(CephError) -> Error {
    let context = context.into();
    move |source| {
        if source.timed_out() {
            Error::Ceph { context, source }
        } else {
            Error::Aborted(format!(
                "{context}: {source}; the image exists but is not complete: retry"
            ))
        }
    }
}

fn ignore_exists(r: Result<(), CephError>) -> Result<(), CephError> {
    match r {
        Err(e) if e.exists() => Ok(()),
        r => r,
    }
}

fn ignore_missing(r: Result<(), CephError>) -> Result<(), CephError> {
    match r {
        Err(e) if e.not_found() => Ok(()),
        r => r,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The image a clone came from, also after it was flattened. Clones stay within their pool.
fn parent_name(img: &Image) -> Result<Option<String>, CephError> {
    match img.parent()? {
        Some(p) => Ok(Some(p.image_name)),
        None => img.metadata_get(PARENT_KEY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_rounded_up_to_whole_mib_within_limits() {
        assert_eq!(size_for(1, 0).unwrap(), MIB);
        assert_eq!(size_for(0, 0).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(0, 10 * MIB as i64).unwrap(), 10 * MIB);
        assert_eq!(size_for(5 * MIB as i64 + 1, 0).unwrap(), 6 * MIB);
        assert!(matches!(
            size_for(5 * MIB as i64 + 1, 5 * MIB as i64 + 2),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(size_for(-1, 0), Err(Error::InvalidArgument(_))));
        assert!(matches!(size_for(i64::MAX, 0), Err(Error::OutOfRange(_))));
        assert!(matches!(size_for(10, 5), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn names_of_zero_and_more_than_128_bytes_are_invalid() {
        assert!(validate_name("name", "").is_err());
        assert!(validate_name("name", &"a".repeat(129)).is_err());
        assert!(validate_name("name", &"a".repeat(128)).is_ok());
        assert!(validate_name("name", "a\u{0}b").is_err());
    }
}
