//! StorageClass parameters and the volume context handed to the node, as typed structs.
//! Keys and meanings follow ceph-csi, so existing StorageClasses carry over. A ceph-csi parameter
//! that would change security, placement or limits and is not implemented here is refused by
//! name: a StorageClass never silently provisions something other than it asks for.

use super::Error;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The features krbd supports, which is what a volume gets unless the StorageClass says otherwise.
pub const DEFAULT_FEATURES: &str = "layering,exclusive-lock,object-map,fast-diff,deep-flatten";

/// librbd's object sizes: 4 KiB (order 12) to 32 MiB (order 25).
const MIN_ORDER: u32 = 12;
const MAX_ORDER: u32 = 25;
/// librbd's default object size (4 MiB), which a stripe unit must divide when objectSize is unset.
const DEFAULT_ORDER: u32 = 22;

/// ceph-csi parameters this driver does not implement, with what a user would lose if they were
/// ignored. An empty value means unset, as in ceph-csi.
const REFUSED: &[(&str, &str)] = &[
    ("topologyConstrainedPools", "topology-constrained placement is not implemented: the image would land in `pool` whatever the node's zone"),
    ("BaseReadIops", QOS),
    ("BaseWriteIops", QOS),
    ("BaseReadBytesPerSecond", QOS),
    ("BaseWriteBytesPerSecond", QOS),
    ("ReadIopsPerGiB", QOS),
    ("WriteIopsPerGiB", QOS),
    ("ReadBpsPerGiB", QOS),
    ("WriteBpsPerGiB", QOS),
    ("BaseVolSizeBytes", QOS),
    ("mirroringMode", MIRRORING),
    ("schedulingInterval", MIRRORING),
    ("schedulingStartTime", MIRRORING),
];
const QOS: &str = "QoS limits are not implemented: the volume would be unthrottled";
const MIRRORING: &str = "RBD mirroring is not implemented: the image would not be replicated";

/// ceph-csi's encryption settings. ceph-csi reads them only when `encrypted` is true; here they
/// are refused unless `encrypted` is explicitly false, so nobody mistakes a plain volume for an
/// encrypted one.
const ENCRYPTION_KEYS: &[&str] = &[
    "encryptionKMSID",
    "encryptionType",
    "encryptionCipher",
    "encryptionKeySize",
    "encryptionSectorSize",
    "integrityMode",
];

/// ceph-csi parameters that change nothing about the image or its security here.
const HARMLESS: &[(&str, &str)] = &[
    (
        "tryOtherMounters",
        "no fallback between mappers; use mounter: auto",
    ),
    ("cephLogDir", "mapper daemons log through the plugin"),
    ("cephLogStrategy", "mapper daemons log through the plugin"),
    ("snapshotNamePrefix", "a VolumeSnapshotClass parameter"),
];

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
    /// ceph-csi's `krbd:o1,o2;nbd:o3` form; see [`MapperOptions`].
    pub map_options: Option<String>,
    pub unmap_options: Option<String>,
    pub volume_name_prefix: Option<String>,
    /// Striping (`rbd create --stripe-unit/--stripe-count/--object-size`), in bytes and objects.
    pub stripe_unit: Option<String>,
    pub stripe_count: Option<String>,
    pub object_size: Option<String>,
    pub image_format: Option<String>,
    pub encrypted: Option<String>,
    pub thick_provision: Option<String>,
    /// Everything else: logged, not rejected, so StorageClasses with keys of other tools still
    /// provision. ceph-csi's own keys are all handled above or in [`REFUSED`] and [`HARMLESS`].
    #[serde(flatten)]
    pub other: BTreeMap<String, String>,
}

