//! The operator on an external Ceph cluster: the real dev cluster (ROOK_RBD_TEST_CEPH_DIR) imported
//! as Rook's import script does it (Secret `rook-ceph-mon`, ConfigMap `rook-ceph-mon-endpoints`),
//! a real kube-apiserver + etcd, and the real `rook-rbd operator` process per namespace. What
//! each test asserts about Ceph is read back with the `ceph` and `rbd` CLIs.

mod apiserver;
mod common;

use apiserver::operator::{eventually, Operator};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use rook_rbd::operator::crd::{self, CephBlockPool, CephCluster, ConditionStatus, Phase};
use serde_json::json;
use std::collections::BTreeMap;

struct Env {
    ceph: common::Cluster,
    client: Client,
    operator: Operator,
    ns: String,
}

fn mon_address(c: &common::Cluster) -> String {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("cluster-config.json")).unwrap())
            .unwrap();
    cfg[0]["monitors"][0].as_str().unwrap().to_string()
}

fn bytes(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// The dev cluster imported into `ns` with `admin_key`, an external CephCluster `ext`, and an
/// operator; `None` (with a note) when the dev cluster or the apiserver is not available.
async fn external_cluster(ns: &str, admin_key: Option<&str>) -> Option<Env> {
    let ceph = common::cluster()?;
    let server = apiserver::shared()?;
    let client = server.client().await;
    apiserver::install_crds(&client, &crd::crds()).await;
    apiserver::namespace(&client, ns).await;
    let key = admin_key.unwrap_or(&ceph.key).to_string();
    let mut secret = Secret::default();
    secret.metadata.name = Some("rook-ceph-mon".into());
    secret.data = Some(bytes(&[("fsid", &ceph.fsid), ("admin-secret", &key)]));
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("rook-ceph-mon-endpoints".into());
    cm.data = Some(BTreeMap::from([(
        "data".to_string(),
        format!("a={}", mon_address(&ceph)),
    )]));
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let cluster: CephCluster = serde_json::from_value(json!({
        "apiVersion": "ceph.rook.io/v1", "kind": "CephCluster",
        "metadata": {"name": "ext"},
        "spec": {"external": {"enable": true}},
    }))
    .unwrap();
    Api::<CephCluster>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cluster)
        .await
        .unwrap();
    let operator = Operator::start(server, ns);
    Some(Env {
        ceph,
        client,
        operator,
        ns: ns.to_string(),
    })
}

