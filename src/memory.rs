//! Keeping a long-running driver's resident memory flat under glibc malloc.
//!
//! librados and librbd allocate from many threads (messenger workers, timers, finishers, and our
//! blocking pool). glibc gives each such thread its own arena, up to eight per core, and never
//! gives back freed memory in the middle of an arena. Measured on the dev cluster, a driver
//! that had served a few hundred create/delete cycles held ~25 MiB of private memory of which
//! ~12 MiB was free but retained; `malloc_trim(0)` returned it. So: two arenas (plenty for a
//! control plane that spends its time waiting on the network), and a trim after each burst of
//! calls, off the request path.

use std::sync::Arc;
use std::time::Duration;

/// Caps glibc's malloc arenas at two, unless `MALLOC_ARENA_MAX` already says otherwise.
/// Call before any thread is started: arenas are assigned when a thread first allocates.
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; no other thread exists yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

/// Every `interval`, if `activity` changed since the last look (calls were served), gives freed
/// memory back to the kernel. The trim runs on the blocking pool: it takes arena locks.
pub fn spawn_trimmer(activity: Arc<dyn Fn() -> u64 + Send + Sync>, interval: Duration) {
    tokio::spawn(async move {
        let mut seen = activity();
        loop {
            tokio::time::sleep(interval).await;
            let now = activity();
            if now == seen {
                continue;
            }
            seen = now;
            // SAFETY: malloc_trim has no preconditions; it is thread-safe.
            let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
        }
    });
}
