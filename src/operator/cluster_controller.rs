//! The CephCluster reconciler (Rook's clusterController), first step: the cluster identity and
//! the artefacts Rook's users and tools read it from. Every child carries the CephCluster as its
//! controller owner and is written by server-side apply; the identity itself is created at most
//! once, and never minted again for a cluster that had one.

use super::crd::status::{Condition, ConditionStatus, Phase};
use super::crd::CephCluster;
use super::endpoints::MonEndpoints;
use super::identity::{ClusterIdentity, IdentityError};
use crate::ceph::ConnectionPool;
use crate::secret::Secret as SecretValue;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Rook's finalizer name, so a CephCluster moves between Rook and rook-rbd without a stuck one.
pub const FINALIZER: &str = "cephcluster.ceph.rook.io";
pub const FIELD_MANAGER: &str = "rook-rbd-operator";
/// On every child, and the selector the controller watches children with.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "rook-rbd");

/// The children's names, as Rook names them.
pub mod names {
    pub const MON_SECRET: &str = "rook-ceph-mon";
    pub const MON_ENDPOINTS: &str = "rook-ceph-mon-endpoints";
    pub const CONFIG_SECRET: &str = "rook-ceph-config";
    pub const ADMIN_KEYRING: &str = "rook-ceph-admin-keyring";
}

/// Periodic resync when nothing changes.
const RESYNC: Duration = Duration::from_secs(300);
/// A blocked cluster is looked at again this often (a fixed Secret does not wake the controller
/// unless it carries our label).
const BLOCKED_RETRY: Duration = Duration::from_secs(30);

pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    /// Connections to external clusters, shared by both controllers.
    pub ceph: Arc<ConnectionPool>,
    pub backoff: Backoff,
}

/// Exponential retry delays per object (`namespace/name`), reset by a success.
#[derive(Default)]
pub struct Backoff(Mutex<HashMap<String, u32>>);

impl Backoff {
    const FIRST: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(300);

    /// The delay before the next attempt after a failure (5 s, 10 s, ... up to 5 min).
    pub fn failed(&self, key: &str) -> Duration {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(key.to_string()).or_insert(0);
        let delay = Self::FIRST.saturating_mul(1 << (*n).min(6)).min(Self::MAX);
        *n = n.saturating_add(1);
        delay
    }

