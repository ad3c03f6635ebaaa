//! Safe, blocking wrappers over a librados cluster handle and its I/O contexts, and the record of
//! what a connection's calls have seen lately (`ConnHealth`), which the pool reads to replace a
//! connection that is broken or stuck.

use super::{check, cstr, ffi, owned, CephError, Result};
use crate::secret::Secret;
use std::collections::HashMap;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Owns a `rados_t`; shut down when the last `Connection`, `IoCtx` or `Image` referring to it is
/// gone.
pub(crate) struct ClusterHandle(ffi::rados_t);

// librados handles are documented as thread-safe.
unsafe impl Send for ClusterHandle {}
unsafe impl Sync for ClusterHandle {}

struct RawCluster(ffi::rados_t);
unsafe impl Send for RawCluster {}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        // rados_shutdown joins librados's threads and closes its sessions; the last reference to
        // an evicted connection may go on an async worker, which must not block on that.
        let raw = RawCluster(self.0);
        let shutdown = move || {
            let raw = raw;
            unsafe { ffi::rados_shutdown(raw.0) }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(shutdown)),
            Err(_) => shutdown(),
        }
    }
}

/// How a Ceph call ended, as far as the health of its connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The cluster answered (with success or with any error of its own, e.g. ENOENT).
    Answered,
    /// No answer within the op timeout.
    TimedOut,
    /// The client is blocklisted (librados's EBLOCKLISTED is ESHUTDOWN) or shut down: this
    /// connection never works again, a new one (a new client address) does.
    Fenced,
}

impl Outcome {
    pub(crate) fn of(ret: i32) -> Outcome {
        match -ret {
            libc::ETIMEDOUT => Outcome::TimedOut,
            libc::ESHUTDOWN => Outcome::Fenced,
            _ => Outcome::Answered,
        }
    }
}

/// What one connection's calls have seen: consecutive timeouts since the last answer, kept apart
/// for OSDs and monitors (a monitor that answers the health check says nothing about an OSD
/// session that is stuck), and whether the client was fenced. Shared by the connection and every
/// I/O context and image opened from it.
#[derive(Debug, Default)]
pub struct ConnHealth {
    osd_streak: AtomicU32,
    mon_streak: AtomicU32,
    fenced: AtomicBool,
    timeouts: AtomicU64,
    answers: AtomicU64,
    /// The pool of the latest OSD timeout: where a replacement is probed.
    timeout_pool: Mutex<Option<String>>,
}

/// A copy of `ConnHealth` at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub osd_streak: u32,
    pub mon_streak: u32,
    pub fenced: bool,
    pub timeouts: u64,
    pub answers: u64,
}

impl HealthSnapshot {
    /// The longer run of consecutive timeouts, OSD or monitor.
    pub fn streak(&self) -> u32 {
        self.osd_streak.max(self.mon_streak)
    }
}

impl ConnHealth {
    /// Records the return code of an OSD-side call (librados I/O, librbd) on `pool`.
    pub(crate) fn osd(&self, pool: &str, ret: i32) -> i32 {
        if self.record(&self.osd_streak, ret) == Outcome::TimedOut {
            *self.timeout_pool.lock().unwrap() = Some(pool.to_string());
        }
        ret
    }

    /// Records the return code of a monitor command.
    pub(crate) fn mon(&self, ret: i32) -> i32 {
        self.record(&self.mon_streak, ret);
        ret
    }

    fn record(&self, streak: &AtomicU32, ret: i32) -> Outcome {
        let outcome = Outcome::of(ret);
        match outcome {
            Outcome::Answered => {
                self.answers.fetch_add(1, Ordering::Relaxed);
                streak.store(0, Ordering::Relaxed);
            }
            Outcome::TimedOut => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                streak.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Fenced => self.fenced.store(true, Ordering::Relaxed),
        }
        outcome
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        HealthSnapshot {
            osd_streak: self.osd_streak.load(Ordering::Relaxed),
            mon_streak: self.mon_streak.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            answers: self.answers.load(Ordering::Relaxed),
        }
    }

