//! Assembling and running the CSI driver process: configuration, Ceph pool, health checks, node
//! registration and the gRPC services.

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use super::proto;
use super::server::{self, Endpoint};
use crate::ceph::health::Health;
use crate::ceph::{CephTimeouts, ConnectionPool};
use crate::metrics::{RpcMetrics, RpcMetricsLayer, Sources};
use crate::node::{NodeConfig, NodeDriver};
use crate::volume::controller::{Controller, ControllerConfig};
use crate::volume::{ClusterConfig, Credentials};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct DriverOptions {
    pub endpoint: String,
    pub driver_name: String,
    pub node_id: Option<String>,
    pub controller: bool,
    pub node: bool,
    pub cluster_config: PathBuf,
    pub secret_dir: Option<PathBuf>,
    pub kubelet_dir: PathBuf,
    pub extra_roots: Vec<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub timeouts: CephTimeouts,
    pub health_interval: Duration,
    pub controller_cfg: ControllerConfig,
    pub metrics_address: Option<String>,
    pub default_mounter: String,
}

pub async fn run(opts: DriverOptions) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let endpoint = Endpoint::parse(&opts.endpoint)?;
    let clusters = ClusterConfig::load(&opts.cluster_config)?;
    let creds = match &opts.secret_dir {
        Some(dir) if dir.join("userID").exists() => Some(Credentials::from_dir(dir)?),
        Some(dir) => {
            tracing::warn!(dir = %dir.display(), "secret dir has no userID/userKey; calls without secrets will be refused");
            None
        }
        None => None,
    };
    if opts.node && opts.node_id.as_deref().unwrap_or("").is_empty() {
        anyhow::bail!("--node-id is required for the node service");
    }
    let pool = Arc::new(ConnectionPool::new(opts.timeouts));
    let controller = Arc::new(Controller::new(
        clusters.clone(),
        pool.clone(),
        creds.clone(),
        opts.controller_cfg.clone(),
    ));
    if opts.controller {
        controller.resume_purges();
    }
    let health = Arc::new(Health::default());
    health.clone().spawn(
        clusters.health_targets(),
        pool.clone(),
        opts.health_interval,
    );

    if opts.node {
        let node_id = opts.node_id.clone().unwrap_or_default();
        spawn_registration(controller.clone(), node_id, creds.clone());
    }

    let identity = proto::identity_server::IdentityServer::new(IdentityService {
        driver_name: opts.driver_name.clone(),
        controller: opts.controller,
        health: health.clone(),
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let controller_svc = opts.controller.then(|| {
        proto::controller_server::ControllerServer::new(ControllerService {
            inner: controller.clone(),
        })
    });
    let rpc_metrics = Arc::new(RpcMetrics::default());
    let calls = rpc_metrics.clone();
    crate::memory::spawn_trimmer(
        Arc::new(move || calls.calls_total()),
        Duration::from_secs(2),
    );
    let mut volume_ops = vec![controller.inflight().clone()];
    let router = tonic::transport::Server::builder()
        .layer(RpcMetricsLayer::new(rpc_metrics.clone()))
        .add_service(identity)
        .add_service(reflection)
        .add_optional_service(controller_svc);
    let node_svc = match opts.node {
        false => None,
        true => {
            let state_dir = opts.state_dir.clone().unwrap_or_else(|| {
                opts.kubelet_dir
                    .join("plugins")
                    .join(&opts.driver_name)
                    .join("state")
            });
            let mut cfg = NodeConfig::new(opts.node_id.clone().unwrap_or_default(), state_dir);
            cfg.allowed_roots = std::iter::once(opts.kubelet_dir.clone())
                .chain(opts.extra_roots.iter().cloned())
                .collect();
            let inflight = crate::volume::guard::InFlight::default();
            volume_ops.push(inflight.clone());
            Some(proto::node_server::NodeServer::new(NodeService {
                driver: NodeDriver::new(cfg)?,
                node_id: opts.node_id.clone().unwrap_or_default(),
                clusters: clusters.clone(),
                default_creds: creds.clone(),
                default_mounter: opts.default_mounter.clone(),
                inflight,
            }))
        }
    };
    let router = router.add_optional_service(node_svc);
    if let Some(addr) = &opts.metrics_address {
        let sources = Sources {
            rpc: rpc_metrics,
            pool: pool.clone(),
            health: health.clone(),
            volume_ops,
        };
        let local = crate::metrics::spawn_server(addr, sources).await?;
        tracing::info!(address = %local, "serving /metrics and /healthz");
    }
    server::serve(&endpoint, router, || {
        tracing::info!(
            controller = opts.controller,
            node = opts.node,
            startup_ms = started.elapsed().as_millis() as u64,
            version = env!("CARGO_PKG_VERSION"),
            "driver ready"
        )
    })
    .await
}

/// Registers the node so ControllerPublish can validate node IDs, retrying while the cluster is
/// unreachable.
fn spawn_registration(controller: Arc<Controller>, node_id: String, creds: Option<Credentials>) {
    let Some(creds) = creds else {
        tracing::warn!("no --secret-dir: this node cannot register, and ControllerPublish to it will fail with NotFound");
        return;
    };
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(500);
        loop {
            match controller.register_node(&node_id, &creds).await {
                Ok(()) => {
                    tracing::info!(node = %node_id, "node registered");
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = %node_id, error = %e, "node registration failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
}