impl Env {
    fn pools(&self) -> Api<CephBlockPool> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create_pool(&self, name: &str, spec: serde_json::Value) {
        let pool: CephBlockPool = serde_json::from_value(json!({
            "apiVersion": "ceph.rook.io/v1", "kind": "CephBlockPool",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        self.pools()
            .create(&PostParams::default(), &pool)
            .await
            .unwrap();
    }

    /// The pool once its status says `phase` for its current generation.
    async fn pool_in(&self, name: &str, phase: Phase) -> CephBlockPool {
        let api = self.pools();
        eventually(&format!("pool {name} in phase {phase:?}"), || {
            let api = api.clone();
            async move {
                let p = api.get(name).await.ok()?;
                let s = p.status.as_ref()?;
                (s.phase == Some(phase) && s.observed_generation == p.metadata.generation)
                    .then_some(p)
            }
        })
        .await
    }

    fn ceph_pools(&self) -> Vec<String> {
        self.ceph
            .ceph(&["osd", "pool", "ls"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn pool_get(&self, pool: &str, var: &str) -> String {
        let out = self.ceph.ceph(&["osd", "pool", "get", pool, var]);
        // `size: 2`
        out.split_once(':').unwrap().1.trim().to_string()
    }

    async fn delete_pool_and_wait(&self, name: &str) {
        self.pools()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        let api = self.pools();
        eventually(&format!("CephBlockPool {name} gone"), || {
            let api = api.clone();
            async move { api.get_opt(name).await.unwrap().is_none().then_some(()) }
        })
        .await;
    }
}

fn condition<'a>(p: &'a CephBlockPool, type_: &str) -> &'a crd::Condition {
    p.status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", p.status))
}

#[tokio::test]
async fn a_pool_is_created_with_its_size_rule_and_application_a_parameter_change_is_applied_and_deletion_waits_for_its_images(
) {
    let Some(env) = external_cluster("pool-ready", None).await else {
        return;
    };
    let clusters: Api<CephCluster> = Api::namespaced(env.client.clone(), &env.ns);
    let connected = eventually("the external cluster Connected", || {
        let clusters = clusters.clone();
        async move {
            let c = clusters.get("ext").await.ok()?;
            (c.status.as_ref()?.phase == Some(Phase::Connected)).then_some(c)
        }
    })
    .await;
    let ceph_status = connected.status.unwrap().ceph.unwrap();
    assert_eq!(ceph_status.fsid.as_deref(), Some(env.ceph.fsid.as_str()));
    assert!(ceph_status.health.unwrap().starts_with("HEALTH_"));
    assert!(ceph_status.last_checked.is_some());

    let name = common::unique("opool");
    env.create_pool(
        &name,
        json!({
            "failureDomain": "osd",
            "replicated": {"size": 2},
            "parameters": {"compression_mode": "passive"},
        }),
    )
    .await;
    let ready = env.pool_in(&name, Phase::Ready).await;
    let info = &ready.status.as_ref().unwrap().info;
    assert_eq!(info["type"], "Replicated");
    assert_eq!(info["failureDomain"], "osd");
    assert_eq!(condition(&ready, "Ready").status, ConditionStatus::True);
    assert!(env.ceph_pools().contains(&name));
    assert_eq!(env.pool_get(&name, "size"), "2");
    assert_eq!(env.pool_get(&name, "min_size"), "1");
    assert_eq!(env.pool_get(&name, "crush_rule"), format!("{name}_osd"));
    assert_eq!(env.pool_get(&name, "compression_mode"), "passive");
    let rule = env
        .ceph
        .ceph(&["osd", "crush", "rule", "dump", &format!("{name}_osd")]);
    assert!(rule.contains(r#""type": "osd""#), "{rule}");
    let apps = env.ceph.ceph(&["osd", "pool", "application", "get", &name]);
    assert!(apps.contains("\"rbd\""), "{apps}");

    // A parameters change is applied, and is a new generation observed.
    env.pools()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"parameters": {"compression_mode": "aggressive"}}})),
        )
        .await
        .unwrap();
    env.pool_in(&name, Phase::Ready).await;
    assert_eq!(env.pool_get(&name, "compression_mode"), "aggressive");

    // An image in the pool blocks the deletion, with a condition that counts it.
    let image = format!("{name}/img");
    env.ceph.rbd(&["create", "--size", "4M", &image]);
    env.pools()
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let blocked = env.pool_in(&name, Phase::DeletionIsBlocked).await;
    let c = condition(&blocked, "DeletionIsBlocked");
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::True, "PoolNotEmpty")
    );
    assert!(c.message.contains("holds 1 RBD image"), "{}", c.message);
    assert!(
        env.ceph_pools().contains(&name),
        "the pool was deleted with an image in it"
    );

    // Moved to the trash, it still blocks: a trashed volume may be restored until it is purged.
    env.ceph.rbd(&["trash", "mv", &image]);
    let api = env.pools();
    eventually("the condition counts the trashed image", || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let p = api.get(&name).await.unwrap();
            condition(&p, "DeletionIsBlocked")
                .message
                .contains("0 RBD image(s) and 1 in its trash")
                .then_some(())
        }
    })
    .await;
    assert!(
        env.ceph_pools().contains(&name),
        "deleted with a trashed image in it"
    );
    let trash = env.ceph.rbd(&["trash", "ls", &name]);
    let id = trash.split_whitespace().next().expect("the trash entry");
    env.ceph.rbd(&["trash", "rm", &format!("{name}/{id}")]);
    eventually("the CephBlockPool released once the image is gone", || {
        let api = api.clone();
        let name = name.clone();
        async move { api.get_opt(&name).await.unwrap().is_none().then_some(()) }
    })
    .await;
    assert!(
        !env.ceph_pools().contains(&name),
        "the pool is still in Ceph"
    );
    let rules = env.ceph.ceph(&["osd", "crush", "rule", "ls"]);
    assert!(!rules.contains(&format!("{name}_osd")), "{rules}");
    assert!(
        !env.operator.log_text().contains(&env.ceph.key),
        "the key is in the log"
    );
}

