//! Tier-1 tests of the operator's CRDs against a real kube-apiserver + etcd: they install and
//! are Established, Rook's own manifests apply with only the image changed and lose nothing,
//! the schema rejects what it must, status and Rook's printer columns work, and the served CRDs
//! are reported current.

mod apiserver;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, Resource};
use rook_rbd::operator::crd::{self, CephBlockPool, CephCluster};
use rook_rbd::operator::installed::{self, CrdState};
use serde_json::{json, Value};
use std::io::Write;
use std::process::Stdio;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rook-v1.18");
/// The only edit Rook's manifests get: the Ceph image, for the one built from Debian's 16.2.
const ROOK_IMAGE: &str = "quay.io/ceph/ceph:v19";
const OUR_IMAGE: &str = "localhost/rook-rbd/ceph:16.2";

/// A client of this binary's API server with the CRDs installed, or `None` when skipped.
async fn setup() -> Option<Client> {
    let server = apiserver::shared()?;
    let client = server.client().await;
    apiserver::install_crds(&client, &crd::crds()).await;
    Some(client)
}

/// Rook's manifest with only the image changed; asserts that exactly one line changed.
fn rook_manifest(file: &str) -> String {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{file}")).unwrap();
    let changed = text.replace(ROOK_IMAGE, OUR_IMAGE);
    let edited = text
        .lines()
        .zip(changed.lines())
        .filter(|(a, b)| a != b)
        .count();
    assert!(edited <= 1, "{file}: {edited} lines would change");
    changed
}

/// `kubectl apply` of `manifest` as a user runs it; fails on any error or any warning (kubectl
/// warns about fields the schema prunes).
fn kubectl_apply(manifest: &str) {
    let server = apiserver::shared().unwrap();
    let mut child = server
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl apply failed: {stderr}");
    assert!(stderr.trim().is_empty(), "kubectl apply warned: {stderr}");
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(yaml).unwrap()
}

#[tokio::test]
async fn crds_install_and_become_established() {
    let Some(client) = setup().await else { return };
    // install_crds waited for Established; a list of each kind proves they are served.
    let clusters: Api<CephCluster> = Api::all(client.clone());
    let pools: Api<CephBlockPool> = Api::all(client);
    clusters
        .list(&Default::default())
        .await
        .expect("cephclusters served");
    pools
        .list(&Default::default())
        .await
        .expect("cephblockpools served");
}

#[tokio::test]
async fn rook_cluster_test_yaml_applies_with_only_the_image_changed_and_keeps_every_field_over_releases(
) {
    let Some(client) = setup().await else { return };
    apiserver::namespace(&client, "rook-ceph").await;
    // The older release first, then the newer applied over it, as an upgrade of Rook's file.
    for file in ["cluster-test.yaml", "cluster-test-0226134.yaml"] {
        let manifest = rook_manifest(file);
        kubectl_apply(&manifest);

        let docs = documents(&manifest);
        let cluster: CephCluster = Api::namespaced(client.clone(), "rook-ceph")
            .get("my-cluster")
            .await
            .unwrap();
        // Stored exactly as written: nothing pruned, so nothing a Rook user set is lost.
        assert_eq!(
            serde_json::to_value(&cluster.spec).unwrap(),
            docs[0]["spec"],
            "{file}"
        );
        let missing = cluster.not_implemented();
        assert!(
            missing.contains(&"spec.dashboard.enabled".to_string()),
            "{file}: {missing:?}"
        );
        assert!(
            !missing.iter().any(|p| p.starts_with("spec.mon")),
            "{file}: {missing:?}"
        );

        let mgr_pool: CephBlockPool = Api::namespaced(client.clone(), "rook-ceph")
            .get("builtin-mgr")
            .await
            .unwrap();
        assert_eq!(
            serde_json::to_value(&mgr_pool.spec).unwrap(),
            docs[1]["spec"],
            "{file}"
        );
        assert_eq!(mgr_pool.pool_name(), Some(".mgr"));
    }
}

#[tokio::test]
async fn rook_pool_test_yaml_applies_unchanged() {
    let Some(client) = setup().await else { return };
    apiserver::namespace(&client, "rook-ceph").await;
    let manifest = rook_manifest("pool-test.yaml");
    kubectl_apply(&manifest);
    let pool: CephBlockPool = Api::namespaced(client, "rook-ceph")
        .get("replicapool")
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&pool.spec).unwrap(),
        documents(&manifest)[0]["spec"]
    );
    assert_eq!(pool.spec.replicated.as_ref().map(|r| r.size), Some(1));
    assert_eq!(pool.not_implemented(), Vec::<String>::new());
}

fn cluster_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        &CephCluster::group(&()),
        &CephCluster::version(&()),
        &CephCluster::kind(&()),
    ))
}

fn pool_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        &CephBlockPool::group(&()),
        &CephBlockPool::version(&()),
        &CephBlockPool::kind(&()),
    ))
}

