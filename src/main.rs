//! The `rook-rbd` command line. Each subcommand is a thin front end over the library.

use clap::{Parser, Subcommand, ValueEnum};
use rook_rbd::ceph::CephTimeouts;
use rook_rbd::csi::driver::{self, DriverOptions};
use rook_rbd::volume::controller::ControllerConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "rook-rbd",
    version,
    about = "Ceph RBD block storage for Kubernetes",
    long_about = "Ceph RBD block storage for Kubernetes.\n\n\
        One binary: the CSI driver (controller and node plugin), a CSI client for debugging,\n\
        a benchmark, the operator, and the operator's CRDs (`crdgen`). Start with `rook-rbd csi --help`.",
    after_help = "Examples:\n  \
        rook-rbd csi --endpoint unix:///csi/csi.sock --cluster-config /etc/rook-rbd/config.json --controller\n  \
        rook-rbd client --endpoint unix:///csi/csi.sock probe"
)]
struct Cli {
    /// Log format for stderr.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "ROOK_RBD_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CSI driver: Identity plus the Controller and/or Node services.
    #[command(
        long_about = "Run the CSI driver: Identity plus the Controller and/or Node services on one socket.\n\n\
        With neither --controller nor --node, both run (handy for csi-sanity and single-node clusters).\n\
        Ceph credentials come from each request's CSI secrets (userID, userKey), as with ceph-csi.\n\
        Calls that carry no secrets (ListVolumes, GetCapacity, ControllerGetVolume) and node\n\
        registration use the userID/userKey files in --secret-dir.",
        after_help = "Every Ceph call has a deadline (--rados-osd-op-timeout, --rados-mon-op-timeout,\n\
        --client-mount-timeout); keep them below your sidecars' --timeout so a dead cluster\n\
        answers Unavailable/DeadlineExceeded instead of a sidecar timeout."
    )]
    Csi(CsiArgs),
    /// Talk to any CSI endpoint: create, delete, stage, publish and so on (like csc).
    Client(rook_rbd::client::cli::ClientArgs),
    /// Drive any CSI endpoint and report latency, throughput and RSS, optionally next to a
    /// raw-librbd floor measured in the same run.
    Bench(rook_rbd::bench::BenchArgs),
    /// Run the operator: reconcile CephClusters (the cluster identity and Rook's Secrets and
    /// ConfigMaps so far). Finds the API server as kubectl does.
    Operator(rook_rbd::operator::run::OperatorArgs),
    /// Print the operator's CRDs (CephCluster, CephBlockPool) as YAML; deploy/operator/crds.yaml
    /// is this output.
    Crdgen,
}

