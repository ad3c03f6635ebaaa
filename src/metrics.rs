//! Prometheus metrics: per-RPC latency histograms (recorded by a tower layer on the gRPC server),
//! Ceph connection-pool gauges, in-flight counts and a liveness gauge, served as text at
//! `/metrics` next to `/healthz` by a deliberately tiny HTTP/1 server.
//!
//! The hot path is a few relaxed atomic adds into a table sized at start-up: no locks, no
//! allocation, no logging. Rendering, which happens once per scrape, does the formatting.

use crate::ceph::health::Health;
use crate::ceph::ConnectionPool;
use crate::volume::guard::InFlight;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codegen::http;

/// Upper bounds of the latency buckets, in seconds (as printed) and nanoseconds (as compared).
/// From 1 ms (an Identity call) to 30 s (a stuck Ceph call hitting its deadline).
pub const BUCKETS: [(&str, u64); 14] = [
    ("0.001", 1_000_000),
    ("0.0025", 2_500_000),
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("10", 10_000_000_000),
    ("30", 30_000_000_000),
];

/// A fixed-bucket latency histogram. Buckets are stored non-cumulatively (one add per
/// observation) and summed when rendered.
#[derive(Default)]
pub struct Histogram {
    /// `buckets[i]` counts observations in (BUCKETS[i-1], BUCKETS[i]]; the last is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKETS.partition_point(|&(_, le)| le < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    /// Cumulative counts per bucket, ending with +Inf.
    pub fn cumulative(&self) -> [u64; BUCKETS.len() + 1] {
        let mut out = [0u64; BUCKETS.len() + 1];
        let mut acc = 0;
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            acc += b.load(Ordering::Relaxed);
            *o = acc;
        }
        out
    }

    /// The q-quantile estimated as Prometheus' `histogram_quantile` does: linear interpolation
    /// inside the bucket that holds the rank. `None` without observations; observations above
    /// the last bound report that bound.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let cum = self.cumulative();
        let total = *cum.last().unwrap();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let i = cum.iter().position(|&c| c as f64 >= rank).unwrap();
        if i == BUCKETS.len() {
            return Some(Duration::from_nanos(BUCKETS[i - 1].1));
        }
        let (lo, below) = match i {
            0 => (0u64, 0u64),
            _ => (BUCKETS[i - 1].1, cum[i - 1]),
        };
        let hi = BUCKETS[i].1;
        let in_bucket = (cum[i] - below) as f64;
        let frac = if in_bucket == 0.0 {
            1.0
        } else {
            (rank - below as f64) / in_bucket
        };
        Some(Duration::from_nanos(lo + ((hi - lo) as f64 * frac) as u64))
    }
}

/// gRPC status codes by number, named as go-grpc-prometheus labels them.
pub const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Every CSI method we serve, so the table can be sized once; anything else is `other`.
pub const METHODS: [&str; 26] = [
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
    "other",
];

/// The index into `METHODS` for a gRPC path such as `/csi.v1.Controller/CreateVolume`.
pub fn method_index(path: &str) -> usize {
    let other = METHODS.len() - 1;
    if !path.starts_with("/csi.v1.") {
        return other;
    }
    let name = path.rsplit('/').next().unwrap_or("");
    METHODS[..other]
        .iter()
        .position(|m| *m == name)
        .unwrap_or(other)
}

/// The per-RPC table plus the gauges that are not owned elsewhere.
pub struct RpcMetrics {
    /// `[method][code]`.
    table: Vec<[Histogram; CODES.len()]>,
    in_flight: AtomicI64,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            table: (0..METHODS.len()).map(|_| Default::default()).collect(),
            in_flight: AtomicI64::new(0),
        }
    }
}

impl RpcMetrics {
    pub fn observe(&self, method: usize, code: usize, d: Duration) {
        self.table[method][code.min(CODES.len() - 1)].observe(d);
    }

    pub fn histogram(&self, method: &str, code: &str) -> Option<&Histogram> {
        let m = METHODS.iter().position(|x| *x == method)?;
        let c = CODES.iter().position(|x| *x == code)?;
        Some(&self.table[m][c])
    }

