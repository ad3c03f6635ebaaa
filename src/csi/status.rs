//! The one place where domain errors become gRPC status codes.

use crate::ceph::CephError;
use crate::node::{NodeError, NodeErrorKind};
use crate::volume::Error;
use tonic::{Code, Status};

fn ceph_code(e: &CephError) -> Code {
    match e.errno {
        libc::ENOENT => Code::NotFound,
        libc::EEXIST => Code::AlreadyExists,
        libc::EACCES | libc::EPERM => Code::PermissionDenied,
        // A connect that never completes means the monitors are out of reach.
        libc::ETIMEDOUT if e.op == "rados_connect" => Code::Unavailable,
        libc::ETIMEDOUT => Code::DeadlineExceeded,
        libc::ENOTCONN
        | libc::ECONNREFUSED
        | libc::ESHUTDOWN
        | libc::ENETUNREACH
        | libc::EHOSTUNREACH
        | libc::ECONNRESET => Code::Unavailable,
        libc::EBUSY => Code::FailedPrecondition,
        // Pool full or over quota. The provisioner may reschedule on this, which is harmless here.
        libc::ENOSPC | libc::EDQUOT => Code::ResourceExhausted,
        libc::EINVAL | libc::ERANGE | libc::ENAMETOOLONG => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
            Error::Ceph { source, .. } => ceph_code(source),
        };
        // The whole chain goes in the message; no layer ever puts a key into an error.
        Status::new(code, e.to_string())
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        let code = match e.code() {
            NodeErrorKind::InvalidArgument => Code::InvalidArgument,
            NodeErrorKind::NotFound => Code::NotFound,
            NodeErrorKind::AlreadyExists => Code::AlreadyExists,
            NodeErrorKind::FailedPrecondition => Code::FailedPrecondition,
            NodeErrorKind::Internal => Code::Internal,
            NodeErrorKind::Unavailable => Code::Unavailable,
            NodeErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceph_errnos_map_to_precise_codes() {
        let c = |op, errno| {
            Status::from(Error::Ceph {
                context: "x".into(),
                source: CephError {
                    op,
                    target: "t".into(),
                    errno,
                },
            })
            .code()
        };
        assert_eq!(c("rbd_open", libc::ENOENT), Code::NotFound);
        assert_eq!(c("rados_connect", libc::ETIMEDOUT), Code::Unavailable);
        assert_eq!(c("rbd_create4", libc::ETIMEDOUT), Code::DeadlineExceeded);
        assert_eq!(c("rados_connect", libc::EACCES), Code::PermissionDenied);
        assert_eq!(c("rados_connect", libc::EPERM), Code::PermissionDenied);
        assert_eq!(c("rbd_remove", libc::EBUSY), Code::FailedPrecondition);
        assert_eq!(c("rbd_create4", libc::EDQUOT), Code::ResourceExhausted);
        assert_eq!(c("rbd_create4", libc::EIO), Code::Internal);
    }
}
