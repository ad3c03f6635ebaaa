//! A Ceph cluster's identity, which the operator mints once and never again: the fsid and the
//! cephx keys of `mon.` and `client.admin`. It lives in Secret `rook-ceph-mon` with Rook's keys,
//! so tools written for Rook find it where they look.

use crate::secret::Secret;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use k8s_openapi::ByteString;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Ceph's `CEPH_CRYPTO_AES`: the only key type `ceph-authtool --gen-print-key` makes.
const CRYPTO_AES: u16 = 1;
const AES_KEY_LEN: usize = 16;
/// type (u16) + created (utime_t: u32 s, u32 ns) + length (u16) + the AES key.
const ENCODED_LEN: usize = 2 + 8 + 2 + AES_KEY_LEN;

/// Rook's data keys in Secret `rook-ceph-mon`.
pub mod keys {
    pub const CLUSTER_NAME: &str = "cluster-name";
    pub const FSID: &str = "fsid";
    pub const MON_SECRET: &str = "mon-secret";
    pub const ADMIN_SECRET: &str = "admin-secret";
    pub const CEPH_USERNAME: &str = "ceph-username";
    pub const CEPH_SECRET: &str = "ceph-secret";
}

/// The user whose key is `admin-secret` (and `ceph-secret`).
pub const ADMIN_USER: &str = "client.admin";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the OS random source failed: {0}")]
    Random(getrandom::Error),
    /// A field of an existing identity is missing or malformed; says which, never its value.
    #[error("{0}")]
    Invalid(String),
}

/// A new cephx secret key in the format of `ceph-authtool --gen-print-key`: Ceph's encoded
/// `CryptoKey` (AES, creation time, 16 random bytes) in base64.
pub fn generate_cephx_key() -> Result<Secret, IdentityError> {
    let mut key = [0u8; AES_KEY_LEN];
    getrandom::fill(&mut key).map_err(IdentityError::Random)?;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut buf = Vec::with_capacity(ENCODED_LEN);
    buf.extend(CRYPTO_AES.to_le_bytes());
    // utime_t is 32-bit seconds; Ceph itself truncates the same way.
    buf.extend((created.as_secs() as u32).to_le_bytes());
    buf.extend(created.subsec_nanos().to_le_bytes());
    buf.extend((AES_KEY_LEN as u16).to_le_bytes());
    buf.extend(key);
    Ok(Secret::new(STANDARD.encode(buf)))
}

/// Whether `key` is a cephx key Ceph will load: base64 of an AES `CryptoKey` with a 16-byte key.
pub fn is_cephx_key(key: &str) -> bool {
    let Ok(raw) = STANDARD.decode(key) else {
        return false;
    };
    raw.len() == ENCODED_LEN
        && raw[0..2] == CRYPTO_AES.to_le_bytes()
        && raw[10..12] == (AES_KEY_LEN as u16).to_le_bytes()
}

/// What a cluster is: the same fsid and keys for its whole life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterIdentity {
    pub fsid: Uuid,
    pub mon_key: Secret,
    pub admin_key: Secret,
}

impl ClusterIdentity {
    /// A new cluster: a random fsid and fresh keys.
    pub fn mint() -> Result<Self, IdentityError> {
        Ok(Self {
            fsid: Uuid::new_v4(),
            mon_key: generate_cephx_key()?,
            admin_key: generate_cephx_key()?,
        })
    }

    /// The identity in Secret `rook-ceph-mon`'s data, as Rook writes it.
    pub fn to_secret_data(&self, cluster_name: &str) -> BTreeMap<String, ByteString> {
        let admin = self.admin_key.expose();
        [
            (keys::CLUSTER_NAME, cluster_name),
            (keys::FSID, &self.fsid.to_string()),
            (keys::MON_SECRET, self.mon_key.expose()),
            (keys::ADMIN_SECRET, admin),
            (keys::CEPH_USERNAME, ADMIN_USER),
            (keys::CEPH_SECRET, admin),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
    }

    /// The identity stored in Secret `rook-ceph-mon` (by rook-rbd or by Rook). `admin-secret`
    /// is Rook's older key for the admin key, `ceph-secret` its newer one; either will do.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, IdentityError> {
        let field = |k: &str| -> Result<&str, IdentityError> {
            let v = data
                .get(k)
                .ok_or_else(|| IdentityError::Invalid(format!("has no `{k}`")))?;
            std::str::from_utf8(&v.0)
                .map(str::trim)
                .map_err(|_| IdentityError::Invalid(format!("`{k}` is not UTF-8")))
        };
        let key = |k: &str| -> Result<Secret, IdentityError> {
            let v = field(k)?;
            if is_cephx_key(v) {
                Ok(Secret::new(v))
            } else {
                Err(IdentityError::Invalid(format!("`{k}` is not a cephx key")))
            }
        };
        let fsid = field(keys::FSID)?;
        let fsid = Uuid::parse_str(fsid)
            .map_err(|_| IdentityError::Invalid(format!("`fsid` {fsid:?} is not a UUID")))?;
        let admin_key = match data.contains_key(keys::CEPH_SECRET) {
            true => key(keys::CEPH_SECRET)?,
            false => key(keys::ADMIN_SECRET)?,
        };
        Ok(Self {
            fsid,
            mon_key: key(keys::MON_SECRET)?,
            admin_key,
        })
    }

