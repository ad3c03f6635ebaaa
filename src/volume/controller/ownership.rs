//! What is ours. Every image carries the request name that made it (`rook-rbd.name`), so an image
//! that another driver sharing the pool made for another name is never adopted. Every custom
//! `volumeNamePrefix` is recorded in its pool, so listing and the trash sweep still find those
//! volumes after a restart.

use super::{unfinished, Controller, NAME_KEY, PV_NAME_KEY};
use crate::ceph::pool::with_ioctx;
use crate::ceph::{CephError, Image, IoCtx};
use crate::volume::naming::VOLUME_PREFIX;
use crate::volume::Error;
use std::collections::BTreeSet;
use std::sync::Arc;

/// One custom prefix a line. Written only by appends, which the OSD serialises, so two
/// controllers recording different prefixes at once both stay recorded.
const PREFIX_OBJECT: &str = "rook-rbd.volume-prefixes";

/// Whether an image found where `name`'s image belongs may be taken as the one `name` made,
/// before anything of it is changed (a refusal is final: `AlreadyExists`).
///
/// Marked with `name`: ours. Marked otherwise: someone else's. Not marked: made by the previous
/// version of this driver (which marked only when Kubernetes metadata came along) or by a create
/// that stopped before its mark; adopted unless its Kubernetes metadata names another PV.
/// `parent` is the image a clone was made from: librbd copies its metadata into the clone, so a
/// value equal to the parent's was inherited and says nothing about the clone.
pub(super) fn check_mark(
    img: &Image,
    image: &str,
    name: &str,
    parent: Option<&Image>,
) -> Result<(), Error> {
    let ctx = || format!("reading the marks of {image}");
    let inherited = |key: &str, value: &str| -> Result<bool, Error> {
        match parent {
            Some(p) => {
                Ok(p.metadata_get(key).map_err(unfinished(ctx()))?.as_deref() == Some(value))
            }
            None => Ok(false),
        }
    };
    match img.metadata_get(NAME_KEY).map_err(unfinished(ctx()))? {
        Some(m) if m == name => return Ok(()),
        Some(m) if !inherited(NAME_KEY, &m)? => {
            return Err(Error::AlreadyExists(format!(
                "image {image} exists, made for request {m:?}, not {name:?}"
            )))
        }
        _ => {}
    }
    if let Some(pv) = img.metadata_get(PV_NAME_KEY).map_err(unfinished(ctx()))? {
        if pv != name && !inherited(PV_NAME_KEY, &pv)? {
            return Err(Error::AlreadyExists(format!(
                "image {image} exists, unmarked, and belongs to PV {pv:?}, not {name:?}"
            )));
        }
    }
    Ok(())
}

/// Marks an image as made by request `name`. The first step after an image is made or adopted.
pub(super) fn mark(img: &Image, image: &str, name: &str) -> Result<(), Error> {
    img.metadata_set(NAME_KEY, name)
        .map_err(unfinished(format!("marking {image}")))
}

/// The volume-name prefixes of the pool (or namespace) of `io`: the default one and every custom
/// one recorded there. For code that already runs on a blocking thread.
pub(super) fn read_prefixes(io: &IoCtx) -> Result<BTreeSet<String>, CephError> {
    let mut out = BTreeSet::from([VOLUME_PREFIX.to_string()]);
    if let Some(raw) = io.read_small(PREFIX_OBJECT)? {
        // An empty line would match every image: never a prefix.
        out.extend(
            String::from_utf8_lossy(&raw)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
    }
    Ok(out)
}

impl Controller {
    /// The image-name prefixes of this driver's volumes in the pool of `io`, also those recorded
    /// by earlier processes. Listing and the trash sweep filter images by these.
    pub async fn known_prefixes(&self, io: &Arc<IoCtx>) -> Result<BTreeSet<String>, Error> {
        let found = with_ioctx(io.clone(), read_prefixes)
            .await
            .map_err(Error::ceph(format!(
                "reading the volume name prefixes of pool {}",
                io.pool()
            )))?;
        self.prefixes.lock().unwrap().extend(found.iter().cloned());
        Ok(found)
    }

    /// Records a custom prefix in the pool before the first image with it is made, so that image
    /// is found again after a restart. One read per pool and prefix per process, one append ever.
    pub(super) async fn record_prefix(
        &self,
        cluster_id: &str,
        io: &Arc<IoCtx>,
        prefix: &str,
    ) -> Result<(), Error> {
        let key = (cluster_id.to_string(), io.location(), prefix.to_string());
        if self.recorded_prefixes.lock().unwrap().contains(&key) {
            return Ok(());
        }
        let p = prefix.to_string();
        with_ioctx(io.clone(), move |io| {
            if !read_prefixes(io)?.contains(&p) {
                io.append(PREFIX_OBJECT, format!("{p}\n").as_bytes())?;
            }
            Ok(())
        })
        .await
        .map_err(Error::ceph(format!(
            "recording volumeNamePrefix {prefix:?}"
        )))?;
        self.prefixes.lock().unwrap().insert(prefix.to_string());
        self.recorded_prefixes.lock().unwrap().insert(key);
        Ok(())
    }
}
