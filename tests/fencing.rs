//! Fencing of single-node volumes against a real Ceph cluster: the attachment record holds
//! between two controller processes.

mod common;

use common::*;
use rook_rbd::client::CsiClient;
use rook_rbd::csi::proto::{self, volume_capability::access_mode::Mode};
use tonic::Code;

const MIB: i64 = 1 << 20;

macro_rules! cluster_or_return {
    () => {
        match cluster() {
            Some(c) => c,
            None => return,
        }
    };
}

fn publish_req(
    c: &Cluster,
    volume_id: &str,
    node: &str,
    block: bool,
) -> proto::ControllerPublishVolumeRequest {
    proto::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        volume_capability: Some(cap_with_mode(block, Mode::SingleNodeWriter)),
        readonly: false,
        secrets: c.secrets(),
        volume_context: Default::default(),
    }
}

fn unpublish_req(
    c: &Cluster,
    volume_id: &str,
    node: &str,
) -> proto::ControllerUnpublishVolumeRequest {
    proto::ControllerUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        secrets: c.secrets(),
    }
}

async fn create(cl: &mut CsiClient, c: &Cluster, name: &str) -> String {
    cl.controller
        .create_volume(create_req(c, name, 16 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn delete(cl: &mut CsiClient, c: &Cluster, volume_id: &str) {
    cl.controller
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}

/// Two controller processes (a leader handover, or two clusters sharing a pool) publish one
/// single-node volume to two nodes at the same instant, 50 times: each time exactly one wins
/// and the other gets FailedPrecondition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_controllers_publish_a_single_node_volume_to_exactly_one_node() {
    let c = cluster_or_return!();
    let d1 = Driver::start(&c, &["--controller"]);
    let d2 = Driver::start(&c, &["--controller"]);
    let (mut cl1, mut cl2) = (d1.client().await, d2.client().await);
    let (a, b) = (unique("race-a"), unique("race-b"));
    c.register_node(&a);
    c.register_node(&b);
    let rounds = 50;
    let mut double_wins = Vec::new();
    for round in 0..rounds {
        let vol = create(&mut cl1, &c, &unique("race")).await;
        let (p1, p2) = (cl1.controller.clone(), cl2.controller.clone());
        let (mut p1, mut p2) = (p1, p2);
        let (r1, r2) = tokio::join!(
            p1.controller_publish_volume(publish_req(&c, &vol, &a, false)),
            p2.controller_publish_volume(publish_req(&c, &vol, &b, false)),
        );
        match (&r1, &r2) {
            (Ok(_), Ok(_)) => double_wins.push(round),
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "round {round}: {e:?}")
            }
            (Err(e1), Err(e2)) => panic!("round {round}: nobody won: {e1:?} / {e2:?}"),
        }
        // The record names exactly the winners, whatever either controller reads.
        let seen = cl2
            .controller
            .controller_get_volume(proto::ControllerGetVolumeRequest {
                volume_id: vol.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .published_node_ids;
        let winners: Vec<&String> = [(&r1, &a), (&r2, &b)]
            .into_iter()
            .filter(|(r, _)| r.is_ok())
            .map(|(_, n)| n)
            .collect();
        if double_wins.last() != Some(&round) {
            assert_eq!(seen.iter().collect::<Vec<_>>(), winners, "round {round}");
        }
        for n in [&a, &b] {
            cl1.controller
                .controller_unpublish_volume(unpublish_req(&c, &vol, n))
                .await
                .unwrap();
        }
        delete(&mut cl1, &c, &vol).await;
    }
    for n in [&a, &b] {
        c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.node.{n}")]);
    }
    eprintln!(
        "{} of {rounds} rounds had two winners: {double_wins:?}",
        double_wins.len()
    );
    assert!(
        double_wins.is_empty(),
        "{} of {rounds} rounds published one single-node volume to two nodes: {double_wins:?}",
        double_wins.len()
    );
}

/// Volumes published by an earlier version carry their record in image metadata: it still
/// fences, and the first write moves it to the header attribute.
#[tokio::test]
async fn a_record_in_image_metadata_from_an_earlier_version_fences_and_moves_on_first_write() {
    let c = cluster_or_return!();
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let (a, b) = (unique("old-a"), unique("old-b"));
    c.register_node(&a);
    c.register_node(&b);
    let vol = create(&mut cl, &c, &unique("legacy")).await;
    let spec = format!("rbd/{}", image_of(&vol));
    let old = format!(r#"[{{"node":"{a}","readonly":false,"exclusive":true}}]"#);
    c.rbd(&["image-meta", "set", &spec, "rook-rbd.attachments", &old]);

    let e = cl
        .controller
        .controller_publish_volume(publish_req(&c, &vol, &b, false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&a), "{e:?}");
    let seen = cl
        .controller
        .controller_get_volume(proto::ControllerGetVolumeRequest {
            volume_id: vol.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .published_node_ids;
    assert_eq!(seen, vec![a.clone()]);

    cl.controller
        .controller_unpublish_volume(unpublish_req(&c, &vol, &a))
        .await
        .unwrap();
    assert!(
        !c.rbd(&["image-meta", "list", &spec])
            .contains("rook-rbd.attachments"),
        "the old copy is gone after the first write"
    );
    cl.controller
        .controller_publish_volume(publish_req(&c, &vol, &b, false))
        .await
        .unwrap();
    cl.controller
        .controller_unpublish_volume(unpublish_req(&c, &vol, &b))
        .await
        .unwrap();
    delete(&mut cl, &c, &vol).await;
    for n in [&a, &b] {
        c.rados(&["-p", "rbd", "rm", &format!("rook-rbd.node.{n}")]);
    }
}
