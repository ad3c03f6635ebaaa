//! What the driver tells about itself: a tower layer on the gRPC server that times every call
//! into Prometheus metrics (`prometheus-client`), opens a span per call and logs each failed
//! call once; and the HTTP endpoint (axum) with `/metrics`, `/livez`, `/readyz` and `/healthz`.
//!
//! Liveness is about the process only (the gRPC server answers a Probe on its own socket), so a
//! Ceph outage never gets the node plugin restarted, which would take every rbd-fuse and rbd-nbd
//! daemon in its cgroup with it. Cluster health shows in readiness, `/healthz` and the metrics.

use crate::ceph::health::Health;
use crate::ceph::ConnectionPool;
use crate::csi::registration::Registration;
use crate::volume::guard::InFlight;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;
use tracing::field::Empty;

/// Upper bounds of the latency buckets, in seconds: from 1 ms (an Identity call) to 30 s (a
/// stuck Ceph call hitting its deadline).
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

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

/// Every CSI method we serve, so labels are static strings; anything else is `other`.
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

fn new_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Per-call metrics. Series appear with their first call, as Prometheus clients do.
pub struct RpcMetrics {
    duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    requests: Family<RpcLabels, Counter>,
    in_flight: Gauge,
    /// Every call answered, for the memory trimmer (one load, no label walk).
    answered: AtomicU64,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            duration: Family::new_with_constructor(new_histogram),
            requests: Family::default(),
            in_flight: Gauge::default(),
            answered: AtomicU64::new(0),
        }
    }
}

impl RpcMetrics {
    pub fn observe(&self, method: usize, code: usize, d: Duration) {
        let labels = RpcLabels {
            method: METHODS[method.min(METHODS.len() - 1)],
            code: CODES[code.min(CODES.len() - 1)],
        };
        self.duration
            .get_or_create(&labels)
            .observe(d.as_secs_f64());
        self.requests.get_or_create(&labels).inc();
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Calls answered so far, over every method and code.
    pub fn calls_total(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "rook_rbd_rpc_duration_seconds",
            "Time to answer a CSI call, by method and gRPC code",
            self.duration.clone(),
        );
        r.register(
            "rook_rbd_rpc_requests",
            "CSI calls answered, by method and gRPC code",
            self.requests.clone(),
        );
        r.register(
            "rook_rbd_rpc_in_flight",
            "CSI calls being served right now",
            self.in_flight.clone(),
        );
    }
}

// ---------------------------------------------------------------- what a call is about

/// Records the volume a CSI call is about into the call's span (opened by [`RpcMetricsLayer`]),
/// so its failure line and every log line inside it carry `volume.id`. Call it once the field is
/// known to be present; a value unfit for a log line (empty, over 128 bytes, control characters)
/// is left out, and the status message still says what was wrong with it.
pub fn record_volume_id(id: &str) {
    record("volume.id", id);
}

/// As [`record_volume_id`], for `snapshot.id`.
pub fn record_snapshot_id(id: &str) {
    record("snapshot.id", id);
}

/// As [`record_volume_id`], for the CO's request name (CreateVolume, CreateSnapshot).
pub fn record_request_name(name: &str) {
    record("request.name", name);
}

fn record(field: &'static str, value: &str) {
    if loggable(value) {
        tracing::Span::current().record(field, value);
    }
}

/// CSI IDs and names are at most 128 bytes; anything longer, or with control characters, is not
/// a real ID and would only make a log line lie about where it ends.
fn loggable(value: &str) -> bool {
    !value.is_empty() && value.len() <= 128 && !value.chars().any(char::is_control)
}

// ---------------------------------------------------------------- the tower layer

/// Wraps every gRPC call: metrics, a span, and one log line when it fails. Installed with
/// `Server::builder().layer(..)`.
///
/// The code comes from the response head: tonic answers a failed unary call with a
/// trailers-only response, which carries `grpc-status` (and `grpc-message`) in the headers; a
/// successful unary call carries its status in trailers, so a head without it is `OK`. The
/// latency is measured until the head is ready, which for unary calls is when the handler
/// returned.
///
/// The span (`rpc`, with `method` and the empty `volume.id`, `snapshot.id`, `request.name` that
/// the adapters fill in) is at ERROR level, so no log filter can print a failure line without
/// it. A failure the caller can fix or retry at will (bad input, not found, already exists, in
/// flight, failed precondition) is logged at WARN; one the driver or the cluster owes an
/// explanation for (Internal, Unknown, DeadlineExceeded, Unavailable, DataLoss) at ERROR. A call
/// the client gave up on (its deadline passed, it went away) is logged at WARN as `Canceled`;
/// any work it started goes on in its own task.
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
        let span = tracing::error_span!(
            "rpc",
            method = METHODS[method],
            volume.id = Empty,
            snapshot.id = Empty,
            request.name = Empty,
        );
        self.metrics.in_flight.inc();
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        RpcFuture {
            inner,
            call: Some(Call {
                metrics: self.metrics.clone(),
                method,
                start: Instant::now(),
                span,
                answered: false,
            }),
        }
    }
}

