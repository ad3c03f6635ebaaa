//! CSI Node: protobuf in, `node::NodeDriver` calls, protobuf out. The image and cluster come from
//! the volume ID; credentials from the stage secrets (or --secret-dir); the mapper, mkfs and map
//! options from the volume context CreateVolume returned.
//!
//! Each operation on a volume runs in a task of its own that holds the volume's key until its
//! work is over (kubelet's deadline drops only the handler); a retry meanwhile gets `Aborted`.

use super::controller::check_capability;
use super::proto::{self, node_server, node_service_capability as nsc, volume_capability};
use super::require;
use crate::node::mapper::ImageRef;
use crate::node::step::{answerable, first_answer};
use crate::node::{
    AccessType, MapRequest, MapperChoice, MapperKind, NodeDriver, NodeError, PathPolicy,
    PublishRequest, StageRequest, VolumeAccess, VolumeUsage,
};
use crate::volume::controller::Controller;
use crate::volume::params::MapperOptions;
use crate::volume::{ClusterConfig, Credentials, InFlight, RunError, VolumeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use volume_capability::access_mode::Mode;

pub struct NodeService {
    pub driver: Arc<NodeDriver>,
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

    /// Runs `work` under the volume's key in a task of its own; answers with its outcome, or
    /// with DeadlineExceeded as soon as one of its steps overruns (the work goes on).
    async fn run<T, E, W>(&self, id: &str, work: W) -> Result<T, Status>
    where
        W: Future<Output = Result<T, E>> + Send + 'static,
        E: Into<Status> + Send + 'static,
        T: Send + 'static,
    {
        let (work, early) = answerable(work);
        match first_answer(self.inflight.run(id, work), early).await {
            Err(overrun) => Err(overrun.into()),
            Ok(Err(RunError::Busy(_))) => Err(Status::aborted(format!(
                "an operation on volume {id} is already in progress on this node"
            ))),
            Ok(Err(lost)) => Err(crate::volume::Error::from(lost).into()),
            Ok(Ok(done)) => done.map_err(Into::into),
        }
    }

    /// Whether this node's client of the volume was fenced by a force move (so its unwritten
    /// data is lost already). Unknown counts as no.
    async fn fenced_here(&self, volume_id: &str) -> bool {
        let (Ok(vol), Some(creds)) = (self.volume(volume_id), self.default_creds.as_ref()) else {
            return false;
        };
        match self.volumes.fenced_on(&vol, &self.node_id, creds).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(volume.id = %volume_id, error = %e, "could not read whether this node's client was fenced");
                false
            }
        }
    }

    /// What an unstage needs to release this node's hold on the attachment record.
    fn releaser(&self, volume_id: &str) -> Option<Release> {
        Some(Release {
            volumes: self.volumes.clone(),
            vol: self.volume(volume_id).ok()?,
            volume_id: volume_id.to_string(),
            node_id: self.node_id.clone(),
            creds: self.default_creds.clone()?,
        })
    }

    /// The monitors of the volume's cluster, or none when that is unknown here.
    fn monitors_of(&self, id: &str) -> Vec<String> {
        VolumeId::decode(id)
            .ok()
            .and_then(|v| self.clusters.get(&v.cluster_id).map(|c| c.monitors.clone()))
            .unwrap_or_default()
    }
}

/// `mapOptions` or `unmapOptions` of the volume context, by mapper. CreateVolume checked them;
/// a hand-made (static) volume context is checked here.
fn options_by_mapper(
    ctx: &HashMap<String, String>,
    key: &str,
) -> Result<HashMap<MapperKind, String>, Status> {
    let o = MapperOptions::parse(key, ctx.get(key).map_or("", String::as_str))?;
    Ok([(MapperKind::Krbd, o.krbd), (MapperKind::Nbd, o.nbd)]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect())
}

/// For questions about a volume at a path (stats, expand), a path that cannot hold one of our
/// volumes simply means the volume is not there.
fn not_here(e: NodeError, volume_id: &str, path: &str) -> NodeError {
    match e {
        NodeError::InvalidPath { .. } => {
            NodeError::NotFound(format!("volume {volume_id} is not at {path:?}"))
        }
        e => e,
    }
}

