//! Is the CRD the API server serves the one this binary was built with? The operator calls
//! `check()` at start: an older rook-rbd's CRD (or Rook's own) prunes or rejects fields this
//! version reads and writes, which would otherwise show up much later as a status that never
//! sticks or a field that is silently gone.

use super::crd::crds;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use kube::api::Api;
use kube::Client;
use serde_json::Value;
use std::fmt;

/// How the served CRD compares with ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrdState {
    /// Same versions, subresources, printer columns and schema.
    Current,
    /// The API server has no CRD of that name.
    Missing,
    /// It differs; each line says where and how.
    Stale(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdReport {
    pub name: String,
    pub state: CrdState,
}

impl fmt::Display for CrdReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            CrdState::Current => write!(f, "CRD {}: current", self.name),
            CrdState::Missing => write!(f, "CRD {}: not installed", self.name),
            CrdState::Stale(d) => write!(
                f,
                "CRD {}: differs from this rook-rbd's ({}); apply deploy/operator/crds.yaml",
                self.name,
                d.join("; ")
            ),
        }
    }
}

/// At most this many schema differences are listed; the rest are counted.
const MAX_DIFFERENCES: usize = 20;

/// Compares every CRD the operator needs with what the API server serves.
pub async fn check(client: Client) -> Result<Vec<CrdReport>, kube::Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let mut reports = Vec::new();
    for ours in crds() {
        let name = ours.metadata.name.clone().unwrap_or_default();
        let state = match api.get_opt(&name).await? {
            None => CrdState::Missing,
            Some(served) => match differences(&served, &ours) {
                d if d.is_empty() => CrdState::Current,
                d => CrdState::Stale(d),
            },
        };
        reports.push(CrdReport { name, state });
    }
    Ok(reports)
}

/// What differs between the served CRD and ours, one readable line each; empty when current.
pub fn differences(
    served: &CustomResourceDefinition,
    ours: &CustomResourceDefinition,
) -> Vec<String> {
    let mut out = Vec::new();
    let (s, o) = (&served.spec, &ours.spec);
    if s.group != o.group {
        out.push(format!("group {} (ours {})", s.group, o.group));
    }
    if s.scope != o.scope {
        out.push(format!("scope {} (ours {})", s.scope, o.scope));
    }
    if s.names.kind != o.names.kind || s.names.plural != o.names.plural {
        out.push(format!(
            "names {}/{} (ours {}/{})",
            s.names.kind, s.names.plural, o.names.kind, o.names.plural
        ));
    }
    for ov in &o.versions {
        match s.versions.iter().find(|sv| sv.name == ov.name) {
            None => out.push(format!("version {} is not in the served CRD", ov.name)),
            Some(sv) => version_differences(sv, ov, &mut out),
        }
    }
    out
}

fn version_differences(
    served: &CustomResourceDefinitionVersion,
    ours: &CustomResourceDefinitionVersion,
    out: &mut Vec<String>,
) {
    let v = &ours.name;
    if !served.served {
        out.push(format!("version {v} is not served"));
    }
    if served.storage != ours.storage {
        out.push(format!(
            "version {v}: storage {} (ours {})",
            served.storage, ours.storage
        ));
    }
    let status = |x: &CustomResourceDefinitionVersion| {
        x.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    };
    if status(served) != status(ours) {
        out.push(format!(
            "version {v}: status subresource {} (ours {})",
            status(served),
            status(ours)
        ));
    }
    let columns = |x: &CustomResourceDefinitionVersion| {
        x.additional_printer_columns
            .iter()
            .flatten()
            .map(|c| format!("{}={}", c.name, c.json_path))
            .collect::<Vec<_>>()
    };
    if columns(served) != columns(ours) {
        out.push(format!(
            "version {v}: printer columns [{}] (ours [{}])",
            columns(served).join(", "),
            columns(ours).join(", ")
        ));
    }
    let schema = |x: &CustomResourceDefinitionVersion| {
        x.schema
            .as_ref()
            .and_then(|s| serde_json::to_value(&s.open_api_v3_schema).ok())
            .unwrap_or(Value::Null)
    };
    let mut diffs = Vec::new();
    diff_schema(&schema(served), &schema(ours), "", &mut diffs);
    let more = diffs.len().saturating_sub(MAX_DIFFERENCES);
    out.extend(
        diffs
            .into_iter()
            .take(MAX_DIFFERENCES)
            .map(|d| format!("version {v}: schema {d}")),
    );
    if more > 0 {
        out.push(format!("version {v}: schema: {more} more differences"));
    }
}

