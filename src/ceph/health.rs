//! Cluster health as Probe reports it: checked in the background, cached, never dialled per Probe.
//!
//! A cluster is healthy when a pooled connection's monitor command answers, or, before any
//! connection exists, when a monitor answers the messenger banner on TCP. Probe (and `/readyz`)
//! is ready only when every configured cluster is healthy; `/healthz` reports each cluster's
//! state and last error.

use super::pool::blocking;
use super::ConnectionPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// A cluster to watch: its ID (as connections in the pool are keyed) and its monitors.
#[derive(Debug, Clone)]
pub struct Target {
    pub cluster_id: String,
    pub monitors: Vec<String>,
}

/// What the last check of a cluster found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No check has finished yet.
    Unchecked,
    Up,
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unchecked => "unchecked",
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// One cluster's health as of its last check. The last error is kept after the cluster comes
/// back, so a report can still say what went wrong and when.
#[derive(Debug, Clone)]
pub struct ClusterHealth {
    pub cluster_id: String,
    pub state: State,
    pub last_check: Option<Instant>,
    /// When `state` last changed (or when watching began).
    pub since: Instant,
    pub last_error: Option<(Instant, String)>,
}

pub struct Health {
    targets: Vec<Target>,
    ready: AtomicBool,
    checked: AtomicBool,
    clusters: Mutex<Vec<ClusterHealth>>,
}

impl Health {
    pub fn new(targets: Vec<Target>) -> Self {
        let now = Instant::now();
        let clusters = targets
            .iter()
            .map(|t| ClusterHealth {
                cluster_id: t.cluster_id.clone(),
                state: State::Unchecked,
                last_check: None,
                since: now,
                last_error: None,
            })
            .collect();
        Self {
            targets,
            ready: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            clusters: Mutex::new(clusters),
        }
    }

