//! The node registry: node plugins write a RADOS object at start, so ControllerPublish can tell a
//! real node from a typo.

use super::{unix_now, Controller, NODE_OBJECT_PREFIX};
use crate::ceph::pool::with_ioctx;
use crate::volume::{Credentials, Error};

pub(super) fn validate_node_id(node: &str) -> Result<(), Error> {
    if node.is_empty() {
        return Err(Error::InvalidArgument("node_id is required".into()));
    }
    if node.len() > 256 || node.chars().any(|c| c.is_control() || c == '/') {
        return Err(Error::InvalidArgument(
            "node_id is not a valid node name".into(),
        ));
    }
    Ok(())
}

pub fn node_object(node: &str) -> String {
    format!("{NODE_OBJECT_PREFIX}{node}")
}

impl Controller {
    pub(super) async fn require_node(
        &self,
        cluster_id: &str,
        node: &str,
        creds: &Credentials,
    ) -> Result<(), Error> {
        let entry = self.cluster(cluster_id)?;
        let io = self
            .ioctx(
                cluster_id,
                entry.registry_pool(),
                entry.rados_namespace(),
                creds,
            )
            .await?;
        let obj = node_object(node);
        let known = with_ioctx(io, move |io| io.exists(&obj))
            .await
            .map_err(Error::ceph("looking up the node registry"))?;
        if known {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "node {node} has not registered with cluster {cluster_id}"
            )))
        }
    }

    /// Written by the node plugin at start, so the controller can tell real nodes from typos.
    pub async fn register_node(&self, node: &str, creds: &Credentials) -> Result<(), Error> {
        validate_node_id(node)?;
        for entry in self.clusters.entries() {
            let io = self
                .ioctx(
                    &entry.cluster_id,
                    entry.registry_pool(),
                    entry.rados_namespace(),
                    creds,
                )
                .await?;
            let obj = node_object(node);
            let body = serde_json::json!({"node": node, "registered": unix_now()}).to_string();
            with_ioctx(io, move |io| io.write_full(&obj, body.as_bytes()))
                .await
                .map_err(Error::ceph(format!(
                    "registering node {node} in cluster {}",
                    entry.cluster_id
                )))?;
        }
        Ok(())
    }
}
