//! The operator's first reconcile step against a real kube-apiserver + etcd, with the real
//! `rook-rbd operator` process: the cluster identity is minted once and survives a second
//! reconcile and a killed operator; Rook's Secrets and ConfigMap are written with owner
//! references; status, conditions and Events are written; deleting the CephCluster releases the
//! finalizer and the garbage collector takes the children. Each test has its own namespace and
//! its own operator watching only that namespace.

mod apiserver;

use apiserver::operator::{eventually, Operator};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rook_rbd::operator::crd::{self, CephCluster, ConditionStatus, Phase};
use rook_rbd::operator::identity::{is_cephx_key, ClusterIdentity};
use serde_json::json;
use std::time::Duration;

const CHILDREN: [&str; 3] = [
    "rook-ceph-mon",
    "rook-ceph-config",
    "rook-ceph-admin-keyring",
];
const CONFIG_MAP: &str = "rook-ceph-mon-endpoints";

async fn setup(namespace: &str) -> Option<(&'static apiserver::ApiServer, Client)> {
    let server = apiserver::shared()?;
    let client = server.client().await;
    apiserver::install_crds(&client, &crd::crds()).await;
    apiserver::namespace(&client, namespace).await;
    Some((server, client))
}

/// A CephCluster `c` in `ns` with an operator that has reconciled it once.
async fn cluster_with_operator(
    ns: &str,
) -> Option<(&'static apiserver::ApiServer, Client, Operator, CephCluster)> {
    let (server, client) = setup(ns).await?;
    create_cluster(&client, ns, "c").await;
    let operator = Operator::start(server, ns);
    let cluster = observed(&client, ns, "c", 1).await;
    Some((server, client, operator, cluster))
}

async fn create_cluster(client: &Client, ns: &str, name: &str) -> CephCluster {
    let api: Api<CephCluster> = Api::namespaced(client.clone(), ns);
    let mut c = CephCluster::new(name, Default::default());
    c.spec.data_dir_host_path = Some("/var/lib/rook".into());
    c.spec.mon = Some(crd::cluster::MonSpec {
        count: Some(1),
        ..Default::default()
    });
    api.create(&PostParams::default(), &c).await.unwrap()
}

/// The cluster once the operator has written the status of generation `generation`.
async fn observed(client: &Client, ns: &str, name: &str, generation: i64) -> CephCluster {
    let api: Api<CephCluster> = Api::namespaced(client.clone(), ns);
    eventually(&format!("status of generation {generation}"), || {
        let api = api.clone();
        async move {
            let c = api.get(name).await.ok()?;
            let status = c.status.as_ref()?;
            (status.observed_generation == Some(generation) && status.ceph.as_ref()?.fsid.is_some())
                .then_some(c)
        }
    })
    .await
}

fn fsid(c: &CephCluster) -> String {
    c.status
        .as_ref()
        .unwrap()
        .ceph
        .as_ref()
        .unwrap()
        .fsid
        .clone()
        .unwrap()
}

async fn identity(client: &Client, ns: &str) -> (ClusterIdentity, String) {
    let s: Secret = Api::namespaced(client.clone(), ns)
        .get("rook-ceph-mon")
        .await
        .unwrap();
    let rv = s.resource_version().unwrap();
    (
        ClusterIdentity::from_secret_data(&s.data.unwrap()).unwrap(),
        rv,
    )
}

/// A spec change, so the operator reconciles again with a new generation to observe.
async fn bump_generation(client: &Client, ns: &str, name: &str, mon_count: u32) {
    let api: Api<CephCluster> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"mon": {"count": mon_count}}})),
    )
    .await
    .unwrap();
}

fn assert_no_secret_in(log: &str, id: &ClusterIdentity) {
    for key in [&id.mon_key, &id.admin_key] {
        assert!(
            !log.contains(key.expose()),
            "a cephx key is in the operator's log"
        );
    }
}

