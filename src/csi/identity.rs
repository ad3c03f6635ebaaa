//! CSI Identity: plugin name and version, capabilities, and a Probe that tells the truth about
//! the cluster from the cached health check.

use super::proto::{self, identity_server::Identity, plugin_capability};
use crate::ceph::health::Health;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct IdentityService {
    pub driver_name: String,
    pub controller: bool,
    pub health: Arc<Health>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<proto::GetPluginInfoRequest>,
    ) -> Result<Response<proto::GetPluginInfoResponse>, Status> {
        Ok(Response::new(proto::GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<proto::GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![proto::PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        }];
        if self.controller {
            capabilities.push(proto::PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service {
                        r#type: plugin_capability::service::Type::ControllerService as i32,
                    },
                )),
            });
        }
        Ok(Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let ready = self.health.ready();
        if !ready && self.health.checked() {
            tracing::debug!(problems = ?self.health.problems(), "probe: not ready");
        }
        Ok(Response::new(proto::ProbeResponse { ready: Some(ready) }))
    }
}
