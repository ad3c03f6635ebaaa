//! `rook-rbd client`: one CSI call per invocation. Results go to stdout (IDs alone, so scripts can
//! capture them); timings go to stderr.

use super::CsiClient;
use crate::csi::proto::{self, volume_capability, volume_content_source};
use clap::{Args, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct ClientArgs {
    /// The driver's endpoint: unix:///path/to/csi.sock or tcp://host:port.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Directory with userID and userKey files, sent as the call's CSI secrets.
    #[arg(long, env = "SECRET_DIR")]
    pub secret_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub call: Call,
}

#[derive(Subcommand)]
pub enum Call {
    /// Identity: plugin name, version and readiness.
    Probe,
    /// CreateVolume; prints the volume ID.
    Create {
        name: String,
        /// Size, e.g. 1G, 512Mi or bytes.
        #[arg(long, default_value = "1G")]
        size: String,
        /// StorageClass parameter key=value (repeatable), e.g. clusterID=..., pool=rbd.
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        #[arg(long)]
        from_volume: Option<String>,
        /// Ask for a raw block volume instead of a filesystem.
        #[arg(long)]
        block: bool,
        /// Filesystem the volume will carry (ext4 or xfs).
        #[arg(long, default_value = "ext4")]
        fs: String,
    },
    /// DeleteVolume.
    Delete { volume_id: String },
    /// ListVolumes; prints ID, size and published nodes per line.
    List {
        #[arg(long, default_value_t = 0)]
        max: i32,
    },
    /// ControllerExpandVolume to a new size.
    Expand { volume_id: String, size: String },
    /// CreateSnapshot; prints the snapshot ID.
    Snapshot {
        name: String,
        #[arg(long)]
        source: String,
    },
    /// DeleteSnapshot.
    DeleteSnapshot { snapshot_id: String },
    /// ListSnapshots, optionally of one source volume.
    ListSnapshots {
        #[arg(long, default_value = "")]
        source: String,
    },
    /// ControllerPublishVolume to a node.
    Publish {
        volume_id: String,
        #[arg(long)]
        node: String,
        #[arg(long)]
        readonly: bool,
        #[arg(long)]
        block: bool,
    },
    /// ControllerUnpublishVolume from a node.
    Unpublish {
        volume_id: String,
        #[arg(long)]
        node: String,
    },
    /// NodeStageVolume: map, format if empty, mount at the staging path.
    Stage {
        volume_id: String,
        #[arg(long)]
        staging_path: String,
        #[arg(long)]
        block: bool,
        #[arg(long, default_value = "ext4")]
        fs: String,
        /// Volume context key=value, as returned by CreateVolume (repeatable).
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// NodeUnstageVolume.
    Unstage {
        volume_id: String,
        #[arg(long)]
        staging_path: String,
    },
    /// NodePublishVolume: bind the staged volume into a target path.
    Mount {
        volume_id: String,
        #[arg(long)]
        staging_path: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        readonly: bool,
        #[arg(long)]
        block: bool,
        /// The filesystem the volume was staged with (ext4 or xfs).
        #[arg(long, default_value = "ext4")]
        fs: String,
        #[arg(long = "context", value_parser = parse_kv)]
        context: Vec<(String, String)>,
    },
    /// NodeUnpublishVolume.
    Umount {
        volume_id: String,
        #[arg(long)]
        target: String,
    },
    /// NodeExpandVolume: grow the filesystem to the device's size.
    NodeExpand {
        volume_id: String,
        #[arg(long)]
        path: String,
    },
    /// NodeGetVolumeStats.
    Stats {
        volume_id: String,
        #[arg(long)]
        path: String,
    },
    /// GetCapacity for StorageClass parameters.
    Capacity {
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// `1G`, `1Gi`, `512M`, `4096`: binary units either way, as Kubernetes users expect from `Gi`.
pub fn parse_size(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    let unit = s[digits.len()..]
        .trim_end_matches(['i', 'B'])
        .to_ascii_uppercase();
    let n: i64 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("size {s:?}: expected a number with an optional unit"))?;
    let mult: i64 = match unit.as_str() {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => anyhow::bail!("size {s:?}: unknown unit"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("size {s:?} is too large"))
}

pub fn capability(block: bool, fs: &str, readonly_many: bool) -> proto::VolumeCapability {
    use volume_capability::access_mode::Mode;
    proto::VolumeCapability {
        access_type: Some(if block {
            volume_capability::AccessType::Block(Default::default())
        } else {
            volume_capability::AccessType::Mount(volume_capability::MountVolume {
                fs_type: fs.to_string(),
                ..Default::default()
            })
        }),
        access_mode: Some(volume_capability::AccessMode {
            mode: if readonly_many {
                Mode::MultiNodeReaderOnly
            } else {
                Mode::SingleNodeWriter
            } as i32,
        }),
    }
}

pub fn read_secrets(dir: &Option<PathBuf>) -> anyhow::Result<HashMap<String, String>> {
    // Sent as they are: validating them is the driver's job, and tests send bad ones on purpose.
    dir.as_deref()
        .map(crate::volume::read_secret_dir)
        .transpose()
        .map(Option::unwrap_or_default)
}

pub async fn run(a: ClientArgs) -> anyhow::Result<()> {
    let mut c = CsiClient::connect(&a.endpoint).await?;
    let secrets = read_secrets(&a.secret_dir)?;
    let t = Instant::now();
    let what = match a.call {
        Call::Probe => {
            let info = c
                .identity
                .get_plugin_info(proto::GetPluginInfoRequest {})
                .await?
                .into_inner();
            let ready = c
                .identity
                .probe(proto::ProbeRequest {})
                .await?
                .into_inner()
                .ready;
            println!(
                "{} {} ready={}",
                info.name,
                info.vendor_version,
                ready.unwrap_or(false)
            );
            "probe"
        }
        Call::Create {
            name,
            size,
            params,
            from_snapshot,
            from_volume,
            block,
            fs,
        } => {
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource { snapshot_id: s },
                )),
                (_, Some(v)) => Some(volume_content_source::Type::Volume(
                    volume_content_source::VolumeSource { volume_id: v },
                )),
                _ => None,
            };
            let v = c
                .controller
                .create_volume(proto::CreateVolumeRequest {
                    name,
                    capacity_range: Some(proto::CapacityRange {
                        required_bytes: parse_size(&size)?,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![capability(block, &fs, false)],
                    parameters: params.into_iter().collect(),
                    secrets: secrets.clone(),
                    volume_content_source: source
                        .map(|t| proto::VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .unwrap_or_default();
            println!("{}", v.volume_id);
            for (k, v) in &v.volume_context {
                eprintln!("  context {k}={v}");
            }
            "CreateVolume"
        }
        Call::Delete { volume_id } => {
            c.controller
                .delete_volume(proto::DeleteVolumeRequest { volume_id, secrets })
                .await?;
            "DeleteVolume"
        }
        Call::List { max } => {
            let mut token = String::new();
            loop {
                let r = c
                    .controller
                    .list_volumes(proto::ListVolumesRequest {
                        max_entries: max,
                        starting_token: token.clone(),
                    })
                    .await?
                    .into_inner();
                for e in r.entries {
                    let v = e.volume.unwrap_or_default();
                    let nodes = e
                        .status
                        .map(|s| s.published_node_ids.join(","))
                        .unwrap_or_default();
                    println!("{}\t{}\t{}", v.volume_id, v.capacity_bytes, nodes);
                }
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            "ListVolumes"
        }
        Call::Expand { volume_id, size } => {
            let r = c
                .controller
                .controller_expand_volume(proto::ControllerExpandVolumeRequest {
                    volume_id,
                    capacity_range: Some(proto::CapacityRange {
                        required_bytes: parse_size(&size)?,
                        limit_bytes: 0,
                    }),
                    secrets,
                    volume_capability: None,
                })
                .await?
                .into_inner();
            println!(
                "{} node_expansion_required={}",
                r.capacity_bytes, r.node_expansion_required
            );
            "ControllerExpandVolume"
        }
        Call::Snapshot { name, source } => {
            let s = c
                .controller
                .create_snapshot(proto::CreateSnapshotRequest {
                    source_volume_id: source,
                    name,
                    secrets,
                    parameters: Default::default(),
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            println!("{}", s.snapshot_id);
            "CreateSnapshot"
        }
        Call::DeleteSnapshot { snapshot_id } => {
            c.controller
                .delete_snapshot(proto::DeleteSnapshotRequest {
                    snapshot_id,
                    secrets,
                })
                .await?;
            "DeleteSnapshot"
        }
        Call::ListSnapshots { source } => {
            let r = c
                .controller
                .list_snapshots(proto::ListSnapshotsRequest {
                    source_volume_id: source,
                    secrets,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for e in r.entries {
                let s = e.snapshot.unwrap_or_default();
                println!(
                    "{}\t{}\t{}",
                    s.snapshot_id, s.size_bytes, s.source_volume_id
                );
            }
            "ListSnapshots"
        }
        Call::Publish {
            volume_id,
            node,
            readonly,
            block,
        } => {
            let r = c
                .controller
                .controller_publish_volume(proto::ControllerPublishVolumeRequest {
                    volume_id,
                    node_id: node,
                    volume_capability: Some(capability(block, "ext4", false)),
                    readonly,
                    secrets,
                    volume_context: Default::default(),
                })
                .await?
                .into_inner();
            for (k, v) in r.publish_context {
                println!("{k}={v}");
            }
            "ControllerPublishVolume"
        }
        Call::Unpublish { volume_id, node } => {
            c.controller
                .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
                    volume_id,
                    node_id: node,
                    secrets,
                })
                .await?;
            "ControllerUnpublishVolume"
        }
        Call::Stage {
            volume_id,
            staging_path,
            block,
            fs,
            context,
        } => {
            c.node
                .node_stage_volume(proto::NodeStageVolumeRequest {
                    volume_id,
                    publish_context: Default::default(),
                    staging_target_path: staging_path,
                    volume_capability: Some(capability(block, &fs, false)),
                    secrets,
                    volume_context: context.into_iter().collect(),
                })
                .await?;
            "NodeStageVolume"
        }
        Call::Unstage {
            volume_id,
            staging_path,
        } => {
            c.node
                .node_unstage_volume(proto::NodeUnstageVolumeRequest {
                    volume_id,
                    staging_target_path: staging_path,
                })
                .await?;
            "NodeUnstageVolume"
        }
        Call::Mount {
            volume_id,
            staging_path,
            target,
            readonly,
            block,
            context,
            fs,
        } => {
            c.node
                .node_publish_volume(proto::NodePublishVolumeRequest {
                    volume_id,
                    publish_context: Default::default(),
                    staging_target_path: staging_path,
                    target_path: target,
                    volume_capability: Some(capability(block, &fs, false)),
                    readonly,
                    secrets,
                    volume_context: context.into_iter().collect(),
                })
                .await?;
            "NodePublishVolume"
        }
        Call::Umount { volume_id, target } => {
            c.node
                .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
                    volume_id,
                    target_path: target,
                })
                .await?;
            "NodeUnpublishVolume"
        }
        Call::NodeExpand { volume_id, path } => {
            let r = c
                .node
                .node_expand_volume(proto::NodeExpandVolumeRequest {
                    volume_id,
                    volume_path: path,
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("{}", r.capacity_bytes);
            "NodeExpandVolume"
        }
        Call::Stats { volume_id, path } => {
            let r = c
                .node
                .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
                    volume_id,
                    volume_path: path,
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            for u in r.usage {
                println!(
                    "unit={} total={} used={} available={}",
                    u.unit, u.total, u.used, u.available
                );
            }
            if let Some(cond) = r.volume_condition {
                println!("abnormal={} message={}", cond.abnormal, cond.message);
            }
            "NodeGetVolumeStats"
        }
        Call::Capacity { params } => {
            let r = c
                .controller
                .get_capacity(proto::GetCapacityRequest {
                    parameters: params.into_iter().collect(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("{}", r.available_capacity);
            "GetCapacity"
        }
    };
    eprintln!("{what} ok in {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
    }
}
