//! The OSD blocklist: fencing a client (one `ip:port/nonce` session) out of the cluster, so
//! every OSD refuses its I/O and drops its watches. A session's nonce is never reused, so an
//! entry only ever affects the one process it names.

use super::{check, ffi, owned, CephError, Connection, Result};
use std::time::Duration;

/// The addresses in an address or address vector as Ceph prints them (`127.0.0.1:0/123`,
/// `v1:127.0.0.1:0/123`, `[v2:127.0.0.1:0/123,v1:127.0.0.1:0/123]`), without the protocol tags,
/// so that watcher addresses and session addresses compare equal.
pub fn plain_addrs(s: &str) -> Vec<String> {
    let mut out: Vec<String> = s
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|a| {
            let a = a.trim();
            ["v1:", "v2:", "any:"]
                .iter()
                .find_map(|p| a.strip_prefix(p))
                .unwrap_or(a)
                .to_string()
        })
        .filter(|a| !a.is_empty())
        .collect();
    out.dedup();
    out
}

/// A client address the blocklist accepts: `ip:port/nonce`, printable, no JSON specials.
fn valid_addr(addr: &str) -> bool {
    !addr.is_empty()
        && addr.len() <= 128
        && addr.contains('/')
        && addr.contains(':')
        && addr
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '/' | '[' | ']'))
}

impl Connection {
    /// This session's own addresses, as they appear in watcher lists.
    pub fn own_addrs(&self) -> Result<Vec<String>> {
        let mut p: *mut libc::c_char = std::ptr::null_mut();
        check("rados_getaddrs", "self", unsafe {
            ffi::rados_getaddrs(self.raw(), &mut p)
        })?;
        let s = unsafe { owned(p) };
        unsafe { libc::free(p as *mut libc::c_void) };
        Ok(plain_addrs(&s))
    }

    /// Blocklists `addr` for `expiry`. Adding an address that is already listed only renews it.
    pub fn blocklist_add(&self, addr: &str, expiry: Duration) -> Result<()> {
        self.blocklist("add", addr, Some(expiry))
    }

    /// Lifts a blocklist entry; an address that is not listed is success.
    pub fn blocklist_rm(&self, addr: &str) -> Result<()> {
        self.blocklist("rm", addr, None)
    }

    fn blocklist(&self, op: &str, addr: &str, expiry: Option<Duration>) -> Result<()> {
        if !valid_addr(addr) {
            return Err(CephError::new("osd blocklist", addr, -libc::EINVAL));
        }
        let mut cmd = serde_json::json!({
            "prefix": "osd blocklist",
            "blocklistop": op,
            "addr": addr,
        });
        if let Some(e) = expiry {
            cmd["expire"] = serde_json::json!(e.as_secs_f64().max(1.0));
        }
        self.mon_command(&cmd.to_string())
            .map(|_| ())
            .map_err(|e| CephError::new("osd blocklist", format!("{op} {addr}"), -e.errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_vectors_and_watcher_addresses_compare_equal() {
        assert_eq!(plain_addrs("127.0.0.1:0/42"), vec!["127.0.0.1:0/42"]);
        assert_eq!(plain_addrs("v1:127.0.0.1:0/42"), vec!["127.0.0.1:0/42"]);
        assert_eq!(
            plain_addrs("[v2:127.0.0.1:0/42,v1:127.0.0.1:0/42]"),
            vec!["127.0.0.1:0/42"]
        );
        assert!(plain_addrs("").is_empty());
    }

    #[test]
    fn only_client_addresses_reach_the_monitor_command() {
        assert!(valid_addr("127.0.0.1:0/2393340521"));
        assert!(valid_addr("[::1]:0/7"));
        assert!(!valid_addr("127.0.0.1"));
        assert!(!valid_addr("1.2.3.4:0/1\",\"prefix\":\"x"));
        assert!(!valid_addr(""));
    }
}
