//! Validation of staging and target paths that arrive in requests.
//!
//! A path from the CO is only used after it has been proven absolute, free of `..` and NUL,
//! normalised, and strictly inside one of the configured roots (kubelet's directory in production).

use std::path::{Component, Path, PathBuf};

use super::NodeError;

/// The roots that request paths must live under.
#[derive(Debug, Clone)]
pub struct PathPolicy {
    roots: Vec<PathBuf>,
}

impl PathPolicy {
    /// Roots are normalised lexically; they are trusted configuration, not request input.
    pub fn new(roots: impl IntoIterator<Item = PathBuf>) -> Self {
        Self {
            roots: roots
                .into_iter()
                .map(|r| r.components().collect::<PathBuf>())
                .collect(),
        }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Returns the normalised path, or [`NodeError::InvalidPath`].
    pub fn validate(&self, raw: &str) -> Result<PathBuf, NodeError> {
        let bad = |reason| NodeError::InvalidPath {
            path: raw.to_string(),
            reason,
        };
        if raw.is_empty() {
            return Err(bad("empty"));
        }
        if raw.contains('\0') {
            return Err(bad("contains NUL"));
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(bad("not absolute"));
        }
        let mut normal = PathBuf::new();
        for c in path.components() {
            match c {
                Component::RootDir => normal.push("/"),
                Component::Normal(part) => normal.push(part),
                Component::CurDir => {}
                Component::ParentDir => return Err(bad("contains '..'")),
                Component::Prefix(_) => return Err(bad("has a prefix")),
            }
        }
        if self
            .roots
            .iter()
            .any(|root| normal.starts_with(root) && normal != *root)
        {
            Ok(normal)
        } else {
            Err(bad("outside the allowed roots"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PathPolicy {
        PathPolicy::new([PathBuf::from("/var/lib/kubelet/"), PathBuf::from("/tmp/t")])
    }

    #[test]
    fn accepts_and_normalises_paths_under_a_root() {
        let p = policy()
            .validate("/var/lib/kubelet//pods/./abc/volumes/x/")
            .unwrap();
        assert_eq!(p, PathBuf::from("/var/lib/kubelet/pods/abc/volumes/x"));
        assert!(policy().validate("/tmp/t/a").is_ok());
    }

    #[test]
    fn rejects_relative_dotdot_nul_empty_and_foreign_paths() {
        let p = policy();
        for raw in [
            "",
            "var/lib/kubelet/x",
            "/var/lib/kubelet/../../etc",
            "/var/lib/kubelet/a\0b",
            "/etc/passwd",
            "/var/lib/kubeletX/a",
            "/var/lib/kubelet",
            "/tmp/t/",
        ] {
            let err = p.validate(raw).unwrap_err();
            assert_eq!(
                err.code(),
                crate::node::NodeErrorKind::InvalidArgument,
                "{raw}"
            );
        }
    }
}
