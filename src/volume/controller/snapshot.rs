//! CreateSnapshot, DeleteSnapshot and ListSnapshots. A snapshot is an image of its own: a clone of
//! the source with one snapshot of the same name.

use super::create::create_clone;
use super::delete::remove_or_trash;
use super::list::paginate;
use super::{
    ignore_exists, ignore_missing, not_found_source, parent_name, validate_name, Controller,
    Outcome, Page, Snapshot,
};
use crate::ceph::pool::{blocking, with_ioctx};
use crate::ceph::{CephError, ImageOptions, IoCtx};
use crate::volume::naming;
use crate::volume::{Credentials, Error, SnapshotId, VolumeId};
use std::collections::HashMap;

impl Controller {
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
            .pool_ioctx(conn.clone(), &src.cluster_id, &src.pool, &src.namespace)
            .await
            .map_err(not_found_source(source_volume))?;
        let snap_image = naming::snapshot_image(name);
        let id = SnapshotId {
            volume: src.sibling(&snap_image),
        };
        let source_image = src.image.clone();
        let max_depth = self.cfg.max_clone_depth;
        let opts = ImageOptions {
            features: crate::volume::params::parse_features(
                crate::volume::params::DEFAULT_FEATURES,
            )?,
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
