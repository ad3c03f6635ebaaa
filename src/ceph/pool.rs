//! A pool of Ceph connections keyed by (cluster, user, key), so a burst of requests shares one
//! authenticated session, and the async front end that runs blocking librados calls off tokio's
//! worker threads.
//!
//! The pool also replaces connections that can no longer work: a fenced (blocklisted) client at
//! once; one whose calls keep timing out once a fresh client is seen to get answers (checked at
//! most once per `check_interval`, so an outage never turns into a reconnect storm); and one that
//! no call has asked for in `idle_timeout` (a rotated key's old session, a cluster no longer
//! used). Callers that still hold a replaced connection finish on it; it closes when they are done.

use super::rados::{ConnectParams, Connection, HealthSnapshot};
use super::{CephError, IoCtx, Result};
use crate::secret::Secret;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Deadlines handed to librados, so that no Ceph call waits forever.
#[derive(Debug, Clone, Copy)]
pub struct CephTimeouts {
    pub osd_op: Duration,
    pub mon_op: Duration,
    pub mount: Duration,
}

impl Default for CephTimeouts {
    fn default() -> Self {
        // Below the CSI sidecars' default 10-15 s timeouts, so we answer before they give up.
        Self {
            osd_op: Duration::from_secs(8),
            mon_op: Duration::from_secs(8),
            mount: Duration::from_secs(8),
        }
    }
}

/// When the pool lets go of a connection.
#[derive(Debug, Clone, Copy)]
pub struct PoolPolicy {
    /// A connection that no call has asked for in this long is closed.
    pub idle_timeout: Duration,
    /// Consecutive timeouts (no answer in between) after which a connection is suspected stuck
    /// and checked against a fresh client.
    pub suspect_after: u32,
    /// At most one such check per connection in this long.
    pub check_interval: Duration,
    /// How long the call that started a check waits for it before going on with the old
    /// connection; the check itself goes on. Short, since in an outage that call pays it on top
    /// of its own op timeout.
    pub check_wait: Duration,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            suspect_after: 2,
            check_interval: Duration::from_secs(10),
            check_wait: Duration::from_secs(1),
        }
    }
}

/// Why a connection left the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    Idle,
    /// Blocklisted, or otherwise shut down: it can never work again.
    Fenced,
    /// Kept timing out while a fresh client got answers.
    Unresponsive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Suspect: connect a fresh client and see whether it gets answers.
    Check,
    Evict(Eviction),
}

/// Whether a check of a connection is running, and when the last one started.
#[derive(Debug, Clone, Copy, Default)]
struct CheckState {
    running: bool,
    last: Option<Instant>,
}

/// The policy, as a pure function of what a connection has seen, so it can be tested with a
/// made-up clock.
fn verdict(
    health: &HealthSnapshot,
    idle_for: Duration,
    check: CheckState,
    now: Instant,
    policy: &PoolPolicy,
) -> Verdict {
    if health.fenced {
        return Verdict::Evict(Eviction::Fenced);
    }
    if idle_for >= policy.idle_timeout {
        return Verdict::Evict(Eviction::Idle);
    }
    let due = check
        .last
        .is_none_or(|t| now.saturating_duration_since(t) >= policy.check_interval);
    if health.streak() >= policy.suspect_after.max(1) && !check.running && due {
        return Verdict::Check;
    }
    Verdict::Keep
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    cluster: String,
    user: String,
    /// A digest of the key, so a rotated key gets a fresh connection without keeping the key twice.
    key_digest: [u8; 32],
}

/// One (cluster, user, key): its live connection, if any, and what the policy needs to know.
struct Slot {
    conn: Mutex<Option<Arc<Connection>>>,
    /// Held for the whole of a connect, so concurrent callers share one.
    connecting: tokio::sync::Mutex<()>,
    last_used: Mutex<Instant>,
    check: Mutex<CheckState>,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Self {
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_used: Mutex::new(now),
            check: Mutex::new(CheckState::default()),
        }
    }

    fn current(&self) -> Option<Arc<Connection>> {
        self.conn.lock().unwrap().clone()
    }

    /// Takes `old` out of the slot if it is still the one there, putting `new` in its place.
    fn replace(&self, old: &Arc<Connection>, new: Option<Arc<Connection>>) -> bool {
        let mut cur = self.conn.lock().unwrap();
        match &*cur {
            Some(c) if Arc::ptr_eq(c, old) => {
                *cur = new;
                true
            }
            _ => false,
        }
    }
}

