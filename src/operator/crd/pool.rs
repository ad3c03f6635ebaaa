//! `CephBlockPool` (`ceph.rook.io/v1`): a replicated RBD pool, with Rook's field names and
//! printer columns. Fields Rook has and rook-rbd does not name are kept (`other`) and reported.

use super::cluster::Other;
use super::status::{Condition, Phase};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A replicated Ceph pool, initialised for RBD.
// Each printcolumn(...) repeats `type_ = ...`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[serde_with::skip_serializing_none]
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ceph.rook.io",
    version = "v1",
    kind = "CephBlockPool",
    namespaced,
    status = "CephBlockPoolStatus",
    doc = "A Ceph RBD pool (Rook's CephBlockPool, reconciled by rook-rbd)",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Type", type_ = "string", json_path = ".status.info.type"),
    printcolumn(
        name = "FailureDomain",
        type_ = "string",
        json_path = ".status.info.failureDomain"
    ),
    printcolumn(
        name = "Replication",
        type_ = "integer",
        json_path = ".spec.replicated.size",
        priority = 1
    ),
    printcolumn(
        name = "EC-CodingChunks",
        type_ = "integer",
        json_path = ".spec.erasureCoded.codingChunks",
        priority = 1
    ),
    printcolumn(
        name = "EC-DataChunks",
        type_ = "integer",
        json_path = ".spec.erasureCoded.dataChunks",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CephBlockPoolSpec {
    /// The Ceph pool's name when it differs from the resource's (e.g. `.mgr`).
    #[schemars(length(min = 1))]
    pub name: Option<String>,
    /// The CRUSH bucket type replicas are spread across: `host` (default), `osd`, `zone`, ...
    pub failure_domain: Option<String>,
    /// Place the pool on OSDs of this device class only (`hdd`, `ssd`, `nvme`, ...).
    pub device_class: Option<String>,
    pub replicated: Option<ReplicatedSpec>,
    /// Pool properties passed to `ceph osd pool set` (e.g. `compression_mode: none`).
    pub parameters: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub other: Other,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedSpec {
    /// Copies of each object, including the object itself.
    #[schemars(range(min = 1, max = 10))]
    pub size: u32,
    /// Refuse a size of 1 unless this is false (a size of 1 loses data with its OSD).
    pub require_safe_replica_size: Option<bool>,
    #[serde(flatten)]
    pub other: Other,
}

/// Kept open to fields rook-rbd does not know (Rook's mirroring status, for example).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct CephBlockPoolStatus {
    pub phase: Option<Phase>,
    /// Rook's `info`: `type` (Replicated), `failureDomain`, ...
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub info: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    pub observed_generation: Option<i64>,
}

impl CephBlockPool {
    /// The Ceph pool this resource stands for: `spec.name`, else the resource's name.
    pub fn pool_name(&self) -> Option<&str> {
        self.spec.name.as_deref().or(self.metadata.name.as_deref())
    }
}
