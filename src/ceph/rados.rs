//! Safe, blocking wrappers over a librados cluster handle and its I/O contexts.

use super::{check, cstr, ffi, owned, CephError, Result};
use crate::secret::Secret;
use std::collections::HashMap;
use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Owns a `rados_t`; shut down when the last `Connection` or `IoCtx` referring to it is gone.
pub(crate) struct ClusterHandle(ffi::rados_t);

// librados handles are documented as thread-safe.
unsafe impl Send for ClusterHandle {}
unsafe impl Sync for ClusterHandle {}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        unsafe { ffi::rados_shutdown(self.0) }
    }
}

/// What a connection needs. Only `key` is secret; it is handed to librados in memory.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub monitors: Vec<String>,
    pub user: String,
    pub key: Secret,
    pub osd_op_timeout: Duration,
    pub mon_op_timeout: Duration,
    pub mount_timeout: Duration,
}

/// A connected cluster, with a cache of I/O contexts per pool.
pub struct Connection {
    handle: Arc<ClusterHandle>,
    ioctxs: Mutex<HashMap<String, Arc<IoCtx>>>,
    fsid: String,
}

impl Connection {
    /// Blocking: connects and authenticates, bounded by `client_mount_timeout`.
    pub fn connect(p: &ConnectParams) -> Result<Connection> {
        let who = format!("client.{}", p.user);
        let mut raw: ffi::rados_t = ptr::null_mut();
        let name = cstr("rados_create2", &who)?;
        let cluster = cstr("rados_create2", "ceph")?;
        check("rados_create2", &who, unsafe {
            ffi::rados_create2(&mut raw, cluster.as_ptr(), name.as_ptr(), 0)
        })?;
        let handle = ClusterHandle(raw);
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        let settings: [(&str, String); 21] = [
            ("mon_host", p.monitors.join(",")),
            ("rados_osd_op_timeout", secs(p.osd_op_timeout)),
            ("rados_mon_op_timeout", secs(p.mon_op_timeout)),
            ("client_mount_timeout", secs(p.mount_timeout)),
            // Keep librados quiet and self-contained: no config file, no keyring search, no log file.
            ("keyring", String::new()),
            ("log_to_stderr", "false".into()),
            ("err_to_stderr", "false".into()),
            ("log_file", String::new()),
            ("admin_socket", String::new()),
            ("rbd_default_clone_format", "2".into()),
            // With no log file the in-memory log is never read, but by default it keeps the last
            // 10,000 entries (about 9 MiB resident, a third of a controller's private memory) and
            // gathers debug entries up to level 5-10 that are formatted on every call. Keep a
            // short ring for crash dumps and gather nothing beyond what is logged.
            ("log_max_recent", "100".into()),
            ("debug_rbd", "0/0".into()),
            ("debug_rados", "0/0".into()),
            ("debug_monc", "0/0".into()),
            ("debug_objecter", "0/0".into()),
            ("debug_objectcacher", "0/0".into()),
            ("debug_journaler", "0/0".into()),
            ("debug_auth", "0/0".into()),
            ("debug_crypto", "0/0".into()),
            ("debug_asok", "0/0".into()),
            ("debug_perfcounter", "0/0".into()),
        ];
        for (k, v) in settings.iter() {
            set_conf(&handle, k, v)?;
        }
        // The key goes in last, and any failure names the option, never the value.
        let key = std::ffi::CString::new(p.key.expose())
            .map_err(|_| CephError::new("rados_conf_set", "key", -libc::EINVAL))?;
        let opt = cstr("rados_conf_set", "key")?;
        check("rados_conf_set", "key", unsafe {
            ffi::rados_conf_set(handle.0, opt.as_ptr(), key.as_ptr())
        })?;
        check("rados_connect", &who, unsafe {
            ffi::rados_connect(handle.0)
        })?;
        let mut buf = [0 as libc::c_char; 64];
        let fsid = match unsafe { ffi::rados_cluster_fsid(handle.0, buf.as_mut_ptr(), buf.len()) } {
            n if n >= 0 => unsafe { owned(buf.as_ptr()) },
            _ => String::new(),
        };
        Ok(Connection {
            handle: Arc::new(handle),
            ioctxs: Mutex::new(HashMap::new()),
            fsid,
        })
    }

    pub fn fsid(&self) -> &str {
        &self.fsid
    }

    /// The I/O context for a pool if one was created before; never blocks.
    pub fn cached_ioctx(&self, pool: &str) -> Option<Arc<IoCtx>> {
        self.ioctxs.lock().unwrap().get(pool).cloned()
    }

