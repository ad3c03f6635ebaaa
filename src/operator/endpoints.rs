//! The mons' addresses as Rook keeps them: ConfigMap `rook-ceph-mon-endpoints` (`data`:
//! `a=10.0.0.1:6789,b=...`, `mapping`: which node each mon is pinned to, `maxMonId`: the highest
//! mon index ever used, so a replaced mon never reuses a name) and, derived from it, the
//! `mon_host` and `mon_initial_members` of Secret `rook-ceph-config`.

use serde_json::Value;
use std::collections::BTreeMap;

/// ConfigMap keys, Rook's spelling.
pub const DATA: &str = "data";
pub const MAPPING: &str = "mapping";
pub const MAX_MON_ID: &str = "maxMonId";

/// Ceph's legacy (v1) mon port; a mon on it also listens for msgr2 on 3300.
const V1_PORT: u16 = 6789;
const V2_PORT: u16 = 3300;

#[derive(Debug, Clone, PartialEq)]
pub struct MonEndpoints {
    /// Mon name to `host:port`, in name order.
    pub mons: BTreeMap<String, String>,
    /// Rook's `{"node": {"a": {"Name": ..., "Hostname": ..., "Address": ...}}}`, kept as is.
    pub mapping: Value,
    /// -1 before the first mon.
    pub max_mon_id: i64,
}

impl Default for MonEndpoints {
    /// A cluster before its first mon (what Rook writes then, too).
    fn default() -> Self {
        Self {
            mons: BTreeMap::new(),
            mapping: serde_json::json!({"node": {}}),
            max_mon_id: -1,
        }
    }
}

impl MonEndpoints {
    /// From the ConfigMap's data; a field that is missing or unreadable takes its value from a
    /// cluster without mons, and the error says which field was unreadable.
    pub fn from_config_map(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut out = Self::default();
        if let Some(d) = data.get(DATA) {
            for entry in d.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (name, addr) = entry
                    .split_once('=')
                    .ok_or_else(|| format!("`{DATA}` entry {entry:?} is not name=host:port"))?;
                out.mons.insert(name.to_string(), addr.to_string());
            }
        }
        if let Some(m) = data.get(MAPPING).filter(|m| !m.trim().is_empty()) {
            out.mapping =
                serde_json::from_str(m).map_err(|e| format!("`{MAPPING}` is not JSON: {e}"))?;
        }
        if let Some(id) = data.get(MAX_MON_ID).filter(|m| !m.trim().is_empty()) {
            out.max_mon_id = id
                .trim()
                .parse()
                .map_err(|_| format!("`{MAX_MON_ID}` {id:?} is not a number"))?;
        }
        Ok(out)
    }

    pub fn to_config_map(&self) -> BTreeMap<String, String> {
        let data = self
            .mons
            .iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        BTreeMap::from([
            (DATA.to_string(), data),
            (MAPPING.to_string(), self.mapping.to_string()),
            (MAX_MON_ID.to_string(), self.max_mon_id.to_string()),
        ])
    }

    /// `mon_host` for ceph.conf: each mon as a msgr2 + v1 address vector when it is on the v1
    /// port (as Rook's mons are), else as a msgr2 address on its port.
    pub fn mon_host(&self) -> String {
        self.mons
            .values()
            .map(|addr| match addr.rsplit_once(':') {
                Some((host, port)) if port.parse() == Ok(V1_PORT) => {
                    format!("[v2:{host}:{V2_PORT},v1:{host}:{V1_PORT}]")
                }
                _ => format!("[v2:{addr}]"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `mon_initial_members`: the mon names.
    pub fn initial_members(&self) -> String {
        self.mons.keys().cloned().collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_cluster_before_its_first_mon_is_written_as_rook_writes_it() {
        let data = MonEndpoints::default().to_config_map();
        assert_eq!(
            data,
            cm(&[
                ("data", ""),
                ("mapping", r#"{"node":{}}"#),
                ("maxMonId", "-1")
            ])
        );
        assert_eq!(
            MonEndpoints::from_config_map(&data).unwrap(),
            Default::default()
        );
        assert_eq!(MonEndpoints::default().mon_host(), "");
    }

    #[test]
    fn rooks_endpoints_give_mon_host_and_initial_members() {
        let e = MonEndpoints::from_config_map(&cm(&[
            ("data", "b=10.0.0.2:6789,a=10.0.0.1:6789,c=10.0.0.3:3300"),
            (
                "mapping",
                r#"{"node":{"a":{"Name":"n1","Hostname":"n1","Address":"10.0.0.1"}}}"#,
            ),
            ("maxMonId", "2"),
        ]))
        .unwrap();
        assert_eq!(e.max_mon_id, 2);
        assert_eq!(e.mapping["node"]["a"]["Name"], "n1");
        assert_eq!(
            e.mon_host(),
            "[v2:10.0.0.1:3300,v1:10.0.0.1:6789],[v2:10.0.0.2:3300,v1:10.0.0.2:6789],[v2:10.0.0.3:3300]"
        );
        assert_eq!(e.initial_members(), "a,b,c");
        assert_eq!(
            e.to_config_map()["data"],
            "a=10.0.0.1:6789,b=10.0.0.2:6789,c=10.0.0.3:3300"
        );
    }

    #[test]
    fn unreadable_fields_are_named() {
        let e = MonEndpoints::from_config_map(&cm(&[("maxMonId", "two")])).unwrap_err();
        assert!(e.contains("maxMonId"), "{e}");
        let e = MonEndpoints::from_config_map(&cm(&[("data", "a:6789")])).unwrap_err();
        assert!(e.contains("`data`"), "{e}");
    }
}