/// Image layout from `objectSize`, `stripeUnit` and `stripeCount`, checked as librbd would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the object size.
    pub order: Option<u8>,
    /// (stripe unit in bytes, stripe count).
    pub stripe: Option<(u64, u64)>,
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
        if let Some(v) = &p.mkfs_options {
            if v.chars().any(|c| c.is_control()) {
                return Err(Error::InvalidArgument(
                    "mkfsOptions contains control characters".into(),
                ));
            }
        }
        for (key, v) in [
            ("mapOptions", &p.map_options),
            ("unmapOptions", &p.unmap_options),
        ] {
            MapperOptions::parse(key, v.as_deref().unwrap_or(""))?;
        }
        p.features()?;
        p.layout()?;
        p.refuse_unimplemented()?;
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

    /// The image layout; unset parameters leave librbd's defaults.
    pub fn layout(&self) -> Result<Layout, Error> {
        let number = |key: &str, v: &Option<String>| -> Result<Option<u64>, Error> {
            match v.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Some(n)),
                    _ => Err(Error::InvalidArgument(format!(
                        "{key} {v:?} is not a positive whole number"
                    ))),
                },
            }
        };
        let object_size = number("objectSize", &self.object_size)?;
        let unit = number("stripeUnit", &self.stripe_unit)?;
        let count = number("stripeCount", &self.stripe_count)?;
        let order = match object_size {
            None => None,
            Some(n)
                if n.is_power_of_two() && (MIN_ORDER..=MAX_ORDER).contains(&n.trailing_zeros()) =>
            {
                Some(n.trailing_zeros() as u8)
            }
            Some(n) => {
                return Err(Error::InvalidArgument(format!(
                    "objectSize {n} must be a power of two from {} to {} bytes",
                    1u64 << MIN_ORDER,
                    1u64 << MAX_ORDER
                )))
            }
        };
        let object_bytes = 1u64 << order.map_or(DEFAULT_ORDER, u32::from);
        let stripe = match (unit, count) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "stripeUnit needs stripeCount".into(),
                ))
            }
            // librbd's default stripe unit is the object size.
            (None, Some(c)) => Some((object_bytes, c)),
            (Some(u), Some(c)) => {
                if u > object_bytes || !object_bytes.is_multiple_of(u) {
                    return Err(Error::InvalidArgument(format!(
                        "stripeUnit {u} must divide the object size ({object_bytes} bytes)"
                    )));
                }
                Some((u, c))
            }
        };
        Ok(Layout { order, stripe })
    }

    fn refuse_unimplemented(&self) -> Result<(), Error> {
        if let Some(v) = &self.image_format {
            if v != "2" {
                return Err(Error::InvalidArgument(format!(
                    "imageFormat {v:?}: only format 2 images are made"
                )));
            }
        }
        if go_bool("thickProvision", self.thick_provision.as_deref())? == Some(true) {
            return Err(Error::InvalidArgument(
                "thickProvision: thick provisioning is not implemented; images are thin".into(),
            ));
        }
        match go_bool("encrypted", self.encrypted.as_deref())? {
            Some(true) => return Err(Error::InvalidArgument(
                "encrypted: encryption is not implemented; the volume would be stored in the clear"
                    .into(),
            )),
            Some(false) => {}
            None => {
                if let Some(k) = ENCRYPTION_KEYS.iter().find(|k| self.is_set(k)) {
                    return Err(Error::InvalidArgument(format!(
                        "{k}: encryption is not implemented (set encrypted: \"false\" for a plain volume)"
                    )));
                }
            }
        }
        if let Some((k, why)) = REFUSED.iter().find(|(k, _)| self.is_set(k)) {
            return Err(Error::InvalidArgument(format!("{k}: {why}")));
        }
        Ok(())
    }

    fn is_set(&self, key: &str) -> bool {
        self.other.get(key).is_some_and(|v| !v.is_empty())
    }

    /// Parameters accepted without effect, each with the reason, for the log.
    pub fn ignored(&self) -> Vec<(&str, &str)> {
        self.other
            .keys()
            .filter(|k| !k.starts_with("csi.storage.k8s.io/"))
            .map(|k| {
                let why = HARMLESS
                    .iter()
                    .find(|(h, _)| h == k)
                    .map(|(_, why)| *why)
                    .or_else(|| {
                        ENCRYPTION_KEYS
                            .contains(&k.as_str())
                            .then_some("encrypted is false")
                    })
                    .unwrap_or("not a parameter of this driver or of ceph-csi");
                (k.as_str(), why)
            })
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
            ("unmapOptions", &self.unmap_options),
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

/// Go's `strconv.ParseBool`, which ceph-csi uses for its boolean parameters.
fn go_bool(key: &str, v: Option<&str>) -> Result<Option<bool>, Error> {
    match v {
        None => Ok(None),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(Some(true)),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(Some(false)),
        Some(other) => Err(Error::InvalidArgument(format!(
            "{key} {other:?} is not \"true\" or \"false\""
        ))),
    }
}

/// `mapOptions` / `unmapOptions` split by mapper, as ceph-csi's `parseMapOptions` does:
/// `;`-separated parts, each `krbd:<options>`, `nbd:<options>` (label case-insensitive), or
/// bare `<options>`, which are krbd's (ceph-csi's first form). Options may contain `:` only in a
/// labelled part. Two deliberate differences, both refusing what ceph-csi would silently drop:
/// a mapper named twice is an error (ceph-csi keeps the last), and a blank part is skipped
/// (ceph-csi lets it erase the krbd options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapperOptions {
    pub krbd: Option<String>,
    pub nbd: Option<String>,
}

