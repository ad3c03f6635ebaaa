//! CSI Controller: protobuf in, `volume::controller::Controller` calls, protobuf out.

use super::proto::{
    self, controller_server, controller_service_capability as csc, volume_capability,
    volume_content_source,
};
use super::require;
use crate::volume::controller::{Controller, CreateRequest, Snapshot, Source, VolumeInfo};
use crate::volume::{Credentials, VolumeParams};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use volume_capability::access_mode::Mode;

pub struct ControllerService {
    pub inner: Arc<Controller>,
}

const CAPABILITIES: &[csc::rpc::Type] = &[
    csc::rpc::Type::CreateDeleteVolume,
    csc::rpc::Type::PublishUnpublishVolume,
    csc::rpc::Type::PublishReadonly,
    csc::rpc::Type::ListVolumes,
    csc::rpc::Type::ListVolumesPublishedNodes,
    csc::rpc::Type::GetCapacity,
    csc::rpc::Type::ExpandVolume,
    csc::rpc::Type::CreateDeleteSnapshot,
    csc::rpc::Type::ListSnapshots,
    csc::rpc::Type::CloneVolume,
    csc::rpc::Type::GetVolume,
    csc::rpc::Type::VolumeCondition,
    csc::rpc::Type::SingleNodeMultiWriter,
];

/// What the access modes of a request say about attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessSummary {
    /// Only one node may attach at a time (every SINGLE_NODE_* mode).
    pub exclusive: bool,
    pub block: bool,
}

/// Checks capabilities and summarises them. A filesystem cannot be written from several nodes,
/// so multi-node writer modes are accepted only for raw block volumes.
pub fn check_capabilities(caps: &[proto::VolumeCapability]) -> Result<AccessSummary, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities are required"));
    }
    let mut summary = AccessSummary {
        exclusive: false,
        block: false,
    };
    for cap in caps {
        let summary_one = check_capability(cap)?;
        summary.exclusive |= summary_one.exclusive;
        summary.block |= summary_one.block;
    }
    Ok(summary)
}

/// mkfs.xfs (xfsprogs 5.19 and later) refuses a filesystem under 300 MiB.
const XFS_MIN_BYTES: i64 = 300 << 20;

/// The required size, raised to the smallest the requested filesystem can be made on: a 1 MiB
/// xfs volume would be provisioned and then fail every mount. OutOfRange when the limit forbids it.
pub fn room_for_filesystem(
    caps: &[proto::VolumeCapability],
    required: i64,
    limit: i64,
) -> Result<i64, Status> {
    let xfs = caps.iter().any(|c| {
        matches!(&c.access_type, Some(volume_capability::AccessType::Mount(m)) if m.fs_type == "xfs")
    });
    if !xfs || required >= XFS_MIN_BYTES || (required == 0 && limit == 0) {
        return Ok(required);
    }
    if limit != 0 && limit < XFS_MIN_BYTES {
        return Err(Status::out_of_range(format!(
            "an xfs volume needs at least {XFS_MIN_BYTES} bytes; limit_bytes is {limit}"
        )));
    }
    Ok(XFS_MIN_BYTES)
}

pub fn check_capability(cap: &proto::VolumeCapability) -> Result<AccessSummary, Status> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or_else(|| Status::invalid_argument("volume_capability.access_mode is required"))?;
    let block = match &cap.access_type {
        Some(volume_capability::AccessType::Block(_)) => true,
        Some(volume_capability::AccessType::Mount(m)) => {
            if !matches!(m.fs_type.as_str(), "" | "ext4" | "xfs") {
                return Err(Status::invalid_argument(format!(
                    "fs_type {:?} is not supported; use ext4 or xfs",
                    m.fs_type
                )));
            }
            false
        }
        None => {
            return Err(Status::invalid_argument(
                "volume_capability.access_type (block or mount) is required",
            ))
        }
    };
    let exclusive = match mode {
        Mode::Unknown => {
            return Err(Status::invalid_argument(
                "volume_capability.access_mode is unknown",
            ))
        }
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => true,
        Mode::MultiNodeReaderOnly => false,
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter if block => false,
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(Status::invalid_argument(
                "multi-node writer access is only supported for block volumes",
            ))
        }
    };
    Ok(AccessSummary { exclusive, block })
}