/// Creates (dry run) an object of `ar` with `spec`; the API server's error, if any.
async fn try_create(client: &Client, ar: &ApiResource, spec: Value) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", ar);
    let mut obj = DynamicObject::new("validation", ar);
    obj.data = json!({ "spec": spec });
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&pp, &obj).await.map(|_| ())
}

#[tokio::test]
async fn schema_rejects_wrong_types_and_out_of_range_values_by_field() {
    let Some(client) = setup().await else { return };
    let (cluster, pool) = (cluster_resource(), pool_resource());
    // The same objects with valid values are accepted, so each rejection is the field's.
    try_create(
        &client,
        &cluster,
        json!({"mon": {"count": 3}, "dataDirHostPath": "/var/lib/rook"}),
    )
    .await
    .expect("a valid CephCluster");
    try_create(&client, &pool, json!({"replicated": {"size": 3}}))
        .await
        .expect("a valid CephBlockPool");

    let cases = [
        (
            &cluster,
            json!({"mon": {"count": "three"}}),
            "spec.mon.count",
        ),
        (&cluster, json!({"mon": {"count": 10}}), "spec.mon.count"),
        (&cluster, json!({"mgr": {"count": -1}}), "spec.mgr.count"),
        (
            &cluster,
            json!({"dataDirHostPath": "var/lib/rook"}),
            "spec.dataDirHostPath",
        ),
        (
            &cluster,
            json!({"network": {"provider": "calico"}}),
            "spec.network.provider",
        ),
        (
            &cluster,
            json!({"storage": {"useAllNodes": "yes"}}),
            "spec.storage.useAllNodes",
        ),
        (
            &cluster,
            json!({"cleanupPolicy": {"confirmation": "yes"}}),
            "spec.cleanupPolicy.confirmation",
        ),
        (
            &cluster,
            json!({"placement": {"mon": {"tolerations": [{"operator": 1}]}}}),
            "spec.placement.mon.tolerations[0].operator",
        ),
        (
            &pool,
            json!({"replicated": {"size": -1}}),
            "spec.replicated.size",
        ),
        (
            &pool,
            json!({"replicated": {"size": 0}}),
            "spec.replicated.size",
        ),
        (
            &pool,
            json!({"replicated": {"requireSafeReplicaSize": false}}),
            "spec.replicated.size",
        ),
        (
            &pool,
            json!({"parameters": {"pg_num": 8}}),
            "spec.parameters.pg_num",
        ),
    ];
    for (ar, spec, field) in cases {
        match try_create(&client, ar, spec.clone()).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{}: {spec}: {}", ar.kind, s.message);
                assert!(s.message.contains(field), "{spec}: {}", s.message);
            }
            other => panic!("{} {spec} was not rejected: {other:?}", ar.kind),
        }
    }
}

#[tokio::test]
async fn status_is_written_through_its_subresource_and_shown_in_rooks_columns() {
    let Some(client) = setup().await else { return };
    apiserver::namespace(&client, "columns").await;
    let api: Api<CephCluster> = Api::namespaced(client.clone(), "columns");
    let mut c = CephCluster::new("c1", Default::default());
    c.spec.data_dir_host_path = Some("/var/lib/rook".into());
    c.spec.mon = Some(crd::cluster::MonSpec {
        count: Some(3),
        ..Default::default()
    });
    api.create(&PostParams::default(), &c).await.unwrap();
    let status = json!({"status": {
        "phase": "Progressing",
        "message": "waiting for mon b to join the quorum",
        "ceph": {"health": "HEALTH_WARN", "fsid": "4d92ffa0-c104-4918-b2f3-67c8726ae244"},
    }});
    let pp = PatchParams::default();
    api.patch_status("c1", &pp, &Patch::Merge(&status))
        .await
        .unwrap();
    // A status sent with the main resource is ignored (it belongs to the subresource).
    api.patch(
        "c1",
        &pp,
        &Patch::Merge(json!({"status": {"phase": "Ready"}})),
    )
    .await
    .unwrap();

    let req = tonic::codegen::http::Request::get(format!("{}/c1", api.resource_url()))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: Value = serde_json::from_str(&client.request_text(req).await.unwrap()).unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Name",
            "DataDirHostPath",
            "MonCount",
            "Age",
            "Phase",
            "Message",
            "Health",
            "FSID"
        ]
    );
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[1], "/var/lib/rook");
    assert_eq!(cells[2], "3");
    assert_eq!(cells[4], "Progressing");
    assert_eq!(cells[5], "waiting for mon b to join the quorum");
    assert_eq!(cells[6], "HEALTH_WARN");
    assert_eq!(cells[7], "4d92ffa0-c104-4918-b2f3-67c8726ae244");
}

#[tokio::test]
async fn served_crds_are_reported_current() {
    let Some(client) = setup().await else { return };
    let reports = installed::check(client).await.unwrap();
    assert_eq!(reports.len(), 2);
    for r in reports {
        assert_eq!(r.state, CrdState::Current, "{r}");
    }
}