#[tokio::test]
async fn rooks_cluster_gets_its_identity_once_and_a_second_reconcile_keeps_it() {
    let ns = "rook-ceph";
    let Some((server, client)) = setup(ns).await else {
        return;
    };
    // Rook's own manifest, as a Rook user applies it.
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rook-v1.18/cluster-test.yaml"
    ))
    .unwrap();
    let cluster: CephCluster = serde_saphyr::from_multiple::<serde_json::Value>(&manifest)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "CephCluster")
        .map(|d| serde_json::from_value(d).unwrap())
        .unwrap();
    Api::<CephCluster>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cluster)
        .await
        .unwrap();
    let operator = Operator::start(server, ns);

    let first = observed(&client, ns, "my-cluster", 1).await;
    let status = first.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(Phase::Progressing));
    assert!(first
        .finalizers()
        .contains(&"cephcluster.ceph.rook.io".to_string()));
    let (id, rv) = identity(&client, ns).await;
    assert_eq!(fsid(&first), id.fsid.to_string());
    assert!(is_cephx_key(id.mon_key.expose()) && is_cephx_key(id.admin_key.expose()));
    assert_ne!(id.mon_key, id.admin_key);

    // Each condition says which generation it is about; Rook's fields rook-rbd ignores are named.
    for c in &status.conditions {
        assert_eq!(c.observed_generation, Some(1), "{c:?}");
    }
    let progressing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(progressing.status, ConditionStatus::True);
    let fields = status
        .conditions
        .iter()
        .find(|c| c.type_ == "FieldsNotImplemented")
        .unwrap();
    assert_eq!(fields.status, ConditionStatus::True);
    assert!(
        fields.message.contains("spec.dashboard.enabled"),
        "{}",
        fields.message
    );

    // Rook's artefacts, in Rook's format.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let keyring = secrets.get("rook-ceph-admin-keyring").await.unwrap();
    let keyring = String::from_utf8(keyring.data.unwrap()["keyring"].0.clone()).unwrap();
    assert!(keyring.starts_with("[client.admin]\n"), "keyring header");
    assert!(keyring.contains(&format!("key = {}", id.admin_key.expose())));
    let config = secrets.get("rook-ceph-config").await.unwrap().data.unwrap();
    assert!(config.contains_key("mon_host") && config.contains_key("mon_initial_members"));
    let cm: ConfigMap = Api::namespaced(client.clone(), ns)
        .get(CONFIG_MAP)
        .await
        .unwrap();
    let data = cm.data.unwrap();
    assert_eq!(data["maxMonId"], "-1");
    assert_eq!(data["mapping"], r#"{"node":{}}"#);
    assert_eq!(data["data"], "");

    // One Event says a new identity was made.
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let created = eventually("an IdentityCreated event", || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            let found: Vec<Event> = list
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("IdentityCreated"))
                .collect();
            (!found.is_empty()).then_some(found)
        }
    })
    .await;
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].regarding.as_ref().unwrap().name.as_deref(),
        Some("my-cluster")
    );
    assert!(created[0]
        .note
        .as_ref()
        .unwrap()
        .contains(&id.fsid.to_string()));

    // A second reconcile (a new generation) keeps the identity, and does not even rewrite it.
    bump_generation(&client, ns, "my-cluster", 3).await;
    let second = observed(&client, ns, "my-cluster", 2).await;
    assert_eq!(fsid(&second), id.fsid.to_string());
    let (again, rv_again) = identity(&client, ns).await;
    assert_eq!(again, id);
    assert_eq!(rv_again, rv, "Secret rook-ceph-mon was rewritten");
    let progressing = second
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(progressing.observed_generation, Some(2));

    assert_no_secret_in(&operator.log_text(), &id);
}

