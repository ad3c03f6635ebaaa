//! ControllerPublish/Unpublish and the single-node fence.
//!
//! The attachment record is a JSON document in an attribute of the image's header object, and
//! every change to it is a compare-and-swap on that attribute, so two controllers (a leader
//! handover, two clusters sharing a pool) can never both publish a single-node volume. Volumes
//! published by earlier versions keep their record in image metadata: it is read as before and
//! moved into the attribute by the first write.
//!
//! NodeStage refuses a single-node volume that another Ceph client still watches.

use super::registry::validate_node_id;
use super::{Attachment, Controller, ATTACHMENTS_KEY};
use crate::ceph::pool::with_ioctx;
use crate::ceph::{CephError, Image, IoCtx};
use crate::volume::{Credentials, Error, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The attribute of `rbd_header.<id>` that holds the record.
const RECORD_ATTR: &str = "rook-rbd.attachments";
/// Compare-and-swap rounds before a publish gives up with Aborted (the caller retries).
const CAS_ATTEMPTS: usize = 32;

/// Everything the fence knows about one image: who it is published to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachmentRecord {
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

/// The record as stored, with the exact bytes a compare-and-swap must find.
struct Stored {
    raw: Option<Vec<u8>>,
    record: AttachmentRecord,
    /// The record came from image metadata, written by an earlier version.
    legacy: bool,
}

fn load(io: &IoCtx, img: &Image, header: &str) -> Result<Stored, CephError> {
    // An unreadable record is an error, never "no attachments": fencing must fail closed.
    let unparsable = || CephError::new("parse attachment record", header, -libc::EBADMSG);
    if let Some(raw) = io.xattr(header, RECORD_ATTR)? {
        let record = serde_json::from_slice(&raw).map_err(|_| unparsable())?;
        return Ok(Stored {
            raw: Some(raw),
            record,
            legacy: false,
        });
    }
    let legacy = match img.metadata_get(ATTACHMENTS_KEY)? {
        Some(s) => Some(serde_json::from_str::<Vec<Attachment>>(&s).map_err(|_| unparsable())?),
        None => None,
    };
    Ok(Stored {
        raw: None,
        legacy: legacy.is_some(),
        record: AttachmentRecord {
            attachments: legacy.unwrap_or_default(),
        },
    })
}

/// The attachments of an open image, from the record or the metadata of an earlier version.
pub(super) fn read_attachments(io: &IoCtx, img: &Image) -> Result<Vec<Attachment>, CephError> {
    Ok(load(io, img, &img.header_object()?)?.record.attachments)
}

enum Change<T> {
    /// Answer without writing.
    Keep(T),
    Write(T),
}

/// Reads the record, lets `change` decide, and writes the result with compare-and-swap, from a
/// fresh read each time another writer got in between. `None` after [`CAS_ATTEMPTS`] losses.
fn update<T>(
    io: &IoCtx,
    image: &str,
    mut change: impl FnMut(&mut AttachmentRecord) -> Result<Change<T>, CephError>,
) -> Result<Option<T>, CephError> {
    // Read-only: no watch of ours, so nodes checking for other clients never see the controller.
    let img = io.open_image_read_only(image)?;
    let header = img.header_object()?;
    for _ in 0..CAS_ATTEMPTS {
        let stored = load(io, &img, &header)?;
        let mut record = stored.record;
        let out = match change(&mut record)? {
            Change::Keep(out) => return Ok(Some(out)),
            Change::Write(out) => out,
        };
        let body = serde_json::to_vec(&record).unwrap_or_default();
        if io.replace_xattr(&header, RECORD_ATTR, stored.raw.as_deref(), &body)? {
            if stored.legacy {
                retire_legacy(io, image);
            }
            return Ok(Some(out));
        }
        tracing::debug!(
            image,
            "the attachment record changed under this update; reading it again"
        );
    }
    Ok(None)
}

/// The record now lives in the header attribute; the old metadata copy would only mislead.
fn retire_legacy(io: &IoCtx, image: &str) {
    if let Err(e) = io
        .open_image(image)
        .and_then(|img| img.metadata_remove(ATTACHMENTS_KEY))
    {
        tracing::warn!(image, error = %e, "attachment record moved, but the old metadata copy stays (it is ignored)");
    }
}

/// A vanished image is NotFound; any other Ceph failure keeps its errno's code.
fn missing_or<'a>(
    volume_id: &'a str,
    context: &'static str,
) -> impl FnOnce(CephError) -> Error + 'a {
    move |e| {
        if e.not_found() {
            Error::NotFound(format!("volume {volume_id} does not exist"))
        } else {
            Error::ceph(context)(e)
        }
    }
}