fn snapshot_proto(s: &Snapshot) -> proto::Snapshot {
    proto::Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: s.id.encode(),
        source_volume_id: s.source_volume.encode(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created.0,
            nanos: s.created.1,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

fn published_status(v: &VolumeInfo) -> proto::list_volumes_response::VolumeStatus {
    proto::list_volumes_response::VolumeStatus {
        published_node_ids: v.attachments.iter().map(|a| a.node.clone()).collect(),
        volume_condition: Some(proto::VolumeCondition {
            abnormal: false,
            message: "image present".into(),
        }),
    }
}

#[tonic::async_trait]
impl controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::volume::controller::validate_name("name", &r.name)?;
        crate::metrics::record_request_name(&r.name);
        check_capabilities(&r.volume_capabilities)?;
        let mut parameters = r.parameters;
        // A StorageClass may leave clusterID out when the driver knows only one cluster.
        if !parameters.contains_key("clusterID") {
            if let Some(only) = self.inner.clusters().only() {
                parameters.insert("clusterID".into(), only.cluster_id.clone());
            }
        }
        let params = VolumeParams::parse(&parameters)?;
        for (key, why) in params.ignored() {
            tracing::warn!(key, why, "ignoring a StorageClass parameter");
        }
        let creds = Credentials::from_secrets(&r.secrets)?;
        let source = match r.volume_content_source.and_then(|s| s.r#type) {
            None => None,
            Some(volume_content_source::Type::Snapshot(s)) => Some(Source::Snapshot(
                require(&s.snapshot_id, "snapshot_id")?.to_string(),
            )),
            Some(volume_content_source::Type::Volume(v)) => Some(Source::Volume(
                require(&v.volume_id, "volume_id")?.to_string(),
            )),
        };
        let (required, limit) = r
            .capacity_range
            .map(|c| (c.required_bytes, c.limit_bytes))
            .unwrap_or((0, 0));
        let required = room_for_filesystem(&r.volume_capabilities, required, limit)?;
        let vol = self
            .inner
            .create_volume(CreateRequest {
                name: r.name,
                required_bytes: required,
                limit_bytes: limit,
                params,
                source,
                creds,
            })
            .await?;
        tracing::info!(volume.id = %vol.id, size = vol.size, "volume created");
        let content_source =
            vol.source.map(|s| proto::VolumeContentSource {
                r#type: Some(match s {
                    Source::Snapshot(id) => volume_content_source::Type::Snapshot(
                        volume_content_source::SnapshotSource { snapshot_id: id },
                    ),
                    Source::Volume(id) => {
                        volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                            volume_id: id,
                        })
                    }
                }),
            });
        Ok(Response::new(proto::CreateVolumeResponse {
            volume: Some(proto::Volume {
                capacity_bytes: vol.size as i64,
                volume_id: vol.id.encode(),
                volume_context: vol.context,
                content_source,
                accessible_topology: vec![],
            }),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<proto::DeleteVolumeRequest>,
    ) -> Result<Response<proto::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        crate::metrics::record_volume_id(&r.volume_id);
        self.inner.delete_volume(&r.volume_id, &r.secrets).await?;
        tracing::info!(volume.id = %r.volume_id, "volume deleted");
        Ok(Response::new(proto::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<proto::ControllerPublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
        require(&r.node_id, "node_id")?;
        let cap = r
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let access = check_capability(&cap)?;
        let publish_context = self
            .inner
            .publish(
                &r.volume_id,
                &r.node_id,
                r.readonly,
                access.exclusive,
                &r.secrets,
            )
            .await?;
        tracing::info!(volume.id = %r.volume_id, node = %r.node_id, readonly = r.readonly, "volume published");
        Ok(Response::new(proto::ControllerPublishVolumeResponse {
            publish_context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<proto::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<proto::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
        self.inner
            .unpublish(&r.volume_id, &r.node_id, &r.secrets)
            .await?;
        tracing::info!(volume.id = %r.volume_id, node = %r.node_id, "volume unpublished");
        Ok(Response::new(proto::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<proto::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<proto::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities are required"));
        }
        self.inner.exists(&r.volume_id, &r.secrets).await?;
        // Unsupported capabilities are not an error here: the answer is "not confirmed".
        let (confirmed, message) = match check_capabilities(&r.volume_capabilities) {
            Ok(_) => (
                Some(proto::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                String::new(),
            ),
            Err(s) => (None, s.message().to_string()),
        };
        Ok(Response::new(proto::ValidateVolumeCapabilitiesResponse {
            confirmed,
            message,
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let page = self
            .inner
            .list_volumes(r.max_entries, &r.starting_token)
            .await?;
        let entries = page
            .entries
            .iter()
            .map(|v| proto::list_volumes_response::Entry {
                volume: Some(proto::Volume {
                    capacity_bytes: v.size as i64,
                    volume_id: v.id.encode(),
                    ..Default::default()
                }),
                status: Some(published_status(v)),
            })
            .collect();
        Ok(Response::new(proto::ListVolumesResponse {
            entries,
            next_token: page.next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        if !r.volume_capabilities.is_empty() {
            check_capabilities(&r.volume_capabilities)?;
        }
        let available = self.inner.capacity(&r.parameters).await?;
        Ok(Response::new(proto::GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(crate::volume::controller::MAX_SIZE as i64),
            minimum_volume_size: Some(crate::volume::controller::MIB as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| proto::ControllerServiceCapability {
                r#type: Some(csc::Type::Rpc(csc::Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(proto::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        require(&r.source_volume_id, "source_volume_id")?;
        crate::metrics::record_volume_id(&r.source_volume_id);
        crate::volume::controller::validate_name("name", &r.name)?;
        crate::metrics::record_request_name(&r.name);
        let snap = self
            .inner
            .create_snapshot(&r.name, &r.source_volume_id, &r.secrets)
            .await?;
        tracing::info!(volume.id = %r.source_volume_id, snapshot.id = %snap.id.encode(), "snapshot created");
        Ok(Response::new(proto::CreateSnapshotResponse {
            snapshot: Some(snapshot_proto(&snap)),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<proto::DeleteSnapshotRequest>,
    ) -> Result<Response<proto::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        crate::metrics::record_snapshot_id(&r.snapshot_id);
        self.inner
            .delete_snapshot(&r.snapshot_id, &r.secrets)
            .await?;
        tracing::info!(snapshot.id = %r.snapshot_id, "snapshot deleted");
        Ok(Response::new(proto::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let page = self
            .inner
            .list_snapshots(
                &r.snapshot_id,
                &r.source_volume_id,
                r.max_entries,
                &r.starting_token,
                &r.secrets,
            )
            .await?;
        let entries = page
            .entries
            .iter()
            .map(|s| proto::list_snapshots_response::Entry {
                snapshot: Some(snapshot_proto(s)),
            })
            .collect();
        Ok(Response::new(proto::ListSnapshotsResponse {
            entries,
            next_token: page.next_token,
        }))
    }

    async fn get_snapshot(
        &self,
        req: Request<proto::GetSnapshotRequest>,
    ) -> Result<Response<proto::GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        require(&r.snapshot_id, "snapshot_id")?;
        crate::metrics::record_snapshot_id(&r.snapshot_id);
        let page = self
            .inner
            .list_snapshots(&r.snapshot_id, "", 0, "", &r.secrets)
            .await?;
        let snap = page.entries.first().ok_or_else(|| {
            Status::not_found(format!("snapshot {} does not exist", r.snapshot_id))
        })?;
        Ok(Response::new(proto::GetSnapshotResponse {
            snapshot: Some(snapshot_proto(snap)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<Response<proto::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
        let range = r
            .capacity_range
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let block = match &r.volume_capability {
            Some(cap) => check_capability(cap)?.block,
            None => false,
        };
        let size = self
            .inner
            .expand_volume(
                &r.volume_id,
                range.required_bytes,
                range.limit_bytes,
                &r.secrets,
            )
            .await?;
        tracing::info!(volume.id = %r.volume_id, size, "volume expanded");
        Ok(Response::new(proto::ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<proto::ControllerGetVolumeRequest>,
    ) -> Result<Response<proto::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
        let v = self
            .inner
            .get_volume(&r.volume_id, &Default::default())
            .await?;
        let st = published_status(&v);
        Ok(Response::new(proto::ControllerGetVolumeResponse {
            volume: Some(proto::Volume {
                capacity_bytes: v.size as i64,
                volume_id: v.id.encode(),
                ..Default::default()
            }),
            status: Some(proto::controller_get_volume_response::VolumeStatus {
                published_node_ids: st.published_node_ids,
                volume_condition: st.volume_condition,
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<proto::ControllerModifyVolumeRequest>,
    ) -> Result<Response<proto::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not supported",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(fs_type: &str) -> proto::VolumeCapability {
        proto::VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume {
                    fs_type: fs_type.into(),
                    ..Default::default()
                },
            )),
            access_mode: None,
        }
    }

    #[test]
    fn a_small_xfs_volume_is_raised_to_what_mkfs_xfs_accepts() {
        let xfs = [mount("xfs")];
        assert_eq!(
            room_for_filesystem(&xfs, 1 << 20, 0).unwrap(),
            XFS_MIN_BYTES
        );
        assert_eq!(
            room_for_filesystem(&xfs, 1 << 20, 1 << 30).unwrap(),
            XFS_MIN_BYTES
        );
        assert_eq!(room_for_filesystem(&xfs, 1 << 30, 0).unwrap(), 1 << 30);
        assert_eq!(
            room_for_filesystem(&xfs, 0, 0).unwrap(),
            0,
            "the default size stays"
        );
        let e = room_for_filesystem(&xfs, 1 << 20, 2 << 20).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        for other in [mount("ext4"), mount("")] {
            assert_eq!(
                room_for_filesystem(&[other], 1 << 20, 2 << 20).unwrap(),
                1 << 20
            );
        }
    }
}
