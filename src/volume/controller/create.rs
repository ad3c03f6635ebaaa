//! CreateVolume: an empty image, or a clone of a snapshot or of another volume.
//!
//! Until the image may exist, a failure keeps its own code, and the caller may give up: nothing
//! is left behind. From then on every failure is one the caller retries (`unfinished`), so a
//! half-made image is completed by the retry instead of forgotten.

use super::ownership::{check_mark, mark};
use super::{
    ignore_exists, ignore_missing, not_found_source, parent_name, size_for, unfinished,
    validate_name, Controller, CreateRequest, Source, Volume, INHERITED_KEYS, NAME_KEY, PARENT_KEY,
};
use crate::ceph::pool::blocking;
use crate::ceph::{CephError, Connection, Image, ImageOptions, IoCtx};
use crate::volume::naming::{self, SNAPSHOT_PREFIX};
use crate::volume::{Error, SnapshotId, VolumeId};
use std::sync::Arc;
use tokio::sync::SemaphorePermit;

/// The image a create makes, and for which request.
pub(super) struct Target<'a> {
    pub io: &'a IoCtx,
    pub image: &'a str,
    /// The request name: the image's mark.
    pub name: &'a str,
    pub size: u64,
    pub opts: &'a ImageOptions,
}

/// What a clone is made from: a snapshot image (at its snapshot), or a volume (through a
/// temporary snapshot).
pub(super) struct CloneSource<'a> {
    pub conn: &'a Connection,
    pub io: &'a IoCtx,
    pub image: &'a str,
    pub from_snapshot: bool,
    /// Flatten the clone when its chain of parents gets deeper than this.
    pub max_depth: u32,
}

/// A CreateVolume request's checked parts: everything decided before Ceph is asked.
struct Plan {
    image: String,
    id: VolumeId,
    size: u64,
    opts: ImageOptions,
    /// A custom volumeNamePrefix, to be recorded in the pool.
    prefix: Option<String>,
    /// The content source's image ID, and whether it is a snapshot.
    source: Option<(VolumeId, bool)>,
}

impl Controller {
    pub async fn create_volume(self: &Arc<Self>, req: CreateRequest) -> Result<Volume, Error> {
        validate_name("name", &req.name)?;
        let size = size_for(req.required_bytes, req.limit_bytes)?;
        let layout = req.params.layout()?;
        let opts = ImageOptions {
            features: req.params.features()?,
            data_pool: req.params.data_pool.clone(),
            order: layout.order,
            stripe: layout.stripe,
        };
        // An empty prefix would make every image in the pool look like a volume of ours.
        let prefix = req
            .params
            .volume_name_prefix
            .clone()
            .filter(|p| !p.is_empty());
        if let Some(p) = &prefix {
            if p.starts_with(SNAPSHOT_PREFIX) || p.starts_with(naming::TEMP_SNAP_PREFIX) {
                return Err(Error::InvalidArgument(
                    "volumeNamePrefix may not start with csi-snap- or csi-tmp-".into(),
                ));
            }
        }
        let namespace = self.cluster(&req.params.cluster_id)?.rados_namespace();
        let image = naming::volume_image(prefix.as_deref(), &req.name);
        let id =
            VolumeId::in_namespace(&req.params.cluster_id, &req.params.pool, namespace, &image);
        if id.encode().len() > crate::volume::id::MAX_ID_LEN {
            return Err(Error::InvalidArgument(
                "clusterID, pool and radosNamespace are too long for a 128-byte volume ID".into(),
            ));
        }
        let source = match &req.source {
            None => None,
            Some(s) => Some(self.content_source(s, &req.params.cluster_id)?),
        };
        let plan = Plan {
            image,
            id,
            size,
            opts,
            prefix,
            source,
        };
        let key = format!("create/{}", req.name);
        self.run_owned(&key, move |this| async move {
            // Taken by the task, so an abandoned call still counts until its work is over.
            let _slot = this.create_slot().await?;
            this.make_volume(req, plan).await
        })
        .await
    }