/// Differences between two OpenAPI schemas, with property paths written as field paths
/// (`.spec.mon.count`) rather than as schema paths (`properties.spec.properties.mon...`).
fn diff_schema(served: &Value, ours: &Value, path: &str, out: &mut Vec<String>) {
    match (served, ours) {
        (Value::Object(s), Value::Object(o)) => {
            for (key, ov) in o {
                match s.get(key) {
                    Some(sv) => diff_schema(sv, ov, &child(path, key), out),
                    None if is_go_zero(key, ov) => {}
                    None => out.push(format!("{}: missing in the served CRD", child(path, key))),
                }
            }
            for (key, sv) in s {
                if !o.contains_key(key) && !is_go_zero(key, sv) {
                    out.push(format!("{}: not in this rook-rbd's CRD", child(path, key)));
                }
            }
        }
        (s, o) if s == o => {}
        (s, o) => out.push(format!("{path}: served {s}, ours {o}")),
    }
}

/// The API server stores these as Go booleans with `omitempty`: `false` and absent are one value.
fn is_go_zero(key: &str, value: &Value) -> bool {
    matches!(
        key,
        "nullable" | "uniqueItems" | "exclusiveMaximum" | "exclusiveMinimum"
    ) && value == &Value::Bool(false)
}

fn child(path: &str, key: &str) -> String {
    // `properties.<name>` is a field; every other keyword stays visible after a slash.
    match path.strip_suffix("/properties") {
        Some(parent) => format!("{parent}.{key}"),
        None => format!("{path}/{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{spec_schema_mut, CephCluster};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
    use kube::CustomResourceExt;
    use std::collections::BTreeMap;

    fn spec_props(crd: &mut CustomResourceDefinition) -> &mut BTreeMap<String, JSONSchemaProps> {
        spec_schema_mut(crd)
            .and_then(|s| s.properties.as_mut())
            .unwrap()
    }

    #[test]
    fn our_own_crd_has_no_differences() {
        assert_eq!(
            differences(&CephCluster::crd(), &CephCluster::crd()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn an_older_crd_without_a_field_and_a_column_is_stale_at_that_field_and_column() {
        let mut older = CephCluster::crd();
        spec_props(&mut older).remove("cephConfig");
        older.spec.versions[0]
            .additional_printer_columns
            .as_mut()
            .unwrap()
            .pop();
        let d = differences(&older, &CephCluster::crd());
        assert_eq!(d.len(), 2, "{d:?}");
        let (served, ours) = d[0].split_once("(ours").unwrap();
        assert!(
            served.contains("printer columns") && !served.contains("FSID"),
            "{d:?}"
        );
        assert!(ours.contains("FSID=.status.ceph.fsid"), "{d:?}");
        assert_eq!(
            d[1],
            "version v1: schema .spec.cephConfig: missing in the served CRD"
        );
    }

    #[test]
    fn a_changed_bound_is_reported_with_both_values() {
        let mut older = CephCluster::crd();
        let mon = spec_props(&mut older).get_mut("mon").unwrap();
        let count = mon.properties.as_mut().unwrap().get_mut("count").unwrap();
        count.maximum = Some(5.0);
        let d = differences(&older, &CephCluster::crd());
        assert_eq!(
            d,
            ["version v1: schema .spec.mon.count/maximum: served 5.0, ours 9.0"]
        );
    }

    #[test]
    fn go_omitempty_false_is_not_a_difference() {
        let s = serde_json::json!({"type": "string"});
        let o = serde_json::json!({"type": "string", "nullable": false});
        let mut out = Vec::new();
        diff_schema(&s, &o, "", &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
}
