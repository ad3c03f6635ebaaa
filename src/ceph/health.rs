//! Cluster health as Probe reports it: checked in the background, cached, never dialled per Probe.
//!
//! A cluster is healthy when a pooled connection's monitor command answers, or, before any
//! connection exists, when a monitor answers the messenger banner on TCP. Probe is ready only
//! when every configured cluster is healthy.

use super::pool::blocking;
use super::ConnectionPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// A cluster to watch: its ID (as connections in the pool are keyed) and its monitors.
#[derive(Debug, Clone)]
pub struct Target {
    pub cluster_id: String,
    pub monitors: Vec<String>,
}

#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    checked: AtomicBool,
    problems: Mutex<Vec<String>>,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn checked(&self) -> bool {
        self.checked.load(Ordering::Acquire)
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }

    /// One round of checks over every cluster; updates the cached answer.
    pub async fn check(&self, clusters: &[Target], pool: &ConnectionPool, timeout: Duration) {
        let conns: HashMap<String, _> = pool.connections().into_iter().collect();
        let mut problems = Vec::new();
        for entry in clusters {
            let ok = match conns.get(&entry.cluster_id) {
                Some(conn) => {
                    let conn = conn.clone();
                    match blocking(move || {
                        conn.mon_command(r#"{"prefix":"mon stat","format":"json"}"#)
                    })
                    .await
                    {
                        Ok(_) => true,
                        // Refused by caps still proves the monitors answer.
                        Err(e) if e.permission_denied() => true,
                        Err(e) => {
                            problems.push(format!("cluster {}: {e}", entry.cluster_id));
                            false
                        }
                    }
                }
                None => match banner_check(&entry.monitors, timeout).await {
                    Ok(()) => true,
                    Err(e) => {
                        problems.push(format!("cluster {}: {e}", entry.cluster_id));
                        false
                    }
                },
            };
            if !ok {
                tracing::warn!(cluster = %entry.cluster_id, "cluster is not reachable");
            }
        }
        let ready = problems.is_empty();
        if ready != self.ready() || !self.checked() {
            tracing::info!(ready, "cluster health changed");
        }
        *self.problems.lock().unwrap() = problems;
        self.ready.store(ready, Ordering::Release);
        self.checked.store(true, Ordering::Release);
    }

    /// Checks now and then every `interval`, for the life of the process.
    pub fn spawn(
        self: Arc<Self>,
        clusters: Vec<Target>,
        pool: Arc<ConnectionPool>,
        interval: Duration,
    ) {
        tokio::spawn(async move {
            loop {
                self.check(&clusters, &pool, Duration::from_secs(2)).await;
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