    async fn create_slot(&self) -> Result<SemaphorePermit<'_>, Error> {
        tokio::time::timeout(self.cfg.create_queue_timeout, self.create_slots.acquire())
            .await
            .map_err(|_| {
                Error::Unavailable("too many CreateVolume calls in flight; try again".into())
            })?
            .map_err(|_| Error::Unavailable("shutting down".into()))
    }

    /// The source's ID (a snapshot image, or a volume) and whether it is a snapshot, checked
    /// without asking Ceph.
    fn content_source(&self, source: &Source, cluster_id: &str) -> Result<(VolumeId, bool), Error> {
        let (raw, id, from_snapshot) = match source {
            Source::Snapshot(sid) => (
                sid,
                SnapshotId::decode(sid)
                    .map_err(|e| Error::NotFound(e.to_string()))?
                    .volume,
                true,
            ),
            Source::Volume(vid) => (
                vid,
                VolumeId::decode(vid).map_err(|e| Error::NotFound(e.to_string()))?,
                false,
            ),
        };
        let what = if from_snapshot { "snapshot" } else { "volume" };
        if naming::is_snapshot_image(&id.image) != from_snapshot {
            return Err(Error::NotFound(format!("{what} {raw} does not exist")));
        }
        if id.cluster_id != cluster_id {
            return Err(Error::InvalidArgument(format!(
                "a {what} can only be cloned within its own cluster"
            )));
        }
        Ok((id, from_snapshot))
    }

    /// CreateVolume's work, in the task that owns the request's key.
    async fn make_volume(&self, req: CreateRequest, plan: Plan) -> Result<Volume, Error> {
        let conn = self.connect(&req.params.cluster_id, &req.creds).await?;
        let io = self
            .pool_ioctx(
                conn.clone(),
                &plan.id.cluster_id,
                &plan.id.pool,
                &plan.id.namespace,
            )
            .await?;
        if let Some(p) = &plan.prefix {
            self.record_prefix(&req.params.cluster_id, &io, p).await?;
        }
        let source_io = match &plan.source {
            None => None,
            Some((sid, _)) => Some(
                self.volume_ioctx(sid, &req.creds)
                    .await
                    .map_err(not_found_source(&sid.encode()))?,
            ),
        };
        let max_depth = self.cfg.max_clone_depth;
        // Kubernetes' PVC and PV names (--extra-create-metadata), for operators.
        let k8s_meta: Vec<(String, String)> = req
            .params
            .other
            .iter()
            .filter(|(k, _)| k.starts_with("csi.storage.k8s.io/p"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (name, image) = (req.name.clone(), plan.image.clone());
        blocking(move || {
            let t = Target {
                io: &io,
                image: &plan.image,
                name: &name,
                size: plan.size,
                opts: &plan.opts,
            };
            let src = match (&plan.source, &source_io) {
                (Some((sid, from_snapshot)), Some(sio)) => Some(CloneSource {
                    conn: &conn,
                    io: sio,
                    image: &sid.image,
                    from_snapshot: *from_snapshot,
                    max_depth,
                }),
                _ => None,
            };
            Ok(build_volume(&t, src.as_ref(), &k8s_meta))
        })
        .await
        .map_err(unfinished(format!("creating image {image}")))??;

        Ok(Volume {
            context: req.params.volume_context(&image),
            id: plan.id,
            size: plan.size,
            source: req.source,
        })
    }
}

/// Makes (or completes) the image, marked, with the Kubernetes metadata on it.
fn build_volume(
    t: &Target,
    src: Option<&CloneSource>,
    k8s_meta: &[(String, String)],
) -> Result<(), Error> {
    match src {
        Some(src) => write_metadata(&create_clone(src, t)?, t.image, k8s_meta),
        None => create_plain(t, k8s_meta),
    }
}

fn write_metadata(img: &Image, image: &str, meta: &[(String, String)]) -> Result<(), Error> {
    for (k, v) in meta {
        img.metadata_set(k, v)
            .map_err(unfinished(format!("writing {k} on {image}")))?;
    }
    Ok(())
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
/// `None` says so, so the caller can create it again. Only safe while no other create of this
/// image runs, which the operation's key guarantees.
fn open_or_discard_partial(io: &IoCtx, name: &str) -> Result<Option<Image>, Error> {
    let step = || unfinished(format!("opening image {name}"));
    match io.open_image(name) {
        Ok(img) => Ok(Some(img)),
        Err(e) if e.not_found() => {
            tracing::warn!(image = name, "found a half-created image; removing it");
            ignore_missing(io.remove_image(name)).map_err(step())?;
            Ok(None)
        }
        Err(e) => Err(step()(e)),
    }
}

/// Creates an empty image, or accepts the one a previous attempt made if it matches; marks it
/// and writes `meta` on it.
fn create_plain(t: &Target, meta: &[(String, String)]) -> Result<(), Error> {
    for _ in 0..2 {
        match t.io.create_image(t.image, t.size, t.opts) {
            Ok(()) => {
                // Just made, under our key: nobody has it open, so the mark needs no open image.
                let mut all = vec![(NAME_KEY, t.name)];
                all.extend(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                return t
                    .io
                    .metadata_set_unopened(t.image, &all)
                    .map_err(unfinished(format!("marking {}", t.image)));
            }
            Err(e) if e.exists() => {}
            // librbd undoes a create it could not finish: nothing of ours is left.
            Err(e) => return Err(Error::ceph(format!("creating image {}", t.image))(e)),
        }
        let Some(img) = open_or_discard_partial(t.io, t.image)? else {
            continue;
        };
        check_mark(&img, t.image, t.name, None)?;
        let ctx = || unfinished(format!("reading image {}", t.image));
        if img.parent().map_err(ctx())?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "volume {} exists with a content source",
                t.image
            )));
        }
        let have = img.size().map_err(ctx())?;
        if have != t.size {
            return Err(Error::AlreadyExists(format!(
                "volume exists with size {have}, not {}",
                t.size
            )));
        }
        mark(&img, t.image, t.name)?;
        return write_metadata(&img, t.image, meta);
    }
    Err(Error::Aborted(format!(
        "image {} keeps appearing half-made; retry",
        t.image
    )))
}

