//! ControllerPublish/Unpublish and the single-node fence.
//!
//! The attachment record is a JSON document in an attribute of the image's header object, and
//! every change to it is a compare-and-swap on that attribute, so two controllers (a leader
//! handover, two clusters sharing a pool) can never both publish a single-node volume. Volumes
//! published by earlier versions keep their record in image metadata: it is read as before and
//! moved into the attribute by the first write.
//!
//! Nodes add the Ceph clients they map a single-node volume with (NodeStage) and take them off
//! again (NodeUnstage). When such a volume is published to a node while another node's clients
//! are still on the record (a force detach after node loss), those clients are blocklisted
//! before the publish succeeds: the old node's writes then fail instead of landing beside the
//! new node's. NodeStage also refuses a single-node volume that another client still watches.

use super::registry::validate_node_id;
use super::{unix_now, Attachment, Controller, ATTACHMENTS_KEY};
use crate::ceph::blocklist::plain_addrs;
use crate::ceph::pool::with_ioctx;
use crate::ceph::{CephError, Connection, Image, IoCtx};
use crate::volume::{Credentials, Error, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;

/// The attribute of `rbd_header.<id>` that holds the record.
const RECORD_ATTR: &str = "rook-rbd.attachments";
/// Compare-and-swap rounds before a publish gives up with Aborted (the caller retries).
const CAS_ATTEMPTS: usize = 32;
/// How long a fenced client stays blocklisted unless its node lifts the entry on NodeUnstage.
/// Long, because an expired entry lets a client that is still alive write again.
pub const BLOCKLIST_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Everything the fence knows about one image.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachmentRecord {
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Ceph clients that nodes mapped the image with, from NodeStage until NodeUnstage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<NodeClient>,
    /// Clients blocklisted because the volume moved on while their node still held it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<FencedClient>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeClient {
    pub node: String,
    /// `ip:port/nonce`, as the image's watcher list shows it.
    pub addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FencedClient {
    pub node: String,
    pub addr: String,
    /// The node the volume was published to when the client was fenced.
    pub moved_to: String,
    /// Unix seconds: when it was blocklisted, and when the entry expires.
    pub at: u64,
    pub until: u64,
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
            ..Default::default()
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
        let now = unix_now();
        record.fenced.retain(|f| f.until > now);
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

/// Blocklists the clients of nodes other than `node` that are still on the record, before a
/// single-node publish to `node`. At this point no other node is attached (the fence refused
/// otherwise), so these clients belong to nodes that were detached without letting go. Never
/// the new node's own clients, never this controller's own session.
fn fence_departed(
    conn: &Connection,
    record: &mut AttachmentRecord,
    node: &str,
    own: &[String],
) -> Result<Vec<FencedClient>, CephError> {
    let now = unix_now();
    let (departed, stay): (Vec<_>, Vec<_>) = record.clients.drain(..).partition(|c| c.node != node);
    record.clients = stay;
    let mut fenced = Vec::new();
    for c in departed {
        if own.contains(&c.addr) {
            tracing::warn!(node = %c.node, client = %c.addr, "a node recorded this controller's own session as its client; not fencing it");
            continue;
        }
        conn.blocklist_add(&c.addr, BLOCKLIST_EXPIRY)?;
        record.fenced.retain(|f| f.addr != c.addr);
        let f = FencedClient {
            node: c.node,
            addr: c.addr,
            moved_to: node.to_string(),
            at: now,
            until: now + BLOCKLIST_EXPIRY.as_secs(),
        };
        record.fenced.push(f.clone());
        fenced.push(f);
    }
    Ok(fenced)
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
        let conn = self.connect(&id.cluster_id, &creds).await?;
        let io = self
            .pool_ioctx(conn.clone(), &id.cluster_id, &id.pool, &id.namespace)
            .await?;
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
            let own = if want.exclusive {
                conn.own_addrs()?
            } else {
                Vec::new()
            };
            update(io, &image, |record| {
                if let Some(existing) = record.attachments.iter().find(|a| a.node == want.node) {
                    return Ok(Change::Keep(if *existing == want {
                        Ok(Vec::new())
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
                let fenced = if want.exclusive {
                    fence_departed(&conn, record, &want.node, &own)?
                } else {
                    Vec::new()
                };
                record.attachments.push(want.clone());
                Ok(Change::Write(Ok(fenced)))
            })
        })
        .await
        .map_err(missing_or(volume_id, "publishing"))?
        .ok_or_else(|| contended(volume_id))?;
        match outcome {
            Ok(fenced) => {
                for f in fenced {
                    tracing::warn!(
                        volume.id = %volume_id,
                        node,
                        fenced_node = %f.node,
                        client = %f.addr,
                        until = f.until,
                        "blocklisted a client of node {} that still held this single-node volume as it moved to {node}; \
                         NodeUnstage on {} lifts it (fuse, nbd), or run `ceph osd blocklist rm {}` once that node has unmapped it",
                        f.node, f.node, f.addr
                    );
                }
                Ok(HashMap::from([
                    ("attachedNode".to_string(), node.to_string()),
                    ("readOnly".to_string(), readonly.to_string()),
                ]))
            }
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
        let io = self.volume_ioctx(&id, &creds).await?;
        let image = id.image.clone();
        let node = node.to_string();
        let res = with_ioctx(io, move |io| {
            let _guard = guard;
            // The node's clients stay on the record: after a force detach they may still hold
            // the image, and the next single-node publish elsewhere fences them.
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
        let io = self.volume_ioctx(id, creds).await?;
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

    /// NodeStage of a single-node volume on `node`, after mapping: records the image's watchers
    /// as this node's clients, so that a force move to another node can fence them. Either
    /// [`Controller::check_stage`] found nobody before the mapping, or the node mapped the image
    /// already; so the watchers are this node's, save a controller that opens the image at
    /// this very moment, which a second look tells apart. Returns what it recorded.
    pub async fn record_stage(
        &self,
        id: &VolumeId,
        node: &str,
        creds: &Credentials,
    ) -> Result<Vec<String>, Error> {
        let io = self.volume_ioctx(id, creds).await?;
        let image = id.image.clone();
        let node = node.to_string();
        let recorded = with_ioctx(io, move |io| {
            let new_watchers = |img: &Image| -> Result<Vec<String>, CephError> {
                Ok(img
                    .watchers()?
                    .iter()
                    .flat_map(|w| plain_addrs(w))
                    .collect())
            };
            let img = io.open_image_read_only(&image)?;
            let mut ours = new_watchers(&img)?;
            if ours.len() > 1 {
                // Another client opened the image just now (a controller reading it, say);
                // ours is the one that stays.
                std::thread::sleep(Duration::from_millis(300));
                let again = new_watchers(&img)?;
                ours.retain(|w| again.contains(w));
            }
            drop(img);
            if ours.is_empty() {
                return Ok(Some(ours));
            }
            update(io, &image, |record| {
                let mut changed = false;
                for addr in &ours {
                    if !record.clients.iter().any(|c| &c.addr == addr) {
                        record.clients.push(NodeClient {
                            node: node.clone(),
                            addr: addr.clone(),
                        });
                        changed = true;
                    }
                }
                Ok(if changed {
                    Change::Write(ours.clone())
                } else {
                    Change::Keep(ours.clone())
                })
            })
        })
        .await
        .map_err(Error::ceph("recording this node's client of the image"))?;
        recorded.ok_or_else(|| contended(&id.image))
    }

    /// Whether a client of `node` was fenced from the image (blocklisted when the volume moved
    /// on): its writes can never reach the cluster again, so nothing is lost by tearing its
    /// mapping down at once.
    pub async fn fenced_on(
        &self,
        id: &VolumeId,
        node: &str,
        creds: &Credentials,
    ) -> Result<bool, Error> {
        let io = self.volume_ioctx(id, creds).await?;
        let (image, node) = (id.image.clone(), node.to_string());
        with_ioctx(io, move |io| {
            let img = io.open_image_read_only(&image)?;
            let record = load(io, &img, &img.header_object()?)?.record;
            Ok(record.fenced.iter().any(|f| f.node == node))
        })
        .await
        .map_err(Error::ceph("reading the attachment record"))
    }

    /// NodeUnstage on `node`, once its mapping is torn down: takes its clients off the record
    /// and, when `lift` (the mapper's client served only this image, so it is gone now), lifts
    /// the blocklist entries of its fenced ones. Returns the lifted addresses.
    pub async fn release_stage(
        &self,
        id: &VolumeId,
        node: &str,
        creds: &Credentials,
        lift: bool,
    ) -> Result<Vec<String>, Error> {
        let conn = self.connect(&id.cluster_id, creds).await?;
        let io = self
            .pool_ioctx(conn.clone(), &id.cluster_id, &id.pool, &id.namespace)
            .await?;
        let image = id.image.clone();
        let node = node.to_string();
        let res = with_ioctx(io, move |io| {
            update(io, &image, |record| {
                let before = (record.clients.len(), record.fenced.len());
                record.clients.retain(|c| c.node != node);
                let mut lifted = Vec::new();
                if lift {
                    for f in record.fenced.iter().filter(|f| f.node == node) {
                        match conn.blocklist_rm(&f.addr) {
                            Ok(()) => lifted.push(f.addr.clone()),
                            Err(e) => tracing::warn!(
                                node = %node, client = %f.addr, error = %e,
                                "could not lift the blocklist entry of this node's old client; it expires by itself, or run `ceph osd blocklist rm {}`",
                                f.addr
                            ),
                        }
                    }
                    record.fenced.retain(|f| !lifted.contains(&f.addr));
                }
                Ok(
                    if (record.clients.len(), record.fenced.len()) == before {
                        Change::Keep(lifted)
                    } else {
                        Change::Write(lifted)
                    },
                )
            })
        })
        .await;
        match res {
            Err(e) if e.not_found() => Ok(Vec::new()),
            Ok(None) => Err(contended(&id.image)),
            r => r
                .map(Option::unwrap_or_default)
                .map_err(Error::ceph("releasing this node's client of the image")),
        }
    }
}

enum Fence {
    Incompatible,
    Held(String),
}
