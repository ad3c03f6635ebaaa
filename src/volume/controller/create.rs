//! CreateVolume: an empty image, or a clone of a snapshot or of another volume.

use super::{
    ignore_exists, ignore_missing, not_found_source, parent_name, size_for, validate_name,
    Controller, CreateRequest, Outcome, Source, Volume, INHERITED_KEYS, NAME_KEY, PARENT_KEY,
};
use crate::ceph::pool::blocking;
use crate::ceph::{CephError, Connection, Image, ImageOptions, IoCtx};
use crate::volume::naming::{self, SNAPSHOT_PREFIX};
use crate::volume::{Error, SnapshotId, VolumeId};

impl Controller {
    pub async fn create_volume(&self, req: CreateRequest) -> Result<Volume, Error> {
        validate_name("name", &req.name)?;
        let size = size_for(req.required_bytes, req.limit_bytes)?;
        let features = req.params.features()?;
        let layout = req.params.layout()?;
        if let Some(p) = &req.params.volume_name_prefix {
            if p.starts_with(SNAPSHOT_PREFIX) || p.starts_with(naming::TEMP_SNAP_PREFIX) {
                return Err(Error::InvalidArgument(
                    "volumeNamePrefix may not start with csi-snap- or csi-tmp-".into(),
                ));
            }
        }
        let namespace = self.cluster(&req.params.cluster_id)?.rados_namespace();
        let image = naming::volume_image(req.params.volume_name_prefix.as_deref(), &req.name);
        let id =
            VolumeId::in_namespace(&req.params.cluster_id, &req.params.pool, namespace, &image);
        if id.encode().len() > crate::volume::id::MAX_ID_LEN {
            return Err(Error::InvalidArgument(
                "clusterID, pool and radosNamespace are too long for a 128-byte volume ID".into(),
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
            .pool_ioctx(conn.clone(), &id.cluster_id, &id.pool, &id.namespace)
            .await?;
        let opts = ImageOptions {
            features,
            data_pool: req.params.data_pool.clone(),
            order: layout.order,
            stripe: layout.stripe,
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
                    .volume_ioctx(&snap.volume, &req.creds)
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
                    .volume_ioctx(&src, &req.creds)
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
        let io = conn.ioctx_in(&p.pool, &p.namespace)?;
        let pimg = io.open_image_by_id(&p.image_id)?;
        parent = pimg.parent()?;
    }
    Ok(depth)
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
pub(super) fn create_clone(
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
