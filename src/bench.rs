//! `rook-rbd bench`: drives any CSI endpoint and reports latency, throughput and RSS, next to a
//! floor measured in the same run (the same create/remove through our Ceph layer directly, and
//! the node steps run as plain commands by `scripts/node-floor.sh`).
//!
//! Ratios within one run are what we judge: the machine is shared and noisy. Any failed call
//! fails the run, with the first error printed.

use crate::ceph::pool::blocking;
use crate::ceph::{CephTimeouts, ConnectionPool, ImageOptions, IoCtx};
use crate::client::cli::{capability, parse_size, read_secrets};
use crate::client::CsiClient;
use crate::csi::proto;
use crate::secret::Secret;
use crate::volume::naming::VOLUME_PREFIX;
use crate::volume::params::{parse_features, DEFAULT_FEATURES};
use crate::volume::{ClusterConfig, Credentials};
use anyhow::{anyhow, bail, Context as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// CreateVolume then DeleteVolume, one at a time.
    Serial,
    /// CreateVolume, then DeleteVolume, `--concurrency` at a time.
    Concurrent,
    /// ListVolumes over `--list-volumes` volumes.
    List,
    /// NodeStage+NodePublish and NodeUnpublish+NodeUnstage on fresh volumes.
    Node,
    /// Driver RSS after each of `--rss-cycles` create/delete cycles.
    Rss,
    /// `--count` deletes, then how long after `--trash-deferment` each image is still in the
    /// pool or its trash (watched through our Ceph layer: needs `--floor`).
    Purge,
    /// Images up to each of `--scale-images` (the first `--scale-driver-volumes` through the
    /// driver, the rest through librbd), ListVolumes in pages of `--scale-page` at each count,
    /// and the driver's memory and threads after each step (needs `--floor`).
    Scale,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example (what `make bench` runs, see scripts/bench.sh):\n  \
    rook-rbd bench --endpoint unix:///tmp/csi.sock --secret-dir SECRETS --param clusterID=FSID \\\n    \
    --param pool=rbd --param mounter=fuse --floor --cluster-config cluster-config.json \\\n    \
    --kubelet-dir /tmp/kubelet --metrics-url http://127.0.0.1:9090/metrics --json bench-results.json \\\n    \
    -- rook-rbd csi --endpoint unix:///tmp/csi.sock ..."
)]
pub struct BenchArgs {
    /// The CSI endpoint: unix:///path or tcp://host:port.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Volumes per create/delete scenario.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Calls in flight in the concurrent scenarios.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Volume size (binary units: 1Gi, 512Mi).
    #[arg(long, default_value = "1Gi")]
    pub size: String,
    /// A StorageClass parameter, key=value (repeatable): clusterID, pool, imageFeatures, mounter...
    #[arg(long = "param", value_parser = parse_kv)]
    pub params: Vec<(String, String)>,
    /// Directory with userID and userKey, sent as CSI secrets (and used by the floor).
    #[arg(long)]
    pub secret_dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Which scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "serial,concurrent,list,node,rss"
    )]
    pub scenarios: Vec<Scenario>,
    /// The driver's process ID, for its RSS (VmRSS in /proc/PID/status).
    #[arg(long)]
    pub driver_pid: Option<u32>,
    /// The driver's Prometheus endpoint, e.g. http://127.0.0.1:9090/metrics.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Measure the floor in the same run: raw librbd through our Ceph layer, and the node steps
    /// as plain commands.
    #[arg(long)]
    pub floor: bool,
    /// The cluster list (ceph-csi format), for the floor's monitors.
    #[arg(long)]
    pub cluster_config: Option<PathBuf>,
    /// The cluster for the floor; default: the clusterID parameter.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// The pool for the floor; default: the pool parameter.
    #[arg(long)]
    pub pool: Option<String>,
    /// kubelet's directory as the driver knows it (--kubelet-dir); staging and target paths go here.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// Alternating driver/floor rounds in the concurrent scenario (A-B-B-A order).
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Volumes staged and published in the node scenario.
    #[arg(long, default_value_t = 5)]
    pub node_count: usize,
    /// The node floor script.
    #[arg(long, default_value = "scripts/node-floor.sh")]
    pub node_floor_script: PathBuf,
    /// Volumes present while ListVolumes is timed.
    #[arg(long, default_value_t = 100)]
    pub list_volumes: usize,
    /// Create/delete cycle counts at which the driver's RSS is read (comma-separated, ascending).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000")]
    pub rss_cycles: Vec<usize>,
    /// Idle time before each RSS reading in the RSS scenario.
    #[arg(long, default_value_t = 3000)]
    pub rss_settle_ms: u64,
    /// The driver's trash deferment in seconds (its `--trash-deferment`), for the purge scenario.
    #[arg(long, default_value_t = 0)]
    pub trash_deferment: u64,
    /// Image counts at which the scale scenario lists (comma-separated, ascending).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub scale_images: Vec<usize>,
    /// How many of the scale scenario's images are created through the driver.
    #[arg(long, default_value_t = 1000)]
    pub scale_driver_volumes: usize,
    /// Creates and deletes in flight in the scale scenario.
    #[arg(long, default_value_t = 32)]
    pub scale_concurrency: usize,
    /// ListVolumes max_entries in the scale scenario.
    #[arg(long, default_value_t = 500)]
    pub scale_page: usize,
    /// Where a driver started by the bench writes its stdout and stderr (default: inherited).
    #[arg(long)]
    pub driver_log: Option<PathBuf>,
    /// Start the driver from the command after `--`, time start-up to a ready Probe, measure
    /// its RSS, and stop it at the end.
    #[arg(last = true)]
    pub driver_cmd: Vec<String>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

// ---------------------------------------------------------------- statistics

/// Latency samples of one kind of step.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Nearest-rank percentile: the smallest sample with at least `p`% of samples at or below it.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        Some(v[rank.clamp(1, v.len()) - 1])
    }

    pub fn mean(&self) -> Option<Duration> {
        (!self.0.is_empty()).then(|| self.0.iter().sum::<Duration>() / self.0.len() as u32)
    }

    fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    /// The samples cut into `rounds` consecutive parts of equal size (the last may be short),
    /// so a ratio can be taken per round of samples that were measured side by side.
    fn rounds(&self, rounds: usize) -> Vec<Samples> {
        let size = self.0.len().div_ceil(rounds.max(1)).max(1);
        self.0.chunks(size).map(|c| Samples(c.to_vec())).collect()
    }

    fn json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        json!({
            "n": self.len(),
            "p50_ms": ms(self.percentile(50.0)),
            "p90_ms": ms(self.percentile(90.0)),
            "p99_ms": ms(self.percentile(99.0)),
            "mean_ms": ms(self.mean()),
        })
    }
}

// ---------------------------------------------------------------- progress

/// A one-line progress bar on stderr (indicatif), redrawn at most ten times a second; on a
/// non-terminal, where indicatif draws nothing, only the final line is written.
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(label: &str, total: usize) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(total as u64),
            ProgressDrawTarget::stderr_with_hz(10),
        )
        .with_style(
            ProgressStyle::with_template(
                "  {prefix:<28} [{bar:30}] {pos:>5}/{len:<5} {elapsed_secs}s",
            )
            .expect("a valid template")
            .with_key(
                "elapsed_secs",
                |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:>6.1}", s.elapsed().as_secs_f64());
                },
            )
            .progress_chars("#."),
        )
        .with_prefix(label.to_string());
        Self { bar }
    }

    /// Counts nothing on screen: for steps that belong to another bar's count.
    fn hidden() -> Self {
        Self {
            bar: ProgressBar::hidden(),
        }
    }

    fn inc(&self) {
        self.bar.inc(1);
    }

    /// A handle for tasks that count steps concurrently.
    fn handle(&self) -> ProgressBar {
        self.bar.clone()
    }

    fn finish(self) {
        if self.bar.is_hidden() {
            if !self.bar.prefix().is_empty() {
                eprintln!(
                    "  {:<28} {:>5}/{:<5} {:>6.1}s",
                    self.bar.prefix(),
                    self.bar.position(),
                    self.bar.length().unwrap_or(0),
                    self.bar.elapsed().as_secs_f64()
                );
            }
        } else {
            self.bar.finish();
        }
    }
}

