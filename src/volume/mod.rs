//! The domain: volume and snapshot IDs, StorageClass parameters, naming, idempotency, fencing and
//! the in-flight guard. The CSI adapters translate protobuf to these types and back; nothing in
//! here knows about gRPC except the one error mapping in `csi::status`.

pub mod config;
pub mod controller;
pub mod guard;
pub mod id;
pub mod naming;
pub mod params;

pub use config::{ClusterConfig, ClusterEntry};
pub use guard::{InFlight, InFlightGuard, RunError};
pub use id::{IdError, SnapshotId, VolumeId};
pub use params::VolumeParams;

use crate::ceph::CephError;
use crate::secret::Secret;
use std::collections::HashMap;

/// cephx credentials, from the CSI secrets `userID` / `userKey` (ceph-csi's names).
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub key: Secret,
}

impl Credentials {
    pub fn from_secrets(secrets: &HashMap<String, String>) -> Result<Self, Error> {
        // A Secret made with `kubectl create secret --from-file` from `ceph auth get-key` output
        // carries its trailing newline; Ceph's own key files are read the same way.
        let value = |k: &str| secrets.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let user = value("userID");
        let key = value("userKey");
        match (user, key) {
            (Some(u), Some(k)) => {
                if u.len() > 128
                    || !u
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                {
                    return Err(Error::InvalidArgument(
                        "secret userID is not a valid cephx user name".into(),
                    ));
                }
                // A cephx key is base64; reject anything else before librados sees it.
                if k.len() > 256
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                {
                    return Err(Error::InvalidArgument(
                        "secret userKey is not a valid cephx key".into(),
                    ));
                }
                let user = u.strip_prefix("client.").unwrap_or(u).to_string();
                Ok(Self {
                    user,
                    key: Secret::new(k.to_string()),
                })
            }
            _ => Err(Error::InvalidArgument(
                "secrets userID and userKey are required".into(),
            )),
        }
    }

    /// Reads `userID` and `userKey` files from a directory, the layout of a mounted Kubernetes Secret.
    pub fn from_dir(dir: &std::path::Path) -> anyhow::Result<Self> {
        Self::from_secrets(&read_secret_dir(dir)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))
    }
}

/// The `userID` and `userKey` files of a secret directory, as a CSI secrets map (unvalidated).
pub fn read_secret_dir(dir: &std::path::Path) -> anyhow::Result<HashMap<String, String>> {
    let mut m = HashMap::new();
    for k in ["userID", "userKey"] {
        let p = dir.join(k);
        let v = std::fs::read_to_string(&p)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
        m.insert(k.to_string(), v.trim().to_string());
    }
    Ok(m)
}

/// Domain errors. Each variant is one gRPC code; `csi::status` does the mapping once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// A Ceph call failed; the errno decides the code.
    #[error("{context}: {source}")]
    Ceph {
        context: String,
        #[source]
        source: CephError,
    },
}

impl Error {
    pub fn ceph(context: impl Into<String>) -> impl FnOnce(CephError) -> Error {
        let context = context.into();
        move |source| Error::Ceph { context, source }
    }

    pub fn aborted_in_flight(what: &str) -> Error {
        Error::Aborted(format!("an operation on {what} is already in progress"))
    }
}

/// Both are retried by the caller: a busy key clears once the first operation ends, and an
/// operation whose outcome is unknown is safe to run again (every operation is idempotent).
impl From<RunError> for Error {
    fn from(e: RunError) -> Self {
        Error::Aborted(e.to_string())
    }
}

impl From<IdError> for Error {
    fn from(e: IdError) -> Self {
        Error::NotFound(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(user: &str, key: &str) -> HashMap<String, String> {
        HashMap::from([
            ("userID".to_string(), user.to_string()),
            ("userKey".to_string(), key.to_string()),
        ])
    }

    const KEY: &str = "AQBxsS5nAAAAABAAp0D2pmd9Pm/y7yQ2xGbt3w==";

    #[test]
    fn a_key_from_a_file_with_its_newline_is_accepted_without_it() {
        let c = Credentials::from_secrets(&secrets("csi\n", &format!("{KEY}\n"))).unwrap();
        assert_eq!(c.user, "csi");
        assert_eq!(c.key.expose(), KEY);
    }

    #[test]
    fn a_key_that_is_not_base64_is_refused_and_not_echoed() {
        let e = Credentials::from_secrets(&secrets("csi", "not a key!")).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(!e.to_string().contains("not a key"));
        let e = Credentials::from_secrets(&secrets("csi", " \n")).unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
    }
}
