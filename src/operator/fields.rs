//! Which fields of a spec rook-rbd keeps but does not act on, for the `FieldsNotImplemented`
//! condition. Nothing a Rook user wrote is dropped (the schema preserves unknown fields), so the
//! reconciler must say which of them change nothing.
//!
//! Two sources:
//! - fields the CRD schema does not name (Rook's `dashboard`, a typo like `mon.cuont`), found
//!   by walking the spec against the schema generated from our own types, so the two never drift;
//! - named fields set to a value rook-rbd does not implement (`network.provider: multus`,
//!   placement for a daemon it does not run, OSD `config` keys other than `deviceClass`).
//!
//! A field whose value is Rook's "off" (`false`, `0`, empty, or a listed inert value such as
//! `crashCollector.disable: true`) asks for nothing that rook-rbd fails to do, so it is not listed.

use super::crd::cluster::{CephClusterSpec, DeviceSelection, NetworkProvider};
use super::crd::pool::CephBlockPoolSpec;
use super::crd::{spec_schema_mut, CephBlockPool, CephCluster};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// Daemon kinds whose `placement` rook-rbd applies (`all` is merged into each).
pub const PLACEMENT_KEYS: &[&str] = &["all", "mon", "mgr", "osd", "prepareosd", "cleanup"];
/// Daemon kinds whose `resources` rook-rbd applies.
pub const RESOURCE_KEYS: &[&str] = &["mon", "mgr", "osd", "prepareosd", "cleanup"];
/// OSD `config` keys rook-rbd acts on (in `storage`, a node or a device).
pub const OSD_CONFIG_KEYS: &[&str] = &["deviceClass"];

/// Unknown fields whose value means "this feature is off" although it is not Rook's zero value.
const CLUSTER_INERT: &[(&str, bool)] = &[("spec.crashCollector.disable", true)];

static CLUSTER_SPEC_SCHEMA: LazyLock<JSONSchemaProps> =
    LazyLock::new(|| spec_schema(CephCluster::crd()));
static POOL_SPEC_SCHEMA: LazyLock<JSONSchemaProps> =
    LazyLock::new(|| spec_schema(CephBlockPool::crd()));

impl CephCluster {
    /// The `spec.…` paths this cluster sets that rook-rbd keeps but does not act on, sorted.
    pub fn not_implemented(&self) -> Vec<String> {
        cluster_not_implemented(&self.spec)
    }
}

impl CephBlockPool {
    /// The `spec.…` paths this pool sets that rook-rbd keeps but does not act on, sorted.
    pub fn not_implemented(&self) -> Vec<String> {
        pool_not_implemented(&self.spec)
    }
}

