//! DeleteVolume: record the image and move it to the RBD trash, then return; `trash` purges it
//! in the background once its deferment has ended. Also the remove-or-trash step of
//! DeleteSnapshot, and which IDs a delete may treat as already gone.

use super::trash::{record_and_trash, record_object, Trashed, Watched, IN_USE};
use super::{ignore_missing, Controller};
use crate::ceph::pool::with_ioctx;
use crate::ceph::{CephError, IoCtx};
use crate::volume::naming;
use crate::volume::{Error, RunError, VolumeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a delete waits for this process's purges of the image's clones to let go of it. A
/// purge is over in moments, unless a client that died left its watch on the clone or the parent:
/// librbd's remove then waits for the OSD to time that watch out (30 s). The wait runs in the
/// delete's own task, so a caller that gives up meanwhile gets Aborted on its retry, then OK.
const OWN_PURGE_WAIT: Duration = Duration::from_secs(60);

impl Controller {
    /// For deletes: the ID when it names an image of the wanted kind, `None` when it cannot name
    /// anything this driver made (malformed, or of the other kind), which is success.
    ///
    /// A well-formed ID of a cluster that is not in the config fails closed: the volume may well
    /// exist (the config has a typo, or lost an entry), and OK would make the CO forget it for
    /// good. FailedPrecondition says what gRPC means by it: the system is not in a state where the
    /// call can work, and retrying is useless until someone fixes that state. CSI's own codes do
    /// not fit: NotFound means "deleted" to the CO, and InvalidArgument is for a request that is
    /// wrong whatever the state, which this ID is not. The external-provisioner (and -snapshotter)
    /// retry a failed delete with backoff whatever its code and report it as an event on the PV,
    /// so the volume is deleted once the config is fixed.
    pub(super) fn id_to_delete(
        &self,
        raw: &str,
        field: &str,
        snapshot: bool,
    ) -> Result<Option<VolumeId>, Error> {
        if raw.is_empty() {
            return Err(Error::InvalidArgument(format!("{field} is required")));
        }
        let Some(id) = VolumeId::decode(raw)
            .ok()
            .filter(|id| naming::is_snapshot_image(&id.image) == snapshot)
        else {
            return Ok(None);
        };
        if self.clusters.get(&id.cluster_id).is_none() {
            return Err(Error::FailedPrecondition(format!(
                "{field} {raw} is in cluster {:?}, which is not in the cluster config; \
                 refusing to report it deleted",
                id.cluster_id
            )));
        }
        Ok(Some(id))
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
        // The pool of an ID we issued existed when we made the image. If the cluster now says it
        // does not, it was deleted, and every image in it with it.
        let io = match self.volume_ioctx(&id, &creds).await {
            Err(Error::InvalidArgument(_)) => return Ok(()),
            r => r?,
        };
        let (trash, deferment) = (self.trash.clone(), self.cfg.trash_deferment);
        let vid = volume_id.to_string();
        // The move and its record run in a task of their own: a caller that gives up cannot
        // leave an image trashed and not queued for its purge.
        let work = async move {
            let started = Instant::now();
            let at = (
                id.cluster_id.as_str(),
                id.pool.as_str(),
                id.namespace.as_str(),
            );
            let trashed = loop {
                let name = id.image.clone();
                let r = with_ioctx(io.clone(), move |io| record_and_trash(io, &name, deferment))
                    .await
                    .map_err(Error::ceph(format!("deleting image {}", id.image)))?;
                match r {
                    Ok(t) => break Ok(t),
                    // Our own purge of one of its clones has it open; that is over in moments.
                    Err(Watched(image_id))
                        if started.elapsed() < OWN_PURGE_WAIT
                            && trash.purging_clones_of(at, &image_id) =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    // librbd's remove would skip the deferment. A dead client's watch is gone
                    // within 30 s, and the CO retries.
                    Err(Watched(_)) if !deferment.is_zero() => break Err(IN_USE.to_string()),
                    // Another watcher may be a client that crashed, whose watch the OSD has not
                    // timed out yet. librbd's own remove tells the two apart (it refuses a live
                    // client at once and waits out a dead one's watch), so it decides. With no
                    // deferment, removing at once is what the purge would do.
                    Err(Watched(image_id)) => {
                        let (name, rid) = (id.image.clone(), image_id.clone());
                        let r = with_ioctx(io.clone(), move |io| {
                            remove_or_record_and_trash(io, &name, Some(&rid))
                        })
                        .await
                        .map_err(Error::ceph(format!("deleting image {}", id.image)))?;
                        // While librbd waited, our purge of a clone may have come to hold it.
                        let ours = trash.purging_clones_of(at, &image_id);
                        if r.is_ok() || !ours || started.elapsed() >= OWN_PURGE_WAIT {
                            break r;
                        }
                    }
                }
            }
            .map_err(|why| Error::FailedPrecondition(format!("volume {vid} {why}")))?;
            if let Some(t) = trashed {
                trash.add(at, &creds, t);
            }
            Ok(())
        };
        match self.inflight.run(volume_id, work).await {
            Ok(r) => r,
            Err(RunError::Busy(_)) => Err(Error::aborted_in_flight(volume_id)),
            Err(e) => Err(Error::Aborted(e.to_string())),
        }
    }

    /// After a delete in a pool known by name only (DeleteSnapshot): a dependent of a waiting
    /// entry may be gone, and with `trashed_now` a record was written there to be found.
    pub(super) fn sweep_trash_later(&self, io: Arc<IoCtx>, trashed_now: bool) {
        self.trash.poke(io.pool(), io.namespace(), trashed_now);
    }
}

/// Removes an image, or, when snapshots or clones still depend on it, records it and moves it to
/// the trash to be purged once they are gone. The inner error is why it cannot go at all (a
/// client still uses it).
pub(super) fn remove_or_trash(io: &IoCtx, name: &str) -> Result<Result<bool, String>, CephError> {
    Ok(remove_or_record_and_trash(io, name, None)?.map(|t| t.is_some()))
}

/// `record_of`: the image's ID, when a delete that a kill interrupted may have left a record on
/// it; once librbd has removed the image, nothing else would ever remove that record.
fn remove_or_record_and_trash(
    io: &IoCtx,
    name: &str,
    record_of: Option<&str>,
) -> Result<Result<Option<Trashed>, String>, CephError> {
    let removed = || {
        if let Some(id) = record_of {
            io.remove_object(&record_object(id))?;
        }
        Ok(Ok(None))
    };
    match io.remove_image(name) {
        Ok(()) => removed(),
        Err(e) if e.not_found() => Ok(Ok(None)),
        Err(e) if e.is(libc::EBUSY) => Ok(Err(IN_USE.into())),
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
                Ok(()) => return removed(),
                Err(e) if e.is(libc::ENOTEMPTY) || e.is(libc::EMLINK) => {}
                Err(e) if e.is(libc::EBUSY) => return Ok(Err(IN_USE.into())),
                Err(e) => return Err(e),
            }
            Ok(record_and_trash(io, name, Duration::ZERO)?.map_err(|_| IN_USE.to_string()))
        }
        Err(e) => Err(e),
    }
}
