//! StorageClass parameters and the volume context handed to the node, as typed structs.
//! Keys and meanings follow ceph-csi, so existing StorageClasses carry over.

use super::Error;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The features krbd supports, which is what a volume gets unless the StorageClass says otherwise.
pub const DEFAULT_FEATURES: &str = "layering,exclusive-lock,object-map,fast-diff,deep-flatten";

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeParams {
    #[serde(rename = "clusterID", default)]
    pub cluster_id: String,
    #[serde(default)]
    pub pool: String,
    pub data_pool: Option<String>,
    pub image_features: Option<String>,
    #[serde(rename = "csi.storage.k8s.io/fstype")]
    pub fs_type: Option<String>,
    pub mounter: Option<String>,
    pub mkfs_options: Option<String>,
    pub map_options: Option<String>,
    pub volume_name_prefix: Option<String>,
    /// Everything else: logged, not rejected, so ceph-csi StorageClasses with options we do not
    /// implement (for example `imageFormat`) still provision.
    #[serde(flatten)]
    pub other: BTreeMap<String, String>,
}

impl VolumeParams {
    pub fn parse(map: &HashMap<String, String>) -> Result<Self, Error> {
        let value = serde_json::to_value(map).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let p: VolumeParams = serde_json::from_value(value)
            .map_err(|e| Error::InvalidArgument(format!("parameters: {e}")))?;
        if p.cluster_id.is_empty() {
            return Err(Error::InvalidArgument(
                "parameter clusterID is required".into(),
            ));
        }
        if p.pool.is_empty() {
            return Err(Error::InvalidArgument("parameter pool is required".into()));
        }
        check_name("pool", &p.pool)?;
        if let Some(dp) = &p.data_pool {
            check_name("dataPool", dp)?;
        }
        if let Some(prefix) = &p.volume_name_prefix {
            if prefix.len() > 32 || !prefix.bytes().all(safe_name_byte) {
                return Err(Error::InvalidArgument(
                    "volumeNamePrefix must be at most 32 characters of [A-Za-z0-9._-]".into(),
                ));
            }
        }
        if let Some(fs) = &p.fs_type {
            if !matches!(fs.as_str(), "ext4" | "xfs" | "") {
                return Err(Error::InvalidArgument(format!(
                    "csi.storage.k8s.io/fstype {fs:?}: only ext4 and xfs"
                )));
            }
        }
        if let Some(m) = &p.mounter {
            if !matches!(
                m.as_str(),
                "" | "rbd" | "krbd" | "nbd" | "rbd-nbd" | "fuse" | "rbd-fuse" | "auto"
            ) {
                return Err(Error::InvalidArgument(format!(
                    "mounter {m:?}: use krbd, nbd, fuse or auto"
                )));
            }
        }
        for (k, v) in [
            ("mkfsOptions", &p.mkfs_options),
            ("mapOptions", &p.map_options),
        ] {
            if let Some(v) = v {
                if v.chars().any(|c| c.is_control()) {
                    return Err(Error::InvalidArgument(format!(
                        "{k} contains control characters"
                    )));
                }
            }
        }
        p.features()?;
        Ok(p)
    }

    pub fn features(&self) -> Result<u64, Error> {
        parse_features(
            self.image_features
                .as_deref()
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_FEATURES),
        )
    }

    /// Keys we did not recognise and that do not belong to the CO.
    pub fn unknown_keys(&self) -> Vec<&str> {
        self.other
            .keys()
            .filter(|k| !k.starts_with("csi.storage.k8s.io/"))
            .map(|s| s.as_str())
            .collect()
    }

    /// What NodeStage needs to know about the volume.
    pub fn volume_context(&self, image: &str) -> HashMap<String, String> {
        let mut ctx = HashMap::new();
        ctx.insert("clusterID".into(), self.cluster_id.clone());
        ctx.insert("pool".into(), self.pool.clone());
        ctx.insert("imageName".into(), image.to_string());
        let opt = [
            ("mounter", &self.mounter),
            ("mkfsOptions", &self.mkfs_options),
            ("mapOptions", &self.map_options),
            ("dataPool", &self.data_pool),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                ctx.insert(k.into(), v.clone());
            }
        }
        ctx.insert(
            "imageFeatures".into(),
            self.image_features
                .clone()
                .unwrap_or_else(|| DEFAULT_FEATURES.into()),
        );
        ctx
    }
}

pub(crate) fn safe_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

fn check_name(what: &str, v: &str) -> Result<(), Error> {
    if v.is_empty() || v.len() > 64 || v.starts_with('.') || !v.bytes().all(safe_name_byte) {
        return Err(Error::InvalidArgument(format!(
            "{what} {v:?} is not a valid pool name"
        )));
    }
    Ok(())
}

/// `layering,exclusive-lock,...` to librbd feature bits, with the dependency rules librbd enforces.
pub fn parse_features(list: &str) -> Result<u64, Error> {
    let mut bits = 0u64;
    for f in list.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        bits |= match f {
            "layering" => 1 << 0,
            "exclusive-lock" => 1 << 2,
            "object-map" => 1 << 3,
            "fast-diff" => 1 << 4,
            "deep-flatten" => 1 << 5,
            "journaling" => 1 << 6,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "imageFeatures: unknown feature {other:?}"
                )))
            }
        };
    }
    let has = |b: u64| bits & (1 << b) != 0;
    if has(3) && !has(2) {
        return Err(Error::InvalidArgument(
            "imageFeatures: object-map needs exclusive-lock".into(),
        ));
    }
    if has(4) && !has(3) {
        return Err(Error::InvalidArgument(
            "imageFeatures: fast-diff needs object-map".into(),
        ));
    }
    if has(6) && !has(2) {
        return Err(Error::InvalidArgument(
            "imageFeatures: journaling needs exclusive-lock".into(),
        ));
    }
    if !has(0) {
        return Err(Error::InvalidArgument(
            "imageFeatures: layering is required (snapshots and clones)".into(),
        ));
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_ceph_csi_storage_class_parameters() {
        let p = VolumeParams::parse(&map(&[
            ("clusterID", "c1"),
            ("pool", "rbd"),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("mounter", "fuse"),
            ("imageFormat", "2"),
        ]))
        .unwrap();
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        assert_eq!(p.unknown_keys(), vec!["imageFormat"]);
        assert_eq!(p.features().unwrap(), 0b111101);
    }

    #[test]
    fn rejects_missing_and_invalid_values() {
        assert!(VolumeParams::parse(&map(&[("pool", "rbd")])).is_err());
        assert!(VolumeParams::parse(&map(&[("clusterID", "c"), ("pool", "a/b")])).is_err());
        assert!(VolumeParams::parse(&map(&[
            ("clusterID", "c"),
            ("pool", "rbd"),
            ("imageFeatures", "magic")
        ]))
        .is_err());
        assert!(VolumeParams::parse(&map(&[
            ("clusterID", "c"),
            ("pool", "rbd"),
            ("imageFeatures", "layering,fast-diff")
        ]))
        .is_err());
        assert!(VolumeParams::parse(&map(&[
            ("clusterID", "c"),
            ("pool", "rbd"),
            ("mkfsOptions", "-E\u{1}")
        ]))
        .is_err());
        assert!(VolumeParams::parse(&map(&[
            ("clusterID", "c"),
            ("pool", "rbd"),
            ("csi.storage.k8s.io/fstype", "zfs")
        ]))
        .is_err());
    }
}
