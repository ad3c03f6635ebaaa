//! Rook's external cluster mode: the connection to a Ceph cluster that runs elsewhere, read from
//! Secret `rook-ceph-mon` and ConfigMap `rook-ceph-mon-endpoints` as Rook's import script writes
//! them, and mon commands on it through the project's librados layer, each with a deadline.

use super::cluster_controller::{
    carry_transition_times, condition, merge_status, names, now, publish, Context,
};
use super::crd::cluster::HealthMessage;
use super::crd::{CephCluster, Condition, ConditionStatus, Phase};
use super::endpoints::MonEndpoints;
use super::identity::keys;
use crate::ceph::health::banner_check;
use crate::ceph::pool::blocking;
use crate::ceph::{CephError, Connection, ConnectionPool};
use crate::secret::Secret as SecretValue;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A whole connect or mon command gives up after this long, even if librados would not (its
/// own timeouts are per attempt).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Why the external cluster cannot be used; `message` never holds a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// Where the external cluster is and who the operator is on it.
#[derive(Debug, Clone)]
pub struct ExternalCluster {
    pub fsid: String,
    pub monitors: Vec<String>,
    /// Without the `client.` prefix, as librados takes it.
    pub user: String,
    key: SecretValue,
}

fn problem(reason: &'static str, message: String) -> Problem {
    Problem { reason, message }
}

/// The connection settings in namespace `ns`, or what is missing from them.
pub async fn read(
    client: &kube::Client,
    ns: &str,
) -> Result<Result<ExternalCluster, Problem>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let Some(secret) = secrets.get_opt(names::MON_SECRET).await? else {
        return Ok(Err(problem(
            "ExternalSecretMissing",
            format!("Secret {} is missing: import the external cluster's connection (fsid, admin-secret or ceph-username + ceph-secret)", names::MON_SECRET),
        )));
    };
    let Some(cm) = maps.get_opt(names::MON_ENDPOINTS).await? else {
        return Ok(Err(problem(
            "ExternalEndpointsMissing",
            format!(
                "ConfigMap {} is missing: it names the external cluster's mons (data: a=host:port)",
                names::MON_ENDPOINTS
            ),
        )));
    };
    let data = secret.data.unwrap_or_default();
    let field = |k: &str| {
        data.get(k)
            .and_then(|v| std::str::from_utf8(&v.0).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let invalid = |what: String| {
        problem(
            "ExternalSecretInvalid",
            format!("Secret {} {what}", names::MON_SECRET),
        )
    };
    let Some(fsid) = field(keys::FSID) else {
        return Ok(Err(invalid("has no `fsid`".into())));
    };
    // Rook's import script writes either the admin key or a named user with its key.
    let (user, key) = match (
        field(keys::CEPH_USERNAME),
        field(keys::CEPH_SECRET),
        field(keys::ADMIN_SECRET),
    ) {
        (Some(u), Some(k), _) => (u.strip_prefix("client.").unwrap_or(u).to_string(), k),
        (Some(_), None, _) => {
            return Ok(Err(invalid(
                "has `ceph-username` but no `ceph-secret`".into(),
            )))
        }
        (None, _, Some(k)) => ("admin".to_string(), k),
        (None, _, None) => {
            return Ok(Err(invalid(
                "has neither `admin-secret` nor `ceph-username` + `ceph-secret`".into(),
            )))
        }
    };
    let endpoints = match MonEndpoints::from_config_map(&cm.data.unwrap_or_default()) {
        Ok(e) => e,
        Err(e) => {
            return Ok(Err(problem(
                "ExternalEndpointsInvalid",
                format!("ConfigMap {}: {e}", names::MON_ENDPOINTS),
            )))
        }
    };
    if endpoints.mons.is_empty() {
        return Ok(Err(problem(
            "ExternalEndpointsInvalid",
            format!(
                "ConfigMap {} names no mon (`data` is empty)",
                names::MON_ENDPOINTS
            ),
        )));
    }
    Ok(Ok(ExternalCluster {
        fsid: fsid.to_string(),
        monitors: endpoints.mons.into_values().collect(),
        user,
        key: SecretValue::new(key),
    }))
}

impl ExternalCluster {
    /// The pooled connection, within `DEADLINE`; a failure says what to fix, without the key.
    pub async fn connect(&self, pool: &ConnectionPool) -> Result<Arc<Connection>, Problem> {
        let at = self.monitors.join(",");
        let who = format!("client.{}", self.user);
        let attempt = pool.get(&self.fsid, &self.monitors, &self.user, &self.key);
        let conn = match tokio::time::timeout(DEADLINE, attempt).await {
            Err(_) => Err(CephError::new("connect", &who, -libc::ETIMEDOUT)),
            Ok(r) => r,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // librados reports refused credentials as a connect timeout once
                // client_mount_timeout is set: mons that answer their banner refused them.
                let answering = e.timed_out()
                    && banner_check(&self.monitors, Duration::from_secs(2))
                        .await
                        .is_ok();
                let hint = if e.permission_denied() || answering {
                    "the mons answer, but authentication did not succeed: the key in Secret \
                     rook-ceph-mon is wrong for this user (or the user does not exist)"
                } else if e.timed_out() {
                    "no answer from the mons in time"
                } else {
                    "connect failed"
                };
                return Err(problem(
                    "ExternalConnectFailed",
                    format!(
                        "cannot connect to the external cluster at {at} as {who}: {hint} ({e})"
                    ),
                ));
            }
        };
        if !conn.fsid().is_empty() && conn.fsid() != self.fsid {
            return Err(problem(
                "ExternalFsidMismatch",
                format!(
                    "the mons at {at} serve cluster {}, not the fsid {} of Secret rook-ceph-mon",
                    conn.fsid(),
                    self.fsid
                ),
            ));
        }
        Ok(conn)
    }
}

/// A mon command (`prefix` and arguments as JSON) with JSON output, within `DEADLINE`.
pub async fn mon_json(conn: &Arc<Connection>, cmd: Value) -> Result<Value, CephError> {
    let text = cmd.to_string();
    let out = mon_raw(conn, cmd).await?;
    if out.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out)
        .map_err(|_| CephError::new("parse mon output", text, -libc::EBADMSG))
}