// ---------------------------------------------------------------- the run

struct Bench {
    args: BenchArgs,
    client: CsiClient,
    params: HashMap<String, String>,
    secrets: HashMap<String, String>,
    size: i64,
    run_id: String,
    driver_pid: Option<u32>,
    floor: Option<Floor>,
    rows: Vec<Row>,
    results: serde_json::Map<String, Value>,
}

/// What the scale scenario made, for its clean-up.
#[derive(Default)]
struct ScaleImages {
    /// Volume IDs of the driver's volumes.
    driver_ids: Vec<String>,
    /// Images created through librbd.
    floor_names: Vec<String>,
}

impl ScaleImages {
    /// Every image name, the driver's decoded from their volume IDs.
    fn images(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::with_capacity(self.driver_ids.len() + self.floor_names.len());
        for id in &self.driver_ids {
            let v =
                crate::volume::VolumeId::decode(id).map_err(|e| anyhow!("volume ID {id}: {e}"))?;
            out.push(v.image);
        }
        out.extend(self.floor_names.iter().cloned());
        Ok(out)
    }
}

/// The same work without the driver: one pooled connection to the pool the driver uses.
struct Floor {
    io: Arc<IoCtx>,
    opts: ImageOptions,
    monitors: Vec<String>,
    user: String,
    key: Secret,
    pool: String,
}

/// One line of the table. `target` is the largest (or smallest, for throughput) allowed ratio.
struct Row {
    what: String,
    driver: f64,
    floor: Option<f64>,
    unit: &'static str,
    target: Option<Target>,
    /// Lowest and highest driver/floor ratio of the single rounds, when there were rounds.
    spread: Option<(f64, f64)>,
}

#[derive(Clone, Copy)]
enum Target {
    /// driver/floor at most this.
    RatioAtMost(f64),
    /// driver/floor at least this.
    RatioAtLeast(f64),
    /// the driver's own value at most this.
    AtMost(f64),
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.floor.filter(|f| *f > 0.0).map(|f| self.driver / f)
    }

    fn verdict(&self) -> Option<bool> {
        match self.target? {
            Target::RatioAtMost(t) => self.ratio().map(|r| r <= t),
            Target::RatioAtLeast(t) => self.ratio().map(|r| r >= t),
            Target::AtMost(t) => Some(self.driver <= t),
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Some(Target::RatioAtMost(t)) => format!("<= {t:.2}x"),
            Some(Target::RatioAtLeast(t)) => format!(">= {t:.2}x"),
            Some(Target::AtMost(t)) => format!("<= {t} {}", self.unit),
            None => String::new(),
        }
    }
}

/// Lowest and highest driver/floor ratio over rounds of (driver, floor) values; rounds without
/// a usable floor value are left out.
fn spread(rounds: impl IntoIterator<Item = (f64, f64)>) -> Option<(f64, f64)> {
    rounds
        .into_iter()
        .filter(|(_, f)| *f > 0.0)
        .map(|(d, f)| d / f)
        .filter(|r| r.is_finite())
        .fold(None, |acc, r| match acc {
            None => Some((r, r)),
            Some((lo, hi)) => Some((f64::min(lo, r), f64::max(hi, r))),
        })
}

/// The spread of a percentile's ratio over the rounds of paired samples.
fn percentile_spread(d: &Samples, f: &Samples, rounds: usize, q: f64) -> Option<(f64, f64)> {
    let pairs = d.rounds(rounds).into_iter().zip(f.rounds(rounds));
    spread(pairs.map(|(d, f)| (ms(d.percentile(q)), ms(f.percentile(q)))))
}

