//! Whether a cluster's monitors answer at all. Before an unstage gives up on data it can no
//! longer write, it needs proof that the cluster is gone: no monitor sends its protocol banner.
//!
//! A TCP connect alone proves nothing: the kernel completes the handshake for a monitor
//! process that is frozen or hung. Both messenger versions send a `ceph v` banner at once.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// What a probe of the monitors showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// At least one monitor sent its banner.
    Reachable,
    /// Every monitor address was tried and none sent its banner within the limit.
    Unreachable,
    /// No monitor address could be worked out: nothing is proven.
    Unknown,
}

/// Probes every address of `monitors` (ceph-csi's `host:port` entries, or Ceph's
/// `[v2:ip:port/nonce,v1:ip:port/nonce]` address vectors) concurrently, each within `limit`.
pub async fn monitors(monitors: &[String], limit: Duration) -> Reach {
    let mut addrs = Vec::new();
    for m in monitors {
        for a in addresses(m) {
            addrs.extend(resolve(&a, limit).await);
        }
    }
    if addrs.is_empty() {
        return Reach::Unknown;
    }
    let mut probes = tokio::task::JoinSet::new();
    for a in addrs {
        probes.spawn(answers(a, limit));
    }
    while let Some(r) = probes.join_next().await {
        if matches!(r, Ok(true)) {
            return Reach::Reachable;
        }
    }
    Reach::Unreachable
}

/// The addresses one monitor entry names, still unresolved.
fn addresses(entry: &str) -> Vec<String> {
    let entry = entry.trim();
    let vector = entry.contains("v1:") || entry.contains("v2:");
    let inner = if vector {
        entry.trim_start_matches('[').trim_end_matches(']')
    } else {
        entry
    };
    inner
        .split(',')
        .map(|a| {
            let a = a.trim();
            let a = a
                .strip_prefix("v2:")
                .or_else(|| a.strip_prefix("v1:"))
                .unwrap_or(a);
            a.split('/').next().unwrap_or(a).to_string()
        })
        .filter(|a| !a.is_empty())
        .collect()
}

async fn resolve(addr: &str, limit: Duration) -> Vec<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return vec![a];
    }
    // No port: the messenger v2 and v1 defaults.
    if let Ok(ip) = addr.trim_matches(['[', ']']).parse::<IpAddr>() {
        return vec![SocketAddr::new(ip, 3300), SocketAddr::new(ip, 6789)];
    }
    let with_port = match addr.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => vec![addr.to_string()],
        _ => vec![format!("{addr}:3300"), format!("{addr}:6789")],
    };
    let mut out = Vec::new();
    for a in with_port {
        if let Ok(Ok(found)) = tokio::time::timeout(limit, tokio::net::lookup_host(a)).await {
            out.extend(found);
        }
    }
    out
}

async fn answers(addr: SocketAddr, limit: Duration) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut banner = [0u8; 6];
        s.read_exact(&mut banner).await.ok()?;
        Some(&banner == b"ceph v")
    };
    matches!(tokio::time::timeout(limit, probe).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn monitor_entries_in_every_spelling_give_their_addresses() {
        assert_eq!(addresses("127.0.0.1:3300"), ["127.0.0.1:3300"]);
        assert_eq!(
            addresses("[v2:127.0.0.1:3300/0,v1:127.0.0.1:6789/0]"),
            ["127.0.0.1:3300", "127.0.0.1:6789"]
        );
        assert_eq!(addresses("[::1]:3300"), ["[::1]:3300"]);
        assert_eq!(addresses(" mon-a "), ["mon-a"]);
        assert!(addresses("").is_empty());
    }

    #[tokio::test]
    async fn a_monitor_that_sends_its_banner_is_reachable() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"ceph v2\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let r = monitors(&[addr], Duration::from_secs(2)).await;
        assert_eq!(r, Reach::Reachable);
    }

    #[tokio::test]
    async fn a_monitor_that_accepts_but_stays_silent_is_unreachable() {
        // Like a frozen ceph-mon: the kernel accepts, the process never answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent = l.local_addr().unwrap().to_string();
        let closed = {
            let c = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            c.local_addr().unwrap().to_string()
        };
        let r = monitors(&[silent, closed], Duration::from_millis(300)).await;
        assert_eq!(r, Reach::Unreachable);
        drop(l);
    }

    #[tokio::test]
    async fn without_a_usable_monitor_address_nothing_is_proven() {
        assert_eq!(
            monitors(&[], Duration::from_millis(100)).await,
            Reach::Unknown
        );
        assert_eq!(
            monitors(&["".into()], Duration::from_millis(100)).await,
            Reach::Unknown
        );
    }
}