    /// Rook's admin keyring (Secret `rook-ceph-admin-keyring`, key `keyring`).
    pub fn admin_keyring(&self) -> Secret {
        Secret::new(format!(
            "[{ADMIN_USER}]\n\tkey = {}\n\tcaps mds = \"allow *\"\n\tcaps mon = \"allow *\"\n\
             \tcaps osd = \"allow *\"\n\tcaps mgr = \"allow *\"\n",
            self.admin_key.expose()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn generated_keys_have_ceph_authtools_layout_and_differ() {
        let a = generate_cephx_key().unwrap();
        let b = generate_cephx_key().unwrap();
        assert_ne!(a, b);
        for k in [&a, &b] {
            assert!(is_cephx_key(k.expose()));
            // 28 bytes in base64; type 1 little-endian encodes as the familiar "AQ" prefix.
            assert_eq!(k.expose().len(), 40);
            assert!(k.expose().starts_with("AQ"));
        }
    }

    /// Ceph's own parser, when this machine has it: `ceph-authtool --gen-print-key` output passes
    /// our check, and a keyring holding our key is read back by `ceph-authtool -l` unchanged.
    #[test]
    fn ceph_authtool_reads_our_keys_and_we_accept_its() {
        let Ok(out) = Command::new("ceph-authtool")
            .arg("--gen-print-key")
            .output()
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have ceph-authtool"
            );
            eprintln!("skipped: ceph-authtool is not installed (`make deps` installs it)");
            return;
        };
        let theirs = String::from_utf8(out.stdout).unwrap();
        assert!(is_cephx_key(theirs.trim()), "{theirs}");

        let identity = ClusterIdentity::mint().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        // The key goes through a file, never argv.
        std::fs::write(&path, identity.admin_keyring().expose()).unwrap();
        let listed = Command::new("ceph-authtool")
            .arg("-l")
            .arg(&path)
            .output()
            .unwrap();
        assert!(listed.status.success(), "{listed:?}");
        let listed = String::from_utf8(listed.stdout).unwrap();
        assert!(
            listed.contains(&format!("key = {}", identity.admin_key.expose())),
            "ceph-authtool did not read the key back"
        );
        assert!(listed.contains("caps mon = \"allow *\""));
    }

    #[test]
    fn identity_round_trips_through_rooks_secret_keys() {
        let id = ClusterIdentity::mint().unwrap();
        let data = id.to_secret_data("rook-ceph");
        assert_eq!(data["cluster-name"].0, b"rook-ceph");
        assert_eq!(data["ceph-username"].0, b"client.admin");
        assert_eq!(data["admin-secret"], data["ceph-secret"]);
        assert_eq!(ClusterIdentity::from_secret_data(&data).unwrap(), id);
    }

    #[test]
    fn a_secret_with_a_malformed_field_is_rejected_by_name_without_its_value() {
        let id = ClusterIdentity::mint().unwrap();
        let mut data = id.to_secret_data("c");
        data.insert("mon-secret".into(), ByteString(b"AQnotakey".to_vec()));
        let e = ClusterIdentity::from_secret_data(&data).unwrap_err();
        assert_eq!(e.to_string(), "`mon-secret` is not a cephx key");

        let mut data = id.to_secret_data("c");
        data.remove("fsid");
        let e = ClusterIdentity::from_secret_data(&data).unwrap_err();
        assert_eq!(e.to_string(), "has no `fsid`");
    }

    #[test]
    fn rooks_older_secret_with_admin_secret_only_is_accepted() {
        let id = ClusterIdentity::mint().unwrap();
        let mut data = id.to_secret_data("c");
        data.remove("ceph-secret");
        data.remove("ceph-username");
        assert_eq!(ClusterIdentity::from_secret_data(&data).unwrap(), id);
    }
}