#[derive(Default)]
pub struct PoolStats {
    /// Connects started (first ones, replacements and checks' fresh clients).
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Calls that reused a pooled connection.
    pub hits: AtomicU64,
    /// Connections the pool let go of (idle, fenced or unresponsive).
    pub evictions: AtomicU64,
    /// Fresh-client checks of a connection that kept timing out.
    pub checks: AtomicU64,
}

/// What the pool and its background work (checks, the idle sweeper) share.
struct Shared {
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    stats: Arc<PoolStats>,
    policy: PoolPolicy,
}

impl Shared {
    fn evicted(&self, cluster: &str, user: &str, why: Eviction) {
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(cluster, user, reason = ?why, "closing a pooled Ceph connection");
    }

    /// Drops idle and fenced connections, and slots that have nothing left to keep.
    fn sweep(&self, now: Instant) {
        let mut slots = self.slots.lock().unwrap();
        slots.retain(|k, slot| {
            let idle_for = now.saturating_duration_since(*slot.last_used.lock().unwrap());
            let check = *slot.check.lock().unwrap();
            let Some(c) = slot.current() else {
                // A slot whose connects failed: keep it only while it is in use.
                return idle_for < self.policy.idle_timeout || check.running;
            };
            match verdict(&c.health().snapshot(), idle_for, check, now, &self.policy) {
                Verdict::Evict(why) if !check.running && slot.replace(&c, None) => {
                    self.evicted(&k.cluster, &k.user, why);
                    why != Eviction::Idle
                }
                _ => true,
            }
        });
    }
}

pub struct ConnectionPool {
    shared: Arc<Shared>,
    timeouts: CephTimeouts,
    sweeper: AtomicBool,
    pub stats: Arc<PoolStats>,
}

/// The object a check reads to see whether the OSDs answer a fresh client: any answer, even
/// ENOENT, will do.
const PROBE_OBJECT: &str = "rook-rbd.probe";

impl ConnectionPool {
    pub fn new(timeouts: CephTimeouts) -> Self {
        Self::with_policy(timeouts, PoolPolicy::default())
    }

    pub fn with_policy(timeouts: CephTimeouts, policy: PoolPolicy) -> Self {
        let stats = Arc::new(PoolStats::default());
        Self {
            shared: Arc::new(Shared {
                slots: Mutex::new(HashMap::new()),
                stats: stats.clone(),
                policy,
            }),
            timeouts,
            sweeper: AtomicBool::new(false),
            stats,
        }
    }

    pub fn timeouts(&self) -> CephTimeouts {
        self.timeouts
    }

    pub fn policy(&self) -> PoolPolicy {
        self.shared.policy
    }

