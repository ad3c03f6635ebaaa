//! Validation of staging and target paths that arrive in requests.
//!
//! A path from the CO is only used after it has been proven absolute, free of `..` and NUL,
//! normalised, and strictly inside one of the configured roots (kubelet's directory in production),
//! both as written and after resolving symlinks in the part of it that already exists: a symlink
//! inside the kubelet dir must not carry a mount outside it.

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
        let inside =
            |p: &Path, roots: &[PathBuf]| roots.iter().any(|root| p.starts_with(root) && p != root);
        if !inside(&normal, &self.roots) {
            return Err(bad("outside the allowed roots"));
        }
        let real = resolve_existing(&normal);
        let real_roots: Vec<PathBuf> = self
            .roots
            .iter()
            .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
            .collect();
        if !inside(&real, &real_roots) {
            return Err(bad("leads outside the allowed roots through a symlink"));
        }
        Ok(real)
    }
}

/// The path with its longest existing prefix replaced by that prefix's real location.
fn resolve_existing(normal: &Path) -> PathBuf {
    let mut probe = normal.to_path_buf();
    loop {
        if let Ok(real) = std::fs::canonicalize(&probe) {
            let rest = normal.strip_prefix(&probe).unwrap_or(Path::new(""));
            return if rest.as_os_str().is_empty() {
                real
            } else {
                real.join(rest)
            };
        }
        if !probe.pop() {
            return normal.to_path_buf();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_inside_the_root_cannot_lead_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("kubelet");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("fine")).unwrap();
        let p = PathPolicy::new([root.clone()]);
        assert!(p.validate(root.join("evil/s").to_str().unwrap()).is_err());
        assert!(p.validate(root.join("evil").to_str().unwrap()).is_err());
        let real_root = std::fs::canonicalize(&root).unwrap();
        assert_eq!(
            p.validate(root.join("fine/s").to_str().unwrap()).unwrap(),
            real_root.join("real/s")
        );
        assert_eq!(
            p.validate(root.join("new/a/b").to_str().unwrap()).unwrap(),
            real_root.join("new/a/b")
        );
    }

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
