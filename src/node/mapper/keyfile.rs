//! Key files for the mapping tools, in a memory-backed directory: a cephx key never reaches
//! kubelet's disk, and a key file a crash left behind is gone at the next start.
//!
//! The directory is the first of `--key-dir`, `/run/rook-rbd` and `/dev/shm/rook-rbd` that
//! statfs shows on tmpfs or ramfs (with a warning when none is: the state directory then).
//! Each state directory gets its own subdirectory, so plugins sharing a host never remove each
//! other's files.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::node::NodeError;
use crate::secret::Secret;

/// Memory-backed roots tried after the configured one.
pub const DEFAULT_KEY_ROOTS: &[&str] = &["/run/rook-rbd", "/dev/shm/rook-rbd"];

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The private directory key files go to; removed (when empty) on drop.
#[derive(Debug)]
pub struct KeyDir {
    path: PathBuf,
}

impl KeyDir {
    /// Picks and prepares the directory for a plugin with state in `state_dir`, and removes
    /// key files left there (and in the old place, `<state_dir>/keys`) by a previous run.
    pub fn open(configured: Option<&Path>, state_dir: &Path) -> Result<Self, NodeError> {
        let on_disk = state_dir.join("keys");
        let leaf = format!("keys-{}", short_hash(state_dir));
        let roots: Vec<PathBuf> = configured
            .map(Path::to_path_buf)
            .into_iter()
            .chain(DEFAULT_KEY_ROOTS.iter().map(PathBuf::from))
            .collect();
        let mut chosen = None;
        for root in &roots {
            match memory_backed(root) {
                Ok(true) => {
                    chosen = Some(root.join(&leaf));
                    break;
                }
                Ok(false) if Some(root.as_path()) == configured => {
                    tracing::warn!(dir = %root.display(), "--key-dir is not on tmpfs or ramfs; trying the defaults")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(dir = %root.display(), error = %e, "cannot check key dir"),
            }
        }
        let path = match chosen {
            Some(dir) => {
                let root = dir.parent().unwrap_or(&dir).to_path_buf();
                ensure_own_private_dir(&root)?;
                ensure_own_private_dir(&dir)?;
                remove_leftovers(&on_disk);
                let _ = std::fs::remove_dir(&on_disk);
                dir
            }
            None => {
                tracing::warn!(
                    dir = %on_disk.display(),
                    "no memory-backed directory for key files (tried {roots:?}); they go to the state directory on disk"
                );
                ensure_own_private_dir(&on_disk)?;
                on_disk
            }
        };
        remove_leftovers(&path);
        tracing::info!(dir = %path.display(), "key files for the mappers go here");
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Whether `path` (or, before it exists, its nearest existing ancestor) is on tmpfs or ramfs.
pub fn memory_backed(path: &Path) -> Result<bool, NodeError> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let magic = nix::sys::statfs::statfs(existing)
        .map_err(|e| NodeError::io("statfs", existing, e.into()))?
        .filesystem_type()
        .0 as i64;
    Ok(magic == TMPFS_MAGIC || magic == RAMFS_MAGIC)
}

fn short_hash(p: &Path) -> String {
    Sha256::digest(p.as_os_str().as_encoded_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Creates `dir` (mode 0700) or accepts an existing one only if it is a real directory of ours:
/// under a world-writable root such as /dev/shm, anyone could have made it first.
fn ensure_own_private_dir(dir: &Path) -> Result<(), NodeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| NodeError::io("creating key directory", dir, e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| NodeError::io("inspecting", dir, e))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(NodeError::FailedPrecondition(format!(
            "key directory {} is not a directory owned by this process's user",
            dir.display()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| NodeError::io("restricting key directory", dir, e))
}

fn remove_leftovers(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::warn!(dir = %dir.display(), removed, "removed key files left by a previous run");
    }
}

/// A cephx key in a 0600 file, removed on drop.
#[derive(Debug)]
pub struct KeyFile {
    path: PathBuf,
}

impl KeyFile {
    /// Creates the file exclusively with mode 0600 in `dir` (a [`KeyDir`]; made again if
    /// something cleaned it away since the start).
    pub fn create(dir: &Path, key: &Secret) -> Result<Self, NodeError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        ensure_own_private_dir(dir)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{}-{}-{nanos}.key",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| NodeError::io("creating key file", &path, e))?;
        let kf = KeyFile { path };
        f.write_all(key.expose().as_bytes())
            .and_then(|_| f.write_all(b"\n"))
            .map_err(|e| NodeError::io("writing key file", &kf.path, e))?;
        Ok(kf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(path = %self.path.display(), error = %e, "could not remove key file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_private_and_removed_on_drop() {
        let state = tempfile::tempdir().unwrap();
        let dir = KeyDir::open(None, state.path()).unwrap();
        let kf = KeyFile::create(dir.path(), &Secret::new("AQBkey==")).unwrap();
        let p = kf.path().to_path_buf();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(p.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "AQBkey==\n");
        drop(kf);
        assert!(!p.exists());
    }

    #[test]
    fn a_configured_dir_on_disk_is_passed_over_for_a_memory_backed_one() {
        let state = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        if memory_backed(state.path()).unwrap() {
            eprintln!("SKIPPED: the source tree is on tmpfs; no disk directory to pass over");
            return;
        }
        let on_disk = state.path().join("keys-here");
        let dir = KeyDir::open(Some(&on_disk), state.path()).unwrap();
        assert!(!dir.path().starts_with(&on_disk));
        if memory_backed(Path::new("/dev/shm")).unwrap() {
            assert!(
                memory_backed(dir.path()).unwrap(),
                "{}",
                dir.path().display()
            );
        }
    }

    #[test]
    fn plugins_with_different_state_dirs_get_different_key_dirs() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (da, db) = (
            KeyDir::open(None, a.path()).unwrap(),
            KeyDir::open(None, b.path()).unwrap(),
        );
        assert_ne!(da.path(), db.path());
    }
}