    /// Calls answered so far, over every method and code (read once per scrape or trim check).
    pub fn calls_total(&self) -> u64 {
        self.table.iter().flatten().map(Histogram::count).sum()
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The RPC families in Prometheus text format; only series that have seen a call.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP rook_rbd_rpc_duration_seconds Time to answer a CSI call, by method and gRPC code.\n");
        out.push_str("# TYPE rook_rbd_rpc_duration_seconds histogram\n");
        let series = || {
            self.table.iter().enumerate().flat_map(|(m, codes)| {
                codes
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| h.count() > 0)
                    .map(move |(c, h)| (METHODS[m], CODES[c], h))
            })
        };
        for (m, c, h) in series() {
            let cum = h.cumulative();
            for (i, (le, _)) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "rook_rbd_rpc_duration_seconds_bucket{{method=\"{m}\",code=\"{c}\",le=\"{le}\"}} {}",
                    cum[i]
                );
            }
            let _ = writeln!(
                out,
                "rook_rbd_rpc_duration_seconds_bucket{{method=\"{m}\",code=\"{c}\",le=\"+Inf\"}} {}",
                cum[BUCKETS.len()]
            );
            let _ = writeln!(
                out,
                "rook_rbd_rpc_duration_seconds_sum{{method=\"{m}\",code=\"{c}\"}} {}",
                h.sum().as_secs_f64()
            );
            let _ = writeln!(
                out,
                "rook_rbd_rpc_duration_seconds_count{{method=\"{m}\",code=\"{c}\"}} {}",
                cum[BUCKETS.len()]
            );
        }
        out.push_str(
            "# HELP rook_rbd_rpc_requests_total CSI calls answered, by method and gRPC code.\n",
        );
        out.push_str("# TYPE rook_rbd_rpc_requests_total counter\n");
        for (m, c, h) in series() {
            let _ = writeln!(
                out,
                "rook_rbd_rpc_requests_total{{method=\"{m}\",code=\"{c}\"}} {}",
                h.count()
            );
        }
        gauge(
            out,
            "rook_rbd_rpc_in_flight",
            "CSI calls being served right now.",
            self.in_flight(),
        );
    }
}

fn gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
    );
}

fn counter(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
    );
}

/// Everything `/metrics` and `/healthz` report on.
#[derive(Clone)]
pub struct Sources {
    pub rpc: Arc<RpcMetrics>,
    pub pool: Arc<ConnectionPool>,
    pub health: Arc<Health>,
    /// Per-volume in-flight guards (controller, node).
    pub volume_ops: Vec<InFlight>,
}

impl Sources {
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        self.rpc.render(&mut out);
        let ops: usize = self.volume_ops.iter().map(InFlight::len).sum();
        gauge(
            &mut out,
            "rook_rbd_volume_operations_in_flight",
            "Volume operations holding a per-volume in-flight guard.",
            ops,
        );
        let s = &self.pool.stats;
        gauge(
            &mut out,
            "rook_rbd_ceph_connections",
            "Pooled Ceph connections (one per cluster, user and key).",
            self.pool.size(),
        );
        counter(
            &mut out,
            "rook_rbd_ceph_connects_total",
            "Connects to a Ceph cluster (a pooled connection is made once).",
            s.connects.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "rook_rbd_ceph_connect_failures_total",
            "Connects to a Ceph cluster that failed.",
            s.connect_failures.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "rook_rbd_ceph_connection_pool_hits_total",
            "Calls that reused a pooled Ceph connection.",
            s.hits.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "rook_rbd_cluster_ready",
            "1 when every configured cluster answers (what Probe reports), else 0.",
            u8::from(self.health.ready()),
        );
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut out,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss,
            );
        }
        out
    }
}

/// This process's resident set, from `/proc/self/statm` (pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

// ---------------------------------------------------------------- the tower layer

/// Records every gRPC call into `RpcMetrics`. Installed with `Server::builder().layer(..)`.
///
/// The code comes from the `grpc-status` response header. tonic answers a unary call that
/// failed with a trailers-only response, which carries `grpc-status` in the headers; a successful
/// unary call carries it in trailers, so a response without the header is `OK`. The latency is
/// measured until the response head is ready, which for unary calls is when the handler returned.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<RpcMetrics>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<RpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_index(req.uri().path());
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        RpcFuture {
            inner: self.inner.call(req),
            call: Some(Call {
                metrics: self.metrics.clone(),
                method,
                start: Instant::now(),
            }),
        }
    }
}

/// One call being served; dropping it (answered or cancelled) leaves the in-flight gauge.
struct Call {
    metrics: Arc<RpcMetrics>,
    method: usize,
    start: Instant,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, RB, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some(call) = this.call.take() {
            let code = match &out {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0),
                Err(_) => 2, // Unknown: the transport failed before any answer.
            };
            call.metrics
                .observe(call.method, code, call.start.elapsed());
        }
        Poll::Ready(out)
    }
}

// ---------------------------------------------------------------- the HTTP endpoint

/// `:8080` means every interface; anything else is a socket address.
pub fn listen_address(s: &str) -> String {
    match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    }
}

/// Binds now (so a bad address fails start-up) and serves in the background.
pub async fn spawn_server(addr: &str, sources: Sources) -> anyhow::Result<std::net::SocketAddr> {
    let addr = listen_address(addr);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let sources = sources.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), answer(stream, &sources)).await;
            });
        }
    });
    Ok(local)
}

