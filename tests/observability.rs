//! What the driver tells about itself, on a real driver process and the real dev cluster: one
//! log line per failed call (never a key), liveness that ignores Ceph, readiness and /healthz
//! that report it, and the metric families the README lists.

mod common;

use common::*;
use rook_rbd::csi::proto::{self, volume_capability::access_mode::Mode};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// A port nothing listens on right now (the kernel's pick, released at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain GET: (status, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// GETs `path` until `done(status, body)` holds, for at most 20 s; returns the last answer.
async fn get_until(port: u16, path: &str, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let mut last = (0, String::new());
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            last = get(port, path).await;
            if done(last.0, &last.1) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("GET {path} never got what was awaited; last answer: {last:?}");
}

/// The driver's JSON log lines.
fn log_lines(d: &Driver) -> Vec<Value> {
    std::fs::read_to_string(d.path("driver.log"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The lines that report a failed call (they carry a gRPC code) whose span field `field` is
/// `value`.
fn failure_lines(lines: &[Value], field: &str, value: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l.get("code").is_some() && l["span"][field] == value)
        .cloned()
        .collect()
}

fn assert_one_failure(
    lines: &[Value],
    field: &str,
    value: &str,
    method: &str,
    code: &str,
    level: &str,
) {
    let found = failure_lines(lines, field, value);
    assert_eq!(
        found.len(),
        1,
        "want exactly one failure line for {field}={value}, got {found:#?}"
    );
    let l = &found[0];
    assert_eq!(l["span"]["method"], method, "{l}");
    assert_eq!(l["code"], code, "{l}");
    assert_eq!(l["level"], level, "{l}");
    assert!(
        l["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "no duration: {l}"
    );
}

#[tokio::test]
async fn a_failed_call_is_logged_once_with_method_code_object_and_duration_and_never_a_key() {
    let Some(c) = cluster() else { return };
    let d = Driver::start(&c, &["--controller", "--log-format", "json"]);
    let mut cl = d.client().await;

    // Bad input: the request name identifies it.
    let bad = unique("obs-bad");
    let mut r = create_req(&c, &bad, 16 * MIB);
    r.parameters
        .insert("imageFeatures".into(), "layering,warp-drive".into());
    let e = cl.controller.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A wrong key: the call that is most tempted to say what it tried.
    let wrong = unique("obs-wrong-key");
    let other_key = String::from_utf8(
        std::process::Command::new("ceph-authtool")
            .arg("--gen-print-key")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let mut r = create_req(&c, &wrong, 16 * MIB);
    r.secrets.insert("userKey".into(), other_key.clone());
    let e = cl.controller.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // In use: a single-node volume held by one node, published to another.
    let ok_name = unique("obs-ok");
    let v = create_volume(&mut cl, create_req(&c, &ok_name, 16 * MIB)).await;
    let (a, b) = (unique("obs-node-a"), unique("obs-node-b"));
    c.register_node(&a);
    c.register_node(&b);
    let publish = |node: &str| proto::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(cap_with_mode(false, Mode::SingleNodeWriter)),
        secrets: c.secrets(),
        ..Default::default()
    };
    cl.controller
        .controller_publish_volume(publish(&a))
        .await
        .unwrap();
    let e = cl
        .controller
        .controller_publish_volume(publish(&b))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    cl.controller
        .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: a.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
    delete_volume(&c, &mut cl, &v.volume_id).await;
    for n in [&a, &b] {
        c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.node.{n}")]);
    }

    let lines = log_lines(&d);
    assert_one_failure(
        &lines,
        "request.name",
        &bad,
        "CreateVolume",
        "InvalidArgument",
        "WARN",
    );
    assert_one_failure(
        &lines,
        "request.name",
        &wrong,
        "CreateVolume",
        "PermissionDenied",
        "WARN",
    );
    let on_volume = failure_lines(&lines, "volume.id", &v.volume_id);
    assert_eq!(on_volume.len(), 1, "{on_volume:#?}");
    assert_eq!(on_volume[0]["span"]["method"], "ControllerPublishVolume");
    assert_eq!(on_volume[0]["code"], "FailedPrecondition");
    // Calls that succeeded are not failures.
    assert!(failure_lines(&lines, "request.name", &ok_name).is_empty());

    let log = std::fs::read_to_string(d.path("driver.log")).unwrap();
    for key in [&c.key, &other_key] {
        assert!(!log.contains(key.as_str()), "a key is in the driver's log");
        // Not even the secret half of it (a key is base64 of a 12-byte header and 16 bytes).
        assert!(
            !log.contains(&key[16..]),
            "part of a key is in the driver's log"
        );
    }
}

#[tokio::test]
async fn a_call_whose_client_stopped_waiting_is_logged_once_as_canceled() {
    let Some(c) = cluster() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // Connecting to a cluster that is not there takes the whole mount timeout: long enough.
    let dead = dead_cluster(&c, tmp.path());
    let d = Driver::start(&dead, &["--controller", "--log-format", "json"]);
    let mut cl = d.client().await;
    let name = unique("obs-impatient");
    let mut req = tonic::Request::new(create_req(&dead, &name, 16 * MIB));
    req.set_timeout(Duration::from_millis(300));
    let e = cl.controller.create_volume(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    // The server notices when the stream is reset; give it a moment to write the line.
    let mut found = Vec::new();
    for _ in 0..50 {
        found = failure_lines(&log_lines(&d), "request.name", &name);
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_one_failure(
        &found,
        "request.name",
        &name,
        "CreateVolume",
        "Canceled",
        "WARN",
    );
}

/// A cluster config of a single cluster whose monitor port has nothing behind it.
fn dead_cluster(c: &Cluster, dir: &Path) -> Cluster {
    let port = free_port();
    std::fs::write(
        dir.join("cluster-config.json"),
        format!(r#"[{{"clusterID": "dead-cluster", "monitors": ["127.0.0.1:{port}"]}}]"#),
    )
    .unwrap();
    Cluster {
        dir: dir.to_path_buf(),
        fsid: "dead-cluster".into(),
        key: c.key.clone(),
    }
}

#[tokio::test]
async fn liveness_ignores_ceph_and_readiness_and_healthz_report_it() {
    let Some(c) = cluster() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dead = dead_cluster(&c, tmp.path());
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Driver::start(&dead, &["--controller", "--metrics-address", &metrics]);
    let _cl = d.client().await;

    let (status, body) = get_until(port, "/livez", |s, _| s != 0).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "live without Ceph");
    // Wait for a finished check, then the reason names the cluster and what failed.
    let (status, body) = get_until(port, "/readyz", |_, b| b.contains("monitor")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("cluster dead-cluster: monitor 127.0.0.1:"),
        "{body}"
    );
    let (status, body) = get(port, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "unhealthy", "{h:#}");
    assert_eq!(h["live"], true, "{h:#}");
    assert_eq!(h["ready"], false, "{h:#}");
    assert_eq!(h["clusters"][0]["cluster_id"], "dead-cluster");
    assert_eq!(h["clusters"][0]["state"], "down");
    assert!(
        h["clusters"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1")),
        "{h:#}"
    );
    assert_eq!(h["kubelet_registration"], "not used");
    // Liveness stays 200 however long the cluster is gone.
    assert_eq!(get(port, "/livez").await.0, 200);
    drop(d);

    // The same with a cluster that answers: everything is 200.
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Driver::start(&c, &["--controller", "--metrics-address", &metrics]);
    let _cl = d.client().await;
    assert_eq!(get_until(port, "/livez", |s, _| s != 0).await.0, 200);
    let (status, body) = get_until(port, "/readyz", |s, _| s == 200).await;
    assert_eq!(body, "ok\n");
    assert_eq!(status, 200);
    let (status, body) = get(port, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok", "{h:#}");
    assert_eq!(h["clusters"][0]["cluster_id"], c.fsid.as_str());
    assert_eq!(h["clusters"][0]["state"], "up");
}

#[tokio::test]
async fn a_node_plugin_is_ready_only_once_kubelet_has_registered_it() {
    use rook_rbd::csi::registration::proto::{
        registration_client::RegistrationClient, InfoRequest, RegistrationStatus,
    };
    let Some(c) = cluster() else { return };
    let reg_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let node = unique("obs-node");
    let d = Driver::start(
        &c,
        &[
            "--node",
            "--node-id",
            &node,
            "--registration-dir",
            reg_dir.path().to_str().unwrap(),
            "--metrics-address",
            &metrics,
        ],
    );
    let _cl = d.client().await;
    // The cluster answers and the node registers in RADOS, but kubelet has not said yes.
    let (status, body) = get_until(port, "/readyz", |_, b| {
        !b.contains("cluster") && !b.contains("node registration")
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, "kubelet has not registered the plugin yet\n");
    let h: Value = serde_json::from_str(&get(port, "/healthz").await.1).unwrap();
    assert_eq!(h["kubelet_registration"], "waiting", "{h:#}");
    assert_eq!(h["node_registry"]["state"], "registered", "{h:#}");

    // Play kubelet: GetInfo, then accept the plugin.
    let sock = reg_dir.path().join("rbd.csi.ceph.rook.io-reg.sock");
    let ch = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let p = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut kubelet = RegistrationClient::new(ch);
    kubelet.get_info(InfoRequest {}).await.unwrap();
    kubelet
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let (status, body) = get(port, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(port, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["kubelet_registration"], "registered", "{h:#}");
    c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.node.{node}")]);
}

#[tokio::test]
async fn metrics_carry_every_documented_family_in_prometheus_text() {
    let Some(c) = cluster() else { return };
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Driver::start(&c, &["--controller", "--metrics-address", &metrics]);
    let mut cl = d.client().await;
    let v = create_volume(&mut cl, create_req(&c, &unique("obs-metrics"), 16 * MIB)).await;
    delete_volume(&c, &mut cl, &v.volume_id).await;
    let (status, text) = get_until(port, "/metrics", |s, _| s == 200).await;
    assert_eq!(status, 200);
    let value = |sample: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        value(r#"rook_rbd_rpc_requests_total{method="CreateVolume",code="OK"}"#),
        1.0
    );
    assert_eq!(
        value(r#"rook_rbd_rpc_duration_seconds_count{method="DeleteVolume",code="OK"}"#),
        1.0
    );
    assert_eq!(
        value(r#"rook_rbd_rpc_duration_seconds_bucket{method="DeleteVolume",code="OK",le="+Inf"}"#),
        1.0
    );
    assert!(value("rook_rbd_ceph_connects_total") >= 1.0);
    assert!(value("rook_rbd_ceph_connection_pool_hits_total") >= 1.0);
    assert_eq!(value("rook_rbd_ceph_connections"), 1.0);
    assert_eq!(value("rook_rbd_cluster_ready"), 1.0);
    assert!(value("process_resident_memory_bytes") > 0.0);
    for family in [
        "rook_rbd_rpc_duration_seconds histogram",
        "rook_rbd_rpc_requests_total counter",
        "rook_rbd_rpc_in_flight gauge",
        "rook_rbd_volume_operations_in_flight gauge",
        "rook_rbd_ceph_connections gauge",
        "rook_rbd_ceph_connects_total counter",
        "rook_rbd_ceph_connect_failures_total counter",
        "rook_rbd_ceph_connection_pool_hits_total counter",
        "rook_rbd_ceph_connection_evictions_total counter",
        "rook_rbd_ceph_connection_checks_total counter",
        "rook_rbd_cluster_ready gauge",
        "process_resident_memory_bytes gauge",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}\n")),
            "no family {family} in\n{text}"
        );
    }
    assert_eq!(
        value("rook_rbd_ceph_connection_evictions_total"),
        0.0,
        "nothing was idle long enough to be evicted"
    );
}

#[tokio::test]
async fn an_unused_connection_is_closed_after_the_ceph_idle_timeout() {
    let Some(c) = cluster() else { return };
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = Driver::start(
        &c,
        &[
            "--controller",
            "--metrics-address",
            &metrics,
            "--ceph-idle-timeout",
            "1",
        ],
    );
    let mut cl = d.client().await;
    let v = create_volume(&mut cl, create_req(&c, &unique("obs-idle"), 16 * MIB)).await;
    delete_volume(&c, &mut cl, &v.volume_id).await;
    let sample = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let (_, text) = get_until(port, "/metrics", |s, t| {
        s == 200 && sample(t, "rook_rbd_ceph_connection_evictions_total") == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, "rook_rbd_ceph_connections"),
        Some(0.0),
        "{text}"
    );
}
