//! `mounter: auto`: the best mapper this node's kernel supports.

use std::path::PathBuf;

use super::MapperKind;

/// The paths probed to decide; injectable so tests can fake a kernel.
#[derive(Debug, Clone)]
pub struct AutoProbe {
    /// Present when the `rbd` kernel module is loaded.
    pub krbd_paths: Vec<PathBuf>,
    /// Present when the `nbd` kernel module is loaded.
    pub nbd_paths: Vec<PathBuf>,
}

impl Default for AutoProbe {
    fn default() -> Self {
        Self {
            krbd_paths: vec![PathBuf::from("/sys/bus/rbd")],
            nbd_paths: vec![PathBuf::from("/sys/block/nbd0"), PathBuf::from("/dev/nbd0")],
        }
    }
}

impl AutoProbe {
    /// krbd if the rbd module is there, else nbd if the nbd module is, else fuse (always works).
    pub fn choose(&self) -> MapperKind {
        let kind = if self.krbd_paths.iter().any(|p| p.exists()) {
            MapperKind::Krbd
        } else if self.nbd_paths.iter().any(|p| p.exists()) {
            MapperKind::Nbd
        } else {
            MapperKind::Fuse
        };
        tracing::info!(mapper = %kind, "mounter auto chose a mapper");
        kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_krbd_then_nbd_then_fuse() {
        let dir = tempfile::tempdir().unwrap();
        let rbd = dir.path().join("bus_rbd");
        let nbd = dir.path().join("nbd0");
        let probe = AutoProbe {
            krbd_paths: vec![rbd.clone()],
            nbd_paths: vec![nbd.clone()],
        };
        assert_eq!(probe.choose(), MapperKind::Fuse);
        std::fs::write(&nbd, "").unwrap();
        assert_eq!(probe.choose(), MapperKind::Nbd);
        std::fs::create_dir(&rbd).unwrap();
        assert_eq!(probe.choose(), MapperKind::Krbd);
    }
}
