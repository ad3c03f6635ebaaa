//! ControllerPublish/Unpublish: the attachment record on the image, and the single-node fence.

use super::registry::validate_node_id;
use super::{Attachment, Controller, ATTACHMENTS_KEY};
use crate::ceph::pool::with_ioctx;
use crate::ceph::{CephError, Image};
use crate::volume::Error;
use std::collections::HashMap;

/// The attachment record. An unreadable record is an error, never "no attachments": fencing
/// must fail closed.
pub(super) fn read_attachments(img: &Image) -> Result<Vec<Attachment>, CephError> {
    match img.metadata_get(ATTACHMENTS_KEY)? {
        None => Ok(Vec::new()),
        Some(s) => serde_json::from_str(&s)
            .map_err(|_| CephError::new("parse attachments", ATTACHMENTS_KEY, -libc::EBADMSG)),
    }
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
        let _guard = self
            .inflight
            .try_enter(volume_id)
            .ok_or_else(|| Error::aborted_in_flight(volume_id))?;
        self.require_node(&id.cluster_id, node, &creds).await?;
        let io = self.volume_ioctx(&id, &creds).await?;
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
        let io = self.volume_ioctx(&id, &creds).await?;
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
}

enum Fence {
    Incompatible,
    Held(String),
}
