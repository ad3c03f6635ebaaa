//! `CephCluster` (`ceph.rook.io/v1`): Rook's field names and printer columns, so Rook's manifests
//! apply unchanged. Every Rook-shaped object keeps the fields it does not name (`other`), and the
//! schema preserves them, so nothing a Rook user wrote is pruned; `not_implemented()` lists them.

use super::status::{Condition, Phase};
use k8s_openapi::api::core::v1::{
    NodeAffinity, PodAffinity, PodAntiAffinity, ResourceRequirements, Toleration,
    TopologySpreadConstraint,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Fields Rook defines that this version does not name; kept, and reported as not implemented.
pub type Other = BTreeMap<String, Value>;

/// A Ceph cluster that rook-rbd bootstraps and runs: mons, mgrs and OSDs in pods.
// Each printcolumn(...) repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[serde_with::skip_serializing_none]
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ceph.rook.io",
    version = "v1",
    kind = "CephCluster",
    namespaced,
    status = "CephClusterStatus",
    doc = "A Ceph storage cluster (Rook's CephCluster, reconciled by rook-rbd)",
    printcolumn(
        name = "DataDirHostPath",
        type_ = "string",
        json_path = ".spec.dataDirHostPath",
        description = "Directory used on the K8s nodes"
    ),
    printcolumn(
        name = "MonCount",
        type_ = "string",
        json_path = ".spec.mon.count",
        description = "Number of MONs"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        description = "Message"
    ),
    printcolumn(
        name = "Health",
        type_ = "string",
        json_path = ".status.ceph.health",
        description = "Ceph Health"
    ),
    printcolumn(
        name = "FSID",
        type_ = "string",
        json_path = ".status.ceph.fsid",
        description = "Ceph FSID"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CephClusterSpec {
    pub ceph_version: Option<CephVersionSpec>,
    /// Where mons and OSD metadata keep their data on each node, e.g. /var/lib/rook.
    #[schemars(regex(pattern = r"^/(\S+)"))]
    pub data_dir_host_path: Option<String>,
    pub mon: Option<MonSpec>,
    pub mgr: Option<MgrSpec>,
    pub network: Option<NetworkSpec>,
    pub storage: Option<StorageSpec>,
    /// Ceph options by section (`global`, `mon`, `osd.0`, ...), set in the mon config database.
    pub ceph_config: Option<BTreeMap<String, BTreeMap<String, String>>>,
    pub health_check: Option<HealthCheckSpec>,
    /// Scheduling per daemon kind: `all`, `mon`, `mgr`, `osd`, `prepareosd`, `cleanup`.
    pub placement: Option<BTreeMap<String, Placement>>,
    /// Requests and limits per daemon kind: `mon`, `mgr`, `osd`, `prepareosd`, `cleanup`.
    pub resources: Option<BTreeMap<String, ResourceRequirements>>,
    pub cleanup_policy: Option<CleanupPolicySpec>,
    /// Rook's external mode: connect to a Ceph cluster that runs elsewhere, deploy no daemons.
    pub external: Option<ExternalSpec>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalSpec {
    /// The connection is read from Secret `rook-ceph-mon` (`fsid`, `admin-secret`, or
    /// `ceph-username` + `ceph-secret`) and ConfigMap `rook-ceph-mon-endpoints`, as Rook's
    /// import script writes them.
    pub enable: Option<bool>,
    #[serde(flatten)]
    pub other: Other,
}

impl CephClusterSpec {
    /// Whether this is an external cluster (Rook's `external.enable`).
    pub fn is_external(&self) -> bool {
        self.external.as_ref().and_then(|e| e.enable) == Some(true)
    }
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CephVersionSpec {
    /// The container image of the Ceph daemons.
    pub image: Option<String>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonSpec {
    /// Number of mons; odd numbers keep a quorum through a failure.
    #[schemars(range(min = 0, max = 9))]
    pub count: Option<u32>,
    /// Allow more than one mon on a node (test clusters only).
    pub allow_multiple_per_node: Option<bool>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MgrSpec {
    #[schemars(range(min = 0, max = 5))]
    pub count: Option<u32>,
    pub allow_multiple_per_node: Option<bool>,
    /// Manager modules to enable or disable.
    pub modules: Option<Vec<MgrModule>>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MgrModule {
    pub name: Option<String>,
    pub enabled: Option<bool>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// `host`: daemons use the node's network and address. Empty: the pod network, with a
    /// Service per mon. (`multus` is Rook's; rook-rbd reports it as not implemented.)
    pub provider: Option<NetworkProvider>,
    /// Rook's older spelling of `provider: host`.
    pub host_network: Option<bool>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NetworkProvider {
    #[serde(rename = "")]
    Default,
    #[serde(rename = "host")]
    Host,
    #[serde(rename = "multus")]
    Multus,
}

impl NetworkSpec {
    /// Whether daemons run with host networking, from either spelling.
    pub fn uses_host_network(&self) -> bool {
        self.provider == Some(NetworkProvider::Host) || self.host_network == Some(true)
    }
}

/// Which nodes and devices hold OSDs.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Run OSDs on every node (subject to placement) rather than on `nodes` only.
    pub use_all_nodes: Option<bool>,
    pub nodes: Option<Vec<StorageNode>>,
    /// OSD settings for every device; only `deviceClass` is acted on.
    pub config: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub selection: DeviceSelection,
    #[serde(flatten)]
    pub other: Other,
}

// Which devices of a node become OSDs; in `storage` for all nodes, or per node. (A plain
// comment: a doc comment would replace the description of the structs it is flattened into.)
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSelection {
    /// Use every empty device the node has.
    pub use_all_devices: Option<bool>,
    /// A regular expression over device names (`sdb`, `nvme0n1`, `loop1`).
    pub device_filter: Option<String>,
    pub devices: Option<Vec<Device>>,
}

/// The devices of one node; these settings replace those of `storage` for it.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageNode {
    /// The Kubernetes node name (its `kubernetes.io/hostname` label).
    pub name: Option<String>,
    pub config: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub selection: DeviceSelection,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// A device name (`sdb`) or path; `/dev/disk/by-id/...` names one device for good.
    pub name: Option<String>,
    pub config: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckSpec {
    pub daemon_health: Option<DaemonHealthSpec>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonHealthSpec {
    /// How often `status.ceph` is refreshed.
    pub status: Option<DaemonHealthCheck>,
    /// Mon quorum checks; `timeout` is how long a mon may be out before it is replaced.
    pub mon: Option<DaemonHealthCheck>,
    pub osd: Option<DaemonHealthCheck>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonHealthCheck {
    pub disabled: Option<bool>,
    /// A Go duration, e.g. `45s`, `1m`.
    pub interval: Option<String>,
    pub timeout: Option<String>,
    #[serde(flatten)]
    pub other: Other,
}

/// Rook's `Placement`: the Kubernetes scheduling fields, checked by the API server's own schema.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    pub node_affinity: Option<NodeAffinity>,
    pub pod_affinity: Option<PodAffinity>,
    pub pod_anti_affinity: Option<PodAntiAffinity>,
    pub tolerations: Option<Vec<Toleration>>,
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CleanupPolicySpec {
    /// `yes-really-destroy-data`: deleting the CephCluster also wipes `dataDirHostPath` and
    /// the OSD devices on every node.
    #[schemars(regex(pattern = r"^$|^yes-really-destroy-data$"))]
    pub confirmation: Option<String>,
    pub sanitize_disks: Option<SanitizeDisksSpec>,
    /// Delete the cluster even while pools hold RBD images.
    pub allow_uninstall_with_volumes: Option<bool>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SanitizeDisksSpec {
    pub method: Option<SanitizeMethod>,
    pub data_source: Option<SanitizeDataSource>,
    #[schemars(range(min = 1))]
    pub iteration: Option<u32>,
    #[serde(flatten)]
    pub other: Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SanitizeMethod {
    /// Wipe the metadata areas only.
    Quick,
    /// Overwrite the whole device.
    Complete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SanitizeDataSource {
    Zero,
    Random,
}

/// What rook-rbd last saw and did. Kept open to fields it does not know (Rook's status on an
/// object that Rook's operator wrote before).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct CephClusterStatus {
    pub phase: Option<Phase>,
    /// What the cluster is doing or waiting for, in words (the step while Progressing).
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    pub ceph: Option<CephStatus>,
    pub storage: Option<StorageStatus>,
    pub version: Option<ClusterVersion>,
    pub observed_generation: Option<i64>,
}

/// Rook's `status.ceph`: what the mons say, refreshed every `healthCheck.daemonHealth.status.interval`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CephStatus {
    /// HEALTH_OK, HEALTH_WARN or HEALTH_ERR.
    pub health: Option<String>,
    /// Health checks by name (e.g. `MON_DOWN`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, HealthMessage>,
    pub last_checked: Option<String>,
    pub last_changed: Option<String>,
    pub previous_health: Option<String>,
    pub capacity: Option<Capacity>,
    pub fsid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HealthMessage {
    pub severity: String,
    pub message: String,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Capacity {
    #[serde(rename = "bytesTotal")]
    pub total_bytes: Option<u64>,
    #[serde(rename = "bytesUsed")]
    pub used_bytes: Option<u64>,
    #[serde(rename = "bytesAvailable")]
    pub available_bytes: Option<u64>,
    #[serde(rename = "lastUpdated")]
    pub last_updated: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClusterVersion {
    pub image: Option<String>,
    pub version: Option<String>,
}

/// Rook's `status.storage`, plus what each OSD prepare job did with each device it looked at.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_classes: Vec<DeviceClass>,
    pub osd: Option<OsdStatus>,
    /// Per node: every device the prepare job considered, and the outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeDevices>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceClass {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OsdStatus {
    /// OSD count per backend store (`bluestore`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub store_type: BTreeMap<String, u32>,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDevices {
    pub node: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceResult>,
    pub last_updated: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceResult {
    /// The device's stable name, `/dev/disk/by-id/...` where the node has one.
    pub device: String,
    pub result: DeviceOutcome,
    /// Why the device was skipped or failed (`has partitions`, `too small`, ...).
    pub reason: Option<String>,
    #[serde(rename = "osdID")]
    pub osd_id: Option<u32>,
    pub device_class: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeviceOutcome {
    /// An OSD lives on this device.
    Prepared,
    /// Left alone; `reason` says why.
    #[default]
    Skipped,
    /// Preparing it failed; `reason` has the error.
    Failed,
}