    /// Every configured cluster answered its last check.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn checked(&self) -> bool {
        self.checked.load(Ordering::Acquire)
    }

    pub fn clusters(&self) -> Vec<ClusterHealth> {
        self.clusters.lock().unwrap().clone()
    }

    /// Why the driver is not ready, one line per cluster that is not up.
    pub fn problems(&self) -> Vec<String> {
        self.clusters
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| match (c.state, &c.last_error) {
                (State::Up, _) => None,
                (State::Down, Some((_, e))) => Some(format!("cluster {}: {e}", c.cluster_id)),
                (state, _) => Some(format!("cluster {}: {}", c.cluster_id, state.as_str())),
            })
            .collect()
    }

    /// One round of checks over every cluster; updates the cached answer.
    pub async fn check(&self, pool: &ConnectionPool, timeout: Duration) {
        let conns: HashMap<String, _> = pool.connections().into_iter().collect();
        let mut outcomes = Vec::with_capacity(self.targets.len());
        for entry in &self.targets {
            let outcome = match conns.get(&entry.cluster_id) {
                Some(conn) => {
                    let conn = conn.clone();
                    match blocking(move || {
                        conn.mon_command(r#"{"prefix":"mon stat","format":"json"}"#)
                    })
                    .await
                    {
                        Ok(_) => Ok(()),
                        // Refused by caps still proves the monitors answer.
                        Err(e) if e.permission_denied() => Ok(()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                None => banner_check(&entry.monitors, timeout).await,
            };
            outcomes.push(outcome);
        }
        let ready = self.record(outcomes, Instant::now());
        if ready != self.ready() || !self.checked() {
            tracing::info!(ready, "cluster health changed");
        }
        self.ready.store(ready, Ordering::Release);
        self.checked.store(true, Ordering::Release);
    }

    /// Stores one round's outcomes (in `targets` order); returns whether all are up.
    fn record(&self, outcomes: Vec<Result<(), String>>, now: Instant) -> bool {
        let mut clusters = self.clusters.lock().unwrap();
        for (c, outcome) in clusters.iter_mut().zip(outcomes) {
            let state = match outcome {
                Ok(()) => State::Up,
                Err(e) => {
                    tracing::warn!(cluster = %c.cluster_id, error = %e, "cluster is not reachable");
                    c.last_error = Some((now, e));
                    State::Down
                }
            };
            if state != c.state {
                c.since = now;
                c.state = state;
            }
            c.last_check = Some(now);
        }
        clusters.iter().all(|c| c.state == State::Up)
    }

    /// Checks now and then every `interval`, for the life of the process.
    pub fn spawn(self: Arc<Self>, pool: Arc<ConnectionPool>, interval: Duration) {
        tokio::spawn(async move {
            loop {
                self.check(&pool, Duration::from_secs(2)).await;
                tokio::time::sleep(interval).await;
            }
        });
    }
}

/// Addresses from a monitor string: `host:port`, `v2:host:port`, `[v2:a:3300,v1:a:6789]`, `host`.
pub fn monitor_addrs(monitors: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for m in monitors {
        for part in m.trim_matches(|c| c == '[' || c == ']').split(',') {
            let part = part.trim();
            let addr = part
                .strip_prefix("v2:")
                .or_else(|| part.strip_prefix("v1:"))
                .unwrap_or(part);
            let addr = addr.split('/').next().unwrap_or(addr);
            if addr.is_empty() {
                continue;
            }
            let has_port = addr.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty() && !h.ends_with(':') && p.parse::<u16>().is_ok()
            });
            out.push(if has_port {
                addr.to_string()
            } else {
                format!("{addr}:3300")
            });
        }
    }
    out
}

/// A Ceph monitor greets every connection with `ceph v2\n` (msgr2) or `ceph v027` (msgr1).
pub async fn banner_check(monitors: &[String], timeout: Duration) -> Result<(), String> {
    let mut last = String::from("no monitors configured");
    for addr in monitor_addrs(monitors) {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(&addr)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 6];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            if &buf == b"ceph v" {
                Ok(())
            } else {
                Err("the peer is not a Ceph monitor".to_string())
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = format!("monitor {addr}: {e}"),
            Err(_) => last = format!("monitor {addr}: no answer within {timeout:?}"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str) -> Target {
        Target {
            cluster_id: id.into(),
            monitors: vec![],
        }
    }

    #[test]
    fn a_cluster_that_comes_back_is_up_and_keeps_its_last_error() {
        let h = Health::new(vec![target("a"), target("b")]);
        assert_eq!(
            h.problems(),
            vec!["cluster a: unchecked", "cluster b: unchecked"]
        );
        let t0 = Instant::now();
        assert!(!h.record(vec![Ok(()), Err("monitor x: refused".into())], t0));
        assert_eq!(h.problems(), vec!["cluster b: monitor x: refused"]);
        let t1 = t0 + Duration::from_secs(5);
        assert!(h.record(vec![Ok(()), Ok(())], t1));
        assert!(h.problems().is_empty());
        let b = &h.clusters()[1];
        assert_eq!(b.state, State::Up);
        assert_eq!(b.since, t1);
        assert_eq!(b.last_check, Some(t1));
        assert_eq!(b.last_error, Some((t0, "monitor x: refused".to_string())));
        // Unchanged state keeps its start.
        let a = &h.clusters()[0];
        assert_eq!(a.since, t0);
    }

    #[test]
    fn monitor_strings_in_every_ceph_notation_become_addresses() {
        let m = |s: &str| monitor_addrs(&[s.to_string()]);
        assert_eq!(m("127.0.0.1:3300"), vec!["127.0.0.1:3300"]);
        assert_eq!(m("v2:10.0.0.1:3300"), vec!["10.0.0.1:3300"]);
        assert_eq!(
            m("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0]"),
            vec!["10.0.0.1:3300", "10.0.0.1:6789"]
        );
        assert_eq!(m("mon.example"), vec!["mon.example:3300"]);
    }
}
