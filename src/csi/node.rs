//! CSI Node: protobuf in, `node::NodeDriver` calls, protobuf out. The image and cluster come from
//! the volume ID; credentials from the stage secrets (or --secret-dir); the mapper, mkfs and map
//! options from the volume context CreateVolume returned.

use super::controller::check_capability;
use super::proto::{self, node_server, node_service_capability as nsc, volume_capability};
use super::require;
use crate::node::mapper::ImageRef;
use crate::node::{
    AccessType, MapRequest, MapperChoice, MapperKind, NodeDriver, NodeError, PathPolicy,
    PublishRequest, StageRequest, VolumeAccess, VolumeUsage,
};
use crate::volume::controller::Controller;
use crate::volume::{ClusterConfig, Credentials, InFlight, VolumeId};
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use volume_capability::access_mode::Mode;

pub struct NodeService {
    pub driver: NodeDriver,
    pub node_id: String,
    pub clusters: ClusterConfig,
    pub default_creds: Option<Credentials>,
    /// The mapper when the volume context names none. `auto` picks krbd wherever the kernel
    /// has the rbd module, which is the production case.
    pub default_mounter: String,
    pub inflight: InFlight,
    /// The Ceph side of the single-node fence: who else holds an image, and this node's
    /// clients on its attachment record.
    pub volumes: Arc<Controller>,
}

const CAPABILITIES: &[nsc::rpc::Type] = &[
    nsc::rpc::Type::StageUnstageVolume,
    nsc::rpc::Type::ExpandVolume,
    nsc::rpc::Type::GetVolumeStats,
    nsc::rpc::Type::VolumeCondition,
    nsc::rpc::Type::SingleNodeMultiWriter,
];

fn reader_only(cap: &proto::VolumeCapability) -> bool {
    cap.access_mode
        .as_ref()
        .map(|m| {
            matches!(
                Mode::try_from(m.mode),
                Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
            )
        })
        .unwrap_or(false)
}

impl NodeService {
    fn volume(&self, id: &str) -> Result<VolumeId, Status> {
        let v = VolumeId::decode(id)
            .map_err(|e| Status::not_found(format!("volume {id} does not exist ({e})")))?;
        if self.clusters.get(&v.cluster_id).is_none() {
            return Err(Status::not_found(format!(
                "volume {id}: cluster {} is not configured on this node",
                v.cluster_id
            )));
        }
        Ok(v)
    }

    fn creds(&self, secrets: &HashMap<String, String>) -> Result<Credentials, Status> {
        if secrets.is_empty() {
            return self.default_creds.clone().ok_or_else(|| {
                Status::invalid_argument(
                    "NodeStageVolume needs secrets (userID, userKey) or a --secret-dir",
                )
            });
        }
        Ok(Credentials::from_secrets(secrets)?)
    }

    /// Whether this node already maps the image: staged before, or mapped by a stage that
    /// crashed before it recorded its state.
    async fn mapped_here(
        &self,
        volume_id: &str,
        vol: &VolumeId,
        mapper: MapperChoice,
    ) -> Result<bool, Status> {
        if self.staged_mapper(volume_id)?.is_some() {
            return Ok(true);
        }
        let kind = self.driver.mappers().resolve(mapper);
        let image = ImageRef {
            pool: &vol.pool,
            namespace: None,
            image: &vol.image,
        };
        Ok(self.driver.mappers().find(kind, &image).await?.is_some())
    }

    /// The mapper of the volume's staging state on this node, if it is staged here.
    fn staged_mapper(&self, volume_id: &str) -> Result<Option<MapperKind>, Status> {
        Ok(self
            .driver
            .staged()?
            .into_iter()
            .find(|s| s.volume_id == volume_id)
            .map(|s| s.mapping.mapper))
    }

