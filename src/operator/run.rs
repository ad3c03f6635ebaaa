//! `rook-rbd operator`: checks the CRDs, then runs the CephCluster and CephBlockPool controllers
//! until SIGTERM.
//! The API server is found as kubectl finds it (in-cluster service account, else `KUBECONFIG`
//! or ~/.kube/config), so no credential is ever passed in argv.

use super::cluster_controller::{self, Backoff, Context, MANAGED_BY};
use super::crd::{CephBlockPool, CephCluster};
use super::installed::{self, CrdState};
use super::pool_controller;
use crate::ceph::{CephTimeouts, ConnectionPool};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    /// Reconcile CephClusters of this namespace only (default: every namespace).
    #[arg(long, env = "ROOK_RBD_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// This replica's name in Events (in a pod: its name, through the downward API).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
}

/// How often a missing CRD is looked for again.
const CRD_WAIT: Duration = Duration::from_secs(5);

pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    wait_for_crds(&client).await?;

    let (clusters, secrets, maps, pools): (
        Api<CephCluster>,
        Api<Secret>,
        Api<ConfigMap>,
        Api<CephBlockPool>,
    ) = match &args.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let reporter = Reporter {
        controller: cluster_controller::FIELD_MANAGER.into(),
        instance: args.instance,
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        ceph: Arc::new(ConnectionPool::new(CephTimeouts::default())),
        backoff: Backoff::default(),
    });
    // Only the operator's own children: a namespace's other Secrets are none of its business.
    let children = watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        "operator running"
    );
    let cluster_loop = Controller::new(clusters, watcher::Config::default())
        .owns(secrets, children.clone())
        .owns(maps, children)
        .shutdown_on_signal()
        .run(
            cluster_controller::reconcile,
            cluster_controller::error_policy,
            ctx.clone(),
        )
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(cluster = %obj, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        });
    let pool_loop = Controller::new(pools, watcher::Config::default())
        .shutdown_on_signal()
        .run(
            pool_controller::reconcile,
            pool_controller::error_policy,
            ctx,
        )
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(pool = %obj, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "pool reconcile failed"),
            }
        });
    futures::join!(cluster_loop, pool_loop);
    tracing::info!("operator stopped");
    Ok(())
}

/// Waits until every CRD is served; a stale one is logged (it may prune fields this version
/// writes) but does not stop the operator, so an upgrade can roll the CRDs after it.
async fn wait_for_crds(client: &Client) -> anyhow::Result<()> {
    let mut said_missing = false;
    loop {
        let reports = installed::check(client.clone()).await?;
        let missing: Vec<_> = reports
            .iter()
            .filter(|r| r.state == CrdState::Missing)
            .collect();
        for r in reports
            .iter()
            .filter(|r| matches!(r.state, CrdState::Stale(_)))
        {
            tracing::warn!("{r}");
        }
        if missing.is_empty() {
            return Ok(());
        }
        if !said_missing {
            for r in &missing {
                tracing::warn!("{r}; waiting for it (kubectl apply -f deploy/operator/crds.yaml)");
            }
            said_missing = true;
        }
        tokio::time::sleep(CRD_WAIT).await;
    }
}