/// Options the driver sets itself from the cluster config and the secrets; a StorageClass that
/// overrode them would move the mapping to another identity, or put a key in argv.
const DRIVER_OPTIONS: &[&str] = &[
    "id", "name", "keyfile", "keyring", "key", "secret", "mon_host", "mon-host", "conf", "cluster",
];

impl MapperOptions {
    /// `key` names the parameter in errors.
    pub fn parse(key: &str, raw: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::InvalidArgument(format!("{key}: {why}"));
        let mut out = MapperOptions::default();
        let mut seen = (false, false);
        for part in raw.split(';').filter(|p| !p.trim().is_empty()) {
            let (slot, seen, options) = match part.split_once(':') {
                None => (&mut out.krbd, &mut seen.0, part.trim()),
                Some((label, options)) => match label.trim().to_ascii_lowercase().as_str() {
                    "krbd" => (&mut out.krbd, &mut seen.0, options.trim()),
                    "nbd" => (&mut out.nbd, &mut seen.1, options.trim()),
                    other => {
                        return Err(bad(format!(
                            "unknown mounter type {other:?} in {part:?} (krbd or nbd; options containing ':' need the label)"
                        )))
                    }
                },
            };
            if std::mem::replace(seen, true) {
                return Err(bad(format!(
                    "{part:?} sets options for a mapper named before"
                )));
            }
            if options.is_empty() {
                continue;
            }
            for opt in options.split(',') {
                check_map_option(opt)
                    .map_err(|why| bad(format!("option {opt:?} in {part:?} {why}")))?;
            }
            *slot = Some(options.to_string());
        }
        Ok(out)
    }
}

fn check_map_option(opt: &str) -> Result<(), &'static str> {
    let name = opt.split_once('=').map_or(opt, |(k, _)| k);
    if opt.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters");
    }
    if name.is_empty()
        || name.starts_with('-')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("is not an option name of [A-Za-z0-9_-]");
    }
    if DRIVER_OPTIONS.contains(&name) {
        return Err("is set by the driver from the cluster config and secrets");
    }
    Ok(())
}

pub(crate) fn safe_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