    /// The pool to probe when OSD calls are the ones timing out.
    pub(crate) fn timeout_pool(&self) -> Option<String> {
        if self.osd_streak.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.timeout_pool.lock().unwrap().clone()
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

/// A connected cluster, with a cache of I/O contexts per pool and RADOS namespace.
pub struct Connection {
    handle: Arc<ClusterHandle>,
    ioctxs: Mutex<HashMap<(String, String), Arc<IoCtx>>>,
    fsid: String,
    health: Arc<ConnHealth>,
}

/// `objecter_timeout` for an OSD op timeout: a quarter of it, so that an op whose OSD is silent
/// counts as laggy well before librados gives up on it (see `Connection::connect`).
fn laggy_after(osd_op_timeout: Duration) -> Duration {
    (osd_op_timeout / 4).clamp(Duration::from_millis(500), Duration::from_secs(10))
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
        let laggy = laggy_after(Duration::from_secs(p.osd_op_timeout.as_secs().max(1)));
        let settings: [(&str, String); 23] = [
            ("mon_host", p.monitors.join(",")),
            ("rados_osd_op_timeout", secs(p.osd_op_timeout)),
            ("rados_mon_op_timeout", secs(p.mon_op_timeout)),
            ("client_mount_timeout", secs(p.mount_timeout)),
            // Why a pooled connection stayed stuck after an OSD restart (issue 7, item 3): the
            // Objecter asks the monitors for a newer osdmap only when an OSD session resets, or
            // when its tick (every objecter_tick_interval, 5 s) finds an op older than
            // objecter_timeout (10 s). After `kill -9`, the session reset came while the OSD was
            // still "up" in the map, so the one-time map request was answered with an epoch that
            // still named the dead instance. The restarted OSD listens on the same port with a new
            // nonce and drops every connection addressed to the old one, without a reset; and
            // with rados_osd_op_timeout at 8 s every op was cancelled before it was 10 s old, so
            // none ever counted as laggy and the map (with the new address) was never fetched.
            // Fresh clients fetch the current map at connect, which is why `rbd` worked.
            // Below the op timeout, the tick finds the op laggy, fetches the map and resends.
            ("objecter_timeout", format!("{:.3}", laggy.as_secs_f64())),
            (
                "objecter_tick_interval",
                format!("{:.3}", laggy.as_secs_f64() / 2.0),
            ),
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
            health: Arc::default(),
        })
    }

    pub fn fsid(&self) -> &str {
        &self.fsid
    }

    /// What this connection's calls have seen lately.
    pub fn health(&self) -> &ConnHealth {
        &self.health
    }

    /// The I/O context for a pool and namespace (empty: the default one) if one was created
    /// before; never blocks.
    pub fn cached_ioctx(&self, pool: &str, namespace: &str) -> Option<Arc<IoCtx>> {
        let key = (pool.to_string(), namespace.to_string());
        self.ioctxs.lock().unwrap().get(&key).cloned()
    }

    /// The I/O context for a pool's default namespace, created once and then shared.
    pub fn ioctx(&self, pool: &str) -> Result<Arc<IoCtx>> {
        self.ioctx_in(pool, "")
    }

    /// The I/O context for a pool and RADOS namespace, created once and then shared. The
    /// namespace is fixed for its life: a shared context must never switch.
    pub fn ioctx_in(&self, pool: &str, namespace: &str) -> Result<Arc<IoCtx>> {
        if let Some(io) = self.cached_ioctx(pool, namespace) {
            return Ok(io);
        }
        let name = cstr("rados_ioctx_create", pool)?;
        let ns = cstr("rados_ioctx_set_namespace", namespace)?;
        let mut raw: ffi::rados_ioctx_t = ptr::null_mut();
        check("rados_ioctx_create", pool, unsafe {
            ffi::rados_ioctx_create(self.handle.0, name.as_ptr(), &mut raw)
        })?;
        let io = Arc::new(IoCtx(Arc::new(IoHandle {
            raw,
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            health: self.health.clone(),
            _cluster: self.handle.clone(),
        })));
        if !namespace.is_empty() {
            unsafe { ffi::rados_ioctx_set_namespace(io.raw(), ns.as_ptr()) };
            // librados accepts any namespace name; only RBD's registry knows the real ones.
            let mut exists = false;
            let spec = io.location();
            check("rbd_namespace_exists", &spec, unsafe {
                io.seen(ffi::rbd_namespace_exists(
                    io.raw(),
                    ns.as_ptr(),
                    &mut exists,
                ))
            })?;
            if !exists {
                return Err(CephError::new("rbd_namespace_exists", &spec, -libc::ENOENT));
            }
        }
        let mut map = self.ioctxs.lock().unwrap();
        let key = (pool.to_string(), namespace.to_string());
        Ok(map.entry(key).or_insert(io).clone())
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
        self.health.mon(ret);
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
pub struct IoCtx(Arc<IoHandle>);

/// The I/O context itself, shared with the images opened through it, so that neither it nor the
/// cluster handle under it can go while an image is open.
pub(crate) struct IoHandle {
    raw: ffi::rados_ioctx_t,
    pool: String,
    namespace: String,
    pub(crate) health: Arc<ConnHealth>,
    _cluster: Arc<ClusterHandle>,
}

unsafe impl Send for IoHandle {}
unsafe impl Sync for IoHandle {}

impl Drop for IoHandle {
    fn drop(&mut self) {
        unsafe { ffi::rados_ioctx_destroy(self.raw) }
    }
}

impl IoHandle {
    /// `pool/name` or `pool/namespace/name`, for messages.
    pub(crate) fn target(&self, name: &str) -> String {
        match self.namespace.as_str() {
            "" => format!("{}/{}", self.pool, name),
            ns => format!("{}/{ns}/{}", self.pool, name),
        }
    }

    /// Records a call's return code in the connection's health and passes it on.
    pub(crate) fn seen(&self, ret: i32) -> i32 {
        self.health.osd(&self.pool, ret)
    }
}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.0.pool
    }

