//! Status types shared by CephCluster and CephBlockPool: Rook's phase and conditions, with
//! `observedGeneration` on each condition so a reader can tell a stale condition from a fresh one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Rook's `phase` values (its `ConditionType`), with the same spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Working towards the spec; `status.message` says which step.
    Progressing,
    Ready,
    /// An external cluster answers (Rook's phase for `external.enable`).
    Connected,
    Failure,
    Deleting,
    /// Deletion waits for something (images in a pool, pools in a cluster); a condition says what.
    DeletionIsBlocked,
    /// A phase this version does not know, for example Rook's `Connecting` on an object that
    /// Rook's operator wrote before. Never written by rook-rbd.
    #[serde(other)]
    #[schemars(skip)]
    Unknown,
}

/// A condition's truth value, as in Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// Rook's `Condition`, plus `observedGeneration` (as in `metav1.Condition`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Rook's types (`Progressing`, `Ready`, `Failure`, `Deleting`, `DeletionIsBlocked`) and
    /// rook-rbd's own (`FieldsNotImplemented`, ...).
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    pub observed_generation: Option<i64>,
    pub last_heartbeat_time: Option<Time>,
    pub last_transition_time: Option<Time>,
}

/// The condition type under which the reconciler lists the spec fields it keeps but does not act on.
pub const FIELDS_NOT_IMPLEMENTED: &str = "FieldsNotImplemented";

impl Condition {
    /// The `FieldsNotImplemented` condition for `paths` (from `not_implemented()`): True with
    /// the list when there are any, False otherwise, so `kubectl wait` can test for either.
    pub fn fields_not_implemented(paths: &[String], generation: Option<i64>, now: Time) -> Self {
        let (status, reason, message) = if paths.is_empty() {
            (
                ConditionStatus::False,
                "AllFieldsImplemented",
                "rook-rbd acts on every field of the spec".to_string(),
            )
        } else {
            (
                ConditionStatus::True,
                "FieldsKeptNotActedOn",
                format!("rook-rbd keeps but does not act on: {}", paths.join(", ")),
            )
        };
        Condition {
            type_: FIELDS_NOT_IMPLEMENTED.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_written_by_rook_but_unknown_here_still_deserializes() {
        let p: Phase = serde_json::from_str(r#""Connecting""#).unwrap();
        assert_eq!(p, Phase::Unknown);
        let p: Phase = serde_json::from_str(r#""DeletionIsBlocked""#).unwrap();
        assert_eq!(p, Phase::DeletionIsBlocked);
    }

    #[test]
    fn phase_schema_offers_only_the_phases_rook_rbd_writes() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(crate::operator::crd::CephCluster::crd()).unwrap();
        let phase = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"]["phase"];
        let mut values: Vec<&str> = phase["enum"]
            .as_array()
            .expect("an enum")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        values.sort();
        assert_eq!(
            values,
            [
                "Connected",
                "Deleting",
                "DeletionIsBlocked",
                "Failure",
                "Progressing",
                "Ready"
            ]
        );
    }

    #[test]
    fn fields_not_implemented_condition_lists_the_paths_and_the_generation() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let c = Condition::fields_not_implemented(
            &[
                "spec.dashboard.enabled".into(),
                "spec.monitoring.enabled".into(),
            ],
            Some(7),
            now.clone(),
        );
        assert_eq!(c.status, ConditionStatus::True);
        assert_eq!(c.observed_generation, Some(7));
        assert!(c
            .message
            .contains("spec.dashboard.enabled, spec.monitoring.enabled"));
        let none = Condition::fields_not_implemented(&[], Some(7), now);
        assert_eq!(none.status, ConditionStatus::False);
    }
}