fn ms(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let started_all = Instant::now();
    let mut driver = None;
    let mut startup = None;
    if !args.driver_cmd.is_empty() {
        let (child, took) =
            spawn_driver(&args.driver_cmd, &args.endpoint, args.driver_log.as_deref()).await?;
        eprintln!(
            "driver started; Probe ready after {:.1} ms",
            took.as_secs_f64() * 1e3
        );
        startup = Some(took);
        driver = Some(child);
    }
    let res = async {
        let driver_pid = args.driver_pid.or(driver.as_ref().and_then(|c| c.id()));
        let mut b = Bench::new(args, driver_pid).await?;
        if let Some(t) = startup {
            b.rows.push(Row {
                what: "start-up to ready Probe".into(),
                driver: t.as_secs_f64() * 1e3,
                floor: None,
                unit: "ms",
                target: Some(Target::AtMost(200.0)),
                spread: None,
            });
            b.results
                .insert("startup_to_probe_ms".into(), json!(t.as_secs_f64() * 1e3));
        }
        b.run_all().await?;
        Ok::<_, anyhow::Error>(b)
    }
    .await;
    if let Some(mut child) = driver {
        stop_driver(&mut child).await;
    }
    let mut b = res?;
    b.results.insert(
        "wall_seconds".into(),
        json!(started_all.elapsed().as_secs_f64()),
    );
    let table = b.print_table();
    b.results.insert("table".into(), table);
    if let Some(p) = &b.args.json {
        let doc = Value::Object(b.results.clone());
        std::fs::write(p, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("results written to {}", p.display());
    }
    Ok(())
}

/// Spawns the driver and polls Probe until it answers ready; returns the time that took.
async fn spawn_driver(
    cmd: &[String],
    endpoint: &str,
    log: Option<&Path>,
) -> anyhow::Result<(tokio::process::Child, Duration)> {
    let mut command = tokio::process::Command::new(&cmd[0]);
    if let Some(log) = log {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        command.stdout(f.try_clone()?).stderr(f);
    }
    let t = Instant::now();
    let mut child = command
        .args(&cmd[1..])
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting the driver {:?}", cmd[0]))?;
    let deadline = t + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the driver exited during start-up: {status}");
        }
        if Instant::now() > deadline {
            bail!("the driver did not report a ready Probe within 30 s");
        }
        if let Ok(mut c) = CsiClient::connect(endpoint).await {
            if let Ok(r) = c.identity.probe(proto::ProbeRequest {}).await {
                if r.into_inner().ready == Some(true) {
                    return Ok((child, t.elapsed()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn stop_driver(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling the child we spawned, by its pid.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

impl Bench {
    async fn new(args: BenchArgs, driver_pid: Option<u32>) -> anyhow::Result<Self> {
        let client = CsiClient::connect_with_retry(&args.endpoint, Duration::from_secs(10)).await?;
        let params: HashMap<String, String> = args.params.iter().cloned().collect();
        let secrets = read_secrets(&args.secret_dir)?;
        let size = parse_size(&args.size)?;
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
                & 0xffffff
        );
        let floor = if args.floor {
            Some(Floor::connect(&args, &params, &secrets).await?)
        } else {
            None
        };
        let mut results = serde_json::Map::new();
        results.insert(
            "config".into(),
            json!({
                "endpoint": args.endpoint,
                "count": args.count,
                "concurrency": args.concurrency,
                "size_bytes": size,
                "params": params,
                "floor": args.floor,
                "features": params.get("imageFeatures").map(String::as_str).unwrap_or(DEFAULT_FEATURES),
            }),
        );
        Ok(Self {
            args,
            client,
            params,
            secrets,
            size,
            run_id,
            driver_pid,
            floor,
            rows: Vec::new(),
            results,
        })
    }

    async fn run_all(&mut self) -> anyhow::Result<()> {
        let rss_before = self.rss_kib();
        let scenarios = self.args.scenarios.clone();
        for s in scenarios {
            match s {
                Scenario::Serial => self.serial().await,
                Scenario::Concurrent => self.concurrent().await,
                Scenario::List => self.list().await,
                Scenario::Node => self.node().await,
                Scenario::Rss => self.rss().await,
                Scenario::Purge => self.purge().await,
                Scenario::Scale => self.scale().await,
            }
            .with_context(|| format!("scenario {s:?}"))?;
        }
        let rss_after = self.rss_kib();
        if let (Some(a), Some(b)) = (rss_before, rss_after) {
            eprintln!(
                "driver RSS: {} MiB before, {} MiB after",
                a / 1024,
                b / 1024
            );
        }
        self.results.insert(
            "driver_rss_kib".into(),
            json!({"before": rss_before, "after": rss_after}),
        );
        if let Some(url) = self.args.metrics_url.clone() {
            let text = http_get(&url)
                .await
                .with_context(|| format!("reading {url}"))?;
            let summary = summarize_metrics(&text);
            eprintln!("driver metrics ({url}):");
            for (k, v) in &summary {
                eprintln!("  {k} = {v}");
            }
            self.results.insert("driver_metrics".into(), json!(summary));
        }
        Ok(())
    }

    fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.driver_pid?)
    }

    fn create_request(&self, name: String) -> proto::CreateVolumeRequest {
        proto::CreateVolumeRequest {
            name,
            capacity_range: Some(proto::CapacityRange {
                required_bytes: self.size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability(false, "ext4", false)],
            parameters: self.params.clone(),
            secrets: self.secrets.clone(),
            ..Default::default()
        }
    }

    fn name(&self, scenario: &str, i: usize) -> String {
        format!("bench-{}-{scenario}-{i}", self.run_id)
    }

    /// CreateVolume then DeleteVolume, one at a time, each followed by the same pair on the floor
    /// so both see the same cluster state.
    async fn serial(&mut self) -> anyhow::Result<()> {
        let n = self.args.count;
        let (mut create, mut delete) = (Samples::default(), Samples::default());
        let (mut fcreate, mut fremove) = (Samples::default(), Samples::default());
        let p = Progress::new("serial create/delete", n);
        let mut driver_time = Duration::ZERO;
        for i in 0..n {
            let t = Instant::now();
            let req = self.create_request(self.name("s", i));
            let id = create_volume(&mut self.client, req).await?;
            create.push(t.elapsed());
            let t = Instant::now();
            delete_volume(&mut self.client, &id, &self.secrets).await?;
            delete.push(t.elapsed());
            driver_time += create.0[i] + delete.0[i];
            if let Some(f) = &self.floor {
                let name = self.name("fs", i);
                let t = Instant::now();
                f.create(&name, self.size as u64).await?;
                fcreate.push(t.elapsed());
                let t = Instant::now();
                f.remove(&name).await?;
                fremove.push(t.elapsed());
            }
            p.inc();
        }
        p.finish();
        let floor = self.floor.is_some();
        let pct = |s: &Samples, q| floor.then(|| ms(s.percentile(q)));
        // Each pair is driver then floor, so any stretch of pairs is a fair round.
        let rounds = self.args.rounds.max(1);
        for (what, d, f, target) in [
            (
                "serial CreateVolume p50",
                &create,
                &fcreate,
                Some(Target::RatioAtMost(1.3)),
            ),
            ("serial CreateVolume p90", &create, &fcreate, None),
            ("serial CreateVolume p99", &create, &fcreate, None),
            (
                "serial DeleteVolume p50",
                &delete,
                &fremove,
                // A trash move against rbd_remove's walk of the objects (issue 11).
                Some(Target::RatioAtMost(0.3)),
            ),
            ("serial DeleteVolume p90", &delete, &fremove, None),
            ("serial DeleteVolume p99", &delete, &fremove, None),
        ] {
            let q = match &what[what.len() - 3..] {
                "p50" => 50.0,
                "p90" => 90.0,
                _ => 99.0,
            };
            self.rows.push(Row {
                what: what.into(),
                driver: ms(d.percentile(q)),
                floor: pct(f, q),
                unit: "ms",
                target,
                spread: percentile_spread(d, f, rounds, q),
            });
        }
        let tput = n as f64 / driver_time.as_secs_f64();
        self.rows.push(Row {
            what: "serial create+delete pairs/s".into(),
            driver: tput,
            floor: floor.then(|| {
                let total: Duration = fcreate.0.iter().chain(&fremove.0).sum();
                n as f64 / total.as_secs_f64()
            }),
            unit: "/s",
            target: None,
            spread: {
                let rate = |a: &Samples, b: &Samples| {
                    a.len() as f64 / (a.total() + b.total()).as_secs_f64()
                };
                let d = create.rounds(rounds).into_iter().zip(delete.rounds(rounds));
                let f = fcreate
                    .rounds(rounds)
                    .into_iter()
                    .zip(fremove.rounds(rounds));
                spread(
                    d.zip(f)
                        .map(|((c, d), (fc, fr))| (rate(&c, &d), rate(&fc, &fr))),
                )
            },
        });
        self.results.insert(
            "serial".into(),
            json!({
                "create": create.json(), "delete": delete.json(),
                "floor_create": floor.then(|| fcreate.json()),
                "floor_remove": floor.then(|| fremove.json()),
                "pairs_per_second": tput,
            }),
        );
        Ok(())
    }

    /// `count` creates with `concurrency` in flight, then the deletes the same way.
    /// `count` creates with `concurrency` in flight, then the deletes the same way. With a floor,
    /// driver and floor rounds alternate A-B-B-A, so drift in a shared machine's load falls on both.
    async fn concurrent(&mut self) -> anyhow::Result<()> {
        let (n, c) = (self.args.count, self.args.concurrency.max(1));
        let rounds = if self.floor.is_some() {
            self.args.rounds.max(1)
        } else {
            1
        };
        // Wall time of the creates and of the deletes, driver (d) and floor (f).
        let (mut cw_d, mut dw_d) = (Duration::ZERO, Duration::ZERO);
        let (mut cw_f, mut dw_f) = (Duration::ZERO, Duration::ZERO);
        let (mut create, mut delete) = (Samples::default(), Samples::default());
        let (mut fcreate, mut fremove) = (Samples::default(), Samples::default());
        // Per round: create and delete wall times, driver then floor.
        let mut walls = Vec::with_capacity(rounds);
        for r in 0..rounds {
            let mut round = [Duration::ZERO; 4];
            let driver_first = r % 4 == 0 || r % 4 == 3;
            for floor_turn in [!driver_first, driver_first] {
                if !floor_turn {
                    let names: Vec<String> =
                        (0..n).map(|i| self.name(&format!("c{r}"), i)).collect();
                    let p = Progress::new(&format!("{c}-way CreateVolume ({}/{rounds})", r + 1), n);
                    let (ids, w, s) = self.create_many(&names, c, &p).await?;
                    p.finish();
                    cw_d += w;
                    round[0] = w;
                    create.0.extend(s.0);
                    let p = Progress::new(&format!("{c}-way DeleteVolume ({}/{rounds})", r + 1), n);
                    let (w, s) = self.delete_many(ids, c, &p).await?;
                    p.finish();
                    dw_d += w;
                    round[1] = w;
                    delete.0.extend(s.0);
                } else if let Some(f) = &self.floor {
                    let fnames: Vec<String> =
                        (0..n).map(|i| self.name(&format!("fc{r}"), i)).collect();
                    let p = Progress::new(&format!("{c}-way floor create ({}/{rounds})", r + 1), n);
                    let (w, s) = f.run_many(&fnames, c, self.size as u64, true, &p).await?;
                    p.finish();
                    cw_f += w;
                    round[2] = w;
                    fcreate.0.extend(s.0);
                    let p = Progress::new(&format!("{c}-way floor remove ({}/{rounds})", r + 1), n);
                    let (w, s) = f.run_many(&fnames, c, 0, false, &p).await?;
                    p.finish();
                    dw_f += w;
                    round[3] = w;
                    fremove.0.extend(s.0);
                }
            }
            walls.push(round);
        }
        let total = (n * rounds) as f64;
        let create_tput = total / cw_d.as_secs_f64();
        let delete_tput = total / dw_d.as_secs_f64();
        let (fc, fd) = match self.floor {
            Some(_) => (
                Some(total / cw_f.as_secs_f64()),
                Some(total / dw_f.as_secs_f64()),
            ),
            None => (None, None),
        };
        // Rates in a round are n / wall, so the rate ratio is floor wall over driver wall.
        let round_spread = |d: usize, f: usize| {
            let secs = |w: Duration| w.as_secs_f64();
            let with_floor = walls.iter().filter(|w| !w[f].is_zero());
            spread(with_floor.map(|w| (secs(w[f]), secs(w[d]))))
        };
        let floor_json = json!({"create_per_second": fc, "remove_per_second": fd,
            "create": fcreate.json(), "remove": fremove.json()});
        self.rows.push(Row {
            what: format!("{c}-way CreateVolume /s"),
            driver: create_tput,
            floor: fc,
            unit: "/s",
            target: Some(Target::RatioAtLeast(0.85)),
            spread: round_spread(0, 2),
        });
        self.rows.push(Row {
            what: format!("{c}-way DeleteVolume /s"),
            driver: delete_tput,
            floor: fd,
            unit: "/s",
            target: None,
            spread: round_spread(1, 3),
        });
        self.results.insert(
            "concurrent".into(),
            json!({
                "concurrency": c, "rounds": rounds,
                "create_per_second": create_tput, "delete_per_second": delete_tput,
                "create": create.json(), "delete": delete.json(),
                "floor": floor_json,
            }),
        );
        Ok(())
    }

    /// Creates every name with `c` calls in flight; returns the IDs, the wall time and latencies.
    async fn create_many(
        &self,
        names: &[String],
        c: usize,
        p: &Progress,
    ) -> anyhow::Result<(Vec<String>, Duration, Samples)> {
        let reqs: Vec<_> = names
            .iter()
            .map(|n| self.create_request(n.clone()))
            .collect();
        let client = self.client.clone();
        let done = p.handle();
        let (out, wall) = run_pool(reqs, c, move |req| {
            let mut client = client.clone();
            let done = done.clone();
            async move {
                let id = create_volume(&mut client, req).await?;
                done.inc(1);
                Ok(id)
            }
        })
        .await?;
        let mut s = Samples::default();
        let ids = out
            .into_iter()
            .map(|(id, d)| {
                s.push(d);
                id
            })
            .collect();
        Ok((ids, wall, s))
    }

    async fn delete_many(
        &self,
        ids: Vec<String>,
        c: usize,
        p: &Progress,
    ) -> anyhow::Result<(Duration, Samples)> {
        let client = self.client.clone();
        let secrets = Arc::new(self.secrets.clone());
        let done = p.handle();
        let (out, wall) = run_pool(ids, c, move |id| {
            let mut client = client.clone();
            let secrets = secrets.clone();
            let done = done.clone();
            async move {
                delete_volume(&mut client, &id, &secrets).await?;
                done.inc(1);
                Ok(())
            }
        })
        .await?;
        let mut s = Samples::default();
        for (_, d) in out {
            s.push(d);
        }
        Ok((wall, s))
    }

    async fn list(&mut self) -> anyhow::Result<()> {
        let n = self.args.list_volumes;
        let c = self.args.concurrency.max(1);
        let names: Vec<String> = (0..n).map(|i| self.name("l", i)).collect();
        let p = Progress::new("ListVolumes: creating", n);
        let (ids, _, _) = self.create_many(&names, c, &p).await?;
        p.finish();
        let rounds = 10;
        let mut lat = Samples::default();
        let p = Progress::new(&format!("ListVolumes over {n}"), rounds);
        let mut seen = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            let mut token = String::new();
            seen = 0;
            loop {
                let r = self
                    .client
                    .controller
                    .list_volumes(proto::ListVolumesRequest {
                        max_entries: 0,
                        starting_token: token.clone(),
                    })
                    .await
                    .map_err(|s| status_error("ListVolumes", "", s))?
                    .into_inner();
                seen += r
                    .entries
                    .iter()
                    .filter_map(|e| e.volume.as_ref())
                    .filter(|v| ids.contains(&v.volume_id))
                    .count();
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            lat.push(t.elapsed());
            p.inc();
        }
        p.finish();
        if seen != n {
            bail!("ListVolumes returned {seen} of the {n} volumes the bench created");
        }
        let p = Progress::new("ListVolumes: deleting", n);
        self.delete_many(ids, c, &p).await?;
        p.finish();
        self.rows.push(Row {
            what: format!("ListVolumes over {n} p50"),
            driver: ms(lat.percentile(50.0)),
            floor: None,
            unit: "ms",
            target: None,
            spread: None,
        });
        self.results
            .insert("list".into(), json!({"volumes": n, "latency": lat.json()}));
        Ok(())
    }

    /// Stage+publish and unpublish+unstage on fresh volumes, each followed by the same steps as
    /// plain commands (scripts/node-floor.sh) on a fresh image of its own.
    async fn node(&mut self) -> anyhow::Result<()> {
        let n = self.args.node_count;
        let driver_name = crate::csi::DEFAULT_DRIVER_NAME;
        let kubelet = self.args.kubelet_dir.clone();
        let (mut up, mut down) = (Samples::default(), Samples::default());
        let (mut fup, mut fdown) = (Samples::default(), Samples::default());
        let p = Progress::new("node stage+publish", n);
        for i in 0..n {
            let name = self.name("n", i);
            let resp = self
                .client
                .controller
                .create_volume(self.create_request(name.clone()))
                .await
                .map_err(|s| status_error("CreateVolume", &name, s))?
                .into_inner();
            let vol = resp
                .volume
                .ok_or_else(|| anyhow!("CreateVolume {name}: no volume"))?;
            let staging = kubelet
                .join("plugins/kubernetes.io/csi")
                .join(driver_name)
                .join(&name)
                .join("globalmount");
            let target = kubelet
                .join("pods")
                .join(&name)
                .join("volumes/kubernetes.io~csi/pv/mount");
            std::fs::create_dir_all(&staging)?;
            std::fs::create_dir_all(target.parent().unwrap())?;
            let cap = Some(capability(false, "ext4", false));
            let t = Instant::now();
            self.client
                .node
                .node_stage_volume(proto::NodeStageVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    staging_target_path: staging.to_string_lossy().into(),
                    volume_capability: cap.clone(),
                    secrets: self.secrets.clone(),
                    volume_context: vol.volume_context.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| status_error("NodeStageVolume", &vol.volume_id, s))?;
            self.client
                .node
                .node_publish_volume(proto::NodePublishVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    staging_target_path: staging.to_string_lossy().into(),
                    target_path: target.to_string_lossy().into(),
                    volume_capability: cap.clone(),
                    secrets: self.secrets.clone(),
                    volume_context: vol.volume_context.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| status_error("NodePublishVolume", &vol.volume_id, s))?;
            up.push(t.elapsed());
            let t = Instant::now();
            self.client
                .node
                .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    target_path: target.to_string_lossy().into(),
                })
                .await
                .map_err(|s| status_error("NodeUnpublishVolume", &vol.volume_id, s))?;
            self.client
                .node
                .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    staging_target_path: staging.to_string_lossy().into(),
                })
                .await
                .map_err(|s| status_error("NodeUnstageVolume", &vol.volume_id, s))?;
            down.push(t.elapsed());
            delete_volume(&mut self.client, &vol.volume_id, &self.secrets).await?;
            let _ = std::fs::remove_dir_all(kubelet.join("pods").join(&name));
            let _ = std::fs::remove_dir(&staging);
            let _ = std::fs::remove_dir(staging.parent().unwrap());

            if let Some(f) = &self.floor {
                let fname = self.name("fn", i);
                let dir = kubelet.join("bench-floor").join(&fname);
                f.create(&fname, self.size as u64).await?;
                let (a, b) = f
                    .node_steps(&self.args.node_floor_script, &fname, &dir)
                    .await?;
                fup.push(a);
                fdown.push(b);
                f.remove(&fname).await?;
                let _ = std::fs::remove_dir_all(&dir);
            }
            p.inc();
        }
        p.finish();
        let floor = self.floor.is_some();
        self.rows.push(Row {
            what: "NodeStage+NodePublish p50".into(),
            driver: ms(up.percentile(50.0)),
            floor: floor.then(|| ms(fup.percentile(50.0))),
            unit: "ms",
            target: Some(Target::RatioAtMost(1.2)),
            // Each volume is a round: driver, then the floor.
            spread: percentile_spread(&up, &fup, n, 50.0),
        });
        self.rows.push(Row {
            what: "NodeUnpublish+NodeUnstage p50".into(),
            driver: ms(down.percentile(50.0)),
            floor: floor.then(|| ms(fdown.percentile(50.0))),
            unit: "ms",
            target: None,
            spread: percentile_spread(&down, &fdown, n, 50.0),
        });
        self.results.insert(
            "node".into(),
            json!({
                "mounter": self.params.get("mounter"),
                "stage_publish": up.json(), "unpublish_unstage": down.json(),
                "floor_stage_publish": floor.then(|| fup.json()),
                "floor_unpublish_unstage": floor.then(|| fdown.json()),
            }),
        );
        Ok(())
    }

    /// Deletes `count` volumes `concurrency` at a time, then watches the pool and its trash until
    /// every image is gone: how long after its deferment's end each one went. The deferment is
    /// counted from the start of its DeleteVolume call, which is before the driver can have
    /// recorded it, so an image gone before that end is a purge that came early.
    async fn purge(&mut self) -> anyhow::Result<()> {
        let Some(floor) = &self.floor else {
            bail!("the purge scenario watches the trash through our Ceph layer: it needs --floor");
        };
        let (n, c) = (self.args.count, self.args.concurrency.max(1));
        let deferment = Duration::from_secs(self.args.trash_deferment);
        let names: Vec<String> = (0..n).map(|i| self.name("p", i)).collect();
        let p = Progress::new("purge: creating", n);
        let (ids, _, _) = self.create_many(&names, c, &p).await?;
        p.finish();
        let (client, secrets) = (self.client.clone(), Arc::new(self.secrets.clone()));
        let (deleted, _) = run_pool(ids, c, move |id| {
            let (mut client, secrets) = (client.clone(), secrets.clone());
            async move {
                let image = crate::volume::VolumeId::decode(&id)
                    .map_err(|e| anyhow!("volume ID {id}: {e}"))?
                    .image;
                let started = Instant::now();
                delete_volume(&mut client, &id, &secrets).await?;
                Ok((image, started + deferment))
            }
        })
        .await?;
        let mut due: HashMap<String, Instant> = deleted.into_iter().map(|(d, _)| d).collect();
        let p = Progress::new("purge: waiting for the trash", n);
        let mut late = Samples::default();
        let give_up = Instant::now() + deferment + Duration::from_secs(600);
        while !due.is_empty() {
            if Instant::now() > give_up {
                bail!(
                    "{} deleted images still in the pool or its trash",
                    due.len()
                );
            }
            let io = floor.io.clone();
            let present = blocking(move || {
                let mut names: std::collections::HashSet<String> =
                    io.list_images()?.into_iter().collect();
                names.extend(io.trash_list()?.into_iter().map(|e| e.name));
                Ok(names)
            })
            .await?;
            let now = Instant::now();
            let mut early = Vec::new();
            due.retain(|image, end| {
                if present.contains(image) {
                    return true;
                }
                match now.checked_duration_since(*end) {
                    Some(d) => late.push(d),
                    None => early.push(image.clone()),
                }
                p.inc();
                false
            });
            if !early.is_empty() {
                bail!("purged before their deferment ended: {early:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p.finish();
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
        self.rows.push(Row {
            what: format!("purge: last of {n}, after deferment end"),
            driver: secs(late.percentile(100.0)),
            floor: None,
            unit: "s",
            target: Some(Target::AtMost(60.0)),
            spread: None,
        });
        self.rows.push(Row {
            what: "purge: p50 after deferment end".into(),
            driver: secs(late.percentile(50.0)),
            floor: None,
            unit: "s",
            target: None,
            spread: None,
        });
        self.results.insert(
            "purge".into(),
            json!({"deferment_s": deferment.as_secs(), "after_deferment_end": late.json()}),
        );
        Ok(())
    }

    /// The scale scenario; whatever it created is removed (trash purge included) even when a
    /// step failed.
    async fn scale(&mut self) -> anyhow::Result<()> {
        if self.floor.is_none() {
            bail!("the scale scenario creates images through our Ceph layer: it needs --floor");
        }
        let mut made = ScaleImages::default();
        let steps = self.scale_steps(&mut made).await;
        let cleanup = self.scale_cleanup(made).await;
        steps.and(cleanup)
    }

    async fn scale_steps(&mut self, made: &mut ScaleImages) -> anyhow::Result<()> {
        let c = self.args.scale_concurrency.max(1);
        let page = self.args.scale_page;
        let max_entries = i32::try_from(page).context("--scale-page")?;
        let mem = |b: &Self| b.driver_pid.and_then(memory_kib);
        let mut creates = Samples::default();
        let mut create_wall = Duration::ZERO;
        let mut points = Vec::new();
        for count in self.args.scale_images.clone() {
            let have = made.driver_ids.len() + made.floor_names.len();
            let want = count.saturating_sub(have);
            let by_driver = want.min(
                self.args
                    .scale_driver_volumes
                    .saturating_sub(made.driver_ids.len()),
            );
            let t = Instant::now();
            if by_driver > 0 {
                let first = made.driver_ids.len();
                let names: Vec<String> = (first..first + by_driver)
                    .map(|i| self.name("k", i))
                    .collect();
                let p = Progress::new(
                    &format!("scale: {c}-way CreateVolume to {count}"),
                    by_driver,
                );
                let (ids, w, s) = self.create_many(&names, c, &p).await?;
                p.finish();
                create_wall += w;
                creates.0.extend(s.0);
                made.driver_ids.extend(ids);
            }
            let by_librbd = want - by_driver;
            if by_librbd > 0 {
                let first = made.floor_names.len();
                // The driver's default prefix, so ListVolumes counts them as volumes.
                let names: Vec<String> = (first..first + by_librbd)
                    .map(|i| format!("{VOLUME_PREFIX}{}", self.name("kf", i)))
                    .collect();
                made.floor_names.extend(names.iter().cloned());
                let p = Progress::new(
                    &format!("scale: {c}-way librbd create to {count}"),
                    by_librbd,
                );
                let floor = self.floor.as_ref().expect("checked in scale()");
                floor
                    .run_many(&names, c, self.size as u64, true, &p)
                    .await?;
                p.finish();
            }
            let create_took = t.elapsed();
            let after_create = mem(self);

            let expected: std::collections::HashSet<String> = made.images()?.into_iter().collect();
            let (total, pages) = self.list_all_once(&expected, max_entries, count).await?;
            let after_list = mem(self);
            let secs = create_took.as_secs_f64();
            let how = match (by_driver, by_librbd) {
                (0, _) => "librbd",
                (_, 0) => "driver",
                _ => "driver+librbd",
            };
            let mib = |m: Option<Memory>| m.map(|m| m.anon as f64 / 1024.0).unwrap_or(f64::NAN);
            let threads = |m: Option<Memory>| m.map(|m| m.threads as f64).unwrap_or(f64::NAN);
            for (what, driver, unit, target) in [
                (format!("+{want} images ({how})"), secs, "s", None),
                (
                    format!("ListVolumes, {} pages", pages.len()),
                    total.as_secs_f64() * 1e3,
                    "ms",
                    None,
                ),
                ("  page p50".into(), ms(pages.percentile(50.0)), "ms", None),
                (
                    "  page max".into(),
                    ms(pages.percentile(100.0)),
                    "ms",
                    Some(Target::AtMost(100.0)),
                ),
                ("  RssAnon after list".into(), mib(after_list), "MiB", None),
                ("  threads after list".into(), threads(after_list), "", None),
            ] {
                self.rows.push(Row {
                    what: format!("scale {count}: {what}"),
                    driver,
                    floor: None,
                    unit,
                    target,
                    spread: None,
                });
            }
            points.push(json!({
                "images": count, "created": want, "created_by": how, "create_s": secs,
                "list_ms": total.as_secs_f64() * 1e3, "page_size": page, "pages": pages.json(),
                "page_max_ms": ms(pages.percentile(100.0)),
                "after_create": after_create, "after_list": after_list,
            }));
        }
        let n = creates.len();
        if n > 0 {
            let rate = n as f64 / create_wall.as_secs_f64();
            for (what, driver, unit) in [
                (format!("scale: {n} CreateVolume {c}-way"), rate, "/s"),
                (
                    "  CreateVolume p50".into(),
                    ms(creates.percentile(50.0)),
                    "ms",
                ),
                (
                    "  CreateVolume p99".into(),
                    ms(creates.percentile(99.0)),
                    "ms",
                ),
            ] {
                self.rows.push(Row {
                    what,
                    driver,
                    floor: None,
                    unit,
                    target: None,
                    spread: None,
                });
            }
        }
        self.results.insert(
            "scale".into(),
            json!({
                "concurrency": c, "steps": points,
                "driver_creates": creates.json(),
                "driver_create_per_second": (n > 0).then(|| n as f64 / create_wall.as_secs_f64()),
            }),
        );
        Ok(())
    }

    /// One full ListVolumes walk in pages of `max_entries`: the total time and each page's, after
    /// checking that every expected image came exactly once.
    async fn list_all_once(
        &mut self,
        expected: &std::collections::HashSet<String>,
        max_entries: i32,
        count: usize,
    ) -> anyhow::Result<(Duration, Samples)> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut pages = Samples::default();
        let mut token = String::new();
        let p = Progress::new(&format!("scale: ListVolumes over {count}"), count);
        let t = Instant::now();
        loop {
            let pt = Instant::now();
            let r = self
                .client
                .controller
                .list_volumes(proto::ListVolumesRequest {
                    max_entries,
                    starting_token: token.clone(),
                })
                .await
                .map_err(|s| status_error("ListVolumes", "", s))?
                .into_inner();
            pages.push(pt.elapsed());
            if max_entries > 0 && r.entries.len() > max_entries as usize {
                bail!(
                    "ListVolumes returned {} entries for max_entries {max_entries}",
                    r.entries.len()
                );
            }
            for v in r.entries.iter().filter_map(|e| e.volume.as_ref()) {
                let image = crate::volume::VolumeId::decode(&v.volume_id)
                    .map_err(|e| anyhow!("ListVolumes gave volume ID {}: {e}", v.volume_id))?
                    .image;
                if expected.contains(&image) {
                    *seen.entry(image).or_default() += 1;
                    p.inc();
                }
            }
            if r.next_token.is_empty() {
                break;
            }
            token = r.next_token;
        }
        let total = t.elapsed();
        p.finish();
        let missing = expected.iter().filter(|i| !seen.contains_key(*i)).count();
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
        if missing > 0 || !twice.is_empty() {
            bail!(
                "ListVolumes over {count}: {missing} of {} volumes missing, some listed more \
                 than once: {twice:?}",
                expected.len()
            );
        }
        Ok((total, pages))
    }

    /// DeleteVolume for the driver's volumes, rbd_remove for the rest, then a wait until none
    /// of them is left in the pool or its trash (the driver purges after its deferment).
    async fn scale_cleanup(&mut self, made: ScaleImages) -> anyhow::Result<()> {
        let c = self.args.scale_concurrency.max(1);
        let t = Instant::now();
        let mut left: std::collections::HashSet<String> = made.images()?.into_iter().collect();
        let p = Progress::new("scale: DeleteVolume", made.driver_ids.len());
        let deleted = self.delete_many(made.driver_ids, c, &p).await;
        p.finish();
        let floor = self.floor.as_ref().expect("checked in scale()");
        let p = Progress::new("scale: librbd remove", made.floor_names.len());
        let done = p.handle();
        let io = floor.io.clone();
        // A step that failed half-way leaves some of its names never created.
        let removed = run_pool(made.floor_names, c, move |name| {
            let (io, done) = (io.clone(), done.clone());
            async move {
                match blocking(move || io.remove_image(&name)).await {
                    Err(e) if !e.not_found() => return Err(e.into()),
                    _ => done.inc(1),
                }
                Ok(())
            }
        })
        .await;
        p.finish();
        // Volumes not deleted would keep the wait below busy until it gives up.
        deleted?;
        removed?;
        let p = Progress::new("scale: waiting for the trash purge", left.len());
        let give_up = Instant::now() + Duration::from_secs(self.args.trash_deferment + 600);
        while !left.is_empty() {
            if Instant::now() > give_up {
                bail!("{} scale images still in the pool or its trash", left.len());
            }
            let io = floor.io.clone();
            let present: std::collections::HashSet<String> = blocking(move || {
                let mut names: std::collections::HashSet<String> =
                    io.list_images()?.into_iter().collect();
                names.extend(io.trash_list()?.into_iter().map(|e| e.name));
                Ok(names)
            })
            .await?;
            left.retain(|i| {
                let keep = present.contains(i);
                if !keep {
                    p.inc();
                }
                keep
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        p.finish();
        self.rows.push(Row {
            what: "scale: clean-up incl. trash purge".into(),
            driver: t.elapsed().as_secs_f64(),
            floor: None,
            unit: "s",
            target: None,
            spread: None,
        });
        Ok(())
    }

    /// Create/delete cycles with RSS read at each checkpoint: the memory bound.
    async fn rss(&mut self) -> anyhow::Result<()> {
        if self.driver_pid.is_none() {
            bail!("the RSS scenario needs --driver-pid, or a driver command after --");
        }
        let c = self.args.concurrency.max(1);
        let mem = |b: &Self| b.driver_pid.and_then(memory_kib);
        let start = mem(self);
        let mut points = vec![json!({"cycles": 0, "memory_kib": start})];
        let mut done = 0;
        let mut last = Vec::new();
        let checkpoints = self.args.rss_cycles.clone();
        let total = checkpoints.iter().copied().max().unwrap_or(0);
        let p = Progress::new("RSS create/delete cycles", total);
        for &at in &checkpoints {
            let mut batch = 0;
            while done < at {
                let k = (at - done).min(500);
                let names: Vec<String> = (0..k)
                    .map(|i| self.name(&format!("r{batch}"), done + i))
                    .collect();
                let (ids, _, _) = self.create_many(&names, c, &p).await?;
                self.delete_many(ids, c, &Progress::hidden()).await?;
                done += k;
                batch += 1;
            }
            // RSS at rest: a driver may give memory back once a burst is over (ours trims
            // every 2 s), and a burst's peak is not what stays.
            tokio::time::sleep(Duration::from_millis(self.args.rss_settle_ms)).await;
            let m = mem(self).ok_or_else(|| anyhow!("cannot read the driver's memory"))?;
            points.push(json!({"cycles": at, "memory_kib": m}));
            last.push((at, m));
        }
        p.finish();
        let mib = |kib: u64| kib as f64 / 1024.0;
        for (at, m) in &last {
            self.rows.push(Row {
                what: format!("driver RSS after {at} cycles"),
                driver: mib(m.rss),
                floor: None,
                unit: "MiB",
                target: Some(Target::AtMost(30.0)),
                spread: None,
            });
            self.rows.push(Row {
                what: format!("  private (RssAnon) after {at}"),
                driver: mib(m.anon),
                floor: None,
                unit: "MiB",
                target: None,
                spread: None,
            });
            self.rows.push(Row {
                what: format!("  shared libs/text (RssFile) at {at}"),
                driver: mib(m.file),
                floor: None,
                unit: "MiB",
                target: None,
                spread: None,
            });
        }
        if last.len() >= 2 {
            let (a, b) = (last[last.len() - 2], last[last.len() - 1]);
            self.rows.push(Row {
                what: format!("RSS growth {}->{} cycles", a.0, b.0),
                driver: mib(b.1.rss) - mib(a.1.rss),
                floor: None,
                unit: "MiB",
                target: None,
                spread: None,
            });
            // A leak is private memory; RssFile also grows when code runs for the first time.
            // Half a MiB over 1,000 cycles would be a leak of ~0.5 KiB per cycle.
            self.rows.push(Row {
                what: format!("RssAnon growth {}->{} cycles", a.0, b.0),
                driver: mib(b.1.anon) - mib(a.1.anon),
                floor: None,
                unit: "MiB",
                target: Some(Target::AtMost(0.5)),
                spread: None,
            });
        }
        self.results.insert("rss_cycles".into(), json!(points));
        Ok(())
    }

    /// Prints the table and returns it as JSON, so runs can be compared line by line.
    fn print_table(&self) -> Value {
        println!();
        println!(
            "{:<36} {:>12} {:>12} {:>8} {:>13}   {:<12} result",
            "what", "driver", "floor", "ratio", "rounds", "target"
        );
        println!("{}", "-".repeat(110));
        let mut rows = Vec::new();
        for r in &self.rows {
            let f = |v: f64| match r.unit {
                "ms" => format!("{v:.2} ms"),
                "/s" => format!("{v:.1} /s"),
                u => format!("{v:.1} {u}"),
            };
            let verdict = match r.verdict() {
                Some(true) => "ok",
                Some(false) => "MISSED",
                None => "",
            };
            println!(
                "{:<36} {:>12} {:>12} {:>8} {:>13}   {:<12} {verdict}",
                r.what,
                f(r.driver),
                r.floor.map(f).unwrap_or_default(),
                r.ratio().map(|x| format!("{x:.2}x")).unwrap_or_default(),
                r.spread
                    .map(|(lo, hi)| format!("{lo:.2}-{hi:.2}x"))
                    .unwrap_or_default(),
                r.target_text(),
            );
            rows.push(json!({
                "what": r.what, "driver": r.driver, "floor": r.floor, "unit": r.unit,
                "ratio": r.ratio(), "round_ratio_min_max": r.spread.map(|(lo, hi)| [lo, hi]),
                "target": r.target_text(), "met": r.verdict(),
            }));
        }
        let _ = std::io::stdout().flush();
        json!(rows)
    }
}

/// Runs `work` over `items` with `c` in flight; the first error stops the run and is returned.
/// Returns each result with its latency, and the wall time.
async fn run_pool<I, T, F, Fut>(
    items: Vec<I>,
    c: usize,
    work: F,
) -> anyhow::Result<(Vec<(T, Duration)>, Duration)>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter().enumerate()));
    let work = Arc::new(work);
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (queue, work) = (queue.clone(), work.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let next = queue.lock().unwrap().next();
                let Some((i, item)) = next else {
                    return Ok::<_, anyhow::Error>(out);
                };
                let s = Instant::now();
                let r = work(item).await?;
                out.push((i, r, s.elapsed()));
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(v) => all.extend(v),
            Err(e) => {
                set.abort_all();
                return Err(e);
            }
        }
    }
    let wall = t.elapsed();
    all.sort_by_key(|(i, _, _)| *i);
    Ok((all.into_iter().map(|(_, r, d)| (r, d)).collect(), wall))
}

fn status_error(call: &str, what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("{call} {what}: {:?}: {}", s.code(), s.message())
}

async fn create_volume(
    client: &mut CsiClient,
    req: proto::CreateVolumeRequest,
) -> anyhow::Result<String> {
    let name = req.name.clone();
    let r = client
        .controller
        .create_volume(req)
        .await
        .map_err(|s| status_error("CreateVolume", &name, s))?;
    r.into_inner()
        .volume
        .map(|v| v.volume_id)
        .ok_or_else(|| anyhow!("CreateVolume {name}: no volume in the answer"))
}

async fn delete_volume(
    client: &mut CsiClient,
    id: &str,
    secrets: &HashMap<String, String>,
) -> anyhow::Result<()> {
    client
        .controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: secrets.clone(),
        })
        .await
        .map_err(|s| status_error("DeleteVolume", id, s))?;
    Ok(())
}