/// One call being served; dropping it leaves the in-flight gauge, and dropping it unanswered
/// (the client gave up) logs that.
struct Call {
    metrics: Arc<RpcMetrics>,
    method: usize,
    start: Instant,
    span: tracing::Span,
    answered: bool,
}

impl Call {
    fn answer(mut self, status: Option<tonic::Status>) {
        self.answered = true;
        let took = self.start.elapsed();
        let code = status.as_ref().map_or(0, |s| s.code() as usize);
        self.metrics.observe(self.method, code, took);
        if let Some(s) = status.filter(|s| s.code() != tonic::Code::Ok) {
            let _entered = self.span.enter();
            log_failure(CODES[code.min(CODES.len() - 1)], s.message(), took);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if !self.answered {
            let _entered = self.span.enter();
            log_failure(
                CODES[tonic::Code::Cancelled as usize],
                "the client stopped waiting",
                self.start.elapsed(),
            );
        }
    }
}

/// Whether a failure with this code is the driver's or the cluster's to explain (ERROR), rather
/// than a verdict on the request (WARN).
pub fn is_server_fault(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Internal | Unavailable | DataLoss
    )
}

fn log_failure(code: &'static str, message: &str, took: Duration) {
    let duration_ms = took.as_secs_f64() * 1e3;
    let server_fault = CODES
        .iter()
        .position(|c| *c == code)
        .is_some_and(|i| is_server_fault(tonic::Code::from(i as i32)));
    if server_fault {
        tracing::error!(code, error = message, duration_ms, "CSI call failed");
    } else {
        tracing::warn!(code, error = message, duration_ms, "CSI call failed");
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
        let out = {
            let _entered = this.call.as_ref().map(|c| c.span.enter());
            std::task::ready!(this.inner.poll(cx))
        };
        if let Some(call) = this.call.take() {
            let status = match &out {
                Ok(resp) => tonic::Status::from_header_map(resp.headers()),
                // The transport failed before any answer.
                Err(_) => Some(tonic::Status::unknown("the call failed in transport")),
            };
            call.answer(status);
        }
        Poll::Ready(out)
    }
}

// ---------------------------------------------------------------- what the endpoint reports on

/// A start-up step that readiness waits for (the node's registration in RADOS): done, or the
/// last error while it is being retried.
#[derive(Default)]
pub struct StepStatus {
    done: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl StepStatus {
    pub fn succeeded(&self) {
        self.done.store(true, Ordering::Release);
    }

    pub fn failed(&self, error: String) {
        *self.last_error.lock().unwrap() = Some(error);
    }

    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }
}

/// Everything `/metrics`, `/livez`, `/readyz` and `/healthz` report on.
pub struct Sources {
    pub rpc: Arc<RpcMetrics>,
    pub pool: Arc<ConnectionPool>,
    pub health: Arc<Health>,
    /// Per-volume in-flight guards (controller, node).
    pub volume_ops: Vec<InFlight>,
    /// The CSI endpoint (`--endpoint`), which `/livez` dials.
    pub endpoint: String,
    /// kubelet's plugin registration, when the node plugin offers itself to kubelet.
    pub kubelet: Option<Arc<Registration>>,
    /// The node's registration in each cluster's registry pool, when the node registers.
    pub node_registry: Option<Arc<StepStatus>>,
}

/// How long `/livez` waits for the driver's own gRPC server to answer a Probe.
pub const LIVENESS_DEADLINE: Duration = Duration::from_secs(3);

/// The metrics registry and the sources, built once; each request reads them.
pub struct Observer {
    sources: Sources,
    registry: Registry,
}

impl Observer {
    pub fn new(sources: Sources) -> Self {
        let mut registry = Registry::default();
        sources.rpc.register(&mut registry);
        registry.register_collector(Box::new(StateCollector {
            pool: sources.pool.clone(),
            health: sources.health.clone(),
            volume_ops: sources.volume_ops.clone(),
        }));
        Self { sources, registry }
    }