/// Whether this node already maps the image: staged before, or mapped by a stage that crashed
/// before it recorded its state.
async fn mapped_here(
    driver: &NodeDriver,
    volume_id: &str,
    vol: &VolumeId,
    mapper: MapperChoice,
) -> Result<bool, Status> {
    if staged_mapper(driver, volume_id)?.is_some() {
        return Ok(true);
    }
    let kind = driver.mappers().resolve(mapper);
    let image = ImageRef {
        pool: &vol.pool,
        namespace: vol.namespace(),
        image: &vol.image,
    };
    Ok(driver.mappers().find(kind, &image).await?.is_some())
}

/// The mapper of the volume's staging state on this node, if it is staged here.
fn staged_mapper(driver: &NodeDriver, volume_id: &str) -> Result<Option<MapperKind>, Status> {
    Ok(driver
        .staged()?
        .into_iter()
        .find(|s| s.volume_id == volume_id)
        .map(|s| s.mapping.mapper))
}

/// After an unstage: takes this node's clients off the attachment record, and lifts the
/// blocklist entries of those that were fenced. A krbd client is shared by every image the
/// kernel maps with it, so it may still serve others: its entry is left to expire.
/// Best effort: a stale entry only names a client that no longer exists.
struct Release {
    volumes: Arc<Controller>,
    vol: VolumeId,
    volume_id: String,
    node_id: String,
    creds: Credentials,
}