#[tokio::test]
async fn an_operator_killed_and_restarted_keeps_the_clusters_fsid() {
    let ns = "restart";
    let Some((server, client, operator, before)) = cluster_with_operator(ns).await else {
        return;
    };
    let (id, rv) = identity(&client, ns).await;
    let log = operator.kill();
    assert!(log.contains("minted the cluster identity"), "{log}");

    let operator = Operator::start(server, ns);
    bump_generation(&client, ns, "c", 3).await;
    let after = observed(&client, ns, "c", 2).await;
    assert_eq!(fsid(&after), fsid(&before));
    let (again, rv_again) = identity(&client, ns).await;
    assert_eq!(again, id);
    assert_eq!(rv_again, rv);
    let log2 = operator.kill();
    assert!(!log2.contains("minted the cluster identity"), "{log2}");
    assert_no_secret_in(&(log + &log2), &id);
}

#[tokio::test]
async fn a_lost_identity_secret_is_reported_and_never_minted_again() {
    let ns = "lost";
    let Some((_, client, _operator, before)) = cluster_with_operator(ns).await else {
        return;
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .delete("rook-ceph-mon", &DeleteParams::default())
        .await
        .unwrap();

    let api: Api<CephCluster> = Api::namespaced(client.clone(), ns);
    let failed = eventually("phase Failure", || {
        let api = api.clone();
        async move {
            let c = api.get("c").await.ok()?;
            (c.status.as_ref()?.phase == Some(Phase::Failure)).then_some(c)
        }
    })
    .await;
    let status = failed.status.unwrap();
    let failure = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failure")
        .unwrap();
    assert_eq!(failure.reason, "IdentityLost");
    assert!(status.message.unwrap().contains(&fsid(&before)));
    // The fsid stays on record, and no new identity appears.
    assert_eq!(status.ceph.unwrap().fsid, Some(fsid(&before)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(secrets.get_opt("rook-ceph-mon").await.unwrap().is_none());
}

#[tokio::test]
async fn deleting_the_cluster_waits_for_the_operator_then_releases_the_finalizer_and_its_children_go_with_it(
) {
    let ns = "delete";
    let Some((server, client, operator, created)) = cluster_with_operator(ns).await else {
        return;
    };
    server.start_garbage_collector();

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut owners = Vec::new();
    for name in CHILDREN {
        owners.push((
            name,
            secrets.get(name).await.unwrap().metadata.owner_references,
        ));
    }
    owners.push((
        CONFIG_MAP,
        maps.get(CONFIG_MAP)
            .await
            .unwrap()
            .metadata
            .owner_references,
    ));
    for (name, refs) in owners {
        let refs = refs.unwrap_or_default();
        assert_eq!(refs.len(), 1, "{name}: {refs:?}");
        let o = &refs[0];
        assert_eq!(
            (o.kind.as_str(), o.name.as_str(), Some(o.uid.as_str())),
            ("CephCluster", "c", created.metadata.uid.as_deref()),
            "{name}"
        );
        assert_eq!(
            (o.controller, o.block_owner_deletion),
            (Some(true), Some(true)),
            "{name}"
        );
    }

    // With no operator running, the finalizer holds the cluster (and so its children).
    operator.kill();
    let api: Api<CephCluster> = Api::namespaced(client.clone(), ns);
    api.delete("c", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = api.get("c").await.expect("held by its finalizer");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(secrets.get_opt("rook-ceph-mon").await.unwrap().is_some());

    let _operator = Operator::start(server, ns);
    eventually("the CephCluster is gone (finalizer released)", || {
        let api = api.clone();
        async move { api.get_opt("c").await.unwrap().is_none().then_some(()) }
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let list = events.list(&ListParams::default()).await.unwrap();
    assert!(list
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("Deleting")));
    eventually("the garbage collector removes every child", || {
        let (secrets, maps) = (secrets.clone(), maps.clone());
        async move {
            for name in CHILDREN {
                if secrets.get_opt(name).await.unwrap().is_some() {
                    return None;
                }
            }
            maps.get_opt(CONFIG_MAP)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
}