pub(crate) fn check_name(what: &str, v: &str) -> Result<(), Error> {
    if v.is_empty() || v.len() > 64 || v.starts_with(['.', '-']) || !v.bytes().all(safe_name_byte) {
        return Err(Error::InvalidArgument(format!(
            "{what} {v:?} is not a valid name (at most 64 of [A-Za-z0-9._-], not starting with '.' or '-')"
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
        assert_eq!(p.image_format.as_deref(), Some("2"));
        assert!(p.ignored().is_empty());
        assert_eq!(p.features().unwrap(), 0b111101);
    }

    fn with(kv: &[(&str, &str)]) -> Result<VolumeParams, Error> {
        let mut m = map(&[("clusterID", "c"), ("pool", "rbd")]);
        m.extend(map(kv));
        VolumeParams::parse(&m)
    }

    fn refused_naming(kv: &[(&str, &str)], key: &str) {
        match with(kv) {
            Err(Error::InvalidArgument(m)) => assert!(m.starts_with(key), "{kv:?}: {m}"),
            other => panic!("{kv:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn unimplemented_security_and_placement_parameters_are_refused_by_name() {
        for (k, v) in [
            ("encrypted", "true"),
            ("encrypted", "True"),
            ("encrypted", "1"),
            ("encrypted", "yes"),
            ("encryptionKMSID", "vault-1"),
            ("encryptionType", "block"),
            ("encryptionCipher", "aes-xts-plain64"),
            ("integrityMode", "hmac-sha512"),
            ("topologyConstrainedPools", r#"[{"poolName":"p0"}]"#),
            ("thickProvision", "true"),
            ("thickProvision", "sure"),
            ("imageFormat", "1"),
            ("BaseReadIops", "100"),
            ("WriteBpsPerGiB", "1000"),
            ("mirroringMode", "snapshot"),
            ("schedulingInterval", "1h"),
        ] {
            refused_naming(&[(k, v)], k);
        }
        // ceph-csi ignores its encryption settings unless `encrypted` is true; an explicit false
        // makes that clear, and the volume is plain as asked.
        let p = with(&[("encrypted", "false"), ("encryptionKMSID", "vault-1")]).unwrap();
        assert_eq!(p.ignored(), vec![("encryptionKMSID", "encrypted is false")]);
    }

    #[test]
    fn harmless_ceph_csi_parameters_are_accepted_and_reported_as_ignored() {
        let p = with(&[
            ("imageFormat", "2"),
            ("encrypted", "false"),
            ("thickProvision", "false"),
            ("tryOtherMounters", "true"),
            ("cephLogStrategy", "compress"),
            ("topologyConstrainedPools", ""),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("someOtherTool/key", "v"),
        ])
        .unwrap();
        let keys: Vec<&str> = p.ignored().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "cephLogStrategy",
                "someOtherTool/key",
                "topologyConstrainedPools",
                "tryOtherMounters"
            ]
        );
    }

    #[test]
    fn striping_parameters_become_an_image_layout_checked_like_librbd() {
        let l = with(&[
            ("objectSize", "8388608"),
            ("stripeUnit", "65536"),
            ("stripeCount", "16"),
        ])
        .unwrap()
        .layout()
        .unwrap();
        assert_eq!(
            l,
            Layout {
                order: Some(23),
                stripe: Some((65536, 16))
            }
        );
        assert_eq!(with(&[]).unwrap().layout().unwrap(), Layout::default());
        // A count alone stripes in whole (default 4 MiB) objects.
        assert_eq!(
            with(&[("stripeCount", "4")])
                .unwrap()
                .layout()
                .unwrap()
                .stripe,
            Some((4 << 20, 4))
        );
        for (kv, key) in [
            (&[("objectSize", "3000000")][..], "objectSize"),
            (&[("objectSize", "2048")][..], "objectSize"),
            (&[("objectSize", "67108864")][..], "objectSize"),
            (&[("objectSize", "-4096")][..], "objectSize"),
            (&[("stripeUnit", "65536")][..], "stripeUnit"),
            (&[("stripeCount", "0")][..], "stripeCount"),
            (
                &[("stripeUnit", "8388608"), ("stripeCount", "2")][..],
                "stripeUnit",
            ),
            (
                &[("stripeUnit", "3000"), ("stripeCount", "2")][..],
                "stripeUnit",
            ),
            (
                &[
                    ("objectSize", "65536"),
                    ("stripeUnit", "131072"),
                    ("stripeCount", "2"),
                ][..],
                "stripeUnit",
            ),
        ] {
            refused_naming(kv, key);
        }
    }

    /// The cases of ceph-csi's own `TestParseMapOptions`.
    #[test]
    fn map_options_split_by_mapper_as_ceph_csi_does() {
        let opts = |krbd: Option<&str>, nbd: Option<&str>| MapperOptions {
            krbd: krbd.map(String::from),
            nbd: nbd.map(String::from),
        };
        for (raw, want) in [
            ("kOp1,kOp2", opts(Some("kOp1,kOp2"), None)),
            (
                "krbd:kOp1,kOp2;nbd:nOp1,nOp2",
                opts(Some("kOp1,kOp2"), Some("nOp1,nOp2")),
            ),
            (
                "kOp1,kOp2;nbd:nOp1,nOp2",
                opts(Some("kOp1,kOp2"), Some("nOp1,nOp2")),
            ),
            ("nbd:nOp1,nOp2", opts(None, Some("nOp1,nOp2"))),
            (
                "krbd:kOp1,kOp2=kOp21:kOp22;nbd:nOp1,nOp2=nOp21:nOp22",
                opts(Some("kOp1,kOp2=kOp21:kOp22"), Some("nOp1,nOp2=nOp21:nOp22")),
            ),
            // The example of ceph-csi's storageclass.yaml, and spacing around parts.
            (
                "krbd:lock_on_read,queue_depth=1024;nbd:try-netlink",
                opts(Some("lock_on_read,queue_depth=1024"), Some("try-netlink")),
            ),
            (
                " KRBD: force ; nbd:force;",
                opts(Some("force"), Some("force")),
            ),
            (
                "krbd:read_from_replica=localize,crush_location=zone:zone1|host:h1",
                opts(
                    Some("read_from_replica=localize,crush_location=zone:zone1|host:h1"),
                    None,
                ),
            ),
            ("", opts(None, None)),
            ("nbd:", opts(None, None)),
        ] {
            assert_eq!(
                MapperOptions::parse("mapOptions", raw).unwrap(),
                want,
                "{raw}"
            );
        }
        for (raw, part) in [
            ("kOp1,kOp2=kOp21:kOp22;nbd:nOp1,nOp2", "kOp1,kOp2=kOp21"),
            ("xyz:xOp1,xOp2", "xyz"),
            (":a", "\"\""),
            // Refused where ceph-csi would silently keep only one of them.
            ("krbd:a;krbd:b", "krbd:b"),
            ("a;krbd:b", "krbd:b"),
            ("krbd:a,,b", "\"\""),
            ("krbd:a b", "a b"),
            ("krbd:--device=/dev/x", "--device"),
            ("nbd:id=admin", "id=admin"),
            ("krbd:secret=AQBx", "secret=AQBx"),
            ("nbd:keyfile=/etc/shadow", "keyfile"),
        ] {
            match MapperOptions::parse("unmapOptions", raw) {
                Err(Error::InvalidArgument(m)) => {
                    assert!(
                        m.starts_with("unmapOptions: ") && m.contains(part),
                        "{raw}: {m}"
                    )
                }
                other => panic!("{raw}: {other:?}"),
            }
        }
    }

    #[test]
    fn map_and_unmap_options_reach_the_volume_context_unchanged() {
        let p = with(&[
            ("mapOptions", "krbd:a;nbd:b"),
            ("unmapOptions", "krbd:force"),
        ])
        .unwrap();
        let ctx = p.volume_context("img");
        assert_eq!(ctx["mapOptions"], "krbd:a;nbd:b");
        assert_eq!(ctx["unmapOptions"], "krbd:force");
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

    #[test]
    fn map_options_with_an_unknown_mounter_label_are_invalid() {
        for key in ["mapOptions", "unmapOptions"] {
            let e = VolumeParams::parse(&map(&[
                ("clusterID", "c"),
                ("pool", "rbd"),
                (key, "krbd:lock_on_read;xyz:a,b"),
            ]))
            .unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains(key) && m.contains("xyz")),
                "{key}: {e}"
            );
        }
    }
}
