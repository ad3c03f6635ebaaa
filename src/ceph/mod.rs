//! The only code that talks to Ceph.
//!
//! `ffi` declares the C functions, `rados` and `rbd` wrap them in safe, blocking Rust types, and
//! `pool` keeps one connection per (cluster, user), replaces the ones that are fenced, stuck or
//! idle, and runs every blocking call on tokio's blocking thread pool, never on its async workers.

pub mod blocklist;
pub mod ffi;
pub mod health;
pub mod object;
pub mod pool;
pub mod rados;
pub mod rbd;

pub use pool::{CephTimeouts, ConnectionPool, Eviction, PoolPolicy, PoolStats};
pub use rados::{ConnHealth, Connection, HealthSnapshot, IoCtx};
pub use rbd::{Image, ImageOptions};

use std::ffi::CString;
use std::fmt;

/// A failed librados/librbd call: which operation, on what, and the errno it returned.
/// The text never carries a key: keys only travel through `rados_conf_set`.
#[derive(Debug, Clone, thiserror::Error)]
pub struct CephError {
    pub op: &'static str,
    pub target: String,
    pub errno: i32,
}

impl fmt::Display for CephError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.errno);
        write!(
            f,
            "{} {}: {} (errno {})",
            self.op, self.target, msg, self.errno
        )
    }
}

impl CephError {
    pub fn new(op: &'static str, target: impl Into<String>, ret: i32) -> Self {
        Self {
            op,
            target: target.into(),
            errno: ret.saturating_abs(),
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno == errno
    }

    pub fn not_found(&self) -> bool {
        self.errno == libc::ENOENT
    }

    pub fn exists(&self) -> bool {
        self.errno == libc::EEXIST
    }

    /// The cluster did not answer in time (osd/mon op timeout, or a connect that never completed).
    pub fn timed_out(&self) -> bool {
        self.errno == libc::ETIMEDOUT
    }

    /// The client is blocklisted (librados's EBLOCKLISTED is ESHUTDOWN) or shut down; only a new
    /// connection can work.
    pub fn fenced(&self) -> bool {
        self.errno == libc::ESHUTDOWN
    }

    pub fn permission_denied(&self) -> bool {
        self.errno == libc::EACCES || self.errno == libc::EPERM
    }
}

pub type Result<T, E = CephError> = std::result::Result<T, E>;

/// Turn a C return code into a `Result`, keeping non-negative values.
pub(crate) fn check(op: &'static str, target: &str, ret: i32) -> Result<i32> {
    if ret < 0 {
        Err(CephError::new(op, target, ret))
    } else {
        Ok(ret)
    }
}

/// A C string for an argument; interior NUL bytes are rejected as EINVAL, never truncated.
pub(crate) fn cstr(op: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| CephError::new(op, s.replace('\0', "\\0"), -libc::EINVAL))
}

/// Copy a C string owned by librados/librbd; NULL becomes empty.
pub(crate) unsafe fn owned(p: *const libc::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
