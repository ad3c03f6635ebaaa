//! A pool of Ceph connections keyed by (cluster, user, key), so a burst of requests shares one
//! authenticated session, and the async front end that runs blocking librados calls off tokio's
//! worker threads.

use super::rados::{ConnectParams, Connection};
use super::{CephError, IoCtx, Result};
use crate::secret::Secret;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

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

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    cluster: String,
    user: String,
    /// A digest of the key, so a rotated key gets a fresh connection without keeping the key twice.
    key_digest: [u8; 32],
}

type Slot = Arc<OnceCell<Arc<Connection>>>;

#[derive(Default)]
pub struct PoolStats {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub hits: AtomicU64,
}

pub struct ConnectionPool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
    timeouts: CephTimeouts,
    pub stats: PoolStats,
}

impl ConnectionPool {
    pub fn new(timeouts: CephTimeouts) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            timeouts,
            stats: PoolStats::default(),
        }
    }

    pub fn timeouts(&self) -> CephTimeouts {
        self.timeouts
    }

    /// The pooled connection for these credentials, connecting once if there is none.
    /// Concurrent callers with the same key wait for the same connect; a failed connect is not
    /// cached, so the next call tries again (the cluster may be back).
    pub async fn get(
        &self,
        cluster: &str,
        monitors: &[String],
        user: &str,
        key: &Secret,
    ) -> Result<Arc<Connection>> {
        let pk = PoolKey {
            cluster: cluster.to_string(),
            user: user.to_string(),
            key_digest: Sha256::digest(key.expose().as_bytes()).into(),
        };
        let slot = self.slots.lock().unwrap().entry(pk).or_default().clone();
        if let Some(c) = slot.get() {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c.clone());
        }
        let params = ConnectParams {
            monitors: monitors.to_vec(),
            user: user.to_string(),
            key: key.clone(),
            osd_op_timeout: self.timeouts.osd_op,
            mon_op_timeout: self.timeouts.mon_op,
            mount_timeout: self.timeouts.mount,
        };
        let stats = &self.stats;
        slot.get_or_try_init(|| async move {
            stats.connects.fetch_add(1, Ordering::Relaxed);
            let res = blocking(move || Connection::connect(&params))
                .await
                .map(Arc::new);
            if res.is_err() {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            res
        })
        .await
        .cloned()
    }

    /// Connections currently held.
    pub fn size(&self) -> usize {
        self.slots
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.initialized())
            .count()
    }

    /// Every live connection, for health checks.
    pub fn connections(&self) -> Vec<(String, Arc<Connection>)> {
        self.slots
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(k, s)| s.get().map(|c| (k.cluster.clone(), c.clone())))
            .collect()
    }
}

/// Run a blocking librados/librbd call on tokio's blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(CephError {
            op: "blocking task",
            target: e.to_string(),
            errno: libc::EIO,
        }),
    }
}

/// Shorthand for running a closure with a pool's I/O context off the async threads.
pub async fn with_ioctx<T, F>(io: Arc<IoCtx>, f: F) -> Result<T>
where
    F: FnOnce(&IoCtx) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    blocking(move || f(&io)).await
}