    /// The I/O context for a pool, created once and then shared.
    pub fn ioctx(&self, pool: &str) -> Result<Arc<IoCtx>> {
        if let Some(io) = self.ioctxs.lock().unwrap().get(pool) {
            return Ok(io.clone());
        }
        let name = cstr("rados_ioctx_create", pool)?;
        let mut raw: ffi::rados_ioctx_t = ptr::null_mut();
        check("rados_ioctx_create", pool, unsafe {
            ffi::rados_ioctx_create(self.handle.0, name.as_ptr(), &mut raw)
        })?;
        let io = Arc::new(IoCtx {
            raw,
            pool: pool.to_string(),
            _cluster: self.handle.clone(),
        });
        let mut map = self.ioctxs.lock().unwrap();
        Ok(map.entry(pool.to_string()).or_insert(io).clone())
    }

    pub fn cached_pools(&self) -> usize {
        self.ioctxs.lock().unwrap().len()
    }

    /// A monitor command with a JSON argument; returns the output buffer.
    pub fn mon_command(&self, json: &str) -> Result<Vec<u8>> {
        let cmd = cstr("rados_mon_command", json)?;
        let mut cmds = [cmd.as_ptr()];
        let mut out: *mut libc::c_char = ptr::null_mut();
        let mut out_len = 0usize;
        let mut status: *mut libc::c_char = ptr::null_mut();
        let mut status_len = 0usize;
        let ret = unsafe {
            ffi::rados_mon_command(
                self.handle.0,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        let data = if out.is_null() {
            Vec::new()
        } else {
            unsafe { std::slice::from_raw_parts(out as *const u8, out_len).to_vec() }
        };
        unsafe {
            if !out.is_null() {
                ffi::rados_buffer_free(out);
            }
            if !status.is_null() {
                ffi::rados_buffer_free(status);
            }
        }
        check("rados_mon_command", json, ret)?;
        Ok(data)
    }

    /// The raw cluster handle, for wrappers in sibling modules; valid while `self` lives.
    pub(crate) fn raw(&self) -> ffi::rados_t {
        self.handle.0
    }
}

fn set_conf(h: &ClusterHandle, k: &str, v: &str) -> Result<()> {
    let key = cstr("rados_conf_set", k)?;
    let val = cstr("rados_conf_set", v)?;
    check("rados_conf_set", k, unsafe {
        ffi::rados_conf_set(h.0, key.as_ptr(), val.as_ptr())
    })?;
    Ok(())
}

/// A pool's I/O context. librados I/O contexts may be used from several threads at once.
pub struct IoCtx {
    pub(crate) raw: ffi::rados_ioctx_t,
    pool: String,
    _cluster: Arc<ClusterHandle>,
}

unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        unsafe { ffi::rados_ioctx_destroy(self.raw) }
    }
}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub(crate) fn target(&self, name: &str) -> String {
        format!("{}/{}", self.pool, name)
    }

    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<()> {
        let o = cstr("rados_write_full", oid)?;
        check("rados_write_full", &self.target(oid), unsafe {
            ffi::rados_write_full(
                self.raw,
                o.as_ptr(),
                data.as_ptr() as *const libc::c_char,
                data.len(),
            )
        })?;
        Ok(())
    }

    /// Reads a whole small object; `None` when it does not exist.
    pub fn read_small(&self, oid: &str) -> Result<Option<Vec<u8>>> {
        let o = cstr("rados_read", oid)?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = unsafe {
            ffi::rados_read(
                self.raw,
                o.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
                0,
            )
        };
        if n == -libc::ENOENT {
            return Ok(None);
        }
        let n = check("rados_read", &self.target(oid), n)? as usize;
        buf.truncate(n);
        Ok(Some(buf))
    }

    pub fn exists(&self, oid: &str) -> Result<bool> {
        let o = cstr("rados_stat", oid)?;
        let mut size = 0u64;
        let mut mtime: libc::time_t = 0;
        match unsafe { ffi::rados_stat(self.raw, o.as_ptr(), &mut size, &mut mtime) } {
            n if n == -libc::ENOENT => Ok(false),
            n => check("rados_stat", &self.target(oid), n).map(|_| true),
        }
    }

    pub fn remove_object(&self, oid: &str) -> Result<()> {
        let o = cstr("rados_remove", oid)?;
        match unsafe { ffi::rados_remove(self.raw, o.as_ptr()) } {
            n if n == -libc::ENOENT => Ok(()),
            n => check("rados_remove", &self.target(oid), n).map(|_| ()),
        }
    }
}