    /// The pooled connection for these credentials, connecting once if there is none.
    /// Concurrent callers with the same key wait for the same connect; a failed connect is not
    /// cached, so the next call tries again (the cluster may be back). A fenced connection is
    /// replaced here, and a suspect one checked (see the module doc).
    pub async fn get(
        &self,
        cluster: &str,
        monitors: &[String],
        user: &str,
        key: &Secret,
    ) -> Result<Arc<Connection>> {
        self.start_sweeper();
        let pk = PoolKey {
            cluster: cluster.to_string(),
            user: user.to_string(),
            key_digest: Sha256::digest(key.expose().as_bytes()).into(),
        };
        let now = Instant::now();
        let slot = self
            .shared
            .slots
            .lock()
            .unwrap()
            .entry(pk)
            .or_insert_with(|| Arc::new(Slot::new(now)))
            .clone();
        *slot.last_used.lock().unwrap() = now;
        let params = ConnectParams {
            monitors: monitors.to_vec(),
            user: user.to_string(),
            key: key.clone(),
            osd_op_timeout: self.timeouts.osd_op,
            mon_op_timeout: self.timeouts.mon_op,
            mount_timeout: self.timeouts.mount,
        };
        if let Some(c) = slot.current() {
            let check = *slot.check.lock().unwrap();
            match verdict(
                &c.health().snapshot(),
                Duration::ZERO,
                check,
                now,
                &self.shared.policy,
            ) {
                Verdict::Keep => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(c);
                }
                Verdict::Check => {
                    let fresh = self.check(&slot, &c, params, cluster).await;
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(fresh.unwrap_or(c));
                }
                Verdict::Evict(why) => {
                    if slot.replace(&c, None) {
                        self.shared.evicted(cluster, user, why);
                    }
                }
            }
        }
        self.connect(slot, params).await
    }

    /// Connects in a task of its own that holds the slot's connect lock until the connect is
    /// over, so a caller that gives up early never lets a second connect start beside it.
    async fn connect(&self, slot: Arc<Slot>, params: ConnectParams) -> Result<Arc<Connection>> {
        let stats = self.stats.clone();
        let task = tokio::spawn(async move {
            let _one = slot.connecting.lock().await;
            if let Some(c) = slot.current() {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c);
            }
            stats.connects.fetch_add(1, Ordering::Relaxed);
            match blocking(move || Connection::connect(&params)).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    *slot.conn.lock().unwrap() = Some(c.clone());
                    Ok(c)
                }
                Err(e) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    Err(e)
                }
            }
        });
        task.await.unwrap_or_else(|e| Err(join_error(e)))
    }

    /// Connects a fresh client and, if it gets an answer where `old` timed out, puts it in
    /// `old`'s place. Returns the fresh connection if that happened within `check_wait`.
    async fn check(
        &self,
        slot: &Arc<Slot>,
        old: &Arc<Connection>,
        params: ConnectParams,
        cluster: &str,
    ) -> Option<Arc<Connection>> {
        {
            let mut st = slot.check.lock().unwrap();
            if st.running {
                return None;
            }
            *st = CheckState {
                running: true,
                last: Some(Instant::now()),
            };
        }
        self.stats.checks.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.clone();
        let (slot, old, cluster) = (slot.clone(), old.clone(), cluster.to_string());
        let mut task = tokio::spawn(async move {
            let user = params.user.clone();
            let fresh = answering_client(&shared.stats, params, old.health().timeout_pool()).await;
            let swapped = fresh.as_ref().is_some_and(|f| {
                // Only if nothing answered the old one meanwhile (it may have healed itself).
                let still_stuck =
                    old.health().snapshot().streak() >= shared.policy.suspect_after.max(1);
                still_stuck && slot.replace(&old, Some(f.clone()))
            });
            slot.check.lock().unwrap().running = false;
            if swapped {
                shared.evicted(&cluster, &user, Eviction::Unresponsive);
                fresh
            } else {
                None
            }
        });
        match tokio::time::timeout(self.shared.policy.check_wait, &mut task).await {
            Ok(Ok(fresh)) => fresh,
            _ => None,
        }
    }

    /// Starts the idle sweeper once, on the runtime of the first call; it ends with the pool.
    fn start_sweeper(&self) {
        if self.sweeper.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        let every = (self.shared.policy.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(60));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                shared.sweep(Instant::now());
            }
        });
    }

    /// Connections currently held.
    pub fn size(&self) -> usize {
        self.shared
            .slots
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.current().is_some())
            .count()
    }

    /// Every live connection, for health checks.
    pub fn connections(&self) -> Vec<(String, Arc<Connection>)> {
        self.shared
            .slots
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(k, s)| s.current().map(|c| (k.cluster.clone(), c)))
            .collect()
    }
}

