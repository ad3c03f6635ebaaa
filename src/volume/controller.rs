//! Controller-side volume lifecycle on Ceph: create (empty, from snapshot, from volume), delete,
//! expand, snapshots, attachments with fencing, listing and capacity.
//!
//! Idempotency comes from deterministic names (`naming`): a retried request finds the image it
//! made before, and a half-made one is completed or removed. Snapshots are images of their own
//! (a clone of the source plus one snapshot), so deleting a source never breaks its snapshots.
//! An image that still has dependents goes to the RBD trash and is swept when they are gone.

use super::naming::{self, SNAPSHOT_PREFIX, VOLUME_PREFIX};
use super::{
    ClusterConfig, ClusterEntry, Credentials, Error, InFlight, SnapshotId, VolumeId, VolumeParams,
};
use crate::ceph::pool::{blocking, with_ioctx};
use crate::ceph::{CephError, Connection, ConnectionPool, Image, ImageOptions, IoCtx};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

pub const MIB: u64 = 1 << 20;
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Larger requests are refused with OutOfRange rather than handed to librbd.
pub const MAX_SIZE: u64 = 1 << 50;
const ATTACHMENTS_KEY: &str = "rook-rbd.attachments";
const NAME_KEY: &str = "rook-rbd.name";
/// Per-image metadata that must not carry over from a parent to its clone.
const INHERITED_KEYS: [&str; 6] = [
    ATTACHMENTS_KEY,
    NAME_KEY,
    PARENT_KEY,
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
];
/// The source image of a clone that has been flattened.
const PARENT_KEY: &str = "rook-rbd.parent";
const NODE_OBJECT_PREFIX: &str = "rook-rbd.node.";
const TRASH_SOURCE_USER: i32 = 0;
/// Blocking tasks ListVolumes spreads its image opens over.
const LIST_PARALLELISM: usize = 8;