/// One request per connection (we answer with `Connection: close`): enough for Prometheus and
/// kubelet probes, and nothing to keep alive or time out.
async fn answer(mut s: tokio::net::TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
        match s.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            sources.render(),
        ),
        ("GET", "/healthz") if sources.health.ready() => {
            ("200 OK", "text/plain", "ok\n".to_string())
        }
        ("GET", "/healthz") => {
            let mut why = sources.health.problems().join("\n");
            if why.is_empty() {
                why = "cluster health not checked yet".into();
            }
            ("503 Service Unavailable", "text/plain", why + "\n")
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_is_not_below_them() {
        let h = Histogram::default();
        h.observe(ms(1)); // exactly on 0.001: le is inclusive
        h.observe(Duration::from_micros(1001));
        h.observe(ms(40));
        h.observe(Duration::from_secs(60)); // above every bound: +Inf only
        let cum = h.cumulative();
        assert_eq!(cum[0], 1);
        assert_eq!(cum[1], 2);
        assert_eq!(cum[4], 2); // 0.025
        assert_eq!(cum[5], 3); // 0.05
        assert_eq!(cum[BUCKETS.len() - 1], 3);
        assert_eq!(cum[BUCKETS.len()], 4);
        assert_eq!(h.count(), 4);
        assert_eq!(
            h.sum(),
            ms(1) + Duration::from_micros(1001) + ms(40) + ms(60_000)
        );
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_histogram_quantile() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        // 10 observations in (10 ms, 25 ms]: the median is halfway through that bucket.
        for _ in 0..10 {
            h.observe(ms(20));
        }
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(17_500)));
        assert_eq!(h.quantile(1.0), Some(ms(25)));
        // Everything above the last bound reports the last bound.
        let slow = Histogram::default();
        slow.observe(Duration::from_secs(100));
        assert_eq!(slow.quantile(0.99), Some(Duration::from_secs(30)));
    }

    #[test]
    fn grpc_paths_map_to_methods_and_unknown_ones_to_other() {
        assert_eq!(
            METHODS[method_index("/csi.v1.Controller/CreateVolume")],
            "CreateVolume"
        );
        assert_eq!(
            METHODS[method_index("/csi.v1.Node/NodeStageVolume")],
            "NodeStageVolume"
        );
        assert_eq!(
            METHODS[method_index("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")],
            "other"
        );
        assert_eq!(METHODS[method_index("/csi.v1.Controller/Nope")], "other");
    }

    #[test]
    fn text_format_has_cumulative_buckets_sum_count_and_only_seen_series() {
        let m = RpcMetrics::default();
        m.observe(method_index("/csi.v1.Controller/CreateVolume"), 0, ms(3));
        m.observe(method_index("/csi.v1.Controller/CreateVolume"), 0, ms(7));
        m.observe(method_index("/csi.v1.Controller/DeleteVolume"), 5, ms(2));
        let mut out = String::new();
        m.render(&mut out);
        let lines: Vec<&str> = out.lines().collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("# TYPE rook_rbd_rpc_duration_seconds histogram"));
        assert!(has(
            r#"rook_rbd_rpc_duration_seconds_bucket{method="CreateVolume",code="OK",le="0.0025"} 0"#
        ));
        assert!(has(
            r#"rook_rbd_rpc_duration_seconds_bucket{method="CreateVolume",code="OK",le="0.005"} 1"#
        ));
        assert!(has(
            r#"rook_rbd_rpc_duration_seconds_bucket{method="CreateVolume",code="OK",le="0.01"} 2"#
        ));
        assert!(has(
            r#"rook_rbd_rpc_duration_seconds_bucket{method="CreateVolume",code="OK",le="+Inf"} 2"#
        ));
        assert!(has(
            r#"rook_rbd_rpc_duration_seconds_sum{method="CreateVolume",code="OK"} 0.01"#
        ));
        assert!(has(
            r#"rook_rbd_rpc_duration_seconds_count{method="CreateVolume",code="OK"} 2"#
        ));
        assert!(has(
            r#"rook_rbd_rpc_requests_total{method="DeleteVolume",code="NotFound"} 1"#
        ));
        assert!(has("# TYPE rook_rbd_rpc_in_flight gauge"));
        assert!(has("rook_rbd_rpc_in_flight 0"));
        // Series that never saw a call are not printed.
        assert!(!out.contains("Probe"));
        // Every sample line is `name{labels} value` or `name value`, and every family is typed.
        for l in lines.iter().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
            let family = name.split('{').next().unwrap();
            let base = family
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                out.contains(&format!("# TYPE {base} ")),
                "untyped family in {l}"
            );
        }
    }

    #[test]
    fn a_bare_port_listens_on_every_interface() {
        assert_eq!(listen_address(":8080"), "0.0.0.0:8080");
        assert_eq!(listen_address("127.0.0.1:9"), "127.0.0.1:9");
    }
}