/// Creates a clone of a snapshot image, or of a volume through a temporary snapshot, or accepts
/// the one a previous attempt made if it matches, and finishes it. Returns it open and marked.
pub(super) fn create_clone(src: &CloneSource, t: &Target) -> Result<Image, Error> {
    let parent = src.image;
    let read_source = || Error::ceph(format!("reading content source {parent}"));
    let simg = match src.io.open_image(parent) {
        Err(e) if e.not_found() => {
            return Err(Error::NotFound(format!(
                "content source {parent} does not exist"
            )))
        }
        r => r.map_err(read_source())?,
    };
    let snap = if src.from_snapshot {
        parent.to_string()
    } else {
        naming::temp_snap(t.image)
    };
    let src_size = if src.from_snapshot {
        let snaps = simg.snaps().map_err(read_source())?;
        match snaps.into_iter().find(|s| s.name == snap) {
            Some(s) => s.size,
            None => return Err(Error::NotFound(format!("snapshot {parent} does not exist"))),
        }
    } else {
        simg.size().map_err(read_source())?
    };
    if t.size < src_size {
        return Err(Error::OutOfRange(format!(
            "requested {} bytes is smaller than the source's {src_size}",
            t.size
        )));
    }
    // A refusal leaves the source as it was: without the temporary snapshot made for the clone.
    let refuse = |e: Error| {
        if !src.from_snapshot {
            if let Err(x) = ignore_missing(simg.snap_remove(&snap)) {
                tracing::warn!(error = %x, "could not remove temporary snapshot {snap} of {parent}");
            }
        }
        e
    };
    for attempt in 0..3 {
        if !src.from_snapshot {
            ignore_exists(simg.snap_create(&snap))
                .map_err(Error::ceph(format!("snapshotting {parent}")))?;
        }
        let fresh = match src.io.clone_image(parent, &snap, t.io, t.image, t.opts) {
            Ok(()) => true,
            Err(e) if e.exists() => false,
            // A crash during an earlier attempt's snapshot removal can leave the temporary
            // snapshot listed but unusable. If the clone is not there yet, make the snapshot anew.
            Err(e) if e.not_found() && !src.from_snapshot && attempt < 2 => {
                if t.io.open_image(t.image).is_err() {
                    tracing::warn!(image = t.image, snap = %snap, "temporary snapshot unusable; making it again");
                    ignore_missing(simg.snap_remove(&snap))
                        .map_err(Error::ceph(format!("removing snapshot {snap}")))?;
                    continue;
                }
                false
            }
            Err(e) => {
                return Err(refuse(Error::ceph(format!(
                    "cloning {parent} into {}",
                    t.image
                ))(e)))
            }
        };
        let Some(img) = open_or_discard_partial(t.io, t.image)? else {
            continue;
        };
        if !fresh {
            let ctx = || unfinished(format!("reading image {}", t.image));
            if parent_name(&img).map_err(ctx())?.as_deref() != Some(parent) {
                return Err(refuse(Error::AlreadyExists(format!(
                    "image {} exists with a different content source",
                    t.image
                ))));
            }
            check_mark(&img, t.image, t.name, Some(&simg)).map_err(refuse)?;
            let have = img.size().map_err(ctx())?;
            if have != t.size && have != src_size {
                return Err(refuse(Error::AlreadyExists(format!(
                    "volume exists with size {have}, not {}",
                    t.size
                ))));
            }
        }
        // The mark goes first: from here on, a retry knows the clone as ours without asking the
        // parent (librbd copied the parent's mark into it).
        mark(&img, t.image, t.name)?;
        finish_clone(src, t, &img, &simg, &snap)
            .map_err(unfinished(format!("finishing clone {}", t.image)))?;
        return Ok(img);
    }
    Err(Error::Aborted(format!(
        "image {} keeps appearing half-made; retry",
        t.image
    )))
}

/// The steps after a clone exists; each is idempotent, so a retry redoes what a crash cut short.
fn finish_clone(
    src: &CloneSource,
    t: &Target,
    img: &Image,
    simg: &Image,
    snap: &str,
) -> Result<(), CephError> {
    if img.size()? < t.size {
        img.resize(t.size)?;
    }
    // librbd copies the parent's image metadata into a clone: attachments and Kubernetes names
    // are the parent's, not ours.
    for key in INHERITED_KEYS {
        img.metadata_remove(key)?;
    }
    if !src.from_snapshot {
        // With clone v2 the snapshot moves to the trash namespace and lives as long as the clone.
        ignore_missing(simg.snap_remove(snap))?;
    }
    if clone_depth(src.conn, img)? > src.max_depth {
        tracing::info!(
            image = t.image,
            "clone chain is deeper than {}; flattening",
            src.max_depth
        );
        // Remember where it came from: idempotency and ListSnapshots still need to know.
        img.metadata_set(PARENT_KEY, src.image)?;
        img.flatten()?;
    }
    Ok(())
}
