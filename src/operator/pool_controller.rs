//! The CephBlockPool reconciler (Rook's pool controller) on an external cluster: a CRUSH rule
//! for the failure domain, the pool, its size and min_size, `parameters`, and `rbd pool init`,
//! each read first and changed only when it differs.
//!
//! Deletion follows Rook: the pool the resource names is deleted, whether or not this operator
//! created it (a CephBlockPool is the claim on that pool), but never while it holds RBD images.
//! `mon_allow_pool_delete` is the external cluster owner's setting and is never changed here:
//! when it is off, the deletion is blocked with a condition that says so.

use super::cluster_controller::{
    carry_transition_times, condition, merge_status, now, publish, Context,
};
use super::crd::{CephBlockPool, CephCluster, Condition, ConditionStatus, Phase};
use super::external::{self, mon_json, mon_raw, Problem};
use crate::ceph::pool::blocking;
use crate::ceph::{CephError, Connection};
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Rook's finalizer name, so a pool moves between Rook and rook-rbd without a stuck one.
pub const FINALIZER: &str = "cephblockpool.ceph.rook.io";
const RESYNC: Duration = Duration::from_secs(300);
/// A pool whose cluster is not ready is looked at again this often (a cluster's status
/// change does not wake the pool controller).
const WAIT_FOR_CLUSTER: Duration = Duration::from_secs(10);
const DEFAULT_FAILURE_DOMAIN: &str = "host";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the CephBlockPool has no namespace")]
    NoNamespace,
    /// Deletion must wait (images in the pool, the cluster unreachable); the finalizer stays.
    #[error("deletion blocked: {0}")]
    DeletionBlocked(String),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