impl Floor {
    async fn connect(
        args: &BenchArgs,
        params: &HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let cfg_path = args
            .cluster_config
            .as_ref()
            .ok_or_else(|| anyhow!("--floor needs --cluster-config"))?;
        let clusters = ClusterConfig::load(cfg_path)?;
        let cluster = args
            .cluster_id
            .clone()
            .or_else(|| params.get("clusterID").cloned())
            .ok_or_else(|| anyhow!("--floor needs --cluster-id or --param clusterID=..."))?;
        let pool = args
            .pool
            .clone()
            .or_else(|| params.get("pool").cloned())
            .ok_or_else(|| anyhow!("--floor needs --pool or --param pool=..."))?;
        let entry = clusters
            .get(&cluster)
            .ok_or_else(|| anyhow!("cluster {cluster} is not in {}", cfg_path.display()))?;
        anyhow::ensure!(!secrets.is_empty(), "--floor needs --secret-dir");
        let Credentials { user, key } = Credentials::from_secrets(secrets)?;
        let features = parse_features(
            params
                .get("imageFeatures")
                .map(String::as_str)
                .unwrap_or(DEFAULT_FEATURES),
        )?;
        let ceph = ConnectionPool::new(CephTimeouts::default());
        let conn = ceph.get(&cluster, &entry.monitors, &user, &key).await?;
        let p = pool.clone();
        let io = blocking(move || conn.ioctx(&p)).await?;
        Ok(Self {
            io,
            opts: ImageOptions {
                features,
                data_pool: params.get("dataPool").cloned(),
                ..Default::default()
            },
            monitors: entry.monitors.clone(),
            user,
            key,
            pool,
        })
    }

