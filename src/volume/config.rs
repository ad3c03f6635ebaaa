//! The cluster configuration file, in ceph-csi's format:
//! `[{"clusterID": "...", "monitors": ["host:port", ...], "rbd": {"radosNamespace": "..."}}]`.

use super::params::check_name;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ClusterEntry {
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    pub monitors: Vec<String>,
    /// Where nodes register themselves so ControllerPublish can tell a real node from a typo.
    /// Not in ceph-csi's format; defaults to the pool `rbd`.
    #[serde(rename = "registryPool", default)]
    pub registry_pool: Option<String>,
    #[serde(default)]
    pub rbd: RbdSettings,
}

/// ceph-csi's `"rbd"` section of a cluster entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct RbdSettings {
    /// The RADOS namespace of every image (and the node registry) this entry creates. Images
    /// made before it was set or changed keep theirs: it is part of their volume IDs.
    #[serde(rename = "radosNamespace", default)]
    pub rados_namespace: Option<String>,
}

impl ClusterEntry {
    pub fn registry_pool(&self) -> &str {
        self.registry_pool.as_deref().unwrap_or("rbd")
    }

    /// The namespace for new images and the node registry; empty for the pool's default.
    pub fn rados_namespace(&self) -> &str {
        self.rbd.rados_namespace.as_deref().unwrap_or("")
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    clusters: HashMap<String, ClusterEntry>,
}

impl ClusterConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading cluster config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("cluster config {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let list: Vec<ClusterEntry> = serde_json::from_str(text)?;
        let mut clusters = HashMap::new();
        for e in list {
            anyhow::ensure!(!e.cluster_id.is_empty(), "an entry has an empty clusterID");
            anyhow::ensure!(
                !e.monitors.is_empty(),
                "cluster {} has no monitors",
                e.cluster_id
            );
            if !e.rados_namespace().is_empty() {
                check_name("rbd.radosNamespace", e.rados_namespace())
                    .map_err(|err| anyhow::anyhow!("cluster {}: {err}", e.cluster_id))?;
            }
            anyhow::ensure!(
                clusters.insert(e.cluster_id.clone(), e.clone()).is_none(),
                "clusterID {} appears twice",
                e.cluster_id
            );
        }
        Ok(Self { clusters })
    }

    pub fn get(&self, id: &str) -> Option<&ClusterEntry> {
        self.clusters.get(id)
    }

    /// The one cluster, when the config lists exactly one.
    pub fn only(&self) -> Option<&ClusterEntry> {
        match self.clusters.len() {
            1 => self.clusters.values().next(),
            _ => None,
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = &ClusterEntry> {
        self.clusters.values()
    }

    /// What the cluster health check watches.
    pub fn health_targets(&self) -> Vec<crate::ceph::health::Target> {
        self.entries()
            .map(|e| crate::ceph::health::Target {
                cluster_id: e.cluster_id.clone(),
                monitors: e.monitors.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ceph_csi_cluster_config() {
        let c = ClusterConfig::parse(
            r#"[{"clusterID":"abc","monitors":["10.0.0.1:6789","10.0.0.2:3300"],"cephFS":{}}]"#,
        )
        .unwrap();
        assert_eq!(c.get("abc").unwrap().monitors.len(), 2);
        assert_eq!(c.get("abc").unwrap().registry_pool(), "rbd");
        assert_eq!(c.only().unwrap().cluster_id, "abc");
        assert_eq!(c.get("abc").unwrap().rados_namespace(), "");
        assert!(ClusterConfig::parse(r#"[{"clusterID":"a","monitors":[]}]"#).is_err());
        let two = ClusterConfig::parse(
            r#"[{"clusterID":"a","monitors":["m"]},{"clusterID":"b","monitors":["m"]}]"#,
        )
        .unwrap();
        assert!(two.only().is_none());
        assert!(ClusterConfig::parse(
            r#"[{"clusterID":"a","monitors":["m"]},{"clusterID":"a","monitors":["m"]}]"#
        )
        .is_err());
    }

    #[test]
    fn reads_the_rados_namespace_of_ceph_csi_rbd_settings() {
        let c = ClusterConfig::parse(
            r#"[{"clusterID":"a","monitors":["m"],"rbd":{"radosNamespace":"tenant-1","mirrorDaemonCount":1}},
                {"clusterID":"b","monitors":["m"],"rbd":{"radosNamespace":""}}]"#,
        )
        .unwrap();
        assert_eq!(c.get("a").unwrap().rados_namespace(), "tenant-1");
        assert_eq!(c.get("b").unwrap().rados_namespace(), "");
        for bad in ["a/b", "-x", ".hidden", "with space"] {
            let text = format!(
                r#"[{{"clusterID":"a","monitors":["m"],"rbd":{{"radosNamespace":"{bad}"}}}}]"#
            );
            let e = ClusterConfig::parse(&text).unwrap_err().to_string();
            assert!(e.contains("radosNamespace"), "{bad}: {e}");
        }
    }
}