    /// After an unstage: takes this node's clients off the attachment record, and lifts the
    /// blocklist entries of those that were fenced. A krbd client is shared by every image the
    /// kernel maps with it, so it may still serve others: its entry is left to expire.
    /// Best effort: a stale entry only names a client that no longer exists.
    async fn release(&self, volume_id: &str, mapper: MapperKind) {
        let (Ok(vol), Some(creds)) = (self.volume(volume_id), self.default_creds.as_ref()) else {
            return;
        };
        let lift = mapper != MapperKind::Krbd;
        match self
            .volumes
            .release_stage(&vol, &self.node_id, creds, lift)
            .await
        {
            Ok(lifted) => {
                for addr in lifted {
                    tracing::info!(volume.id = %volume_id, client = %addr, "lifted the blocklist entry of this node's fenced client, now unmapped");
                }
            }
            Err(e) => {
                tracing::warn!(volume.id = %volume_id, error = %e, "could not take this node's client off the attachment record")
            }
        }
    }

    fn enter(&self, id: &str) -> Result<crate::volume::InFlightGuard, Status> {
        self.inflight.try_enter(id).ok_or_else(|| {
            Status::aborted(format!(
                "an operation on volume {id} is already in progress on this node"
            ))
        })
    }
}

/// For questions about a volume at a path (stats, expand), a path that cannot hold one of our
/// volumes simply means the volume is not there.
fn not_here(e: NodeError, volume_id: &str, path: &str) -> Status {
    match e {
        NodeError::InvalidPath { .. } => {
            Status::not_found(format!("volume {volume_id} is not at {path:?}"))
        }
        e => e.into(),
    }
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<proto::NodeStageVolumeRequest>,
    ) -> Result<Response<proto::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        require(&r.staging_target_path, "staging_target_path")?;
        let cap = r
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let access = check_capability(&cap)?;
        let vol = self.volume(&r.volume_id)?;
        let creds = self.creds(&r.secrets)?;
        let ctx = &r.volume_context;
        let read_only = reader_only(&cap);
        let mounter = ctx
            .get("mounter")
            .filter(|m| !m.is_empty())
            .unwrap_or(&self.default_mounter);
        let mapper: MapperChoice = mounter.parse()?;
        let access_kind = match &cap.access_type {
            Some(volume_capability::AccessType::Mount(m)) if !access.block => VolumeAccess::Mount {
                fs_type: m.fs_type.clone(),
                mount_flags: m.mount_flags.clone(),
                mkfs_options: ctx.get("mkfsOptions").cloned().filter(|s| !s.is_empty()),
            },
            _ => VolumeAccess::Block,
        };
        let monitors = self
            .clusters
            .get(&vol.cluster_id)
            .map(|c| c.monitors.clone())
            .unwrap_or_default();
        let _guard = self.enter(&r.volume_id)?;
        // A bad path is refused before anything asks Ceph about the volume.
        PathPolicy::new(self.driver.config().allowed_roots.clone())
            .validate(&r.staging_target_path)?;
        // A single-node volume is staged only once every other client has let go; a mapping
        // of our own (a repeated stage, or one that a crash left behind) is not another client.
        if access.exclusive && !self.mapped_here(&r.volume_id, &vol, mapper).await? {
            self.volumes
                .check_stage(&vol, &r.volume_id, &self.node_id, &creds)
                .await?;
        }
        self.driver
            .stage(StageRequest {
                volume_id: r.volume_id.clone(),
                staging_path: r.staging_target_path,
                access: access_kind,
                read_only,
                map: MapRequest {
                    pool: vol.pool.clone(),
                    namespace: None,
                    image: vol.image.clone(),
                    monitors,
                    user: creds.user.clone(),
                    key: creds.key.clone(),
                    map_options: ctx.get("mapOptions").cloned().filter(|s| !s.is_empty()),
                    read_only,
                },
                mapper,
            })
            .await?;
        if access.exclusive {
            // Without the record a force move cannot fence this node; the volume still works,
            // and the next node's NodeStage refuses while this node's client holds the image.
            match self.volumes.record_stage(&vol, &self.node_id, &creds).await {
                Ok(clients) if clients.is_empty() => {
                    tracing::warn!(volume.id = %r.volume_id, "no client of this node watches the image; a force move cannot fence it")
                }
                Ok(clients) => {
                    tracing::debug!(volume.id = %r.volume_id, ?clients, "recorded this node's clients")
                }
                Err(e) => {
                    tracing::warn!(volume.id = %r.volume_id, error = %e, "could not record this node's client of the image; a force move cannot fence it")
                }
            }
        }
        tracing::info!(volume.id = %r.volume_id, "volume staged");
        Ok(Response::new(proto::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<proto::NodeUnstageVolumeRequest>,
    ) -> Result<Response<proto::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        require(&r.staging_target_path, "staging_target_path")?;
        let _guard = self.enter(&r.volume_id)?;
        let staged = self.staged_mapper(&r.volume_id)?;
        self.driver
            .unstage(&r.volume_id, &r.staging_target_path)
            .await?;
        if let Some(mapper) = staged {
            self.release(&r.volume_id, mapper).await;
        }
        tracing::info!(volume.id = %r.volume_id, "volume unstaged");
        Ok(Response::new(proto::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        require(&r.staging_target_path, "staging_target_path")?;
        require(&r.target_path, "target_path")?;
        let cap = r
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let access = check_capability(&cap)?;
        let mount_flags = match &cap.access_type {
            Some(volume_capability::AccessType::Mount(m)) => m.mount_flags.clone(),
            _ => vec![],
        };
        let _guard = self.enter(&r.volume_id)?;
        self.driver
            .publish(PublishRequest {
                volume_id: r.volume_id.clone(),
                staging_path: r.staging_target_path,
                target_path: r.target_path,
                access: if access.block {
                    AccessType::Block
                } else {
                    AccessType::Mount
                },
                read_only: r.readonly || reader_only(&cap),
                mount_flags,
            })
            .await?;
        tracing::info!(volume.id = %r.volume_id, "volume published");
        Ok(Response::new(proto::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<proto::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<proto::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        require(&r.target_path, "target_path")?;
        let _guard = self.enter(&r.volume_id)?;
        self.driver.unpublish(&r.volume_id, &r.target_path).await?;
        tracing::info!(volume.id = %r.volume_id, "volume unpublished");
        Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        require(&r.volume_path, "volume_path")?;
        let st = self
            .driver
            .stats(&r.volume_id, &r.volume_path)
            .await
            .map_err(|e| not_here(e, &r.volume_id, &r.volume_path))?;
        use proto::volume_usage::Unit;
        let usage = match st.usage {
            VolumeUsage::Filesystem(f) => vec![
                proto::VolumeUsage {
                    available: f.bytes_available as i64,
                    total: f.bytes_total as i64,
                    used: f.bytes_used as i64,
                    unit: Unit::Bytes as i32,
                },
                proto::VolumeUsage {
                    available: f.inodes_free as i64,
                    total: f.inodes_total as i64,
                    used: f.inodes_used as i64,
                    unit: Unit::Inodes as i32,
                },
            ],
            VolumeUsage::Block { total_bytes } => {
                vec![proto::VolumeUsage {
                    total: total_bytes as i64,
                    unit: Unit::Bytes as i32,
                    ..Default::default()
                }]
            }
        };
        Ok(Response::new(proto::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(proto::VolumeCondition {
                abnormal: st.condition.abnormal,
                message: st.condition.message,
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<proto::NodeExpandVolumeRequest>,
    ) -> Result<Response<proto::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        require(&r.volume_path, "volume_path")?;
        if let Some(cap) = &r.volume_capability {
            check_capability(cap)?;
        }
        let _guard = self.enter(&r.volume_id)?;
        let bytes = self
            .driver
            .expand(&r.volume_id, &r.volume_path)
            .await
            .map_err(|e| not_here(e, &r.volume_id, &r.volume_path))?;
        tracing::info!(volume.id = %r.volume_id, bytes, "volume expanded on the node");
        Ok(Response::new(proto::NodeExpandVolumeResponse {
            capacity_bytes: bytes as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<proto::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<proto::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| proto::NodeServiceCapability {
                r#type: Some(nsc::Type::Rpc(nsc::Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(proto::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<proto::NodeGetInfoRequest>,
    ) -> Result<Response<proto::NodeGetInfoResponse>, Status> {
        Ok(Response::new(proto::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
