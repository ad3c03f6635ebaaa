//! Assembling and running the CSI driver process: configuration, Ceph pool, health checks, node
//! registration and the gRPC services.

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use super::proto;
use super::server::{self, Endpoint};
use crate::ceph::health::Health;
use crate::ceph::{CephTimeouts, ConnectionPool, PoolPolicy};
use crate::metrics::{Observer, RpcMetrics, RpcMetricsLayer, Sources, StepStatus};
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
    pub key_dir: Option<PathBuf>,
    pub timeouts: CephTimeouts,
    /// A pooled Ceph connection no call has asked for in this long is closed.
    pub ceph_idle_timeout: Duration,
    pub health_interval: Duration,
    pub controller_cfg: ControllerConfig,
    pub metrics_address: Option<String>,
    pub default_mounter: String,
    pub registration_dir: Option<PathBuf>,
    pub kubelet_registration_path: Option<PathBuf>,
    pub mapper_cgroup: crate::node::mapper::CgroupSetting,
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
    let pool = Arc::new(ConnectionPool::with_policy(
        opts.timeouts,
        PoolPolicy {
            idle_timeout: opts.ceph_idle_timeout,
            ..PoolPolicy::default()
        },
    ));
    let controller = Arc::new(Controller::new(
        clusters.clone(),
        pool.clone(),
        creds.clone(),
        opts.controller_cfg.clone(),
    ));
    if opts.controller {
        controller.resume_purges();
    }
    let health = Arc::new(Health::new(clusters.health_targets()));
    health.clone().spawn(pool.clone(), opts.health_interval);

    let node_registry = match opts.node {
        false => None,
        true => {
            let node_id = opts.node_id.clone().unwrap_or_default();
            spawn_registration(controller.clone(), node_id, creds.clone())
        }
    };
    let kubelet = match opts.node {
        false => None,
        true => kubelet_registration(&opts, &endpoint),
    };

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
            cfg.key_dir = opts.key_dir.clone();
            cfg.mapper_cgroup = opts.mapper_cgroup.clone();
            cfg.allowed_roots = std::iter::once(opts.kubelet_dir.clone())
                .chain(opts.extra_roots.iter().cloned())
                .collect();
            let inflight = crate::volume::guard::InFlight::default();
            volume_ops.push(inflight.clone());
            Some(proto::node_server::NodeServer::new(NodeService {
                driver: Arc::new(NodeDriver::new(cfg)?),
                node_id: opts.node_id.clone().unwrap_or_default(),
                clusters: clusters.clone(),
                default_creds: creds.clone(),
                default_mounter: opts.default_mounter.clone(),
                inflight,
                volumes: controller.clone(),
            }))
        }
    };
    let router = router.add_optional_service(node_svc);
    if let Some(addr) = &opts.metrics_address {
        let observer = Observer::new(Sources {
            rpc: rpc_metrics,
            pool: pool.clone(),
            health: health.clone(),
            volume_ops,
            endpoint: opts.endpoint.clone(),
            kubelet: kubelet.as_ref().map(|(reg, _)| reg.clone()),
            node_registry,
        });
        let local = crate::metrics::spawn_server(addr, observer).await?;
        tracing::info!(address = %local, "serving /metrics, /livez, /readyz and /healthz");
    }
    server::serve(&endpoint, router, || {
        // Only now: kubelet dials the CSI socket as soon as it has read our registration.
        if let Some((reg, dir)) = kubelet {
            tokio::spawn(async move {
                if let Err(e) = reg.serve(dir).await {
                    tracing::error!(error = %e, "kubelet plugin registration stopped");
                }
            });
        }
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
/// unreachable. The status is what readiness waits for; `None` when the node cannot register.
fn spawn_registration(
    controller: Arc<Controller>,
    node_id: String,
    creds: Option<Credentials>,
) -> Option<Arc<StepStatus>> {
    let Some(creds) = creds else {
        tracing::warn!("no --secret-dir: this node cannot register, and ControllerPublish to it will fail with NotFound");
        return None;
    };
    let status = Arc::new(StepStatus::default());
    let step = status.clone();
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(500);
        loop {
            match controller.register_node(&node_id, &creds).await {
                Ok(()) => {
                    tracing::info!(node = %node_id, "node registered");
                    step.succeeded();
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = %node_id, error = %e, "node registration failed; retrying");
                    step.failed(e.to_string());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
    Some(status)
}

/// The registration to offer kubelet through its plugin registration directory, and that
/// directory, if there is one.
fn kubelet_registration(
    opts: &DriverOptions,
    endpoint: &Endpoint,
) -> Option<(Arc<super::registration::Registration>, PathBuf)> {
    let dir = opts
        .registration_dir
        .clone()
        .unwrap_or_else(|| opts.kubelet_dir.join("plugins_registry"));
    if !dir.is_dir() {
        tracing::info!(dir = %dir.display(), "no kubelet plugin registration directory; not registering with kubelet");
        return None;
    }
    let csi_socket = match (&opts.kubelet_registration_path, endpoint) {
        (Some(p), _) => p.clone(),
        (None, Endpoint::Unix(p)) => p.clone(),
        (None, Endpoint::Tcp(_)) => {
            tracing::warn!("kubelet only dials Unix sockets: not registering a TCP endpoint");
            return None;
        }
    };
    Some((
        super::registration::Registration::new(&opts.driver_name, csi_socket),
        dir,
    ))
}