fn cluster_not_implemented(spec: &CephClusterSpec) -> Vec<String> {
    let mut out = unknown_fields(&CLUSTER_SPEC_SCHEMA, spec, CLUSTER_INERT);
    if spec.network.as_ref().and_then(|n| n.provider) == Some(NetworkProvider::Multus) {
        out.push("spec.network.provider".into());
    }
    keys_outside(
        &mut out,
        "spec.placement",
        spec.placement.as_ref(),
        PLACEMENT_KEYS,
    );
    keys_outside(
        &mut out,
        "spec.resources",
        spec.resources.as_ref(),
        RESOURCE_KEYS,
    );
    if let Some(storage) = &spec.storage {
        osd_config(
            &mut out,
            "spec.storage",
            storage.config.as_ref(),
            &storage.selection,
        );
        for (n, node) in storage.nodes.iter().flatten().enumerate() {
            let path = format!("spec.storage.nodes[{n}]");
            osd_config(&mut out, &path, node.config.as_ref(), &node.selection);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// OSD `config` keys without an implementation, at `path` and in each of its devices.
fn osd_config(
    out: &mut Vec<String>,
    path: &str,
    config: Option<&BTreeMap<String, String>>,
    selection: &DeviceSelection,
) {
    keys_outside(out, &format!("{path}.config"), config, OSD_CONFIG_KEYS);
    for (i, d) in selection.devices.iter().flatten().enumerate() {
        let at = format!("{path}.devices[{i}].config");
        keys_outside(out, &at, d.config.as_ref(), OSD_CONFIG_KEYS);
    }
}

fn pool_not_implemented(spec: &CephBlockPoolSpec) -> Vec<String> {
    let mut out = unknown_fields(&POOL_SPEC_SCHEMA, spec, &[]);
    out.sort();
    out
}

fn keys_outside<V>(
    out: &mut Vec<String>,
    path: &str,
    map: Option<&BTreeMap<String, V>>,
    known: &[&str],
) {
    for key in map.into_iter().flat_map(|m| m.keys()) {
        if !known.contains(&key.as_str()) {
            out.push(format!("{path}.{key}"));
        }
    }
}

fn spec_schema(mut crd: CustomResourceDefinition) -> JSONSchemaProps {
    spec_schema_mut(&mut crd)
        .map(std::mem::take)
        .expect("a derived CRD has a spec schema")
}

/// Leaf paths under `spec` that `schema` does not name, skipping values that ask for nothing.
fn unknown_fields(
    schema: &JSONSchemaProps,
    spec: &impl Serialize,
    inert: &[(&str, bool)],
) -> Vec<String> {
    // Serialising our own derive(Serialize) types into a Value cannot fail.
    let value = serde_json::to_value(spec).unwrap_or(Value::Null);
    let mut out = Vec::new();
    walk(schema, &value, "spec", inert, &mut out);
    out
}

fn walk(
    schema: &JSONSchemaProps,
    value: &Value,
    path: &str,
    inert: &[(&str, bool)],
    out: &mut Vec<String>,
) {
    match value {
        Value::Object(map) => {
            let additional = match &schema.additional_properties {
                Some(JSONSchemaPropsOrBool::Schema(s)) => Some(&**s),
                _ => None,
            };
            for (key, v) in map {
                let child = format!("{path}.{key}");
                match schema.properties.as_ref().and_then(|p| p.get(key)) {
                    Some(s) => walk(s, v, &child, inert, out),
                    None => match additional {
                        Some(s) => walk(s, v, &child, inert, out),
                        None => leaves(v, &child, inert, out),
                    },
                }
            }
        }
        Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(s)) = &schema.items {
                for (i, v) in items.iter().enumerate() {
                    walk(s, v, &format!("{path}[{i}]"), inert, out);
                }
            }
        }
        _ => {}
    }
}

fn leaves(value: &Value, path: &str, inert: &[(&str, bool)], out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                leaves(v, &format!("{path}.{k}"), inert, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                leaves(v, &format!("{path}[{i}]"), inert, out);
            }
        }
        Value::Null => {}
        Value::Bool(b) if !*b || inert.contains(&(path, *b)) => {}
        Value::Number(n) if n.as_f64() == Some(0.0) => {}
        Value::String(s) if s.is_empty() => {}
        _ => out.push(path.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(spec: Value) -> Vec<String> {
        cluster_not_implemented(&serde_json::from_value(spec).unwrap())
    }

    fn pool(spec: Value) -> Vec<String> {
        pool_not_implemented(&serde_json::from_value(spec).unwrap())
    }

    fn rook_manifest(yaml: &str) -> Vec<(String, Vec<String>)> {
        crate::operator::crd::rook_fixtures::documents(yaml)
            .into_iter()
            .map(|doc| {
                let kind = doc["kind"].as_str().unwrap().to_string();
                let spec = doc["spec"].clone();
                let fields = match kind.as_str() {
                    "CephCluster" => cluster(spec),
                    _ => pool(spec),
                };
                (kind, fields)
            })
            .collect()
    }

    #[test]
    fn rook_cluster_test_yaml_lists_only_the_features_rook_rbd_lacks() {
        use crate::operator::crd::rook_fixtures::*;
        let expected = [
            "spec.cephVersion.allowUnsupported",
            "spec.dashboard.enabled",
            "spec.disruptionManagement.managePodBudgets",
            "spec.priorityClassNames.all",
            "spec.priorityClassNames.mgr",
            "spec.skipUpgradeChecks",
            "spec.storage.allowDeviceClassUpdate",
        ];
        let got = rook_manifest(CLUSTER_TEST);
        assert_eq!(
            got[0],
            ("CephCluster".into(), expected.map(String::from).to_vec())
        );
        assert_eq!(got[1], ("CephBlockPool".into(), vec![]));
        let newer = rook_manifest(CLUSTER_TEST_NEWER);
        let mut with_cephx = expected.map(String::from).to_vec();
        with_cephx.push("spec.security.cephx.csi.keyType".into());
        with_cephx.sort();
        assert_eq!(newer[0].1, with_cephx);
        assert_eq!(rook_manifest(POOL_TEST), [("CephBlockPool".into(), vec![])]);
    }

    #[test]
    fn every_implemented_cluster_field_is_acted_on() {
        let spec = json!({
            "cephVersion": {"image": "rook-rbd/ceph:16.2"},
            "dataDirHostPath": "/var/lib/rook",
            "mon": {"count": 3, "allowMultiplePerNode": false},
            "mgr": {"count": 1, "allowMultiplePerNode": true,
                    "modules": [{"name": "pg_autoscaler", "enabled": true}]},
            "network": {"provider": "host", "hostNetwork": true},
            "storage": {
                "useAllNodes": false, "useAllDevices": false, "deviceFilter": "^sd[b-d]",
                "config": {"deviceClass": "ssd"},
                "nodes": [{"name": "n1", "deviceFilter": "^vd",
                           "devices": [{"name": "/dev/disk/by-id/virtio-a",
                                        "config": {"deviceClass": "hdd"}}]}]
            },
            "cephConfig": {"global": {"osd_pool_default_size": "1"}},
            "healthCheck": {"daemonHealth": {
                "status": {"interval": "60s"},
                "mon": {"interval": "45s", "timeout": "600s"},
                "osd": {"disabled": false}}},
            "placement": {"all": {"tolerations": [{"operator": "Exists"}]},
                          "mon": {"nodeAffinity": {}}},
            "resources": {"osd": {"limits": {"memory": "4Gi"}}},
            "cleanupPolicy": {"confirmation": "yes-really-destroy-data",
                              "sanitizeDisks": {"method": "quick", "dataSource": "zero",
                                                "iteration": 1},
                              "allowUninstallWithVolumes": false}
        });
        assert_eq!(cluster(spec), Vec::<String>::new());
    }

    #[test]
    fn rook_fields_without_an_implementation_are_listed_by_leaf_path() {
        let got = cluster(json!({
            "cephVersion": {"image": "x", "allowUnsupported": true},
            "dashboard": {"enabled": true, "ssl": true},
            "priorityClassNames": {"all": "system-node-critical"},
            "mgr": {"modules": [{"name": "rook", "enabled": true,
                                 "settings": {"balancerMode": "upmap"}}]}
        }));
        assert_eq!(
            got,
            [
                "spec.cephVersion.allowUnsupported",
                "spec.dashboard.enabled",
                "spec.dashboard.ssl",
                "spec.mgr.modules[0].settings.balancerMode",
                "spec.priorityClassNames.all",
            ]
        );
    }

    #[test]
    fn a_typo_in_a_known_section_is_listed_not_ignored() {
        assert_eq!(cluster(json!({"mon": {"cuont": 3}})), ["spec.mon.cuont"]);
    }

    #[test]
    fn fields_that_switch_a_feature_off_are_not_listed() {
        let got = cluster(json!({
            "crashCollector": {"disable": true},
            "monitoring": {"enabled": false},
            "dashboard": {"enabled": false, "urlPrefix": "", "port": 0},
            "storage": {"allowOsdCrushWeightUpdate": false},
            "removeOSDsIfOutAndSafeToRemove": false,
            "labels": {}
        }));
        assert_eq!(got, Vec::<String>::new());
        // ... and switching the same feature on is listed.
        assert_eq!(
            cluster(json!({"crashCollector": {"disable": false, "daysToRetain": 7}})),
            ["spec.crashCollector.daysToRetain"]
        );
    }

    #[test]
    fn named_fields_with_unimplemented_values_are_listed() {
        let got = cluster(json!({
            "network": {"provider": "multus"},
            "placement": {"all": {}, "rgw": {}},
            "resources": {"mgr-sidecar": {}},
            "storage": {"config": {"osdsPerDevice": "2", "deviceClass": "ssd"},
                        "devices": [{"name": "sdb", "config": {"metadataDevice": "nvme0n1"}}],
                        "nodes": [{"name": "a", "config": {"encryptedDevice": "true"}}]}
        }));
        assert_eq!(
            got,
            [
                "spec.network.provider",
                "spec.placement.rgw",
                "spec.resources.mgr-sidecar",
                "spec.storage.config.osdsPerDevice",
                "spec.storage.devices[0].config.metadataDevice",
                "spec.storage.nodes[0].config.encryptedDevice",
            ]
        );
    }

    #[test]
    fn pool_fields_without_an_implementation_are_listed() {
        let got = pool(json!({
            "failureDomain": "host",
            "replicated": {"size": 3, "requireSafeReplicaSize": true, "targetSizeRatio": 0.5},
            "deviceClass": "ssd",
            "parameters": {"compression_mode": "none"},
            "erasureCoded": {"dataChunks": 0, "codingChunks": 0},
            "mirroring": {"enabled": true, "mode": "image"},
            "quotas": {"maxSize": "10Gi"}
        }));
        assert_eq!(
            got,
            [
                "spec.mirroring.enabled",
                "spec.mirroring.mode",
                "spec.quotas.maxSize",
                "spec.replicated.targetSizeRatio",
            ]
        );
    }
}