/// A mon command whose output is not needed (or not JSON), within `DEADLINE`.
pub async fn mon_raw(conn: &Arc<Connection>, cmd: Value) -> Result<Vec<u8>, CephError> {
    let text = cmd.to_string();
    let c = conn.clone();
    let call = blocking(move || c.mon_command(&cmd.to_string()));
    match tokio::time::timeout(DEADLINE, call).await {
        Ok(r) => r,
        Err(_) => Err(CephError::new("rados_mon_command", text, -libc::ETIMEDOUT)),
    }
}

/// How often a connected cluster's health is read again (Rook's default status interval).
const HEALTH_INTERVAL: Duration = Duration::from_secs(60);

/// What `ceph health` says: the overall status and each check's severity and message.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterHealth {
    pub status: String,
    pub details: BTreeMap<String, HealthMessage>,
}

async fn health(conn: &Arc<Connection>) -> Result<ClusterHealth, CephError> {
    let v = mon_json(conn, json!({"prefix": "health", "format": "json"})).await?;
    let details = v["checks"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, c)| {
            let m = HealthMessage {
                severity: c["severity"].as_str().unwrap_or_default().to_string(),
                message: c["summary"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            };
            (name.clone(), m)
        })
        .collect();
    Ok(ClusterHealth {
        status: v["status"].as_str().unwrap_or("HEALTH_UNKNOWN").to_string(),
        details,
    })
}

/// Reconciles an external CephCluster: connect, read health, report. Nothing is deployed and
/// nothing in the Secret or ConfigMap is written: they are the user's import.
pub(super) async fn reconcile(
    cluster: &CephCluster,
    ctx: &Context,
    ns: &str,
) -> Result<Action, kube::Error> {
    let outcome = match read(&ctx.client, ns).await? {
        Ok(ext) => match ext.connect(&ctx.ceph).await {
            Ok(conn) => health(&conn)
                .await
                .map(|h| (ext.fsid.clone(), h))
                .map_err(|e| {
                    problem(
                        "ExternalHealthFailed",
                        format!("connected, but `ceph health` failed: {e}"),
                    )
                }),
            Err(p) => Err(p),
        },
        Err(p) => Err(p),
    };
    let key = format!("{ns}/{}", cluster.name_any());
    let next = match &outcome {
        Ok(_) => {
            ctx.backoff.succeeded(&key);
            HEALTH_INTERVAL
        }
        Err(_) => ctx.backoff.failed(&key),
    };
    write_status(cluster, ctx, ns, &outcome).await?;
    Ok(Action::requeue(next))
}

async fn write_status(
    cluster: &CephCluster,
    ctx: &Context,
    ns: &str,
    outcome: &Result<(String, ClusterHealth), Problem>,
) -> Result<(), kube::Error> {
    let gen = cluster.metadata.generation;
    let (phase, message, mut conditions) = match outcome {
        Ok((fsid, h)) => {
            let msg = format!("connected to external cluster {fsid}: {}", h.status);
            let c = condition(
                "Connected",
                ConditionStatus::True,
                "ClusterConnected",
                &msg,
                gen,
            );
            (Phase::Connected, msg, vec![c])
        }
        Err(p) => (
            Phase::Failure,
            p.message.clone(),
            vec![
                condition(
                    "Connected",
                    ConditionStatus::False,
                    p.reason,
                    &p.message,
                    gen,
                ),
                condition("Failure", ConditionStatus::True, p.reason, &p.message, gen),
            ],
        ),
    };
    let mut fields = Condition::fields_not_implemented(&cluster.not_implemented(), gen, now());
    fields.last_heartbeat_time = None;
    conditions.push(fields);
    let current = cluster.status.clone().unwrap_or_default();
    carry_transition_times(&current.conditions, &mut conditions);
    if current.message.as_deref() != Some(message.as_str()) {
        let type_ = match outcome {
            Ok(_) => EventType::Normal,
            Err(_) => EventType::Warning,
        };
        let reason = match outcome {
            Ok(_) => "ClusterConnected",
            Err(p) => p.reason,
        };
        publish(ctx, cluster, type_, reason, &message).await;
    }
    let old_ceph = current.ceph.unwrap_or_default();
    let mut status = json!({
        "phase": phase,
        "message": message,
        "conditions": conditions,
        "observedGeneration": gen,
    });
    if let Ok((fsid, h)) = outcome {
        // A merge patch merges maps: checks that cleared are removed by name.
        let mut details = serde_json::Map::new();
        for name in old_ceph.details.keys() {
            details.insert(name.clone(), Value::Null);
        }
        for (name, m) in &h.details {
            details.insert(name.clone(), json!(m));
        }
        let checked = now().0.to_string();
        let mut ceph = json!({
            "health": h.status,
            "details": details,
            "fsid": fsid,
            "lastChecked": checked,
        });
        if old_ceph.health.as_deref() != Some(h.status.as_str()) {
            ceph["lastChanged"] = json!(checked);
            if let Some(prev) = &old_ceph.health {
                ceph["previousHealth"] = json!(prev);
            }
        }
        status["ceph"] = ceph;
    }
    merge_status(ctx, cluster, ns, status).await
}
