//! CreateSnapshot, DeleteSnapshot and ListSnapshots. A snapshot is an image of its own: a clone of
//! the source with one snapshot of the same name.

use super::create::{create_clone, CloneSource, Target};
use super::delete::remove_or_trash;
use super::list::paginate;
use super::ownership::{check_mark, mark};
use super::{
    ignore_exists, ignore_missing, not_found_source, parent_name, unfinished, validate_name,
    Controller, Page, Snapshot,
};
use crate::ceph::pool::{blocking, with_ioctx};
use crate::ceph::{CephError, ImageOptions, IoCtx};
use crate::volume::naming;
use crate::volume::{Credentials, Error, SnapshotId, VolumeId};
use std::collections::HashMap;
use std::sync::Arc;

impl Controller {
    pub async fn create_snapshot(
        self: &Arc<Self>,
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
        let (name, source_volume) = (name.to_string(), source_volume.to_string());
        self.run_owned(&format!("snapshot/{name}"), move |this| async move {
            this.make_snapshot(&name, &source_volume, src, creds).await
        })
        .await
    }

    /// CreateSnapshot's work, in the task that owns the request's key.
    async fn make_snapshot(
        &self,
        name: &str,
        source_volume: &str,
        src: VolumeId,
        creds: Credentials,
    ) -> Result<Snapshot, Error> {
        let conn = self.connect(&src.cluster_id, &creds).await?;
        let io = self
            .pool_ioctx(conn.clone(), &src.cluster_id, &src.pool, &src.namespace)
            .await
            .map_err(not_found_source(source_volume))?;
        let snap_image = naming::snapshot_image(name);
        let id = SnapshotId {
            volume: src.sibling(&snap_image),
        };
        let (source_image, name) = (src.image.clone(), name.to_string());
        let max_depth = self.cfg.max_clone_depth;
        let opts = ImageOptions {
            features: crate::volume::params::parse_features(
                crate::volume::params::DEFAULT_FEATURES,
            )?,
            ..Default::default()
        };
        let (size, created) = blocking(move || {
            let src = CloneSource {
                conn: &conn,
                io: &io,
                image: &source_image,
                from_snapshot: false,
                max_depth,
            };
            Ok(build_snapshot(&src, &snap_image, &name, &opts))
        })
        .await
        .map_err(unfinished(format!("snapshotting {}", src.image)))??;
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
        let io = match self.volume_ioctx(&id.volume, &creds).await {
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
        let io = match self.volume_ioctx(&id.volume, creds).await {
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
            for (cluster, pool, namespace) in self.pools(scope.as_ref(), &creds).await? {
                let io = self.ioctx(&cluster, &pool, &namespace, &creds).await?;
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
}

/// Makes (or completes, or finds complete) the snapshot image `image` of `src` for request
/// `name`: a clone of the source with one snapshot of the same name. Returns the snapshot's size
/// and creation time.
fn build_snapshot(
    src: &CloneSource,
    image: &str,
    name: &str,
    opts: &ImageOptions,
) -> Result<(u64, (i64, i32)), Error> {
    let simg = match src.io.open_image_read_only(src.image) {
        Err(e) if e.not_found() => {
            return Err(Error::NotFound(format!(
                "source volume {} does not exist",
                src.image
            )))
        }
        r => r.map_err(Error::ceph(format!("reading {}", src.image)))?,
    };
    let size = simg
        .size()
        .map_err(Error::ceph(format!("reading {}", src.image)))?;
    // From here on the snapshot image may exist, made by an earlier attempt of this request.
    let step = |what: &str| unfinished(format!("{what} snapshot image {image}"));
    let complete = match src.io.open_image(image) {
        Ok(img) => {
            let snaps = img.snaps().map_err(step("reading"))?;
            snaps.iter().any(|s| s.name == image).then_some(img)
        }
        Err(e) if e.not_found() => None,
        Err(e) => return Err(step("opening")(e)),
    };
    let img = match complete {
        // Complete from an earlier call: only the size of the source may have moved on.
        Some(img) => {
            if parent_name(&img).map_err(step("reading"))?.as_deref() != Some(src.image) {
                return Err(Error::AlreadyExists(
                    "a snapshot with this name exists for another source volume".into(),
                ));
            }
            check_mark(&img, image, name, Some(&simg))?;
            mark(&img, image, name)?;
            img
        }
        None => {
            let t = Target {
                io: src.io,
                image,
                name,
                size,
                opts,
            };
            let img = create_clone(src, &t)?;
            ignore_exists(img.snap_create(image)).map_err(step("snapshotting"))?;
            img
        }
    };
    let snap = img
        .snaps()
        .map_err(step("reading"))?
        .into_iter()
        .find(|s| s.name == image)
        .ok_or_else(|| Error::Aborted(format!("snapshot {image} vanished while made; retry")))?;
    let created = img.snap_timestamp(snap.id).map_err(step("reading"))?;
    Ok((snap.size, created))
}

fn read_snapshot(io: &IoCtx, cluster: &str, image: &str) -> Result<Option<Snapshot>, CephError> {
    let img = match io.open_image_read_only(image) {
        Err(e) if e.not_found() => return Ok(None),
        r => r?,
    };
    let Some(snap) = img.snaps()?.into_iter().find(|s| s.name == image) else {
        return Ok(None);
    };
    let id = VolumeId::in_namespace(cluster, io.pool(), io.namespace(), image);
    let source = id.sibling(&parent_name(&img)?.unwrap_or_default());
    Ok(Some(Snapshot {
        id: SnapshotId { volume: id },
        source_volume: source,
        size: snap.size,
        created: img.snap_timestamp(snap.id)?,
    }))
}