impl Release {
    async fn run(self, mapper: MapperKind) {
        let lift = mapper != MapperKind::Krbd;
        match self
            .volumes
            .release_stage(&self.vol, &self.node_id, &self.creds, lift)
            .await
        {
            Ok(lifted) => {
                for addr in lifted {
                    tracing::info!(volume.id = %self.volume_id, client = %addr, "lifted the blocklist entry of this node's fenced client, now unmapped");
                }
            }
            Err(e) => {
                tracing::warn!(volume.id = %self.volume_id, error = %e, "could not take this node's client off the attachment record")
            }
        }
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
        crate::metrics::record_volume_id(&r.volume_id);
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
        let req = StageRequest {
            volume_id: r.volume_id.clone(),
            staging_path: r.staging_target_path.clone(),
            access: access_kind,
            read_only,
            map: MapRequest {
                namespace: vol.namespace().map(String::from),
                pool: vol.pool.clone(),
                image: vol.image.clone(),
                monitors,
                user: creds.user.clone(),
                key: creds.key.clone(),
                map_options: options_by_mapper(ctx, "mapOptions")?,
                unmap_options: options_by_mapper(ctx, "unmapOptions")?,
                read_only,
            },
            mapper,
        };
        // A bad path is refused before anything asks Ceph about the volume.
        PathPolicy::new(self.driver.config().allowed_roots.clone())
            .validate(&r.staging_target_path)?;
        let exclusive = access.exclusive;
        let (driver, volumes, node_id) = (
            self.driver.clone(),
            self.volumes.clone(),
            self.node_id.clone(),
        );
        let id = r.volume_id.clone();
        self.run(&r.volume_id, async move {
            // A single-node volume is staged only once every other client has let go; a mapping
            // of our own (a repeated stage, or one that a crash left behind) is not another
            // client.
            if exclusive && !mapped_here(&driver, &id, &vol, mapper).await? {
                volumes.check_stage(&vol, &id, &node_id, &creds).await?;
            }
            driver.stage(req).await?;
            if exclusive {
                // Without the record a force move cannot fence this node; the volume still
                // works, and the next node's NodeStage refuses while this node's client holds
                // the image.
                match volumes.record_stage(&vol, &node_id, &creds).await {
                    Ok(clients) if clients.is_empty() => {
                        tracing::warn!(volume.id = %id, "no client of this node watches the image; a force move cannot fence it")
                    }
                    Ok(clients) => {
                        tracing::debug!(volume.id = %id, ?clients, "recorded this node's clients")
                    }
                    Err(e) => {
                        tracing::warn!(volume.id = %id, error = %e, "could not record this node's client of the image; a force move cannot fence it")
                    }
                }
            }
            Ok::<(), Status>(())
        })
        .await?;
        tracing::info!(volume.id = %r.volume_id, "volume staged");
        Ok(Response::new(proto::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<proto::NodeUnstageVolumeRequest>,
    ) -> Result<Response<proto::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
        require(&r.staging_target_path, "staging_target_path")?;
        let driver = self.driver.clone();
        let release = self.releaser(&r.volume_id);
        let (id, staging) = (r.volume_id.clone(), r.staging_target_path);
        let done = self
            .run(&r.volume_id, async move {
                let staged = staged_mapper(&driver, &id)?;
                driver.unstage(&id, &staging).await?;
                if let (Some(mapper), Some(release)) = (staged, release) {
                    release.run(mapper).await;
                }
                Ok::<(), Status>(())
            })
            .await;
        if let Err(e) = &done {
            if e.code() == tonic::Code::Aborted {
                let monitors = self.monitors_of(&r.volume_id);
                let fenced = self.fenced_here(&r.volume_id).await;
                self.driver
                    .unstage_asked_again(&r.volume_id, &monitors, fenced)
                    .await;
            }
        }
        done?;
        tracing::info!(volume.id = %r.volume_id, "volume unstaged");
        Ok(Response::new(proto::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<proto::NodePublishVolumeRequest>,
    ) -> Result<Response<proto::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
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
        let req = PublishRequest {
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
        };
        let driver = self.driver.clone();
        self.run(&r.volume_id, async move { driver.publish(req).await })
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
        crate::metrics::record_volume_id(&r.volume_id);
        require(&r.target_path, "target_path")?;
        let driver = self.driver.clone();
        let (id, target) = (r.volume_id.clone(), r.target_path);
        self.run(
            &r.volume_id,
            async move { driver.unpublish(&id, &target).await },
        )
        .await?;
        tracing::info!(volume.id = %r.volume_id, "volume unpublished");
        Ok(Response::new(proto::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<proto::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<proto::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        require(&r.volume_id, "volume_id")?;
        crate::metrics::record_volume_id(&r.volume_id);
        require(&r.volume_path, "volume_path")?;
        let st = self
            .driver
            .stats(&r.volume_id, &r.volume_path)
            .await
            .map_err(|e| Status::from(not_here(e, &r.volume_id, &r.volume_path)))?;
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
        crate::metrics::record_volume_id(&r.volume_id);
        require(&r.volume_path, "volume_path")?;
        if let Some(cap) = &r.volume_capability {
            check_capability(cap)?;
        }
        let driver = self.driver.clone();
        let (id, path) = (r.volume_id.clone(), r.volume_path.clone());
        let bytes = self
            .run(&r.volume_id, async move {
                driver
                    .expand(&id, &path)
                    .await
                    .map_err(|e| not_here(e, &id, &path))
            })
            .await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mapper::{krbd, nbd};
    use crate::secret::Secret;
    use std::path::Path;

    fn request(ctx: &HashMap<String, String>) -> Result<MapRequest, Status> {
        Ok(MapRequest {
            pool: "rbd".into(),
            namespace: None,
            image: "csi-vol-1".into(),
            monitors: vec!["127.0.0.1:3300".into()],
            user: "csi".into(),
            key: Secret::new("AQBkey=="),
            map_options: options_by_mapper(ctx, "mapOptions")?,
            unmap_options: options_by_mapper(ctx, "unmapOptions")?,
            read_only: false,
        })
    }

    #[test]
    fn each_mapper_gets_only_its_own_part_of_ceph_csi_map_options() {
        let ctx = HashMap::from([
            (
                "mapOptions".to_string(),
                "krbd:queue_depth=128,lock_on_read;nbd:io-timeout=5".to_string(),
            ),
            ("unmapOptions".to_string(), "nbd:force".to_string()),
        ]);
        let req = request(&ctx).unwrap();
        let k = krbd::map_command(&req, Path::new("/k"));
        assert_eq!(
            k.args[k.args.len() - 2..],
            ["--options", "queue_depth=128,lock_on_read"]
        );
        let n = nbd::map_command(&req, Path::new("/k"));
        assert_eq!(n.args.last().unwrap(), "--io-timeout=5");
        assert!(!n.args.iter().any(|a| a.contains("queue_depth")));
        assert_eq!(
            req.unmap_options_for(MapperKind::Nbd).as_deref(),
            Some("force")
        );
        assert_eq!(req.unmap_options_for(MapperKind::Krbd), None);
        // The older bare form is krbd's alone.
        let bare = HashMap::from([("mapOptions".to_string(), "lock_on_read".to_string())]);
        let req = request(&bare).unwrap();
        assert_eq!(req.map_options_for(MapperKind::Krbd), Some("lock_on_read"));
        assert_eq!(req.map_options_for(MapperKind::Nbd), None);
    }

    #[test]
    fn malformed_map_options_in_a_volume_context_are_invalid_argument() {
        let ctx = HashMap::from([("unmapOptions".to_string(), "xyz:force".to_string())]);
        let e = request(&ctx).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("unmapOptions"), "{}", e.message());
    }
}
