//! Self-describing, versioned volume and snapshot IDs.
//!
//! `0001-<len>-<clusterID>-<len>-<pool>-<image>`: the version, then length-prefixed cluster ID and
//! pool (so either may contain '-'), then the image name. An image in a RADOS namespace has
//! `0002-<len>-<clusterID>-<len>-<pool>-<len>-<namespace>-<image>`. The namespace is in the ID,
//! not looked up in the cluster config, so a volume stays reachable (and deletable) after the
//! config's `radosNamespace` is added or changed; the config only says where new images go.
//! A snapshot is an image of its own (`csi-snap-...`), so snapshot IDs have the same shape.
//! An ID never exceeds 128 bytes, the limit CSI sidecars and Kubernetes object fields live with.

use std::fmt;

pub const MAX_ID_LEN: usize = 128;
const VERSION: &str = "0001";
const VERSION_NAMESPACED: &str = "0002";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    pub cluster_id: String,
    pub pool: String,
    /// RADOS namespace in the pool; empty for the default one.
    pub namespace: String,
    pub image: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    pub volume: VolumeId,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {kind} ID {id:?}: {why}")]
pub struct IdError {
    pub kind: &'static str,
    pub id: String,
    pub why: &'static str,
}

impl VolumeId {
    /// An image in the pool's default namespace.
    pub fn new(cluster_id: &str, pool: &str, image: &str) -> Self {
        Self::in_namespace(cluster_id, pool, "", image)
    }

    pub fn in_namespace(cluster_id: &str, pool: &str, namespace: &str, image: &str) -> Self {
        Self {
            cluster_id: cluster_id.into(),
            pool: pool.into(),
            namespace: namespace.into(),
            image: image.into(),
        }
    }

    /// Another image in the same cluster, pool and namespace.
    pub fn sibling(&self, image: &str) -> Self {
        Self {
            image: image.into(),
            ..self.clone()
        }
    }

    /// The namespace, when there is one.
    pub fn namespace(&self) -> Option<&str> {
        Some(self.namespace.as_str()).filter(|n| !n.is_empty())
    }

    pub fn encode(&self) -> String {
        let field = |v: &str| format!("{:04x}-{v}-", v.len());
        match self.namespace() {
            // Unchanged from before namespaces existed, so those IDs stay what they were.
            None => format!(
                "{VERSION}-{}{}{}",
                field(&self.cluster_id),
                field(&self.pool),
                self.image
            ),
            Some(ns) => format!(
                "{VERSION_NAMESPACED}-{}{}{}{}",
                field(&self.cluster_id),
                field(&self.pool),
                field(ns),
                self.image
            ),
        }
    }

    pub fn decode(id: &str) -> Result<Self, IdError> {
        let err = |why| IdError {
            kind: "volume",
            id: truncate(id),
            why,
        };
        if id.len() > MAX_ID_LEN {
            return Err(err("longer than 128 bytes"));
        }
        let (rest, namespaced) = match id.split_once('-') {
            Some((VERSION, rest)) => (rest, false),
            Some((VERSION_NAMESPACED, rest)) => (rest, true),
            _ => return Err(err("unknown version")),
        };
        let (cluster_id, rest) = take_prefixed(rest).ok_or_else(|| err("bad cluster field"))?;
        let (pool, rest) = take_prefixed(rest).ok_or_else(|| err("bad pool field"))?;
        let (namespace, image) = if namespaced {
            let (ns, image) = take_prefixed(rest).ok_or_else(|| err("bad namespace field"))?;
            if ns.is_empty() || ns.contains('/') {
                return Err(err("bad namespace field"));
            }
            (ns, image)
        } else {
            ("", rest)
        };
        if image.is_empty() || image.contains('/') || image.contains('@') {
            return Err(err("bad image field"));
        }
        if cluster_id.is_empty() || pool.is_empty() {
            return Err(err("empty cluster or pool"));
        }
        Ok(Self::in_namespace(cluster_id, pool, namespace, image))
    }
}

/// Reads `<4 hex len>-<value>-` and returns (value, remainder).
fn take_prefixed(s: &str) -> Option<(&str, &str)> {
    let len_hex = s.get(..4)?;
    if !len_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let len = usize::from_str_radix(len_hex, 16).ok()?;
    let rest = s.get(4..)?.strip_prefix('-')?;
    let value = rest.get(..len)?;
    let rest = rest.get(len..)?.strip_prefix('-')?;
    Some((value, rest))
}

fn truncate(id: &str) -> String {
    id.chars().take(160).collect()
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl SnapshotId {
    pub fn encode(&self) -> String {
        self.volume.encode()
    }

    /// A snapshot is an image of its own, so its ID has the same shape as a volume ID.
    pub fn decode(id: &str) -> Result<Self, IdError> {
        VolumeId::decode(id)
            .map(|volume| Self { volume })
            .map_err(|e| IdError {
                kind: "snapshot",
                ..e
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_round_trips_with_dashes_in_every_field() {
        let v = VolumeId::new("a-b-c", "my-pool", "csi-vol-pvc-1");
        assert_eq!(VolumeId::decode(&v.encode()).unwrap(), v);
        assert_eq!(v.encode(), "0001-0005-a-b-c-0007-my-pool-csi-vol-pvc-1");
    }

    #[test]
    fn a_namespace_gets_its_own_field_and_ids_without_one_are_unchanged() {
        let v = VolumeId::in_namespace("a-b", "rbd", "ns-1", "csi-vol-x");
        assert_eq!(v.encode(), "0002-0003-a-b-0003-rbd-0004-ns-1-csi-vol-x");
        assert_eq!(VolumeId::decode(&v.encode()).unwrap(), v);
        assert_eq!(v.namespace(), Some("ns-1"));
        let plain = VolumeId::in_namespace("a-b", "rbd", "", "csi-vol-x");
        assert_eq!(plain, VolumeId::new("a-b", "rbd", "csi-vol-x"));
        assert_eq!(plain.encode(), "0001-0003-a-b-0003-rbd-csi-vol-x");
        assert_eq!(plain.namespace(), None);
        // Same cluster, pool and image name in two namespaces: two different volumes.
        assert_ne!(v.encode(), plain.encode());
        assert_eq!(v.sibling("csi-snap-y").namespace, "ns-1");
        for bad in [
            "0002-0003-a-b-0003-rbd-csi-vol-x",
            "0002-0003-a-b-0003-rbd-0000--csi-vol-x",
            "0002-0003-a-b-0003-rbd-0003-a/b-img",
        ] {
            assert!(VolumeId::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_id_round_trips() {
        let s = SnapshotId {
            volume: VolumeId::new("c", "rbd", "csi-snap-y"),
        };
        assert_eq!(SnapshotId::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "fake-vol-id-1",
            "0001-zzzz-a-0003-rbd-x",
            "0001-0010-short",
            "0002-0001-a-0001-b-c",
            "0001-0001-a-0001-b-",
        ] {
            assert!(VolumeId::decode(bad).is_err(), "{bad}");
        }
        assert!(VolumeId::decode(&"x".repeat(200)).is_err());
        assert!(SnapshotId::decode("0001-0001-a-0001-b-").is_err());
    }
}