    /// The Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Whether the process serves: its gRPC server answers a Probe on its own socket in time.
    /// The Probe's `ready` is not looked at: that is the cluster's health, not the process's.
    pub async fn live(&self) -> Result<Duration, String> {
        let t = Instant::now();
        let probe = async {
            let mut c = crate::client::CsiClient::connect(&self.sources.endpoint)
                .await
                .map_err(|e| format!("dialling {}: {e:#}", self.sources.endpoint))?;
            c.identity
                .probe(crate::csi::proto::ProbeRequest {})
                .await
                .map_err(|e| format!("Probe on {}: {}", self.sources.endpoint, e.message()))
        };
        match tokio::time::timeout(LIVENESS_DEADLINE, probe).await {
            Ok(Ok(_)) => Ok(t.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "Probe on {} got no answer within {LIVENESS_DEADLINE:?}",
                self.sources.endpoint
            )),
        }
    }

    /// Why the driver is not ready to serve volumes; empty when it is.
    pub fn not_ready(&self) -> Vec<String> {
        let s = &self.sources;
        let mut why = s.health.problems();
        if s.kubelet.as_ref().is_some_and(|k| !k.registered()) {
            why.push("kubelet has not registered the plugin yet".into());
        }
        if let Some(reg) = s.node_registry.as_ref().filter(|r| !r.done()) {
            why.push(match reg.last_error() {
                Some(e) => format!("node registration: {e}"),
                None => "node registration has not finished yet".into(),
            });
        }
        why
    }

    /// The whole report, and whether everything in it is good.
    pub async fn report(&self) -> (bool, serde_json::Value) {
        let s = &self.sources;
        let live = self.live().await;
        let mut problems = self.not_ready();
        let ready = problems.is_empty();
        if let Err(e) = &live {
            problems.insert(0, format!("not live: {e}"));
        }
        let ok = problems.is_empty();
        let now = Instant::now();
        let ago =
            |t: Instant| (now.saturating_duration_since(t).as_secs_f64() * 10.0).round() / 10.0;
        let clusters: Vec<_> = s
            .health
            .clusters()
            .into_iter()
            .map(|c| {
                json!({
                    "cluster_id": c.cluster_id,
                    "state": c.state.as_str(),
                    "state_for_seconds": ago(c.since),
                    "last_check_seconds_ago": c.last_check.map(ago),
                    "last_error": c.last_error.as_ref().map(|(_, e)| e),
                    "last_error_seconds_ago": c.last_error.as_ref().map(|(t, _)| ago(*t)),
                })
            })
            .collect();
        let kubelet = match &s.kubelet {
            None => "not used",
            Some(k) if k.registered() => "registered",
            Some(_) => "waiting",
        };
        let node_registry = match &s.node_registry {
            None => json!({"state": "not used"}),
            Some(r) if r.done() => json!({"state": "registered"}),
            Some(r) => json!({"state": "pending", "last_error": r.last_error()}),
        };
        let body = json!({
            "status": if ok { "ok" } else { "unhealthy" },
            "live": live.is_ok(),
            "ready": ready,
            "problems": problems,
            "clusters": clusters,
            "kubelet_registration": kubelet,
            "node_registry": node_registry,
            "rpc_in_flight": s.rpc.in_flight(),
            "volume_operations_in_flight": volume_ops(&s.volume_ops),
            "ceph_connections": s.pool.size(),
        });
        (ok, body)
    }
}

fn volume_ops(ops: &[InFlight]) -> usize {
    ops.iter().map(InFlight::len).sum()
}

/// The gauges and counters owned elsewhere (the pool, the guards, health), read at each scrape.
struct StateCollector {
    pool: Arc<ConnectionPool>,
    health: Arc<Health>,
    volume_ops: Vec<InFlight>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// `name` without `_total`: the encoder adds it.
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: &AtomicU64) -> std::fmt::Result {
    let c = ConstCounter::new(v.load(Ordering::Relaxed));
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut enc;
        gauge(
            e,
            "rook_rbd_volume_operations_in_flight",
            "Volume operations holding a per-volume in-flight guard.",
            volume_ops(&self.volume_ops) as i64,
        )?;
        let s = &self.pool.stats;
        gauge(
            e,
            "rook_rbd_ceph_connections",
            "Pooled Ceph connections (one per cluster, user and key).",
            self.pool.size() as i64,
        )?;
        counter(
            e,
            "rook_rbd_ceph_connects",
            "Connects to a Ceph cluster: first ones, replacements and checks' fresh clients.",
            &s.connects,
        )?;
        counter(
            e,
            "rook_rbd_ceph_connect_failures",
            "Connects to a Ceph cluster that failed.",
            &s.connect_failures,
        )?;
        counter(
            e,
            "rook_rbd_ceph_connection_pool_hits",
            "Calls that reused a pooled Ceph connection.",
            &s.hits,
        )?;
        counter(
            e,
            "rook_rbd_ceph_connection_evictions",
            "Pooled Ceph connections closed because they were idle, fenced or unresponsive.",
            &s.evictions,
        )?;
        counter(
            e,
            "rook_rbd_ceph_connection_checks",
            "Fresh-client checks of a pooled connection that kept timing out.",
            &s.checks,
        )?;
        gauge(
            e,
            "rook_rbd_cluster_ready",
            "1 when every configured cluster answers (what Probe and /readyz report), else 0.",
            i64::from(self.health.ready()),
        )?;
        if let Some(rss) = resident_bytes() {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss as i64,
            )?;
        }
        Ok(())
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

