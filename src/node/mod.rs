//! Node side: mapping images to block devices, filesystems and mounts.
//!
//! [`NodeDriver`] holds the CSI Node semantics (stage, publish, unpublish, unstage, expand, stats)
//! so that the gRPC adapter only converts messages and maps [`NodeError::code`] to a status.

pub mod command;
pub mod driver;
pub mod fs;
pub mod mapper;
pub mod mount;
pub mod paths;
pub mod reach;
pub mod state;
pub mod step;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use driver::{
    AccessType, NodeConfig, NodeDriver, PublishRequest, StageRequest, VolumeAccess,
    VolumeCondition, VolumeStats, VolumeUsage,
};
pub use mapper::{MapRequest, MapperChoice, MapperKind, Mapping};
pub use paths::PathPolicy;
pub use state::{StagingState, StateStore};

/// The gRPC meaning of a [`NodeError`]; the adapter maps each to a `tonic::Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    Unavailable,
    DeadlineExceeded,
}

/// Every failure of the node layer.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("could not run {program}: {source}")]
    CommandSpawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} did not finish within {after:?}")]
    CommandTimeout { program: String, after: Duration },
    #[error("{program} failed (exit code {code:?}): {stderr}")]
    CommandFailed {
        program: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("{operation} did not finish within {after:?}")]
    Timeout { operation: String, after: Duration },
    /// A step that must not be abandoned outlived its deadline; the operation goes on.
    #[error("{operation} is still running after {after:?}; the operation goes on, retry later")]
    StillRunning { operation: String, after: Duration },
    #[error("{context} {path:?}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unreadable state file {path:?}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected output from {program}: {detail}")]
    Parse { program: String, detail: String },
}

impl NodeError {
    pub fn code(&self) -> NodeErrorKind {
        use NodeErrorKind as K;
        match self {
            NodeError::InvalidPath { .. } | NodeError::InvalidArgument(_) => K::InvalidArgument,
            NodeError::NotFound(_) => K::NotFound,
            NodeError::AlreadyExists(_) => K::AlreadyExists,
            NodeError::FailedPrecondition(_) => K::FailedPrecondition,
            NodeError::Unavailable(_) => K::Unavailable,
            NodeError::CommandTimeout { .. }
            | NodeError::Timeout { .. }
            | NodeError::StillRunning { .. } => K::DeadlineExceeded,
            NodeError::CommandSpawn { .. }
            | NodeError::CommandFailed { .. }
            | NodeError::Io { .. }
            | NodeError::State { .. }
            | NodeError::Parse { .. } => K::Internal,
        }
    }

    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        NodeError::Io {
            context,
            path: path.into(),
            source,
        }
    }
}

/// Runs blocking work that is safe to abandon (statvfs or stat on a possibly stale mount: they
/// change nothing) off the async threads, bounded in time. A timed-out thread is left to finish
/// on its own. Work that changes something goes through [`step::blocking_to_end`].
pub(crate) async fn blocking<T, F>(operation: &str, after: Duration, f: F) -> Result<T, NodeError>
where
    F: FnOnce() -> Result<T, NodeError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::time::timeout(after, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(NodeError::Timeout {
            operation: operation.to_string(),
            after,
        }),
        Ok(Err(join)) => Err(NodeError::Unavailable(format!(
            "{operation} panicked: {join}"
        ))),
        Ok(Ok(r)) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_know_their_grpc_kind() {
        let e = NodeError::InvalidPath {
            path: "x".into(),
            reason: "relative",
        };
        assert_eq!(e.code(), NodeErrorKind::InvalidArgument);
        let e = NodeError::CommandTimeout {
            program: "rbd".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(e.code(), NodeErrorKind::DeadlineExceeded);
        assert_eq!(
            NodeError::AlreadyExists("x".into()).code(),
            NodeErrorKind::AlreadyExists
        );
    }
}