    pub fn succeeded(&self, key: &str) {
        self.0.lock().unwrap().remove(key);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the CephCluster has no namespace")]
    NoNamespace,
    #[error("cluster identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("Secret rook-ceph-mon was created and deleted again while it was being read")]
    IdentityRace,
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// Why the reconciler stopped before the next step; shown as phase Failure with this reason.
struct Blocked {
    reason: &'static str,
    message: String,
}

pub async fn reconcile(cluster: Arc<CephCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cluster.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<CephCluster> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, cluster, |event| async {
        match event {
            FinalizerEvent::Apply(c) => apply(&c, &ctx, &ns).await,
            FinalizerEvent::Cleanup(c) => cleanup(&c, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Requeue after an error; the error is logged by the caller's stream. Kept short: every
/// error here is a failed API call, which the next attempt may well not see.
pub fn error_policy(_cluster: Arc<CephCluster>, _error: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(10))
}

async fn apply(cluster: &CephCluster, ctx: &Context, ns: &str) -> Result<Action, Error> {
    if cluster.spec.is_external() {
        return Ok(super::external::reconcile(cluster, ctx, ns).await?);
    }
    let ready = match ensure_identity(cluster, ctx, ns).await? {
        Ok(id) => current_endpoints(ctx, ns).await?.map(|e| (id, e)),
        Err(blocked) => Err(blocked),
    };
    let (identity, endpoints) = match ready {
        Ok(ready) => ready,
        Err(b) => {
            publish(ctx, cluster, EventType::Warning, b.reason, &b.message).await;
            write_status(cluster, ctx, ns, Err(&b)).await?;
            return Ok(Action::requeue(BLOCKED_RETRY));
        }
    };
    apply_children(cluster, ctx, ns, &identity, &endpoints).await?;
    write_status(cluster, ctx, ns, Ok(&identity)).await?;
    Ok(Action::requeue(RESYNC))
}

/// The identity in Secret `rook-ceph-mon`, created (with its owner) when the cluster never had
/// one. `Ok(Err(_))` when the cluster must not go on: the Secret is unreadable, or it is gone
/// although the status shows the cluster had an fsid (minting again would make a second
/// cluster over the first one's data).
async fn ensure_identity(
    cluster: &CephCluster,
    ctx: &Context,
    ns: &str,
) -> Result<Result<ClusterIdentity, Blocked>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    // Twice at most: a create that loses a race to another writer reads the winner's identity.
    for _ in 0..2 {
        if let Some(s) = secrets.get_opt(names::MON_SECRET).await? {
            let data = s.data.unwrap_or_default();
            return Ok(
                ClusterIdentity::from_secret_data(&data).map_err(|e| Blocked {
                    reason: "IdentityInvalid",
                    message: format!(
                        "Secret {} {e}; rook-rbd never replaces a cluster's identity: repair the \
                     Secret, or delete the CephCluster to start a new cluster",
                        names::MON_SECRET
                    ),
                }),
            );
        }
        if let Some(fsid) = recorded_fsid(cluster) {
            return Ok(Err(Blocked {
                reason: "IdentityLost",
                message: format!(
                    "Secret {} of cluster {fsid} is gone; rook-rbd will not mint a second \
                     identity for this cluster: restore the Secret from a backup",
                    names::MON_SECRET
                ),
            }));
        }
        let minted = ClusterIdentity::mint()?;
        let secret = rook_secret(cluster, names::MON_SECRET, minted.to_secret_data(ns));
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match secrets.create(&pp, &secret).await {
            Ok(_) => {
                let note = format!("new cluster identity, fsid {}", minted.fsid);
                tracing::info!(cluster = %cluster.name_any(), namespace = ns, fsid = %minted.fsid, "minted the cluster identity");
                publish(ctx, cluster, EventType::Normal, "IdentityCreated", &note).await;
                return Ok(Ok(minted));
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::IdentityRace)
}

fn recorded_fsid(cluster: &CephCluster) -> Option<&str> {
    cluster
        .status
        .as_ref()?
        .ceph
        .as_ref()?
        .fsid
        .as_deref()
        .filter(|f| !f.is_empty())
}

/// What ConfigMap `rook-ceph-mon-endpoints` says now (the mon steps change it), or a cluster
/// without mons when there is none.
async fn current_endpoints(
    ctx: &Context,
    ns: &str,
) -> Result<Result<MonEndpoints, Blocked>, Error> {
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let Some(cm) = maps.get_opt(names::MON_ENDPOINTS).await? else {
        return Ok(Ok(MonEndpoints::default()));
    };
    Ok(
        MonEndpoints::from_config_map(&cm.data.unwrap_or_default()).map_err(|e| Blocked {
            reason: "MonEndpointsInvalid",
            message: format!("ConfigMap {}: {e}", names::MON_ENDPOINTS),
        }),
    )
}

fn child_meta(cluster: &CephCluster, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: cluster.namespace(),
        labels: Some(BTreeMap::from([
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (
                "rook_cluster".to_string(),
                cluster.namespace().unwrap_or_default(),
            ),
        ])),
        // blockOwnerDeletion, as Rook sets it: a foreground delete of the cluster waits for them.
        owner_references: cluster.controller_owner_ref(&()).map(|o| {
            vec![OwnerReference {
                block_owner_deletion: Some(true),
                ..o
            }]
        }),
        ..Default::default()
    }
}

fn bytes(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

fn rook_secret(cluster: &CephCluster, name: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: child_meta(cluster, name),
        data: Some(data),
        type_: Some("kubernetes.io/rook".into()),
        ..Default::default()
    }
}

/// The children derived from the identity and the mons, as this cluster's state renders them.
/// Not Secret `rook-ceph-mon`: it is created once and never written again, so a reconcile that
/// read it just before someone deleted it cannot bring it back and hide the loss.
fn render_children(
    cluster: &CephCluster,
    identity: &ClusterIdentity,
    endpoints: &MonEndpoints,
) -> (Vec<Secret>, ConfigMap) {
    let secret = |name: &str, data| rook_secret(cluster, name, data);
    let keyring: SecretValue = identity.admin_keyring();
    let secrets = vec![
        secret(
            names::CONFIG_SECRET,
            bytes(&[
                ("mon_host", &endpoints.mon_host()),
                ("mon_initial_members", &endpoints.initial_members()),
            ]),
        ),
        secret(
            names::ADMIN_KEYRING,
            bytes(&[("keyring", keyring.expose())]),
        ),
    ];
    let config_map = ConfigMap {
        metadata: child_meta(cluster, names::MON_ENDPOINTS),
        data: Some(endpoints.to_config_map()),
        ..Default::default()
    };
    (secrets, config_map)
}

async fn apply_children(
    cluster: &CephCluster,
    ctx: &Context,
    ns: &str,
    identity: &ClusterIdentity,
    endpoints: &MonEndpoints,
) -> Result<(), Error> {
    let (secrets, config_map) = render_children(cluster, identity, endpoints);
    // force: these objects are the operator's; a field another manager set is taken back.
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let secret_api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    for s in &secrets {
        secret_api
            .patch(&s.name_any(), &pp, &Patch::Apply(s))
            .await?;
    }
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    cm_api
        .patch(&config_map.name_any(), &pp, &Patch::Apply(&config_map))
        .await?;
    Ok(())
}

pub(super) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// `new`, with each condition's `lastTransitionTime` taken from `old` when its status did not
/// change, so an unchanged cluster renders an unchanged status (and no write, no watch event).
pub(super) fn carry_transition_times(old: &[Condition], new: &mut [Condition]) {
    for c in new {
        if let Some(o) = old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time.clone_from(&o.last_transition_time);
        }
    }
}

pub(super) fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    gen: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: gen,
        last_heartbeat_time: None,
        last_transition_time: Some(now()),
    }
}

/// The status after this step: Progressing to the mons, or Failure with what blocks.
fn desired_status(
    cluster: &CephCluster,
    outcome: Result<&ClusterIdentity, &Blocked>,
) -> (Phase, String, Vec<Condition>, Option<String>) {
    let gen = cluster.metadata.generation;
    let mut conditions = match outcome {
        Ok(_) => {
            let msg = "cluster identity ready; next: mon a (rook-rbd does not start mons yet)";
            vec![condition(
                "Progressing",
                ConditionStatus::True,
                "IdentityReady",
                msg,
                gen,
            )]
        }
        Err(b) => vec![
            condition(
                "Progressing",
                ConditionStatus::False,
                b.reason,
                &b.message,
                gen,
            ),
            condition("Failure", ConditionStatus::True, b.reason, &b.message, gen),
        ],
    };
    let mut unimplemented =
        Condition::fields_not_implemented(&cluster.not_implemented(), gen, now());
    unimplemented.last_heartbeat_time = None;
    conditions.push(unimplemented);
    let old = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    carry_transition_times(old, &mut conditions);
    match outcome {
        Ok(id) => (
            Phase::Progressing,
            conditions[0].message.clone(),
            conditions,
            Some(id.fsid.to_string()),
        ),
        Err(b) => (Phase::Failure, b.message.clone(), conditions, None),
    }
}

async fn write_status(
    cluster: &CephCluster,
    ctx: &Context,
    ns: &str,
    outcome: Result<&ClusterIdentity, &Blocked>,
) -> Result<(), Error> {
    let (phase, message, conditions, fsid) = desired_status(cluster, outcome);
    let current = cluster.status.clone().unwrap_or_default();
    let current_fsid = current.ceph.as_ref().and_then(|c| c.fsid.clone());
    let unchanged = current.phase == Some(phase)
        && current.message.as_deref() == Some(message.as_str())
        && current.conditions == conditions
        && current.observed_generation == cluster.metadata.generation
        && (fsid.is_none() || current_fsid == fsid);
    if unchanged {
        return Ok(());
    }
    if current.phase != Some(phase) {
        let note = format!("{phase:?}: {message}");
        publish(ctx, cluster, EventType::Normal, "PhaseChanged", &note).await;
    }
    let mut status = json!({
        "phase": phase,
        "message": message,
        "conditions": conditions,
        "observedGeneration": cluster.metadata.generation,
    });
    // A blocked cluster keeps the fsid it had: that is what tells a lost identity from none.
    if let Some(fsid) = fsid {
        status["ceph"] = json!({ "fsid": fsid });
    }
    Ok(merge_status(ctx, cluster, ns, status).await?)
}

/// Merges `status` into the object's status subresource.
pub(super) async fn merge_status<K>(
    ctx: &Context,
    obj: &K,
    ns: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Deletion: the children go with their owner (the garbage collector follows the owner
/// references). Wiping `dataDirHostPath` and disks under `cleanupPolicy` comes with the daemons.
async fn cleanup(cluster: &CephCluster, ctx: &Context) -> Result<Action, Error> {
    let note = "CephCluster deleted; its Secrets and ConfigMaps go with it";
    publish(ctx, cluster, EventType::Normal, "Deleting", note).await;
    Ok(Action::await_change())
}

/// An Event on the CephCluster. A failure to publish is logged, never fatal: events inform,
/// the status is the record.
pub(super) async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    cluster: &K,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        tracing::warn!(cluster = %cluster.name_any(), reason, error = %e, "publishing an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::CephClusterStatus;

    fn cluster() -> CephCluster {
        let mut c = CephCluster::new("c", Default::default());
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("uid-1".into());
        c.metadata.generation = Some(3);
        c
    }

    #[test]
    fn every_child_is_owned_by_the_cluster_as_its_controller_and_labelled() {
        // (The identity Secret is made in ensure_identity and is not among the applied children.)
        let c = cluster();
        let id = ClusterIdentity::mint().unwrap();
        let (secrets, cm) = render_children(&c, &id, &MonEndpoints::default());
        let identity = rook_secret(&c, names::MON_SECRET, id.to_secret_data("ns"));
        let mut metas: Vec<&ObjectMeta> = vec![&identity.metadata];
        metas.extend(secrets.iter().map(|s| &s.metadata));
        metas.push(&cm.metadata);
        let names: Vec<_> = metas.iter().map(|m| m.name.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "rook-ceph-mon",
                "rook-ceph-config",
                "rook-ceph-admin-keyring",
                "rook-ceph-mon-endpoints"
            ]
        );
        for m in metas {
            let o = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!((o.kind.as_str(), o.uid.as_str()), ("CephCluster", "uid-1"));
            assert_eq!(
                (o.controller, o.block_owner_deletion),
                (Some(true), Some(true))
            );
            assert_eq!(
                m.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
                "rook-rbd"
            );
        }
    }

    #[test]
    fn an_unchanged_cluster_renders_an_unchanged_status() {
        let mut c = cluster();
        let id = ClusterIdentity::mint().unwrap();
        let (phase, message, conditions, _) = desired_status(&c, Ok(&id));
        c.status = Some(CephClusterStatus {
            phase: Some(phase),
            message: Some(message),
            conditions: conditions.clone(),
            ..Default::default()
        });
        std::thread::sleep(Duration::from_millis(2));
        let (_, _, again, _) = desired_status(&c, Ok(&id));
        assert_eq!(again, conditions);
        // A new generation is a new observation, but not a transition.
        c.metadata.generation = Some(4);
        let (_, _, next, _) = desired_status(&c, Ok(&id));
        assert_eq!(next[0].observed_generation, Some(4));
        assert_eq!(
            next[0].last_transition_time,
            conditions[0].last_transition_time
        );
    }

    #[test]
    fn a_blocked_cluster_is_a_failure_that_says_why() {
        let c = cluster();
        let b = Blocked {
            reason: "IdentityLost",
            message: "gone".into(),
        };
        let (phase, message, conditions, fsid) = desired_status(&c, Err(&b));
        assert_eq!(phase, Phase::Failure);
        assert_eq!(message, "gone");
        assert_eq!(fsid, None);
        let failure = conditions.iter().find(|c| c.type_ == "Failure").unwrap();
        assert_eq!(
            (failure.status, failure.reason.as_str()),
            (ConditionStatus::True, "IdentityLost")
        );
        assert_eq!(failure.observed_generation, Some(3));
    }
}