/// A blocking step's result: Ceph failed (outer), or Ceph answered and the request is refused (inner).
type Outcome<T> = Result<Result<T, Error>, CephError>;

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
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            max_clone_depth: 8,
            create_concurrency: 32,
            create_queue_timeout: Duration::from_secs(20),
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
    /// Image-name prefixes this controller has created with, for listing and trash sweeps.
    prefixes: Mutex<BTreeSet<String>>,
    /// Per pool: whether the RBD trash may hold images of ours.
    trash_state: Arc<Mutex<HashMap<String, TrashState>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrashState {
    /// Not swept by this process yet: an earlier one may have left something.
    Unknown,
    /// Something of ours is there, still waiting for its dependents.
    Pending,
    Sweeping,
    /// A delete arrived during a sweep: sweep once more when it ends.
    SweepAgain,
    Clean,
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

fn validate_node_id(node: &str) -> Result<(), Error> {
    if node.is_empty() {
        return Err(Error::InvalidArgument("node_id is required".into()));
    }
    if node.len() > 256 || node.chars().any(|c| c.is_control() || c == '/') {
        return Err(Error::InvalidArgument(
            "node_id is not a valid node name".into(),
        ));
    }
    Ok(())
}

pub fn node_object(node: &str) -> String {
    format!("{NODE_OBJECT_PREFIX}{node}")
}

/// The attachment record. An unreadable record is an error, never "no attachments": fencing
/// must fail closed.
fn read_attachments(img: &Image) -> Result<Vec<Attachment>, CephError> {
    match img.metadata_get(ATTACHMENTS_KEY)? {
        None => Ok(Vec::new()),
        Some(s) => serde_json::from_str(&s)
            .map_err(|_| CephError::new("parse attachments", ATTACHMENTS_KEY, -libc::EBADMSG)),
    }
}

/// How many clone generations stand above this image.
fn clone_depth(conn: &Connection, img: &Image) -> Result<u32, CephError> {
    let mut depth = 0;
    let mut parent = img.parent()?;
    while let Some(p) = parent {
        depth += 1;
        if depth > 64 {
            break;
        }
        let io = conn.ioctx(&p.pool)?;
        let pimg = io.open_image_by_id(&p.image_id)?;
        parent = pimg.parent()?;
    }
    Ok(depth)
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
            clusters,
            pool,
            default_creds,
            inflight: InFlight::default(),
            create_slots: Semaphore::new(cfg.create_concurrency.max(1)),
            cfg,
            prefixes: Mutex::new(prefixes),
            trash_state: Default::default(),
        }
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
            && crate::csi::health::banner_check(&entry.monitors, Duration::from_secs(2))
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

    /// A pool's I/O context; a pool that does not exist is an InvalidArgument, not an Internal.
    async fn ioctx(
        &self,
        cluster_id: &str,
        pool: &str,
        creds: &Credentials,
    ) -> Result<Arc<IoCtx>, Error> {
        let conn = self.connect(cluster_id, creds).await?;
        self.pool_ioctx(conn, cluster_id, pool).await
    }

    /// A pool's I/O context on a connection the caller already holds.
    async fn pool_ioctx(
        &self,
        conn: Arc<Connection>,
        cluster_id: &str,
        pool: &str,
    ) -> Result<Arc<IoCtx>, Error> {
        if let Some(io) = conn.cached_ioctx(pool) {
            return Ok(io);
        }
        let p = pool.to_string();
        blocking(move || conn.ioctx(&p)).await.map_err(|e| {
            if e.not_found() {
                Error::InvalidArgument(format!(
                    "pool {pool:?} does not exist in cluster {cluster_id}"
                ))
            } else {
                Error::ceph(format!("opening pool {pool}"))(e)
            }
        })
    }

    // ---------------------------------------------------------------- create / delete

    pub async fn create_volume(&self, req: CreateRequest) -> Result<Volume, Error> {
        validate_name("name", &req.name)?;
        let size = size_for(req.required_bytes, req.limit_bytes)?;
        let features = req.params.features()?;
        if let Some(p) = &req.params.volume_name_prefix {
            if p.starts_with(SNAPSHOT_PREFIX) || p.starts_with(naming::TEMP_SNAP_PREFIX) {
                return Err(Error::InvalidArgument(
                    "volumeNamePrefix may not start with csi-snap- or csi-tmp-".into(),
                ));
            }
        }
        self.cluster(&req.params.cluster_id)?;
        let image = naming::volume_image(req.params.volume_name_prefix.as_deref(), &req.name);
        let id = VolumeId::new(&req.params.cluster_id, &req.params.pool, &image);
        if id.encode().len() > super::id::MAX_ID_LEN {
            return Err(Error::InvalidArgument(
                "clusterID and pool are too long for a 128-byte volume ID".into(),
            ));
        }
        let _guard = self
            .inflight
            .try_enter(&format!("create/{}", req.name))
            .ok_or_else(|| Error::aborted_in_flight(&req.name))?;
        let _slot =
            tokio::time::timeout(self.cfg.create_queue_timeout, self.create_slots.acquire())
                .await
                .map_err(|_| {
                    Error::Unavailable("too many CreateVolume calls in flight; try again".into())
                })?
                .map_err(|_| Error::Unavailable("shutting down".into()))?;
        if let Some(p) = &req.params.volume_name_prefix {
            self.prefixes.lock().unwrap().insert(p.clone());
        }

        let conn = self.connect(&req.params.cluster_id, &req.creds).await?;
        let io = self
            .pool_ioctx(conn.clone(), &req.params.cluster_id, &req.params.pool)
            .await?;
        let opts = ImageOptions {
            features,
            data_pool: req.params.data_pool.clone(),
            order: None,
        };
        let max_depth = self.cfg.max_clone_depth;
        let k8s_meta: Vec<(String, String)> = req
            .params
            .other
            .iter()
            .filter(|(k, _)| k.starts_with("csi.storage.k8s.io/p"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let name = req.name.clone();

        let source = match &req.source {
            None => None,
            Some(Source::Snapshot(sid)) => {
                let snap = SnapshotId::decode(sid).map_err(|e| Error::NotFound(e.to_string()))?;
                if !naming::is_snapshot_image(&snap.volume.image) {
                    return Err(Error::NotFound(format!("snapshot {sid} does not exist")));
                }
                if snap.volume.cluster_id != req.params.cluster_id {
                    return Err(Error::InvalidArgument(
                        "a snapshot can only be restored within its own cluster".into(),
                    ));
                }
                let sio = self
                    .ioctx(&snap.volume.cluster_id, &snap.volume.pool, &req.creds)
                    .await
                    .map_err(not_found_source(sid))?;
                Some((sio, snap.volume.image.clone(), true))
            }
            Some(Source::Volume(vid)) => {
                let src = VolumeId::decode(vid).map_err(|e| Error::NotFound(e.to_string()))?;
                if naming::is_snapshot_image(&src.image) {
                    return Err(Error::NotFound(format!("volume {vid} does not exist")));
                }
                if src.cluster_id != req.params.cluster_id {
                    return Err(Error::InvalidArgument(
                        "a volume can only be cloned within its own cluster".into(),
                    ));
                }
                let sio = self
                    .ioctx(&src.cluster_id, &src.pool, &req.creds)
                    .await
                    .map_err(not_found_source(vid))?;
                Some((sio, src.image.clone(), false))
            }
        };

        let img_name = image.clone();
        let made = blocking(move || {
            let made = match source {
                None => create_plain(&io, &img_name, size, &opts)?,
                Some((sio, parent, from_snapshot)) => create_clone(
                    &conn,
                    &sio,
                    &parent,
                    from_snapshot,
                    &io,
                    &img_name,
                    size,
                    &opts,
                    max_depth,
                )?,
            };
            // Kubernetes' PVC name and namespace (--extra-create-metadata) go on the image for
            // operators; a bare CSI call skips this round trip.
            if made.is_ok() && !k8s_meta.is_empty() {
                let img = io.open_image(&img_name)?;
                img.metadata_set(NAME_KEY, &name)?;
                for (k, v) in &k8s_meta {
                    img.metadata_set(k, v)?;
                }
            }
            Ok(made)
        })
        .await
        .map_err(Error::ceph(format!("creating image {image}")))?;
        made?;

        Ok(Volume {
            context: req.params.volume_context(&image),
            id,
            size,
            source: req.source,
        })
    }

    /// For deletes: the ID when it names an image of the wanted kind in a configured cluster.
    /// A malformed or foreign ID means there is nothing to delete (`None`), which is success.
    fn id_to_delete(
        &self,
        raw: &str,
        field: &str,
        snapshot: bool,
    ) -> Result<Option<VolumeId>, Error> {
        if raw.is_empty() {
            return Err(Error::InvalidArgument(format!("{field} is required")));
        }
        Ok(VolumeId::decode(raw).ok().filter(|id| {
            naming::is_snapshot_image(&id.image) == snapshot
                && self.clusters.get(&id.cluster_id).is_some()
        }))
    }

    pub async fn delete_volume(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), Error> {
        let Some(id) = self.id_to_delete(volume_id, "volume_id", false)? else {
            return Ok(());
        };
        let creds = self.creds(secrets)?;
        let _guard = self
            .inflight
            .try_enter(volume_id)
            .ok_or_else(|| Error::aborted_in_flight(volume_id))?;
        let io = match self.ioctx(&id.cluster_id, &id.pool, &creds).await {
            Err(Error::InvalidArgument(_)) => return Ok(()),
            r => r?,
        };
        let image = id.image.clone();
        let trashed = with_ioctx(io.clone(), move |io| remove_or_trash(io, &image))
            .await
            .map_err(Error::ceph(format!("deleting image {}", id.image)))?
            .map_err(|why| Error::FailedPrecondition(format!("volume {volume_id} {why}")))?;
        if trashed {
            tracing::info!(
                volume.id = volume_id,
                "image has dependents; moved to the RBD trash until they are gone"
            );
        }
        self.sweep_trash_later(io, trashed);
        Ok(())
    }

    /// Removes trashed images of ours whose dependents have gone. Runs in the background.
    /// Removes trashed images of ours whose dependents have gone, in the background.
    ///
    /// Costs a round trip only when it can find something: for a pool where this process trashed
    /// an image, or the first time it deletes in a pool (an earlier process may have trashed some).
    /// A pool's state is "clean" once a sweep leaves none of ours behind.
    fn sweep_trash_later(&self, io: Arc<IoCtx>, trashed_now: bool) {
        {
            let mut st = self.trash_state.lock().unwrap();
            let state = st
                .entry(io.pool().to_string())
                .or_insert(TrashState::Unknown);
            match (*state, trashed_now) {
                (TrashState::Sweeping, _) => {
                    *state = TrashState::SweepAgain;
                    return;
                }
                (TrashState::SweepAgain, _) => return,
                (TrashState::Clean, false) => return,
                _ => *state = TrashState::Sweeping,
            }
        }
        let prefixes: Vec<String> = self
            .prefixes
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .chain([SNAPSHOT_PREFIX.to_string()])
            .collect();
        let states = self.trash_state.clone();
        tokio::spawn(async move {
            loop {
                let p = prefixes.clone();
                let res = with_ioctx(io.clone(), move |io| {
                    // Removing a trashed clone can free its trashed parent: go round while a
                    // pass makes progress.
                    let mut removed = 0;
                    loop {
                        let (mut now, mut left) = (0, 0);
                        for e in io.trash_list()? {
                            if e.source != TRASH_SOURCE_USER
                                || !p.iter().any(|p| e.name.starts_with(p))
                            {
                                continue;
                            }
                            match io.trash_remove(&e.id) {
                                Ok(()) => now += 1,
                                Err(_) => left += 1,
                            }
                        }
                        removed += now;
                        if now == 0 || left == 0 {
                            return Ok((removed, left));
                        }
                    }
                })
                .await;
                let left = match res {
                    Ok((removed, left)) => {
                        if removed > 0 {
                            tracing::info!(removed, left, "swept images from the RBD trash");
                        }
                        left
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "trash sweep failed");
                        1
                    }
                };
                let mut st = states.lock().unwrap();
                let state = st
                    .entry(io.pool().to_string())
                    .or_insert(TrashState::Unknown);
                match *state {
                    TrashState::SweepAgain => *state = TrashState::Sweeping,
                    _ => {
                        *state = if left == 0 {
                            TrashState::Clean
                        } else {
                            TrashState::Pending
                        };
                        return;
                    }
                }
            }
        });
    }

    // ---------------------------------------------------------------- expand / get / validate

    pub async fn expand_volume(
        &self,
        volume_id: &str,
        required: i64,
        limit: i64,
        secrets: &HashMap<String, String>,
    ) -> Result<u64, Error> {
        let id = self.decode_existing(volume_id)?;
        let size = size_for(required, limit)?;
        let creds = self.creds(secrets)?;
        let _guard = self
            .inflight
            .try_enter(volume_id)
            .ok_or_else(|| Error::aborted_in_flight(volume_id))?;
        let io = self.ioctx(&id.cluster_id, &id.pool, &creds).await?;
        let image = id.image.clone();
        with_ioctx(io, move |io| {
            let img = io.open_image(&image)?;
            let cur = img.size()?;
            if size > cur {
                img.resize(size)?;
                Ok(size)
            } else {
                Ok(cur)
            }
        })
        .await
        .map_err(Error::ceph(format!("expanding {}", id.image)))
    }

    fn decode_existing(&self, volume_id: &str) -> Result<VolumeId, Error> {
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

    /// Size and attachments of an existing volume; NotFound when it is gone.
    pub async fn get_volume(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<VolumeInfo, Error> {
        let id = self.decode_existing(volume_id)?;
        let creds = self.creds(secrets)?;
        let io = self
            .ioctx(&id.cluster_id, &id.pool, &creds)
            .await
            .map_err(|e| match e {
                Error::InvalidArgument(m) => Error::NotFound(m),
                e => e,
            })?;
        let image = id.image.clone();
        let (size, attachments) = with_ioctx(io, move |io| {
            let img = io.open_image_read_only(&image)?;
            Ok((img.size()?, read_attachments(&img)?))
        })
        .await
        .map_err(|e| {
            if e.not_found() {
                Error::NotFound(format!("volume {volume_id} does not exist"))
            } else {
                Error::ceph("reading volume")(e)
            }
        })?;
        Ok(VolumeInfo {
            id,
            size,
            attachments,
        })
    }

    // ---------------------------------------------------------------- publish / fencing

    pub async fn publish(
        &self,
        volume_id: &str,
        node: &str,
        readonly: bool,
        exclusive: bool,
        secrets: &HashMap<String, String>,
    ) -> Result<HashMap<String, String>, Error> {
        validate_node_id(node)?;
        let id = self.decode_existing(volume_id)?;
        let creds = self.creds(secrets)?;
        let _guard = self
            .inflight
            .try_enter(volume_id)
            .ok_or_else(|| Error::aborted_in_flight(volume_id))?;
        self.require_node(&id.cluster_id, node, &creds).await?;
        let io = self.ioctx(&id.cluster_id, &id.pool, &creds).await?;
        let image = id.image.clone();
        let want = Attachment {
            node: node.to_string(),
            readonly,
            exclusive,
        };
        let outcome = with_ioctx(io, move |io| {
            let img = io.open_image(&image)?;
            let mut list = read_attachments(&img)?;
            if let Some(existing) = list.iter().find(|a| a.node == want.node) {
                return Ok(if *existing == want {
                    Ok(())
                } else {
                    Err(Fence::Incompatible)
                });
            }
            if let Some(other) = list.iter().find(|a| a.exclusive || want.exclusive) {
                return Ok(Err(Fence::Held(other.node.clone())));
            }
            list.push(want);
            img.metadata_set(
                ATTACHMENTS_KEY,
                &serde_json::to_string(&list).unwrap_or_default(),
            )?;
            Ok(Ok(()))
        })
        .await
        .map_err(|e| {
            if e.not_found() {
                Error::NotFound(format!("volume {volume_id} does not exist"))
            } else {
                Error::ceph("publishing")(e)
            }
        })?;
        match outcome {
            Ok(()) => Ok(HashMap::from([
                ("attachedNode".to_string(), node.to_string()),
                ("readOnly".to_string(), readonly.to_string()),
            ])),
            Err(Fence::Incompatible) => Err(Error::AlreadyExists(format!(
                "volume {volume_id} is already published to node {node} with a different access mode or read-only flag"
            ))),
            Err(Fence::Held(other)) => Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is published to node {other}; a single-node volume cannot also be published to {node}"
            ))),
        }
    }

    pub async fn unpublish(
        &self,
        volume_id: &str,
        node: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), Error> {
        if volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let id = match self.decode_existing(volume_id) {
            Ok(id) => id,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let creds = self.creds(secrets)?;
        let _guard = self
            .inflight
            .try_enter(volume_id)
            .ok_or_else(|| Error::aborted_in_flight(volume_id))?;
        let io = self.ioctx(&id.cluster_id, &id.pool, &creds).await?;
        let image = id.image.clone();
        let node = node.to_string();
        let res = with_ioctx(io, move |io| {
            let img = io.open_image(&image)?;
            let mut list = read_attachments(&img)?;
            let before = list.len();
            // An empty node_id means "from every node" (the spec allows it).
            list.retain(|a| !node.is_empty() && a.node != node);
            if list.len() != before {
                if list.is_empty() {
                    img.metadata_remove(ATTACHMENTS_KEY)?;
                } else {
                    img.metadata_set(
                        ATTACHMENTS_KEY,
                        &serde_json::to_string(&list).unwrap_or_default(),
                    )?;
                }
            }
            Ok(())
        })
        .await;
        match res {
            Err(e) if e.not_found() => Ok(()),
            r => r.map_err(Error::ceph("unpublishing")),
        }
    }

    async fn require_node(
        &self,
        cluster_id: &str,
        node: &str,
        creds: &Credentials,
    ) -> Result<(), Error> {
        let entry = self.cluster(cluster_id)?;
        let io = self.ioctx(cluster_id, entry.registry_pool(), creds).await?;
        let obj = node_object(node);
        let known = with_ioctx(io, move |io| io.exists(&obj))
            .await
            .map_err(Error::ceph("looking up the node registry"))?;
        if known {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "node {node} has not registered with cluster {cluster_id}"
            )))
        }
    }

    /// Written by the node plugin at start, so the controller can tell real nodes from typos.
    pub async fn register_node(&self, node: &str, creds: &Credentials) -> Result<(), Error> {
        validate_node_id(node)?;
        for entry in self.clusters.entries() {
            let io = self
                .ioctx(&entry.cluster_id, entry.registry_pool(), creds)
                .await?;
            let obj = node_object(node);
            let body = serde_json::json!({"node": node, "registered": unix_now()}).to_string();
            with_ioctx(io, move |io| io.write_full(&obj, body.as_bytes()))
                .await
                .map_err(Error::ceph(format!(
                    "registering node {node} in cluster {}",
                    entry.cluster_id
                )))?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- snapshots

    pub async fn create_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Snapshot, Error> {
        validate_name("name", name)?;
        if source_volume.is_empty() {
            return Err(Error::InvalidArgument(
                "source_volume_id is required".into(),
            ));
        }
        let src = self.decode_existing(source_volume)?;
        let creds = self.creds(secrets)?;
        let _guard = self
            .inflight
            .try_enter(&format!("snapshot/{name}"))
            .ok_or_else(|| Error::aborted_in_flight(name))?;
        let conn = self.connect(&src.cluster_id, &creds).await?;
        let io = self
            .pool_ioctx(conn.clone(), &src.cluster_id, &src.pool)
            .await
            .map_err(not_found_source(source_volume))?;
        let snap_image = naming::snapshot_image(name);
        let id = SnapshotId {
            volume: VolumeId::new(&src.cluster_id, &src.pool, &snap_image),
        };
        let source_image = src.image.clone();
        let max_depth = self.cfg.max_clone_depth;
        let opts = ImageOptions {
            features: super::params::parse_features(super::params::DEFAULT_FEATURES)?,
            ..Default::default()
        };
        let (size, created) = blocking(move || -> Outcome<(u64, (i64, i32))> {
            let size = match io.open_image_read_only(&source_image) {
                Err(e) if e.not_found() => {
                    return Ok(Err(Error::NotFound(format!(
                        "source volume {source_image} does not exist"
                    ))))
                }
                r => r?.size()?,
            };
            let img = match io.open_image(&snap_image) {
                // Complete from an earlier call: only the size of the source may have moved on.
                Ok(img) if img.snaps()?.iter().any(|s| s.name == snap_image) => img,
                _ => {
                    if let Err(e) = create_clone(
                        &conn,
                        &io,
                        &source_image,
                        false,
                        &io,
                        &snap_image,
                        size,
                        &opts,
                        max_depth,
                    )? {
                        return Ok(Err(e));
                    }
                    let img = io.open_image(&snap_image)?;
                    ignore_exists(img.snap_create(&snap_image))?;
                    img
                }
            };
            if parent_name(&img)?.as_deref() != Some(source_image.as_str()) {
                return Ok(Err(Error::AlreadyExists(
                    "a snapshot with this name exists for another source volume".into(),
                )));
            }
            let snap = img.snaps()?.into_iter().find(|s| s.name == snap_image);
            let snap = snap.ok_or_else(|| {
                CephError::new("rbd_snap_list", snap_image.clone(), -libc::ENOENT)
            })?;
            Ok(Ok((snap.size, img.snap_timestamp(snap.id)?)))
        })
        .await
        .map_err(Error::ceph(format!("snapshotting {}", src.image)))??;
        Ok(Snapshot {
            id,
            source_volume: src,
            size,
            created,
        })
    }

    pub async fn delete_snapshot(
        &self,
        snapshot_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), Error> {
        let Some(id) = self.id_to_delete(snapshot_id, "snapshot_id", true)? else {
            return Ok(());
        };
        let id = SnapshotId { volume: id };
        let creds = self.creds(secrets)?;
        let _guard = self
            .inflight
            .try_enter(snapshot_id)
            .ok_or_else(|| Error::aborted_in_flight(snapshot_id))?;
        let io = match self
            .ioctx(&id.volume.cluster_id, &id.volume.pool, &creds)
            .await
        {
            Err(Error::InvalidArgument(_)) => return Ok(()),
            r => r?,
        };
        let image = id.volume.image.clone();
        let trashed = with_ioctx(io.clone(), move |io| {
            match io.open_image(&image) {
                Ok(img) => ignore_missing(img.snap_remove(&image))?,
                Err(e) if e.not_found() => return Ok(Ok(false)),
                Err(e) => return Err(e),
            }
            remove_or_trash(io, &image)
        })
        .await
        .map_err(Error::ceph(format!(
            "deleting snapshot {}",
            id.volume.image
        )))?
        .map_err(|why| Error::FailedPrecondition(format!("snapshot {snapshot_id} {why}")))?;
        self.sweep_trash_later(io, trashed);
        Ok(())
    }

    /// One snapshot by ID; `None` when it does not exist.
    async fn snapshot_by_id(
        &self,
        id: &SnapshotId,
        creds: &Credentials,
    ) -> Result<Option<Snapshot>, Error> {
        let io = match self
            .ioctx(&id.volume.cluster_id, &id.volume.pool, creds)
            .await
        {
            Err(Error::InvalidArgument(_)) => return Ok(None),
            r => r?,
        };
        let (image, cluster) = (id.volume.image.clone(), id.volume.cluster_id.clone());
        with_ioctx(io, move |io| read_snapshot(io, &cluster, &image))
            .await
            .map_err(Error::ceph("reading snapshot"))
    }

    pub async fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume: &str,
        max_entries: i32,
        token: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Page<Snapshot>, Error> {
        let creds = self.creds(secrets)?;
        let mut all = Vec::new();
        if !snapshot_id.is_empty() {
            if let Ok(id) = SnapshotId::decode(snapshot_id) {
                if naming::is_snapshot_image(&id.volume.image)
                    && self.clusters.get(&id.volume.cluster_id).is_some()
                {
                    all.extend(self.snapshot_by_id(&id, &creds).await?);
                }
            }
            all.retain(|s: &Snapshot| {
                source_volume.is_empty() || s.source_volume.encode() == source_volume
            });
        } else {
            let scope = match source_volume {
                "" => None,
                v => match VolumeId::decode(v) {
                    Ok(v) if self.clusters.get(&v.cluster_id).is_some() => Some(v),
                    _ => {
                        return Ok(Page {
                            entries: vec![],
                            next_token: String::new(),
                        })
                    }
                },
            };
            for (cluster, pool) in self.pools(scope.as_ref(), &creds).await? {
                let io = self.ioctx(&cluster, &pool, &creds).await?;
                let c = cluster.clone();
                let found = with_ioctx(io, move |io| {
                    let mut out = Vec::new();
                    for name in io
                        .list_images()?
                        .into_iter()
                        .filter(|n| naming::is_snapshot_image(n))
                    {
                        match read_snapshot(io, &c, &name) {
                            Ok(Some(s)) => out.push(s),
                            Ok(None) => {}
                            Err(e) if e.not_found() => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(out)
                })
                .await
                .map_err(Error::ceph(format!("listing snapshots in {pool}")))?;
                all.extend(
                    found
                        .into_iter()
                        .filter(|s| scope.as_ref().is_none_or(|v| &s.source_volume == v)),
                );
            }
        }
        paginate(all, |s| s.id.encode(), max_entries, token)
    }

    // ---------------------------------------------------------------- listing / capacity

    /// (cluster, pool) pairs to search: RBD pools of each cluster, or just the one in `scope`.
    async fn pools(
        &self,
        scope: Option<&VolumeId>,
        creds: &Credentials,
    ) -> Result<Vec<(String, String)>, Error> {
        if let Some(v) = scope {
            return Ok(vec![(v.cluster_id.clone(), v.pool.clone())]);
        }
        let mut out = Vec::new();
        let mut ids: Vec<&ClusterEntry> = self.clusters.entries().collect();
        ids.sort_by(|a, b| a.cluster_id.cmp(&b.cluster_id));
        for entry in ids {
            let conn = self.connect(&entry.cluster_id, creds).await?;
            let raw = blocking(move || {
                conn.mon_command(r#"{"prefix":"osd pool ls","detail":"detail","format":"json"}"#)
            })
            .await
            .map_err(Error::ceph("listing pools"))?;
            let pools: Vec<serde_json::Value> = serde_json::from_slice(&raw).unwrap_or_default();
            for p in pools {
                let is_rbd = p
                    .get("application_metadata")
                    .and_then(|m| m.get("rbd"))
                    .is_some();
                if let (true, Some(name)) = (is_rbd, p.get("pool_name").and_then(|n| n.as_str())) {
                    out.push((entry.cluster_id.clone(), name.to_string()));
                }
            }
        }
        Ok(out)
    }

    pub async fn list_volumes(
        &self,
        max_entries: i32,
        token: &str,
    ) -> Result<Page<VolumeInfo>, Error> {
        let creds = self.creds(&HashMap::new())?;
        if max_entries < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let prefixes: Vec<String> = self.prefixes.lock().unwrap().iter().cloned().collect();
        // IDs come from names alone, so list, page, and open only the page's images.
        let mut ids = Vec::new();
        let mut ioctxs = HashMap::new();
        for (cluster, pool) in self.pools(None, &creds).await? {
            let io = self.ioctx(&cluster, &pool, &creds).await?;
            let names = with_ioctx(io.clone(), |io| io.list_images())
                .await
                .map_err(Error::ceph(format!("listing volumes in {pool}")))?;
            ids.extend(
                names
                    .into_iter()
                    .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
                    .map(|n| VolumeId::new(&cluster, &pool, &n)),
            );
            ioctxs.insert((cluster, pool), io);
        }
        let page = paginate(ids, |v| v.encode(), max_entries, token)?;
        // Opening an image costs round trips: spread the page over a few blocking tasks.
        let chunk = page.entries.len().div_ceil(LIST_PARALLELISM).max(1);
        let mut tasks = Vec::new();
        for part in page.entries.chunks(chunk) {
            let part = part.to_vec();
            let ioctxs: Vec<Arc<IoCtx>> = part
                .iter()
                .map(|id| ioctxs[&(id.cluster_id.clone(), id.pool.clone())].clone())
                .collect();
            // Spawned now, so the parts run at the same time.
            tasks.push(tokio::task::spawn_blocking(
                move || -> Result<Vec<VolumeInfo>, CephError> {
                    let mut out = Vec::with_capacity(part.len());
                    for (id, io) in part.into_iter().zip(ioctxs) {
                        let img = match io.open_image_read_only(&id.image) {
                            // Deleted since the listing: not part of the answer.
                            Err(e) if e.not_found() => continue,
                            r => r?,
                        };
                        out.push(VolumeInfo {
                            size: img.size()?,
                            attachments: read_attachments(&img)?,
                            id,
                        });
                    }
                    Ok(out)
                },
            ));
        }
        let mut entries = Vec::with_capacity(page.entries.len());
        for t in tasks {
            let part = t
                .await
                .map_err(|e| Error::Internal(format!("listing volumes: {e}")))?;
            entries.extend(part.map_err(Error::ceph("reading volumes"))?);
        }
        Ok(Page {
            entries,
            next_token: page.next_token,
        })
    }

    /// Bytes available for new volumes in a pool (`max_avail` from `ceph df`), or in the whole
    /// cluster when no pool is given.
    pub async fn capacity(&self, params: &HashMap<String, String>) -> Result<u64, Error> {
        let creds = self.creds(&HashMap::new())?;
        let ids: Vec<String> = match params.get("clusterID") {
            Some(c) => {
                self.cluster(c)?;
                vec![c.clone()]
            }
            None => self
                .clusters
                .entries()
                .map(|e| e.cluster_id.clone())
                .collect(),
        };
        let pool = params.get("pool").cloned();
        let mut total = 0u64;
        for id in ids {
            let conn = self.connect(&id, &creds).await?;
            let raw = blocking(move || conn.mon_command(r#"{"prefix":"df","format":"json"}"#))
                .await
                .map_err(Error::ceph("ceph df"))?;
            let df: serde_json::Value = serde_json::from_slice(&raw)
                .map_err(|e| Error::Internal(format!("parsing ceph df: {e}")))?;
            total += match &pool {
                Some(p) => df["pools"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|x| x["name"] == p.as_str()))
                    .and_then(|x| x["stats"]["max_avail"].as_u64())
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!("pool {p:?} does not exist in cluster {id}"))
                    })?,
                None => df["stats"]["total_avail_bytes"].as_u64().unwrap_or(0),
            };
        }
        Ok(total)
    }

    /// Whether `volume_id` names an existing volume (for ValidateVolumeCapabilities).
    pub async fn exists(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<VolumeId, Error> {
        self.get_volume(volume_id, secrets).await.map(|v| v.id)
    }
}

enum Fence {
    Incompatible,
    Held(String),
}

fn not_found_source(id: &str) -> impl FnOnce(Error) -> Error + '_ {
    move |e| match e {
        Error::InvalidArgument(_) => Error::NotFound(format!("source {id} does not exist")),
        e => e,
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

/// Opens an image; one whose creation was interrupted before its header existed is removed, and
/// `None` says so, so the caller can create it again.
fn open_or_discard_partial(io: &IoCtx, name: &str) -> Result<Option<Image>, CephError> {
    match io.open_image(name) {
        Ok(img) => Ok(Some(img)),
        Err(e) if e.not_found() => {
            tracing::warn!(image = name, "found a half-created image; removing it");
            ignore_missing(io.remove_image(name))?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Creates an empty image, or accepts the one a previous attempt made if it matches.
fn create_plain(io: &IoCtx, name: &str, size: u64, opts: &ImageOptions) -> Outcome<()> {
    for _ in 0..2 {
        match io.create_image(name, size, opts) {
            Ok(()) => return Ok(Ok(())),
            Err(e) if e.exists() => {}
            Err(e) => return Err(e),
        }
        let Some(img) = open_or_discard_partial(io, name)? else {
            continue;
        };
        if img.parent()?.is_some() {
            return Ok(Err(Error::AlreadyExists(format!(
                "volume {name} exists with a content source"
            ))));
        }
        let have = img.size()?;
        if have != size {
            return Ok(Err(Error::AlreadyExists(format!(
                "volume exists with size {have}, not {size}"
            ))));
        }
        return Ok(Ok(()));
    }
    Ok(Err(Error::Aborted(format!(
        "image {name} keeps appearing half-made; retry"
    ))))
}

/// Creates `name` as a clone of a snapshot image, or of a volume through a temporary snapshot.
#[allow(clippy::too_many_arguments)]
fn create_clone(
    conn: &Connection,
    sio: &IoCtx,
    parent: &str,
    from_snapshot: bool,
    io: &IoCtx,
    name: &str,
    size: u64,
    opts: &ImageOptions,
    max_depth: u32,
) -> Outcome<()> {
    let src = match sio.open_image(parent) {
        Err(e) if e.not_found() => {
            return Ok(Err(Error::NotFound(format!(
                "content source {parent} does not exist"
            ))))
        }
        r => r?,
    };
    let snap = if from_snapshot {
        parent.to_string()
    } else {
        naming::temp_snap(name)
    };
    let src_size = if from_snapshot {
        match src.snaps()?.into_iter().find(|s| s.name == snap) {
            Some(s) => s.size,
            None => {
                return Ok(Err(Error::NotFound(format!(
                    "snapshot {parent} does not exist"
                ))))
            }
        }
    } else {
        src.size()?
    };
    if size < src_size {
        return Ok(Err(Error::OutOfRange(format!(
            "requested {size} bytes is smaller than the source's {src_size}"
        ))));
    }
    for attempt in 0..3 {
        if !from_snapshot {
            ignore_exists(src.snap_create(&snap))?;
        }
        match sio.clone_image(parent, &snap, io, name, opts) {
            Ok(()) => {}
            Err(e) if e.exists() => {}
            // A crash during an earlier attempt's snapshot removal can leave the temporary
            // snapshot listed but unusable. If the clone is not there yet, make the snapshot anew.
            Err(e) if e.not_found() && !from_snapshot && attempt < 2 => {
                if io.open_image(name).is_err() {
                    tracing::warn!(image = name, snap = %snap, "temporary snapshot unusable; making it again");
                    ignore_missing(src.snap_remove(&snap))?;
                    continue;
                }
            }
            Err(e) => return Err(e),
        }
        let Some(img) = open_or_discard_partial(io, name)? else {
            continue;
        };
        if parent_name(&img)?.as_deref() != Some(parent) {
            return Ok(Err(Error::AlreadyExists(format!(
                "volume {name} exists with a different content source"
            ))));
        }
        let have = img.size()?;
        if have != size && have != src_size {
            return Ok(Err(Error::AlreadyExists(format!(
                "volume exists with size {have}, not {size}"
            ))));
        }
        if have < size {
            img.resize(size)?;
        }
        // librbd copies the parent's image metadata into a clone: attachments and names are the
        // parent's, not ours. (Also on a retry: the first attempt may have died before this.)
        for key in INHERITED_KEYS {
            img.metadata_remove(key)?;
        }
        if !from_snapshot {
            // With clone v2 the snapshot moves to the trash namespace and lives as long as the clone.
            ignore_missing(src.snap_remove(&snap))?;
        }
        if clone_depth(conn, &img)? > max_depth {
            tracing::info!(
                image = name,
                "clone chain is deeper than {max_depth}; flattening"
            );
            // Remember where it came from: idempotency and ListSnapshots still need to know.
            img.metadata_set(PARENT_KEY, parent)?;
            img.flatten()?;
        }
        return Ok(Ok(()));
    }
    Ok(Err(Error::Aborted(format!(
        "image {name} keeps appearing half-made; retry"
    ))))
}

/// Removes an image, or moves it to the trash when snapshots or clones still depend on it.
/// The inner error is the reason it cannot go at all (a client still uses it).
fn remove_or_trash(io: &IoCtx, name: &str) -> Result<Result<bool, String>, CephError> {
    match io.remove_image(name) {
        Ok(()) => Ok(Ok(false)),
        Err(e) if e.not_found() => Ok(Ok(false)),
        Err(e) if e.is(libc::EBUSY) => Ok(Err(
            "is still in use: the image is mapped or watched by a client".into(),
        )),
        Err(e) if e.is(libc::ENOTEMPTY) || e.is(libc::EMLINK) => {
            // Drop our own leftover temporary snapshots; then trash what still has dependents.
            if let Ok(img) = io.open_image(name) {
                for s in img
                    .snaps()?
                    .into_iter()
                    .filter(|s| s.name.starts_with(naming::TEMP_SNAP_PREFIX))
                {
                    ignore_missing(img.snap_remove(&s.name))?;
                }
            }
            match io.remove_image(name) {
                Ok(()) => return Ok(Ok(false)),
                Err(e) if e.is(libc::ENOTEMPTY) || e.is(libc::EMLINK) => {}
                Err(e) if e.is(libc::EBUSY) => {
                    return Ok(Err(
                        "is still in use: the image is mapped or watched by a client".into(),
                    ))
                }
                Err(e) => return Err(e),
            }
            match io.trash_move(name) {
                Ok(()) => Ok(Ok(true)),
                Err(e) if e.is(libc::EBUSY) => Ok(Err(
                    "is still in use: the image is mapped or watched by a client".into(),
                )),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The image a clone came from, also after it was flattened. Clones stay within their pool.
fn parent_name(img: &Image) -> Result<Option<String>, CephError> {
    match img.parent()? {
        Some(p) => Ok(Some(p.image_name)),
        None => img.metadata_get(PARENT_KEY),
    }
}

fn read_snapshot(io: &IoCtx, cluster: &str, image: &str) -> Result<Option<Snapshot>, CephError> {
    let img = match io.open_image_read_only(image) {
        Err(e) if e.not_found() => return Ok(None),
        r => r?,
    };
    let Some(snap) = img.snaps()?.into_iter().find(|s| s.name == image) else {
        return Ok(None);
    };
    let source = VolumeId::new(cluster, io.pool(), &parent_name(&img)?.unwrap_or_default());
    Ok(Some(Snapshot {
        id: SnapshotId {
            volume: VolumeId::new(cluster, io.pool(), image),
        },
        source_volume: source,
        size: snap.size,
        created: img.snap_timestamp(snap.id)?,
    }))
}

/// Sorted, token-based pagination: the token is the ID of the last entry returned, so entries
/// deleted or added between pages neither repeat nor shift the rest.
fn paginate<T>(
    mut all: Vec<T>,
    key: impl Fn(&T) -> String,
    max_entries: i32,
    token: &str,
) -> Result<Page<T>, Error> {
    if max_entries < 0 {
        return Err(Error::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    all.sort_by_key(&key);
    if !token.is_empty() && VolumeId::decode(token).is_err() {
        return Err(Error::Aborted(format!(
            "starting_token {token:?} is not a token this driver issued"
        )));
    }
    let start = if token.is_empty() {
        0
    } else {
        all.partition_point(|e| key(e).as_str() <= token)
    };
    let mut rest: Vec<T> = all.into_iter().skip(start).collect();
    let mut next_token = String::new();
    if max_entries > 0 && rest.len() > max_entries as usize {
        rest.truncate(max_entries as usize);
        next_token = rest.last().map(&key).unwrap_or_default();
    }
    Ok(Page {
        entries: rest,
        next_token,
    })
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

    #[test]
    fn pagination_resumes_after_the_last_returned_id_even_if_it_was_deleted() {
        let ids: Vec<String> = (0..5)
            .map(|i| VolumeId::new("c", "p", &format!("img{i}")).encode())
            .collect();
        let p1 = paginate(ids.clone(), |s| s.clone(), 2, "").unwrap();
        assert_eq!(p1.entries, ids[..2]);
        let without_last: Vec<String> = ids.iter().filter(|s| **s != ids[1]).cloned().collect();
        let p2 = paginate(without_last, |s| s.clone(), 2, &p1.next_token).unwrap();
        assert_eq!(p2.entries, ids[2..4]);
        let p3 = paginate(ids.clone(), |s| s.clone(), 2, &p2.next_token).unwrap();
        assert_eq!(p3.entries, ids[4..]);
        assert!(p3.next_token.is_empty());
        assert!(matches!(
            paginate(ids, |s| s.clone(), 2, "bogus"),
            Err(Error::Aborted(_))
        ));
    }
}