    async fn create(&self, name: &str, size: u64) -> anyhow::Result<()> {
        let (io, name, opts) = (self.io.clone(), name.to_string(), self.opts.clone());
        Ok(blocking(move || io.create_image(&name, size, &opts)).await?)
    }

    async fn remove(&self, name: &str) -> anyhow::Result<()> {
        let (io, name) = (self.io.clone(), name.to_string());
        Ok(blocking(move || io.remove_image(&name)).await?)
    }

    /// Creates (or removes) every name with `c` in flight.
    async fn run_many(
        &self,
        names: &[String],
        c: usize,
        size: u64,
        create: bool,
        p: &Progress,
    ) -> anyhow::Result<(Duration, Samples)> {
        let (io, opts) = (self.io.clone(), self.opts.clone());
        let done = p.handle();
        let (out, wall) = run_pool(names.to_vec(), c, move |name| {
            let (io, opts, done) = (io.clone(), opts.clone(), done.clone());
            async move {
                blocking(move || {
                    if create {
                        io.create_image(&name, size, &opts)
                    } else {
                        io.remove_image(&name)
                    }
                })
                .await?;
                done.inc(1);
                Ok(())
            }
        })
        .await?;
        let mut s = Samples::default();
        for (_, d) in out {
            s.push(d);
        }
        Ok((wall, s))
    }

