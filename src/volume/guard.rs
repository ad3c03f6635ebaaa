//! A per-key in-flight guard: a second concurrent operation on the same volume (or the same
//! CreateVolume name) gets `Aborted` instead of racing the first.
//!
//! [`InFlight::run`] is the cancellation-safe way in: the work runs in a task of its own that
//! holds the key until the work is really over. When a client's deadline passes, tonic drops the
//! handler future, but not the task: a retry keeps getting `Aborted` until the first attempt
//! has finished, so no retry ever runs beside (or undoes) the call it retries.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

#[derive(Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; leaving scope releases the key.
pub struct InFlightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

/// Why [`InFlight::run`] did not return the work's output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// Another operation holds the key.
    #[error("an operation on {0} is already in progress")]
    Busy(String),
    /// The work panicked or the runtime is shutting down; its effects are unknown.
    #[error("the operation on {key} did not complete: {reason}")]
    Lost { key: String, reason: String },
}

impl InFlight {
    pub fn try_enter(&self, key: &str) -> Option<InFlightGuard> {
        let mut set = self.keys.lock().unwrap();
        if !set.insert(key.to_string()) {
            return None;
        }
        Some(InFlightGuard {
            keys: self.keys.clone(),
            key: key.to_string(),
        })
    }

    /// Runs `work` under `key` in its own task, which owns the key until `work` completes, even
    /// if the caller stops waiting. `Busy` when another operation holds the key.
    pub async fn run<T, F>(&self, key: &str, work: F) -> Result<T, RunError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let guard = self
            .try_enter(key)
            .ok_or_else(|| RunError::Busy(key.to_string()))?;
        let task = tokio::spawn(async move {
            let out = work.await;
            drop(guard);
            out
        });
        task.await.map_err(|e| RunError::Lost {
            key: key.to_string(),
            reason: if e.is_panic() {
                "it panicked".into()
            } else {
                "it was cancelled by shutdown".into()
            },
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.lock().unwrap().contains(key)
    }

    pub fn len(&self) -> usize {
        self.keys.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys.lock().unwrap().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn second_entry_for_the_same_key_is_refused_until_the_first_leaves() {
        let f = InFlight::default();
        let g = f.try_enter("v1").unwrap();
        assert!(f.try_enter("v1").is_none());
        assert!(f.try_enter("v2").is_some());
        drop(g);
        assert!(f.try_enter("v1").is_some());
    }

    #[tokio::test]
    async fn an_abandoned_run_keeps_its_key_until_its_work_is_over() {
        let f = InFlight::default();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let first = f.run("v1", async move {
            let _ = wait.await;
            let _ = done_tx.send(());
            1
        });
        // The caller gives up (a gRPC deadline drops the handler future).
        assert!(tokio::time::timeout(Duration::from_millis(50), first)
            .await
            .is_err());
        // The work goes on, and holds the key: a retry is refused.
        assert!(f.contains("v1"));
        assert_eq!(
            f.run("v1", async { 2 }).await,
            Err(RunError::Busy("v1".into()))
        );
        release.send(()).unwrap();
        done_rx.await.unwrap();
        // Released once the work is over (the task drops the guard right after).
        for _ in 0..100 {
            if !f.contains("v1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(f.run("v1", async { 3 }).await, Ok(3));
    }

    #[tokio::test]
    async fn a_panicking_run_releases_its_key_and_reports_the_loss() {
        let f = InFlight::default();
        let r = f.run("v1", async { panic!("boom") }).await;
        assert!(matches!(r, Err::<(), _>(RunError::Lost { .. })), "{r:?}");
        assert!(!f.contains("v1"));
    }
}
