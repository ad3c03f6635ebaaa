//! The driver heals by itself after a Ceph daemon is lost and comes back, and after its client is
//! blocklisted: no driver restart. Each test runs its own cluster, since it kills daemons.

mod common;

use common::{cluster, create_req, unique, Driver, PrivateCluster};
use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::Code;

const MIB: i64 = 1 << 20;

/// One private cluster at a time: each is a mon, mgr and OSD on a shared two-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the driver may take to answer again once the lost daemon is back.
const HEAL_WITHIN: Duration = Duration::from_secs(30);

fn request(
    c: &PrivateCluster,
    name: &str,
    secrets: &HashMap<String, String>,
) -> proto::CreateVolumeRequest {
    let mut req = create_req(c, name, 16 * MIB);
    req.secrets = secrets.clone();
    req
}

/// Retries one CreateVolume (same name: idempotent) until it succeeds or `HEAL_WITHIN` has passed
/// since `back`; returns the last error if it never succeeded.
async fn create_until_healed(
    cl: &mut CsiClient,
    req: &proto::CreateVolumeRequest,
    back: Instant,
) -> Result<proto::Volume, Vec<tonic::Status>> {
    let mut errors = Vec::new();
    while back.elapsed() < HEAL_WITHIN {
        match cl.controller.create_volume(req.clone()).await {
            Ok(r) => {
                eprintln!(
                    "CreateVolume succeeded {:?} after the daemon was back, after {} failures",
                    back.elapsed(),
                    errors.len()
                );
                return Ok(r.into_inner().volume.unwrap());
            }
            Err(e) => errors.push(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(errors)
}

/// The driver's own account of connections it replaced, for the test's output.
fn print_evictions(d: &Driver) {
    let log = std::fs::read_to_string(d.path("driver.log")).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("pooled Ceph connection")) {
        eprintln!("driver: {line}");
    }
}

fn assert_still_running(d: &mut Driver) {
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the driver exited; see {}",
        d.path("driver.log").display()
    );
}

/// The driver with the default Ceph timeouts, as a user runs it.
async fn driver(c: &PrivateCluster) -> (Driver, CsiClient) {
    let d = Driver::start(c, &["--controller"]);
    let cl = d.client().await;
    (d, cl)
}

/// What to see while the daemon is gone, before starting it again.
enum WhileDown {
    /// A CreateVolume fails, as it must without an OSD.
    CreateFails,
    /// Probe reports the cluster unready: the driver has noticed.
    ProbeUnready,
}

/// Driver up, a volume made, `daemon` killed (-9), the loss seen, the daemon started again and
/// every PG clean: then a CreateVolume succeeds within `HEAL_WITHIN`, with no driver restart.
async fn loss_and_return_heals(prefix: &str, mon_port: u16, daemon: &str, seen: WhileDown) {
    let c = PrivateCluster::up(prefix, mon_port);
    let (mut d, mut cl) = driver(&c).await;
    let secrets = c.secrets();
    cl.controller
        .create_volume(request(&c, &unique("before"), &secrets))
        .await
        .unwrap();

    c.dev(&["kill-daemon", daemon]);
    match seen {
        WhileDown::CreateFails => {
            let e = cl
                .controller
                .create_volume(request(&c, &unique("during"), &secrets))
                .await
                .unwrap_err();
            assert!(
                matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable),
                "{e:?}"
            );
        }
        WhileDown::ProbeUnready => {
            let since = Instant::now();
            loop {
                let probe = cl.identity.probe(proto::ProbeRequest {}).await.unwrap();
                if probe.into_inner().ready == Some(false) {
                    break;
                }
                assert!(
                    since.elapsed() < Duration::from_secs(60),
                    "Probe never noticed that the {daemon} was gone"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    c.dev(&["start-daemon", daemon]);
    let back = Instant::now();
    c.dev(&["wait-clean"]);
    let name = unique("after");
    let res = create_until_healed(&mut cl, &request(&c, &name, &secrets), back).await;
    print_evictions(&d);
    assert_still_running(&mut d);
    let v = res.unwrap_or_else(|errs| {
        panic!(
            "no CreateVolume succeeded within {HEAL_WITHIN:?} of the {daemon} being back ({} tries): {:?}",
            errs.len(),
            errs.last()
        )
    });
    assert!(c.images().contains(&common::image_of(&v.volume_id)));
}

#[tokio::test]
async fn osd_loss_and_return_heals_without_restart() {
    let Some(_shared) = cluster() else { return };
    let _one = SERIAL.lock().await;
    loss_and_return_heals("rook-rbd-osd-loss", 3391, "osd", WhileDown::CreateFails).await;
}

#[tokio::test]
async fn monitor_loss_and_return_heals_without_restart() {
    let Some(_shared) = cluster() else { return };
    let _one = SERIAL.lock().await;
    loss_and_return_heals("rook-rbd-mon-loss", 3392, "mon", WhileDown::ProbeUnready).await;
}

/// Addresses (`ip:port/nonce`) of the monitor sessions of one Ceph user.
fn session_addrs(c: &PrivateCluster, entity: &str) -> Vec<String> {
    let out = c.ceph(&["tell", "mon.a", "sessions", "-f", "json"]);
    let sessions: serde_json::Value = serde_json::from_str(&out).unwrap();
    sessions
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["entity_name"] == entity)
        .flat_map(|s| {
            s["addrs"]["addrvec"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|a| format!("{}/{}", a["addr"].as_str().unwrap(), a["nonce"]))
        .collect()
}

#[tokio::test]
async fn a_blocklisted_client_is_replaced_and_the_next_call_succeeds() {
    let Some(_shared) = cluster() else { return };
    let _one = SERIAL.lock().await;
    let c = PrivateCluster::up("rook-rbd-blocklist", 3393);
    let (mut d, mut cl) = driver(&c).await;
    // Only the driver speaks as client.csi here, so its session is the one to fence.
    let secrets = c.csi_secrets();
    cl.controller
        .create_volume(request(&c, &unique("before"), &secrets))
        .await
        .unwrap();
    let addrs = session_addrs(&c, "client.csi");
    assert_eq!(addrs.len(), 1, "one client.csi session: {addrs:?}");
    c.ceph(&["osd", "blocklist", "add", &addrs[0]]);

    // A call that runs into the blocklist fails: its client is fenced. (The first one may still
    // pass if it reaches the OSD before the OSD has the map with the blocklist entry.)
    let mut fenced = None;
    for _ in 0..10 {
        match cl
            .controller
            .create_volume(request(&c, &unique("fenced"), &secrets))
            .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => {
                fenced = Some(e);
                break;
            }
        }
    }
    let e = fenced.expect("the blocklist never took effect");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    let v = cl
        .controller
        .create_volume(request(&c, &unique("after"), &secrets))
        .await
        .expect("the next call runs on a fresh connection")
        .into_inner()
        .volume
        .unwrap();
    print_evictions(&d);
    assert_still_running(&mut d);
    assert!(c.images().contains(&common::image_of(&v.volume_id)));
    // The fenced connection was shut down, not just forgotten.
    let since = Instant::now();
    while session_addrs(&c, "client.csi").contains(&addrs[0]) {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the fenced client is still connected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
