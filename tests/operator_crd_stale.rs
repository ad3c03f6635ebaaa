//! The start-up CRD check against a real API server (its own: the test replaces cluster-wide
//! CRDs, which would disturb other tests): missing, then an older generated CRD, then ours.

mod apiserver;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use rook_rbd::operator::crd;
use rook_rbd::operator::installed::{self, CrdState};

/// Our CRDs as an older rook-rbd generated them: CephCluster before `cephConfig` and the FSID
/// column existed, with `mon.count` allowed up to 5.
fn older_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = crd::crds();
    let columns = crds[0].spec.versions[0].additional_printer_columns.as_mut();
    columns.unwrap().pop();
    let spec = crd::spec_schema_mut(&mut crds[0])
        .and_then(|s| s.properties.as_mut())
        .unwrap();
    spec.remove("cephConfig");
    let mon = spec
        .get_mut("mon")
        .and_then(|m| m.properties.as_mut())
        .unwrap();
    mon.get_mut("count").unwrap().maximum = Some(5.0);
    crds
}

#[tokio::test]
async fn stale_crd_in_the_server_is_detected_and_reported() {
    let Some(server) = apiserver::shared() else {
        return;
    };
    let client = server.client().await;

    let reports = installed::check(client.clone()).await.unwrap();
    assert!(
        reports.iter().all(|r| r.state == CrdState::Missing),
        "{reports:?}"
    );

    apiserver::install_crds(&client, &older_crds()).await;
    let reports = installed::check(client.clone()).await.unwrap();
    let CrdState::Stale(d) = &reports[0].state else {
        panic!(
            "an older CephCluster CRD was not found stale: {}",
            reports[0]
        );
    };
    assert_eq!(d.len(), 3, "{d:#?}");
    assert!(
        d[0].contains("printer columns") && d[0].contains("FSID"),
        "{d:#?}"
    );
    assert!(d.contains(&"version v1: schema .spec.cephConfig: missing in the served CRD".into()));
    assert!(d.contains(&"version v1: schema .spec.mon.count/maximum: served 5.0, ours 9.0".into()));
    assert_eq!(reports[1].state, CrdState::Current, "{}", reports[1]);
    println!("{}", reports[0]);

    apiserver::install_crds(&client, &crd::crds()).await;
    let reports = installed::check(client).await.unwrap();
    assert!(
        reports.iter().all(|r| r.state == CrdState::Current),
        "{reports:?}"
    );
}