fn contended(volume_id: &str) -> Error {
    Error::Aborted(format!(
        "the attachment record of volume {volume_id} kept changing under this update; retry"
    ))
}

impl Controller {
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
        let guard = self
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
            // The blocking task owns the guard: a retry waits out this write even if the
            // caller gave up on it.
            let _guard = guard;
            update(io, &image, |record| {
                if let Some(existing) = record.attachments.iter().find(|a| a.node == want.node) {
                    return Ok(Change::Keep(if *existing == want {
                        Ok(())
                    } else {
                        Err(Fence::Incompatible)
                    }));
                }
                if let Some(other) = record
                    .attachments
                    .iter()
                    .find(|a| a.exclusive || want.exclusive)
                {
                    return Ok(Change::Keep(Err(Fence::Held(other.node.clone()))));
                }
                record.attachments.push(want.clone());
                Ok(Change::Write(Ok(())))
            })
        })
        .await
        .map_err(missing_or(volume_id, "publishing"))?
        .ok_or_else(|| contended(volume_id))?;
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
        let guard = self
            .inflight
            .try_enter(volume_id)
            .ok_or_else(|| Error::aborted_in_flight(volume_id))?;
        let io = self.ioctx(&id.cluster_id, &id.pool, &creds).await?;
        let image = id.image.clone();
        let node = node.to_string();
        let res = with_ioctx(io, move |io| {
            let _guard = guard;
            update(io, &image, |record| {
                let before = record.attachments.len();
                // An empty node_id means "from every node" (the spec allows it).
                record
                    .attachments
                    .retain(|a| !node.is_empty() && a.node != node);
                Ok(if record.attachments.len() == before {
                    Change::Keep(())
                } else {
                    Change::Write(())
                })
            })
        })
        .await;
        match res {
            Err(e) if e.not_found() => Ok(()),
            Ok(None) => Err(contended(volume_id)),
            r => r.map(|_| ()).map_err(Error::ceph("unpublishing")),
        }
    }

    /// NodeStage of a single-node volume on `node`, before mapping: refuses while another
    /// client watches the image (our own probe opens it read-only, which registers no watch),
    /// or while the record has it published to another node.
    pub async fn check_stage(
        &self,
        id: &VolumeId,
        volume_id: &str,
        node: &str,
        creds: &Credentials,
    ) -> Result<(), Error> {
        let io = self.ioctx(&id.cluster_id, &id.pool, creds).await?;
        let image = id.image.clone();
        let (watchers, record) = with_ioctx(io, move |io| {
            let img = io.open_image_read_only(&image)?;
            let watchers = img.watchers()?;
            let stored = load(io, &img, &img.header_object()?)?;
            Ok((watchers, stored.record))
        })
        .await
        .map_err(missing_or(volume_id, "checking who uses the image"))?;
        if let Some(other) = record
            .attachments
            .iter()
            .find(|a| a.exclusive && a.node != node)
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is published to node {}, not to {node}",
                other.node
            )));
        }
        if !watchers.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is still in use by another Ceph client ({}); a single-node volume is staged only once its previous user has let go",
                watchers.join(", ")
            )));
        }
        Ok(())
    }
}

enum Fence {
    Incompatible,
    Held(String),
}
