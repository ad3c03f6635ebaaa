//! DeleteVolume, and the sweep that removes trashed images of ours once their dependents are gone.

use super::{ignore_missing, Controller, TRASH_SOURCE_USER};
use crate::ceph::pool::with_ioctx;
use crate::ceph::{CephError, IoCtx};
use crate::volume::naming::{self, SNAPSHOT_PREFIX};
use crate::volume::{Error, VolumeId};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TrashState {
    /// Not swept by this process yet: an earlier one may have left something.
    Unknown,
    /// Something of ours is there, still waiting for its dependents.
    Pending,
    Sweeping,
    /// A delete arrived during a sweep: sweep once more when it ends.
    SweepAgain,
    Clean,
}

impl Controller {
    /// For deletes: the ID when it names an image of the wanted kind in a configured cluster.
    /// A malformed or foreign ID means there is nothing to delete (`None`), which is success.
    pub(super) fn id_to_delete(
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
        let io = match self.volume_ioctx(&id, &creds).await {
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
    pub(super) fn sweep_trash_later(&self, io: Arc<IoCtx>, trashed_now: bool) {
        {
            let mut st = self.trash_state.lock().unwrap();
            let state = st.entry(io.location()).or_insert(TrashState::Unknown);
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
                let state = st.entry(io.location()).or_insert(TrashState::Unknown);
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
}

/// Removes an image, or moves it to the trash when snapshots or clones still depend on it.
/// The inner error is the reason it cannot go at all (a client still uses it).
pub(super) fn remove_or_trash(io: &IoCtx, name: &str) -> Result<Result<bool, String>, CephError> {
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
