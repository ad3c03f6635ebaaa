//! The staging state file: what NodeStage did, kept outside the mount so that NodeUnstage,
//! NodePublish, expand and stats know the image, mapper and device, even after a plugin restart.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::driver::AccessType;
use super::fs::FsType;
use super::mapper::Mapping;
use super::NodeError;

/// One staged volume, as written to `<state_dir>/staged/<sha256(volume_id)>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingState {
    pub volume_id: String,
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub image: String,
    pub mapping: Mapping,
    pub access: AccessType,
    /// Set for mount access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<FsType>,
    pub staging_path: PathBuf,
    pub read_only: bool,
}

/// The directory of state files.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Creates `dir` (mode 0700) if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, NodeError> {
        let dir = dir.into();
        ensure_private_dir(&dir)?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file for `volume_id`: hashed, because volume IDs are not safe file names.
    pub fn path_for(&self, volume_id: &str) -> PathBuf {
        let hex: String = Sha256::digest(volume_id.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join(format!("{hex}.json"))
    }

    /// Writes atomically: a 0600 temporary file, fsync, rename, fsync of the directory.
    pub fn save(&self, state: &StagingState) -> Result<(), NodeError> {
        let path = self.path_for(&state.volume_id);
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        let json = serde_json::to_vec_pretty(state).map_err(|source| NodeError::State {
            path: path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            NodeError::io("writing state file", &path, e)
        })
    }

    pub fn load(&self, volume_id: &str) -> Result<Option<StagingState>, NodeError> {
        read_state(&self.path_for(volume_id))
    }

    /// Removing a state file that is not there is success.
    pub fn remove(&self, volume_id: &str) -> Result<(), NodeError> {
        let path = self.path_for(volume_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NodeError::io("removing state file", path, e)),
        }
    }

    /// All staged volumes; unreadable files are logged and skipped.
    pub fn list(&self) -> Result<Vec<StagingState>, NodeError> {
        let rd =
            std::fs::read_dir(&self.dir).map_err(|e| NodeError::io("listing", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "json") {
                match read_state(&p) {
                    Ok(Some(s)) => out.push(s),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "skipping state file"),
                }
            }
        }
        Ok(out)
    }

    /// The volume staged at `staging_path`, if any.
    pub fn find_by_staging_path(
        &self,
        staging_path: &Path,
    ) -> Result<Option<StagingState>, NodeError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|s| s.staging_path == staging_path))
    }
}

fn read_state(path: &Path) -> Result<Option<StagingState>, NodeError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| NodeError::State {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::io("reading state file", path, e)),
    }
}

/// Creates `dir` with mode 0700 (parents included) and tightens an existing one to 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<(), NodeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| NodeError::io("creating directory", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| NodeError::io("restricting directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mapper::MapperKind;
    use std::os::unix::fs::MetadataExt;

    fn sample(volume_id: &str, staging: &str) -> StagingState {
        StagingState {
            volume_id: volume_id.into(),
            pool: "rbd".into(),
            namespace: None,
            image: "csi-vol-1".into(),
            mapping: Mapping {
                mapper: MapperKind::Fuse,
                device: "/dev/loop4".into(),
                fuse_mountpoint: Some("/var/lib/rook-rbd/fuse/ab".into()),
                pid: Some(42),
                unmap_options: None,
            },
            access: AccessType::Mount,
            fs_type: Some(FsType::Ext4),
            staging_path: staging.into(),
            read_only: false,
        }
    }

    #[test]
    fn state_round_trips_atomically_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path().join("staged")).unwrap();
        assert_eq!(
            std::fs::metadata(store.dir()).unwrap().mode() & 0o777,
            0o700
        );
        let s = sample("0001-abc/with/slashes", "/k/staging/a");
        store.save(&s).unwrap();
        let path = store.path_for(&s.volume_id);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(store.load(&s.volume_id).unwrap(), Some(s.clone()));
        store.save(&sample("other", "/k/staging/b")).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        assert_eq!(
            store
                .find_by_staging_path(Path::new("/k/staging/a"))
                .unwrap()
                .unwrap()
                .volume_id,
            s.volume_id
        );
        store.remove(&s.volume_id).unwrap();
        store.remove(&s.volume_id).unwrap();
        assert_eq!(store.load(&s.volume_id).unwrap(), None);
        let names: Vec<_> = std::fs::read_dir(store.dir()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary files left behind");
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_silent_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        std::fs::write(store.path_for("v"), b"{not json").unwrap();
        assert!(store.load("v").is_err());
        assert!(store.list().unwrap().is_empty());
    }
}