#[tokio::test]
async fn size_one_is_refused_without_the_opt_out_and_made_with_it() {
    let Some(env) = external_cluster("pool-size-one", None).await else {
        return;
    };
    let name = common::unique("opool1");
    env.create_pool(
        &name,
        json!({"failureDomain": "osd", "replicated": {"size": 1}}),
    )
    .await;
    let refused = env.pool_in(&name, Phase::Failure).await;
    let c = condition(&refused, "Failure");
    assert_eq!(c.reason, "UnsafeReplicaSize");
    assert!(
        c.message.contains("requireSafeReplicaSize: false"),
        "{}",
        c.message
    );
    assert!(
        !env.ceph_pools().contains(&name),
        "a size-1 pool was made without the opt-out"
    );

    env.pools()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicated": {"requireSafeReplicaSize": false}}})),
        )
        .await
        .unwrap();
    env.pool_in(&name, Phase::Ready).await;
    assert_eq!(env.pool_get(&name, "size"), "1");
    env.delete_pool_and_wait(&name).await;
    assert!(!env.ceph_pools().contains(&name));
}

#[tokio::test]
async fn an_external_cluster_with_a_wrong_key_says_so_without_the_key_and_connects_once_fixed() {
    // A well-formed cephx key that is not the admin's.
    let wrong = "AQBvaBVnAAAAABAAtUTTMJ+6Fqdk1pmJLldpUA==";
    let Some(env) = external_cluster("pool-wrong-key", Some(wrong)).await else {
        return;
    };
    let clusters: Api<CephCluster> = Api::namespaced(env.client.clone(), &env.ns);
    let failed = eventually("the external cluster in Failure", || {
        let clusters = clusters.clone();
        async move {
            let c = clusters.get("ext").await.ok()?;
            (c.status.as_ref()?.phase == Some(Phase::Failure)).then_some(c)
        }
    })
    .await;
    let status = failed.status.unwrap();
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Connected")
        .unwrap();
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, "ExternalConnectFailed")
    );
    assert!(
        c.message.contains("authentication did not succeed"),
        "{}",
        c.message
    );
    assert!(c.message.contains(&mon_address(&env.ceph)), "{}", c.message);
    let text = serde_json::to_string(&status).unwrap();
    assert!(!text.contains(wrong), "the key is in the status");
    assert!(
        !env.operator.log_text().contains(wrong),
        "the key is in the log"
    );

    // A pool in this namespace waits, saying why.
    let name = common::unique("opoolk");
    env.create_pool(&name, json!({"replicated": {"size": 2}}))
        .await;
    let waiting = env.pool_in(&name, Phase::Failure).await;
    assert_eq!(
        condition(&waiting, "Failure").reason,
        "ExternalConnectFailed"
    );
    assert!(!env.ceph_pools().contains(&name));

    // The right key: the retry (with backoff) connects, without a restart.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    secrets
        .patch(
            "rook-ceph-mon",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"admin-secret": env.ceph.key}})),
        )
        .await
        .unwrap();
    eventually("Connected with the right key", || {
        let clusters = clusters.clone();
        async move {
            let c = clusters.get("ext").await.ok()?;
            (c.status.as_ref()?.phase == Some(Phase::Connected)).then_some(())
        }
    })
    .await;
    env.pool_in(&name, Phase::Ready).await;
    env.delete_pool_and_wait(&name).await;
    assert!(!env.ceph_pools().contains(&name));
}