#[derive(clap::Args)]
struct CsiArgs {
    /// Where to serve: unix:///path/to/csi.sock or tcp://host:port.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's ID, as the CO knows it (Kubernetes: the node name). Required with --node.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Serve the Controller service.
    #[arg(long)]
    controller: bool,
    /// Serve the Node service.
    #[arg(long)]
    node: bool,
    /// The cluster list, in ceph-csi's format: [{"clusterID": "...", "monitors": ["host:port"]}].
    #[arg(
        long,
        env = "CLUSTER_CONFIG",
        default_value = "/etc/rook-rbd/config.json"
    )]
    cluster_config: PathBuf,
    /// The CSI driver name.
    #[arg(long, env = "DRIVER_NAME", default_value = rook_rbd::csi::DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// A directory with files userID and userKey (a mounted Secret), for calls without secrets
    /// and for node registration.
    #[arg(long, alias = "node-secret-dir", env = "SECRET_DIR")]
    secret_dir: Option<PathBuf>,
    /// kubelet's root directory; staging and target paths must lie under it.
    #[arg(long, env = "KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Another directory where staging and target paths are allowed (for tests; repeatable).
    #[arg(long = "allowed-root")]
    allowed_roots: Vec<PathBuf>,
    /// Node state (staging records, fuse mountpoints). Default: <kubelet-dir>/plugins/<driver-name>/state.
    #[arg(long, env = "STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// A tmpfs or ramfs directory for the key files the mappers read, so keys never touch
    /// the disk. Default: /run/rook-rbd, else /dev/shm/rook-rbd (the state dir, with a
    /// warning, when neither is memory-backed).
    #[arg(long, env = "KEY_DIR")]
    key_dir: Option<PathBuf>,
    /// Serve /metrics (Prometheus), /livez, /readyz and /healthz on this address, e.g. :8080.
    #[arg(long, env = "METRICS_ADDRESS")]
    metrics_address: Option<String>,
    /// rados_osd_op_timeout: seconds before an OSD operation fails with a timeout.
    #[arg(long, default_value_t = 8)]
    rados_osd_op_timeout: u64,
    /// rados_mon_op_timeout: seconds before a monitor operation fails with a timeout.
    #[arg(long, default_value_t = 8)]
    rados_mon_op_timeout: u64,
    /// client_mount_timeout: seconds to connect and authenticate to the cluster.
    #[arg(long, default_value_t = 8)]
    client_mount_timeout: u64,
    /// Seconds after which a pooled Ceph connection that no call has used is closed (a rotated
    /// key's old session, a cluster no longer used).
    #[arg(long, default_value_t = rook_rbd::ceph::PoolPolicy::default().idle_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    ceph_idle_timeout: u64,
    /// Seconds between cluster health checks (what Probe reports).
    #[arg(long, default_value_t = 5)]
    health_interval: u64,
    /// Flatten a clone when its chain of parents gets deeper than this.
    #[arg(long, default_value_t = 8)]
    max_clone_depth: u32,
    /// The mapper for volumes whose StorageClass sets no `mounter`: krbd, nbd, fuse, or auto
    /// (krbd where the kernel has rbd, else nbd, else rbd-fuse plus a loop device).
    #[arg(long, env = "DEFAULT_MOUNTER", default_value = "auto")]
    default_mounter: String,
    /// Where kubelet looks for plugin registration sockets. The node plugin registers itself
    /// there (no node-driver-registrar needed) when the directory exists.
    /// Default: <kubelet-dir>/plugins_registry.
    #[arg(long, env = "REGISTRATION_DIR")]
    registration_dir: Option<PathBuf>,
    /// The CSI socket as kubelet sees it, if not the --endpoint path (only when the plugin's
    /// view of the host's paths differs from kubelet's).
    #[arg(long)]
    kubelet_registration_path: Option<PathBuf>,
    /// The cgroup, at the root of every cgroup hierarchy, that the rbd-fuse and rbd-nbd daemons
    /// run in, so they outlive the plugin's container; `none` leaves them in the plugin's
    /// cgroups, and they die with it.
    #[arg(long, env = "MAPPER_CGROUP", default_value = rook_rbd::node::mapper::cgroup::DEFAULT_MAPPER_CGROUP)]
    mapper_cgroup: rook_rbd::node::mapper::CgroupSetting,
    /// CreateVolume calls served at once; more wait up to 20 s, then get Unavailable.
    #[arg(long, default_value_t = 32)]
    create_concurrency: usize,
    /// Seconds a deleted volume stays in the RBD trash (restorable with `rbd trash restore`)
    /// before the driver purges it in the background.
    #[arg(long, default_value_t = 0)]
    trash_deferment: u64,
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Crdgen) {
        // No runtime, no logging: the output is a file.
        return match rook_rbd::operator::crd::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: rendering the CRDs: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if matches!(cli.command, Command::Csi(_)) {
        rook_rbd::memory::limit_arenas();
    }
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res: anyhow::Result<()> = rt.block_on(async move {
        match cli.command {
            Command::Csi(a) => {
                let (controller, node) = if !a.controller && !a.node {
                    (true, true)
                } else {
                    (a.controller, a.node)
                };
                driver::run(DriverOptions {
                    endpoint: a.endpoint,
                    driver_name: a.driver_name,
                    node_id: a.node_id,
                    controller,
                    node,
                    cluster_config: a.cluster_config,
                    secret_dir: a.secret_dir,
                    kubelet_dir: a.kubelet_dir,
                    extra_roots: a.allowed_roots,
                    state_dir: a.state_dir,
                    key_dir: a.key_dir,
                    timeouts: CephTimeouts {
                        osd_op: Duration::from_secs(a.rados_osd_op_timeout),
                        mon_op: Duration::from_secs(a.rados_mon_op_timeout),
                        mount: Duration::from_secs(a.client_mount_timeout),
                    },
                    ceph_idle_timeout: Duration::from_secs(a.ceph_idle_timeout),
                    health_interval: Duration::from_secs(a.health_interval.max(1)),
                    controller_cfg: ControllerConfig {
                        max_clone_depth: a.max_clone_depth,
                        create_concurrency: a.create_concurrency,
                        trash_deferment: Duration::from_secs(a.trash_deferment),
                        ..Default::default()
                    },
                    metrics_address: a.metrics_address,
                    default_mounter: a.default_mounter,
                    registration_dir: a.registration_dir,
                    kubelet_registration_path: a.kubelet_registration_path,
                    mapper_cgroup: a.mapper_cgroup,
                })
                .await
            }
            Command::Client(a) => rook_rbd::client::cli::run(a).await,
            Command::Bench(a) => rook_rbd::bench::run(a).await,
            Command::Operator(a) => rook_rbd::operator::run::run(a).await,
            Command::Crdgen => unreachable!("handled before the runtime starts"),
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: {:?}: {}", s.code(), s.message()),
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