/// A fresh connection, if the cluster answers it: the connect proves the monitors do, and when
/// the old connection's OSD calls were the ones timing out, a stat in that pool proves the OSDs
/// do. Bounded by the mount and OSD op timeouts.
async fn answering_client(
    stats: &PoolStats,
    params: ConnectParams,
    pool: Option<String>,
) -> Option<Arc<Connection>> {
    stats.connects.fetch_add(1, Ordering::Relaxed);
    let fresh = match blocking(move || Connection::connect(&params)).await {
        Ok(c) => Arc::new(c),
        Err(_) => {
            stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    if let Some(pool) = pool {
        let f = fresh.clone();
        let answer = blocking(move || f.ioctx(&pool)?.exists(PROBE_OBJECT)).await;
        // Any other error (a pool gone, no read cap) is still an answer from the cluster.
        if answer.is_err_and(|e| e.timed_out() || e.fenced()) {
            return None;
        }
    }
    Some(fresh)
}

fn join_error(e: tokio::task::JoinError) -> CephError {
    CephError {
        op: "blocking task",
        target: e.to_string(),
        errno: libc::EIO,
    }
}

/// Run a blocking librados/librbd call on tokio's blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(join_error(e)))
}

/// Shorthand for running a closure with a pool's I/O context off the async threads.
pub async fn with_ioctx<T, F>(io: Arc<IoCtx>, f: F) -> Result<T>
where
    F: FnOnce(&IoCtx) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    blocking(move || f(&io)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: PoolPolicy = PoolPolicy {
        idle_timeout: Duration::from_secs(300),
        suspect_after: 2,
        check_interval: Duration::from_secs(10),
        check_wait: Duration::from_secs(1),
    };

    fn health(osd_streak: u32, mon_streak: u32, fenced: bool) -> HealthSnapshot {
        HealthSnapshot {
            osd_streak,
            mon_streak,
            fenced,
            ..Default::default()
        }
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn a_fenced_connection_is_evicted_at_once() {
        let t0 = Instant::now();
        let v = verdict(
            &health(0, 0, true),
            Duration::ZERO,
            CheckState::default(),
            t0,
            &POLICY,
        );
        assert_eq!(v, Verdict::Evict(Eviction::Fenced));
    }

    #[test]
    fn an_idle_connection_is_evicted_only_after_the_idle_timeout() {
        let t0 = Instant::now();
        let h = health(0, 0, false);
        let idle = |secs| {
            verdict(
                &h,
                Duration::from_secs(secs),
                CheckState::default(),
                t0,
                &POLICY,
            )
        };
        assert_eq!(idle(299), Verdict::Keep);
        assert_eq!(idle(300), Verdict::Evict(Eviction::Idle));
    }

    #[test]
    fn one_timeout_is_kept_and_a_run_of_them_is_checked() {
        let t0 = Instant::now();
        let v = |osd, mon| {
            verdict(
                &health(osd, mon, false),
                Duration::ZERO,
                CheckState::default(),
                t0,
                &POLICY,
            )
        };
        assert_eq!(v(0, 0), Verdict::Keep);
        assert_eq!(v(1, 0), Verdict::Keep);
        assert_eq!(v(2, 0), Verdict::Check);
        assert_eq!(v(0, 2), Verdict::Check);
    }

    #[test]
    fn a_suspect_connection_is_checked_at_most_once_per_interval() {
        let t0 = Instant::now();
        let h = health(5, 0, false);
        let v = |check, now| verdict(&h, Duration::ZERO, check, now, &POLICY);
        let running = CheckState {
            running: true,
            last: Some(t0),
        };
        let done = CheckState {
            running: false,
            last: Some(t0),
        };
        assert_eq!(v(running, at(t0, 60)), Verdict::Keep);
        assert_eq!(v(done, at(t0, 9)), Verdict::Keep);
        assert_eq!(v(done, at(t0, 10)), Verdict::Check);
    }

    #[test]
    fn the_health_record_counts_runs_of_timeouts_per_path_and_fencing() {
        use super::super::rados::ConnHealth;
        let h = ConnHealth::default();
        h.osd("rbd", -libc::ETIMEDOUT);
        h.osd("rbd", -libc::ETIMEDOUT);
        // A monitor that answers says nothing about the OSD sessions.
        h.mon(0);
        assert_eq!(h.snapshot().osd_streak, 2);
        assert_eq!(h.timeout_pool().as_deref(), Some("rbd"));
        // Any answer from an OSD, even an error of its own, ends the run.
        h.osd("rbd", -libc::ENOENT);
        assert_eq!(h.snapshot().osd_streak, 0);
        assert_eq!(h.timeout_pool(), None);
        h.mon(-libc::ETIMEDOUT);
        assert_eq!(h.snapshot().mon_streak, 1);
        assert!(!h.snapshot().fenced);
        h.osd("rbd", -libc::ESHUTDOWN);
        let s = h.snapshot();
        assert!(s.fenced);
        assert_eq!((s.timeouts, s.answers), (3, 2));
    }

    #[test]
    fn the_sweeper_drops_idle_slots_and_counts_only_real_connections() {
        let shared = Shared {
            slots: Mutex::new(HashMap::new()),
            stats: Arc::default(),
            policy: POLICY,
        };
        let t0 = Instant::now();
        let key = |n: &str| PoolKey {
            cluster: n.into(),
            user: "admin".into(),
            key_digest: [0; 32],
        };
        // Slots whose connects failed: nothing to close, so no eviction is counted.
        shared
            .slots
            .lock()
            .unwrap()
            .insert(key("old"), Arc::new(Slot::new(t0)));
        shared
            .slots
            .lock()
            .unwrap()
            .insert(key("recent"), Arc::new(Slot::new(at(t0, 200))));
        shared.sweep(at(t0, 299));
        assert_eq!(shared.slots.lock().unwrap().len(), 2);
        shared.sweep(at(t0, 300));
        let left: Vec<_> = shared
            .slots
            .lock()
            .unwrap()
            .keys()
            .map(|k| k.cluster.clone())
            .collect();
        assert_eq!(left, vec!["recent".to_string()]);
        assert_eq!(shared.stats.evictions.load(Ordering::Relaxed), 0);
    }
}