// ---------------------------------------------------------------- the HTTP endpoint

/// `:8080` means every interface; anything else is a socket address.
pub fn listen_address(s: &str) -> String {
    match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    }
}

/// The routes, for the server and for tests.
pub fn router(observer: Arc<Observer>) -> axum::Router {
    use axum::extract::State;
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;

    type Obs = State<Arc<Observer>>;
    fn status(ok: bool) -> StatusCode {
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
    let text = |ok: bool, body: String| {
        (
            status(ok),
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
    };
    axum::Router::new()
        .route(
            "/metrics",
            get(|State(o): Obs| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    )],
                    o.render(),
                )
            }),
        )
        .route(
            "/livez",
            get(move |State(o): Obs| async move {
                match o.live().await {
                    Ok(_) => text(true, "ok\n".into()),
                    Err(e) => text(false, format!("{e}\n")),
                }
            }),
        )
        .route(
            "/readyz",
            get(move |State(o): Obs| async move {
                let why = o.not_ready();
                match why.is_empty() {
                    true => text(true, "ok\n".into()),
                    false => text(false, why.join("\n") + "\n"),
                }
            }),
        )
        .route(
            "/healthz",
            get(|State(o): Obs| async move {
                let (ok, body) = o.report().await;
                (
                    status(ok),
                    [(header::CONTENT_TYPE, "application/json")],
                    serde_json::to_string_pretty(&body).unwrap_or_default() + "\n",
                )
                    .into_response()
            }),
        )
        .with_state(observer)
}

/// Binds now (so a bad address fails start-up) and serves in the background.
pub async fn spawn_server(addr: &str, observer: Observer) -> anyhow::Result<std::net::SocketAddr> {
    let addr = listen_address(addr);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = router(Arc::new(observer));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
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
    fn codes_are_named_by_their_number() {
        for code in [
            tonic::Code::Ok,
            tonic::Code::InvalidArgument,
            tonic::Code::FailedPrecondition,
            tonic::Code::Unauthenticated,
        ] {
            assert_eq!(
                CODES[code as usize].to_lowercase(),
                format!("{code:?}")
                    .to_lowercase()
                    .replace("cancelled", "canceled")
            );
        }
    }

    #[test]
    fn bad_input_is_a_warning_and_a_broken_cluster_an_error() {
        use tonic::Code::*;
        for c in [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            Aborted,
            FailedPrecondition,
        ] {
            assert!(!is_server_fault(c), "{c:?}");
        }
        for c in [Internal, Unknown, DeadlineExceeded, Unavailable] {
            assert!(is_server_fault(c), "{c:?}");
        }
    }

    #[test]
    fn only_printable_bounded_values_are_recorded() {
        assert!(loggable("0001-0009-rook-ceph-0000000000000001-csi-vol-x"));
        assert!(!loggable(""));
        assert!(!loggable("a\nfake log line"));
        assert!(!loggable(&"x".repeat(129)));
    }

    #[test]
    fn text_format_has_cumulative_buckets_sum_count_and_only_seen_series() {
        let m = RpcMetrics::default();
        m.observe(method_index("/csi.v1.Controller/CreateVolume"), 0, ms(3));
        m.observe(method_index("/csi.v1.Controller/CreateVolume"), 0, ms(7));
        m.observe(method_index("/csi.v1.Controller/DeleteVolume"), 5, ms(2));
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let has = |l: &str| lines.contains(&l);
        assert!(
            has("# TYPE rook_rbd_rpc_duration_seconds histogram"),
            "{out}"
        );
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
            r#"rook_rbd_rpc_duration_seconds_count{method="CreateVolume",code="OK"} 2"#
        ));
        let sum = lines
            .iter()
            .find_map(|l| {
                l.strip_prefix(
                    r#"rook_rbd_rpc_duration_seconds_sum{method="CreateVolume",code="OK"} "#,
                )
            })
            .unwrap();
        assert!((sum.parse::<f64>().unwrap() - 0.01).abs() < 1e-9, "{sum}");
        assert!(has("# TYPE rook_rbd_rpc_requests_total counter"));
        assert!(has(
            r#"rook_rbd_rpc_requests_total{method="DeleteVolume",code="NotFound"} 1"#
        ));
        assert!(has("# TYPE rook_rbd_rpc_in_flight gauge"));
        assert!(has("rook_rbd_rpc_in_flight 0"));
        assert_eq!(m.calls_total(), 3);
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