    /// Times `node-floor.sh stage` and `node-floor.sh unstage` on an existing image.
    async fn node_steps(
        &self,
        script: &Path,
        image: &str,
        dir: &Path,
    ) -> anyhow::Result<(Duration, Duration)> {
        std::fs::create_dir_all(dir)?;
        let keyfile = dir.join("key");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&keyfile)?;
            f.write_all(self.key.expose().as_bytes())?;
        }
        let run = |step: &str| {
            let mut cmd = tokio::process::Command::new("bash");
            cmd.arg(script)
                .arg(step)
                .env("FLOOR_DIR", dir)
                .env("FLOOR_POOL", &self.pool)
                .env("FLOOR_IMAGE", image)
                .env("FLOOR_USER", &self.user)
                .env("FLOOR_MONITORS", self.monitors.join(","))
                .env("FLOOR_KEYFILE", &keyfile)
                .stdin(std::process::Stdio::null());
            cmd
        };
        let step = |name: &'static str, mut cmd: tokio::process::Command| async move {
            let t = Instant::now();
            let out = cmd
                .output()
                .await
                .with_context(|| format!("running {}", script.display()))?;
            if !out.status.success() {
                bail!(
                    "node-floor.sh {name} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(t.elapsed())
        };
        let up = step("stage", run("stage")).await;
        // Always tear down, even when staging failed half-way.
        let down = step("unstage", run("unstage")).await;
        let _ = std::fs::remove_file(&keyfile);
        Ok((up?, down?))
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    memory_kib(pid).map(|m| m.rss)
}