    pub(crate) fn raw(&self) -> ffi::rados_ioctx_t {
        self.0.raw
    }

    pub(crate) fn handle(&self) -> Arc<IoHandle> {
        self.0.clone()
    }

    /// The RADOS namespace; empty for the pool's default.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// `pool` or `pool/namespace`, as `rbd` writes it.
    pub fn location(&self) -> String {
        match self.0.namespace.as_str() {
            "" => self.0.pool.clone(),
            ns => format!("{}/{ns}", self.0.pool),
        }
    }

    pub(crate) fn target(&self, name: &str) -> String {
        self.0.target(name)
    }

    pub(crate) fn seen(&self, ret: i32) -> i32 {
        self.0.seen(ret)
    }

    pub fn write_full(&self, oid: &str, data: &[u8]) -> Result<()> {
        let o = cstr("rados_write_full", oid)?;
        check("rados_write_full", &self.target(oid), unsafe {
            self.seen(ffi::rados_write_full(
                self.raw(),
                o.as_ptr(),
                data.as_ptr() as *const libc::c_char,
                data.len(),
            ))
        })?;
        Ok(())
    }

    /// Appends to an object, creating it if needed. The OSD applies appends one at a time, so
    /// concurrent writers never lose each other's records (a read-modify-write would).
    pub fn append(&self, oid: &str, data: &[u8]) -> Result<()> {
        let o = cstr("rados_append", oid)?;
        check("rados_append", &self.target(oid), unsafe {
            self.seen(ffi::rados_append(
                self.raw(),
                o.as_ptr(),
                data.as_ptr() as *const libc::c_char,
                data.len(),
            ))
        })?;
        Ok(())
    }

    /// Calls an object class method that returns no data.
    pub fn exec(&self, oid: &str, class: &str, method: &str, input: &[u8]) -> Result<()> {
        let o = cstr("rados_exec", oid)?;
        let c = cstr("rados_exec", class)?;
        let m = cstr("rados_exec", method)?;
        check("rados_exec", &self.target(oid), unsafe {
            self.seen(ffi::rados_exec(
                self.raw(),
                o.as_ptr(),
                c.as_ptr(),
                m.as_ptr(),
                input.as_ptr() as *const libc::c_char,
                input.len(),
                ptr::null_mut(),
                0,
            ))
        })?;
        Ok(())
    }

    /// Reads a whole small object; `None` when it does not exist.
    pub fn read_small(&self, oid: &str) -> Result<Option<Vec<u8>>> {
        let o = cstr("rados_read", oid)?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.seen(unsafe {
            ffi::rados_read(
                self.raw(),
                o.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
                0,
            )
        });
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
        match self.seen(unsafe { ffi::rados_stat(self.raw(), o.as_ptr(), &mut size, &mut mtime) }) {
            n if n == -libc::ENOENT => Ok(false),
            n => check("rados_stat", &self.target(oid), n).map(|_| true),
        }
    }

    pub fn remove_object(&self, oid: &str) -> Result<()> {
        let o = cstr("rados_remove", oid)?;
        match self.seen(unsafe { ffi::rados_remove(self.raw(), o.as_ptr()) }) {
            n if n == -libc::ENOENT => Ok(()),
            n => check("rados_remove", &self.target(oid), n).map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_op_counts_as_laggy_well_before_librados_gives_up_on_it() {
        // Otherwise the Objecter never asks for a newer osdmap on its own (see `connect`).
        for secs in 1..=120 {
            let op = Duration::from_secs(secs);
            let laggy = laggy_after(op);
            assert!(laggy * 2 <= op, "{op:?}: laggy after {laggy:?}");
        }
    }

    #[test]
    fn timeouts_and_fencing_are_told_apart_from_answers() {
        assert_eq!(Outcome::of(0), Outcome::Answered);
        assert_eq!(Outcome::of(5), Outcome::Answered);
        assert_eq!(Outcome::of(-libc::ENOENT), Outcome::Answered);
        assert_eq!(Outcome::of(-libc::ETIMEDOUT), Outcome::TimedOut);
        assert_eq!(Outcome::of(-libc::ESHUTDOWN), Outcome::Fenced);
    }
}