pub async fn reconcile(pool: Arc<CephBlockPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pool.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<CephBlockPool> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, pool, |event| async {
        match event {
            FinalizerEvent::Apply(p) => apply(&p, &ctx, &ns).await,
            FinalizerEvent::Cleanup(p) => cleanup(&p, &ctx, &ns).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(pool: Arc<CephBlockPool>, _error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!(
        "pool/{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    Action::requeue(ctx.backoff.failed(&key))
}

/// The settings the spec asks for, checked before anything is sent to Ceph.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub pool: String,
    pub size: u32,
    pub min_size: u32,
    pub failure_domain: String,
    pub device_class: Option<String>,
    /// `parameters` without `min_size`, which is part of the above.
    pub parameters: Vec<(String, String)>,
}

impl Desired {
    /// The CRUSH rule for this failure domain and device class; the name says which, so a
    /// changed spec gets a new rule rather than an edited one that other pools may share.
    pub fn rule(&self) -> String {
        match &self.device_class {
            Some(class) => format!("{}_{}_{class}", self.pool, self.failure_domain),
            None => format!("{}_{}", self.pool, self.failure_domain),
        }
    }
}

fn invalid(message: String) -> Problem {
    Problem {
        reason: "InvalidSpec",
        message,
    }
}

/// The spec as Ceph settings, or why it cannot be applied (Rook's checks).
pub fn desired(pool: &CephBlockPool) -> Result<Desired, Problem> {
    let name = pool
        .pool_name()
        .ok_or_else(|| invalid("the pool has no name".into()))?;
    let Some(rep) = &pool.spec.replicated else {
        return Err(invalid(
            "spec.replicated.size is required (rook-rbd makes replicated pools only)".into(),
        ));
    };
    if rep.size == 1 && rep.require_safe_replica_size != Some(false) {
        return Err(Problem {
            reason: "UnsafeReplicaSize",
            message: "spec.replicated.size is 1, which keeps one copy of the data and loses it \
                      with its OSD; set spec.replicated.requireSafeReplicaSize: false to allow it"
                .into(),
        });
    }
    let params = pool.spec.parameters.clone().unwrap_or_default();
    // Ceph's own default for a new pool.
    let mut min_size = rep.size - rep.size / 2;
    if let Some(v) = params.get("min_size") {
        min_size = v
            .parse()
            .ok()
            .filter(|m| (1..=rep.size).contains(m))
            .ok_or_else(|| {
                invalid(format!(
                    "spec.parameters.min_size {v:?} is not a number from 1 to the size {}",
                    rep.size
                ))
            })?;
    }
    Ok(Desired {
        pool: name.to_string(),
        size: rep.size,
        min_size,
        failure_domain: pool
            .spec
            .failure_domain
            .clone()
            .unwrap_or_else(|| DEFAULT_FAILURE_DOMAIN.into()),
        device_class: pool.spec.device_class.clone(),
        parameters: params
            .into_iter()
            .filter(|(k, _)| k != "min_size")
            .collect(),
    })
}

/// The connected external cluster of the pool's namespace.
async fn cluster_connection(
    ctx: &Context,
    ns: &str,
) -> Result<Result<Arc<Connection>, Problem>, kube::Error> {
    let clusters: Api<CephCluster> = Api::namespaced(ctx.client.clone(), ns);
    let list = clusters.list(&ListParams::default()).await?;
    let Some(cluster) = list.items.first() else {
        return Ok(Err(Problem {
            reason: "ClusterMissing",
            message: format!("no CephCluster in namespace {ns}"),
        }));
    };
    if !cluster.spec.is_external() {
        return Ok(Err(Problem {
            reason: "ClusterNotExternal",
            message: format!(
                "CephCluster {} is not external (spec.external.enable): rook-rbd runs no Ceph \
                 daemons yet, so pools need an external cluster",
                cluster.name_any()
            ),
        }));
    }
    Ok(match external::read(&ctx.client, ns).await? {
        Ok(ext) => ext.connect(&ctx.ceph).await,
        Err(p) => Err(p),
    })
}

fn ceph_problem(reason: &'static str, what: &str, e: &CephError) -> Problem {
    Problem {
        reason,
        message: format!("{what}: {e}"),
    }
}

/// The pool's entry in `osd pool ls detail`, if it exists.
async fn pool_detail(conn: &Arc<Connection>, pool: &str) -> Result<Option<Value>, CephError> {
    let v = mon_json(
        conn,
        json!({"prefix": "osd pool ls", "detail": "detail", "format": "json"}),
    )
    .await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pool_name"] == pool)
        .cloned())
}

async fn rule_id(conn: &Arc<Connection>, rule: &str) -> Result<i64, CephError> {
    let v = mon_json(
        conn,
        json!({"prefix": "osd crush rule dump", "name": rule, "format": "json"}),
    )
    .await?;
    v["rule_id"]
        .as_i64()
        .ok_or_else(|| CephError::new("osd crush rule dump", rule, -libc::EBADMSG))
}

async fn pool_set(
    conn: &Arc<Connection>,
    pool: &str,
    var: &str,
    val: &str,
) -> Result<(), CephError> {
    let mut cmd = json!({"prefix": "osd pool set", "pool": pool, "var": var, "val": val});
    if var == "size" && val == "1" {
        // The spec opted out of the safe size; Ceph still asks (and needs mon_allow_pool_size_one).
        cmd["yes_i_really_mean_it"] = json!(true);
    }
    mon_raw(conn, cmd).await.map(drop)
}

/// A pool property as text, or `None` when it was never set.
async fn pool_get(conn: &Arc<Connection>, pool: &str, var: &str) -> Option<String> {
    let v = mon_json(
        conn,
        json!({"prefix": "osd pool get", "pool": pool, "var": var, "format": "json"}),
    )
    .await
    .ok()?;
    match &v[var] {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Makes the pool match `want`; returns what was changed, in words, for the Event.
pub async fn ensure_pool(conn: &Arc<Connection>, want: &Desired) -> Result<Vec<String>, Problem> {
    let mut changed = Vec::new();
    let rule = want.rule();
    let mut cmd = json!({
        "prefix": "osd crush rule create-replicated",
        "name": rule,
        "root": "default",
        "type": want.failure_domain,
    });
    if let Some(class) = &want.device_class {
        cmd["class"] = json!(class);
    }
    // Idempotent in Ceph: an existing rule of this name is left as it is.
    mon_raw(conn, cmd)
        .await
        .map_err(|e| ceph_problem("CrushRuleFailed", &format!("CRUSH rule {rule}"), &e))?;
    let rule_id = rule_id(conn, &rule)
        .await
        .map_err(|e| ceph_problem("CrushRuleFailed", &format!("CRUSH rule {rule}"), &e))?;
    let pool = want.pool.as_str();
    let fail =
        |what: &str, e: CephError| ceph_problem("PoolFailed", &format!("pool {pool}: {what}"), &e);
    let mut detail = pool_detail(conn, pool).await.map_err(|e| fail("list", e))?;
    if detail.is_none() {
        mon_raw(
            conn,
            json!({"prefix": "osd pool create", "pool": pool, "pool_type": "replicated", "rule": rule}),
        )
        .await
        .map_err(|e| fail("create", e))?;
        changed.push(format!("created pool {pool}"));
        detail = pool_detail(conn, pool).await.map_err(|e| fail("list", e))?;
    }
    let detail = detail.ok_or_else(|| {
        fail(
            "create",
            CephError::new("osd pool create", pool, -libc::ENOENT),
        )
    })?;
    if detail["crush_rule"].as_i64() != Some(rule_id) {
        pool_set(conn, pool, "crush_rule", &rule)
            .await
            .map_err(|e| fail("set crush_rule", e))?;
        changed.push(format!("crush_rule {rule}"));
    }
    // size before min_size: Ceph refuses a min_size above the size.
    for (var, value) in [("size", want.size), ("min_size", want.min_size)] {
        if detail[var].as_u64() != Some(u64::from(value)) {
            pool_set(conn, pool, var, &value.to_string())
                .await
                .map_err(|e| fail(&format!("set {var} {value}"), e))?;
            changed.push(format!("{var} {value}"));
        }
    }
    for (var, value) in &want.parameters {
        if pool_get(conn, pool, var).await.as_deref() != Some(value.as_str()) {
            pool_set(conn, pool, var, value).await.map_err(|e| {
                ceph_problem(
                    "PoolParameterFailed",
                    &format!("pool {pool}: spec.parameters.{var} {value:?}"),
                    &e,
                )
            })?;
            changed.push(format!("{var} {value}"));
        }
    }
    if detail["application_metadata"].get("rbd").is_none() {
        // `rbd pool init`: enables the rbd application and checks the pool can hold images.
        let io = conn.ioctx(pool).map_err(|e| fail("open", e))?;
        blocking(move || io.pool_init())
            .await
            .map_err(|e| fail("rbd pool init", e))?;
        changed.push("rbd pool init".into());
    }
    Ok(changed)
}

async fn apply(pool: &CephBlockPool, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let key = format!("pool/{ns}/{}", pool.name_any());
    let want = match desired(pool) {
        Ok(w) => w,
        Err(p) => {
            write_status(pool, ctx, ns, Phase::Failure, &p, None).await?;
            // A spec error waits for a new spec.
            return Ok(Action::await_change());
        }
    };
    let observed = pool.status.as_ref().and_then(|s| s.observed_generation);
    if observed != pool.metadata.generation {
        let p = Problem {
            reason: "Progressing",
            message: format!("configuring pool {}", want.pool),
        };
        write_status(pool, ctx, ns, Phase::Progressing, &p, None).await?;
    }
    let conn = match cluster_connection(ctx, ns).await? {
        Ok(c) => c,
        Err(p) => {
            write_status(pool, ctx, ns, Phase::Failure, &p, None).await?;
            return Ok(Action::requeue(WAIT_FOR_CLUSTER));
        }
    };
    match ensure_pool(&conn, &want).await {
        Ok(changed) => {
            ctx.backoff.succeeded(&key);
            if !changed.is_empty() {
                let note = format!("pool {}: {}", want.pool, changed.join(", "));
                publish(ctx, pool, EventType::Normal, "PoolReconciled", &note).await;
            }
            let ok = Problem {
                reason: "PoolReady",
                message: format!("pool {} is ready", want.pool),
            };
            write_status(pool, ctx, ns, Phase::Ready, &ok, Some(&want)).await?;
            Ok(Action::requeue(RESYNC))
        }
        Err(p) => {
            write_status(pool, ctx, ns, Phase::Failure, &p, None).await?;
            Ok(Action::requeue(ctx.backoff.failed(&key)))
        }
    }
}

/// Deletes the pool unless it holds images; an error keeps the finalizer (kube's `finalizer`
/// removes it only when this returns `Ok`).
async fn cleanup(pool: &CephBlockPool, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let Some(name) = pool.pool_name().map(str::to_string) else {
        return Ok(Action::await_change());
    };
    let blocked = |p: Problem| async move {
        write_status(pool, ctx, ns, Phase::DeletionIsBlocked, &p, None).await?;
        Err(Error::DeletionBlocked(p.message))
    };
    let conn = match cluster_connection(ctx, ns).await? {
        Ok(c) => c,
        // No cluster left to hold the pool: nothing to delete, as Rook does.
        Err(p) if p.reason == "ClusterMissing" => return Ok(Action::await_change()),
        Err(p) => return blocked(p).await,
    };
    let fail = |what: &str, e: CephError| {
        ceph_problem("PoolDeleteFailed", &format!("pool {name}: {what}"), &e)
    };
    match pool_detail(&conn, &name).await {
        Ok(None) => return Ok(Action::await_change()),
        Ok(Some(_)) => {}
        Err(e) => return blocked(fail("list", e)).await,
    }
    // The trash counts too: a deleted volume waits there (the driver's trash deferment) and can
    // still be restored until it is purged; deleting the pool would take that chance away.
    let images = match conn.ioctx(&name) {
        Ok(io) => blocking(move || Ok((io.list_images()?.len(), io.trash_list()?.len()))).await,
        Err(e) => Err(e),
    };
    match images {
        Ok((live, trashed)) if live + trashed > 0 => {
            let p = Problem {
                reason: "PoolNotEmpty",
                message: format!(
                    "pool {name} holds {live} RBD image(s) and {trashed} in its trash; delete \
                     them (or their PVCs) first, and let the trash be purged"
                ),
            };
            publish(ctx, pool, EventType::Warning, p.reason, &p.message).await;
            return blocked(p).await;
        }
        Ok(_) => {}
        Err(e) => return blocked(fail("list images", e)).await,
    }
    let delete = json!({
        "prefix": "osd pool delete", "pool": name, "pool2": name,
        "yes_i_really_really_mean_it": true,
    });
    match mon_raw(&conn, delete).await {
        Ok(_) => {}
        Err(e) if e.permission_denied() => {
            let p = Problem {
                reason: "PoolDeleteDisallowed",
                message: format!(
                    "pool {name}: the cluster refuses pool deletion (mon_allow_pool_delete is \
                     false); rook-rbd does not change it on an external cluster: set it, or \
                     remove the finalizer to keep the pool ({e})"
                ),
            };
            return blocked(p).await;
        }
        Err(e) => return blocked(fail("delete", e)).await,
    }
    if let Ok(want) = desired(pool) {
        // Still used by another pool: Ceph says EBUSY and keeps it, which is right.
        let _ = mon_raw(
            &conn,
            json!({"prefix": "osd crush rule rm", "name": want.rule()}),
        )
        .await;
    }
    publish(
        ctx,
        pool,
        EventType::Normal,
        "PoolDeleted",
        &format!("pool {name} deleted"),
    )
    .await;
    Ok(Action::await_change())
}

async fn write_status(
    pool: &CephBlockPool,
    ctx: &Context,
    ns: &str,
    phase: Phase,
    what: &Problem,
    ready: Option<&Desired>,
) -> Result<(), kube::Error> {
    let gen = pool.metadata.generation;
    let mut conditions = match phase {
        Phase::Ready => vec![condition(
            "Ready",
            ConditionStatus::True,
            what.reason,
            &what.message,
            gen,
        )],
        Phase::Progressing => vec![condition(
            "Ready",
            ConditionStatus::False,
            what.reason,
            &what.message,
            gen,
        )],
        Phase::DeletionIsBlocked => vec![condition(
            "DeletionIsBlocked",
            ConditionStatus::True,
            what.reason,
            &what.message,
            gen,
        )],
        _ => vec![
            condition(
                "Ready",
                ConditionStatus::False,
                what.reason,
                &what.message,
                gen,
            ),
            condition(
                "Failure",
                ConditionStatus::True,
                what.reason,
                &what.message,
                gen,
            ),
        ],
    };
    let mut fields = Condition::fields_not_implemented(&pool.not_implemented(), gen, now());
    fields.last_heartbeat_time = None;
    conditions.push(fields);
    let current = pool.status.clone().unwrap_or_default();
    carry_transition_times(&current.conditions, &mut conditions);
    let unchanged = current.phase == Some(phase)
        && current.conditions == conditions
        && current.observed_generation == gen;
    if unchanged {
        return Ok(());
    }
    if current.phase != Some(phase) || current.conditions.first() != conditions.first() {
        let type_ = match phase {
            Phase::Ready | Phase::Progressing => EventType::Normal,
            _ => EventType::Warning,
        };
        let note = format!("{phase:?}: {}", what.message);
        publish(ctx, pool, type_, what.reason, &note).await;
    }
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "observedGeneration": gen,
    });
    if let Some(want) = ready {
        status["info"] = json!({"type": "Replicated", "failureDomain": want.failure_domain});
    }
    merge_status(ctx, pool, ns, status).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::pool::ReplicatedSpec;
    use std::collections::BTreeMap;

    fn pool(size: u32, safe: Option<bool>) -> CephBlockPool {
        let mut p = CephBlockPool::new("replicapool", Default::default());
        p.spec.replicated = Some(ReplicatedSpec {
            size,
            require_safe_replica_size: safe,
            ..Default::default()
        });
        p
    }

    #[test]
    fn size_one_is_refused_unless_the_spec_opts_out() {
        let refused = desired(&pool(1, None)).unwrap_err();
        assert_eq!(refused.reason, "UnsafeReplicaSize");
        assert!(refused.message.contains("requireSafeReplicaSize: false"));
        assert!(desired(&pool(1, Some(true))).is_err());
        assert_eq!(desired(&pool(1, Some(false))).unwrap().size, 1);
    }

    #[test]
    fn min_size_is_cephs_default_unless_a_parameter_sets_it() {
        assert_eq!(desired(&pool(3, None)).unwrap().min_size, 2);
        assert_eq!(desired(&pool(2, None)).unwrap().min_size, 1);
        let mut p = pool(3, None);
        p.spec.parameters = Some(BTreeMap::from([
            ("min_size".to_string(), "1".to_string()),
            ("compression_mode".to_string(), "none".to_string()),
        ]));
        let d = desired(&p).unwrap();
        assert_eq!(d.min_size, 1);
        assert_eq!(
            d.parameters,
            [("compression_mode".to_string(), "none".to_string())]
        );
        p.spec.parameters = Some(BTreeMap::from([("min_size".to_string(), "4".to_string())]));
        assert_eq!(desired(&p).unwrap_err().reason, "InvalidSpec");
    }

    #[test]
    fn the_rule_name_says_failure_domain_and_device_class() {
        let mut p = pool(3, None);
        assert_eq!(desired(&p).unwrap().rule(), "replicapool_host");
        p.spec.failure_domain = Some("osd".into());
        p.spec.device_class = Some("ssd".into());
        assert_eq!(desired(&p).unwrap().rule(), "replicapool_osd_ssd");
    }
}