/// A process's resident memory, in KiB: all of it, the private (anonymous) part and the part
/// backed by files (the binary and shared libraries, shared with other processes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub threads: u64,
}

pub fn memory_kib(pid: u32) -> Option<Memory> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_memory(&s)
}

fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        anon: field("RssAnon:").unwrap_or(0),
        file: field("RssFile:").unwrap_or(0),
        threads: field("Threads:").unwrap_or(0),
    })
}

/// A plain HTTP/1.1 GET (the driver's metrics endpoint speaks nothing fancier).
async fn http_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// The lines of the driver's metrics worth keeping with a bench result: server-side mean
/// latency per method and code, error counts, pool and liveness gauges.
fn summarize_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    let mut sums = HashMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = v.parse::<f64>() else { continue };
        if let Some(labels) = name.strip_prefix("rook_rbd_rpc_duration_seconds_sum") {
            sums.entry(labels.to_string()).or_insert((0.0, 0.0)).0 = v;
        } else if let Some(labels) = name.strip_prefix("rook_rbd_rpc_duration_seconds_count") {
            sums.entry(labels.to_string()).or_insert((0.0, 0.0)).1 = v;
        } else if name.starts_with("rook_rbd_ceph_")
            || name == "rook_rbd_cluster_ready"
            || name == "process_resident_memory_bytes"
        {
            out.insert(name.to_string(), v);
        }
    }
    for (labels, (sum, count)) in sums {
        if count > 0.0 {
            out.insert(format!("server mean ms {labels}"), sum / count * 1e3);
            out.insert(format!("calls {labels}"), count);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(ms: &[u64]) -> Samples {
        let mut s = Samples::default();
        for m in ms {
            s.push(Duration::from_millis(*m));
        }
        s
    }

    #[test]
    fn nearest_rank_percentiles_pick_real_samples() {
        let s = samples(&[50, 10, 40, 20, 30]);
        assert_eq!(s.percentile(50.0), Some(Duration::from_millis(30)));
        assert_eq!(s.percentile(90.0), Some(Duration::from_millis(50)));
        assert_eq!(s.percentile(0.0), Some(Duration::from_millis(10)));
        assert_eq!(s.percentile(100.0), Some(Duration::from_millis(50)));
        let hundred = samples(&(1..=100).collect::<Vec<_>>());
        assert_eq!(hundred.percentile(50.0), Some(Duration::from_millis(50)));
        assert_eq!(hundred.percentile(99.0), Some(Duration::from_millis(99)));
        assert_eq!(Samples::default().percentile(50.0), None);
        assert_eq!(s.mean(), Some(Duration::from_millis(30)));
    }

    #[test]
    fn ratio_targets_judge_in_the_right_direction() {
        let row = |driver, floor, target| Row {
            what: String::new(),
            driver,
            floor: Some(floor),
            unit: "ms",
            target: Some(target),
            spread: None,
        };
        assert_eq!(
            row(12.0, 10.0, Target::RatioAtMost(1.3)).verdict(),
            Some(true)
        );
        assert_eq!(
            row(14.0, 10.0, Target::RatioAtMost(1.3)).verdict(),
            Some(false)
        );
        assert_eq!(
            row(90.0, 100.0, Target::RatioAtLeast(0.85)).verdict(),
            Some(true)
        );
        assert_eq!(
            row(80.0, 100.0, Target::RatioAtLeast(0.85)).verdict(),
            Some(false)
        );
    }

    #[test]
    fn spread_is_the_lowest_and_highest_ratio_of_single_rounds() {
        // Four rounds of two samples: ratios 1.0, 2.0, 0.5 and 1.5.
        let d = samples(&[10, 10, 40, 40, 10, 10, 30, 30]);
        let f = samples(&[10, 10, 20, 20, 20, 20, 20, 20]);
        assert_eq!(percentile_spread(&d, &f, 4, 50.0), Some((0.5, 2.0)));
        // A round without a floor value says nothing about the ratio.
        assert_eq!(spread([(1.0, 0.0), (3.0, 2.0)]), Some((1.5, 1.5)));
        assert_eq!(percentile_spread(&d, &Samples::default(), 4, 50.0), None);
    }

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\trook-rbd\nVmPeak:\t  100 kB\nVmRSS:\t   23456 kB\n\
            RssAnon:\t    3456 kB\nRssFile:\t   20000 kB\nThreads:\t8\n";
        assert_eq!(
            parse_memory(status),
            Some(Memory {
                rss: 23456,
                anon: 3456,
                file: 20000,
                threads: 8,
            })
        );
        assert_eq!(parse_memory("Name: x\n"), None);
    }

    #[test]
    fn metrics_summary_turns_sums_and_counts_into_server_side_means() {
        let text = "# TYPE x histogram\n\
            rook_rbd_rpc_duration_seconds_sum{method=\"CreateVolume\",code=\"OK\"} 0.5\n\
            rook_rbd_rpc_duration_seconds_count{method=\"CreateVolume\",code=\"OK\"} 50\n\
            rook_rbd_ceph_connects_total 1\n";
        let m = summarize_metrics(text);
        let mean = m["server mean ms {method=\"CreateVolume\",code=\"OK\"}"];
        assert!((mean - 10.0).abs() < 1e-9);
        assert_eq!(m["rook_rbd_ceph_connects_total"], 1.0);
    }
}
