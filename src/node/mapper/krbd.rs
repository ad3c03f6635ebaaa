//! The kernel rbd client: `rbd device map`.
//!
//! The test machine's kernel has no `rbd` module, so only command construction and output
//! parsing are unit-tested here; mapping itself is exercised on real nodes.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    cluster_args, ImageRef, KeyFile, MapRequest, Mapper, MapperConfig, MapperKind, Mapping,
};
use crate::node::command::{self, CommandSpec};
use crate::node::NodeError;

#[derive(Debug)]
pub struct KrbdMapper {
    config: MapperConfig,
}

impl KrbdMapper {
    pub fn new(config: MapperConfig) -> Self {
        Self { config }
    }
}

/// `rbd device map POOL[/NS]/IMAGE -c /dev/null --id U -m MONS --keyfile F [--options O] [--read-only]`,
/// with the krbd part of `mapOptions` as O.
pub fn map_command(req: &MapRequest, keyfile: &Path) -> CommandSpec {
    let mut c = CommandSpec::new("rbd")
        .args(["device", "map"])
        .arg(req.image_spec())
        .args(cluster_args(req, keyfile));
    if let Some(o) = req.map_options_for(MapperKind::Krbd) {
        c = c.args(["--options", o]);
    }
    if req.read_only {
        c = c.arg("--read-only");
    }
    c
}

pub fn list_command() -> CommandSpec {
    CommandSpec::new("rbd").args(["-c", "/dev/null", "device", "list", "--format", "json"])
}

/// `rbd device unmap [--options O] DEVICE`, with the krbd part of `unmapOptions` as O.
pub fn unmap_command(mapping: &Mapping) -> CommandSpec {
    let mut c = CommandSpec::new("rbd").args(["-c", "/dev/null", "device", "unmap"]);
    if let Some(o) = mapping.unmap_options.as_deref() {
        c = c.args(["--options", o]);
    }
    c.arg(mapping.device.to_string_lossy())
}

/// `rbd device unmap -o force`: fails the I/O still queued on the device.
pub fn force_unmap_command(device: &Path) -> CommandSpec {
    CommandSpec::new("rbd")
        .args(["-c", "/dev/null", "device", "unmap", "-o", "force"])
        .arg(device.to_string_lossy())
}

/// One entry of `rbd device list --format json` (krbd) or `rbd-nbd list-mapped --format json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MappedDevice {
    #[serde(default, deserialize_with = "string_or_number")]
    pub id: String,
    pub pool: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(alias = "name")]
    pub image: String,
    #[serde(default)]
    pub snap: String,
    pub device: PathBuf,
}

impl MappedDevice {
    /// The head of `image` (not a snapshot) in the same pool and namespace.
    pub fn is(&self, image: &ImageRef<'_>) -> bool {
        self.pool == image.pool
            && self.namespace == image.namespace.unwrap_or("")
            && self.image == image.image
            && (self.snap.is_empty() || self.snap == "-")
    }
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    })
}

pub fn parse_list(program: &str, stdout: &str) -> Result<Vec<MappedDevice>, NodeError> {
    if stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(stdout).map_err(|e| NodeError::Parse {
        program: program.into(),
        detail: e.to_string(),
    })
}

/// The device path a map command printed (its last non-empty line).
pub fn parse_device(program: &str, stdout: &str) -> Result<PathBuf, NodeError> {
    stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with("/dev/"))
        .map(PathBuf::from)
        .ok_or_else(|| NodeError::Parse {
            program: program.into(),
            detail: format!("no device in output {stdout:?}"),
        })
}

impl Mapper for KrbdMapper {
    fn kind(&self) -> MapperKind {
        MapperKind::Krbd
    }

    async fn map(&self, req: &MapRequest) -> Result<Mapping, NodeError> {
        let unmap_options = req.unmap_options_for(MapperKind::Krbd);
        if let Some(m) = self.find(&req.into()).await? {
            return Ok(Mapping { unmap_options, ..m });
        }
        let keyfile = KeyFile::create(&self.config.key_dir, &req.key)?;
        let spec = map_command(req, keyfile.path());
        let out = command::run_ok(&spec, self.config.command_timeout).await?;
        drop(keyfile);
        Ok(Mapping {
            mapper: MapperKind::Krbd,
            device: parse_device("rbd", &out.stdout)?,
            fuse_mountpoint: None,
            pid: None,
            unmap_options,
        })
    }

    async fn unmap(&self, mapping: &Mapping) -> Result<(), NodeError> {
        if !mapping.device.exists() {
            return Ok(());
        }
        command::run_ok(&unmap_command(mapping), self.config.command_timeout)
            .await
            .map(drop)
    }

    async fn force(&self, mapping: &Mapping) -> Result<(), NodeError> {
        let spec = force_unmap_command(&mapping.device);
        command::run_ok(&spec, self.config.command_timeout)
            .await
            .map(drop)
    }

    async fn find(&self, image: &ImageRef<'_>) -> Result<Option<Mapping>, NodeError> {
        let out = command::run_ok(&list_command(), self.config.command_timeout).await?;
        Ok(parse_list("rbd", &out.stdout)?
            .into_iter()
            .find(|d| d.is(image))
            .map(|d| Mapping {
                mapper: MapperKind::Krbd,
                device: d.device,
                fuse_mountpoint: None,
                pid: None,
                unmap_options: None,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mapper::sample_request;
    use std::collections::HashMap;

    #[test]
    fn map_command_carries_keyfile_not_key() {
        let mut req = sample_request();
        req.map_options =
            HashMap::from([(MapperKind::Krbd, "queue_depth=128,lock_on_read".into())]);
        req.read_only = true;
        let c = map_command(&req, Path::new("/s/keys/1.key"));
        assert_eq!(c.program, "rbd");
        assert_eq!(
            c.args,
            [
                "device",
                "map",
                "rbd/csi-vol-1",
                "-c",
                "/dev/null",
                "--id",
                "csi",
                "-m",
                "10.0.0.1:6789,10.0.0.2:6789",
                "--keyfile",
                "/s/keys/1.key",
                "--options",
                "queue_depth=128,lock_on_read",
                "--read-only"
            ]
        );
        assert!(!c.to_string().contains("AQB"));
    }

    #[test]
    fn parses_device_list_and_matches_head_of_image() {
        let json = r#"[{"id":"0","pool":"rbd","namespace":"","name":"csi-vol-1","snap":"-","device":"/dev/rbd0"},
                       {"id":"1","pool":"rbd","namespace":"ns","name":"csi-vol-1","snap":"-","device":"/dev/rbd1"},
                       {"id":"2","pool":"rbd","namespace":"","name":"csi-vol-1","snap":"s1","device":"/dev/rbd2"}]"#;
        let list = parse_list("rbd", json).unwrap();
        assert_eq!(list.len(), 3);
        let img = ImageRef {
            pool: "rbd",
            namespace: None,
            image: "csi-vol-1",
        };
        let hits: Vec<_> = list.iter().filter(|d| d.is(&img)).collect();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].device, PathBuf::from("/dev/rbd0"));
        let ns = ImageRef {
            namespace: Some("ns"),
            ..img
        };
        assert_eq!(
            list.iter().find(|d| d.is(&ns)).unwrap().device,
            PathBuf::from("/dev/rbd1")
        );
        assert!(parse_list("rbd", "").unwrap().is_empty());
        assert!(parse_list("rbd", "not json").is_err());
    }

    #[test]
    fn parses_printed_device() {
        assert_eq!(
            parse_device("rbd", "/dev/rbd3\n").unwrap(),
            PathBuf::from("/dev/rbd3")
        );
        assert!(parse_device("rbd", "").is_err());
    }

    fn mapping(unmap_options: Option<&str>) -> Mapping {
        Mapping {
            mapper: MapperKind::Krbd,
            device: "/dev/rbd0".into(),
            fuse_mountpoint: None,
            pid: None,
            unmap_options: unmap_options.map(String::from),
        }
    }

    #[test]
    fn unmap_and_list_commands() {
        assert_eq!(
            unmap_command(&mapping(None)).args,
            ["-c", "/dev/null", "device", "unmap", "/dev/rbd0"]
        );
        assert_eq!(
            force_unmap_command(Path::new("/dev/rbd0")).args,
            [
                "-c",
                "/dev/null",
                "device",
                "unmap",
                "-o",
                "force",
                "/dev/rbd0"
            ]
        );
        assert_eq!(
            unmap_command(&mapping(Some("force"))).args,
            [
                "-c",
                "/dev/null",
                "device",
                "unmap",
                "--options",
                "force",
                "/dev/rbd0"
            ]
        );
        assert_eq!(
            list_command().args[2..],
            ["device", "list", "--format", "json"]
        );
    }

    #[test]
    fn map_command_passes_only_the_krbd_part_of_ceph_csi_map_options() {
        let mut req = sample_request();
        req.map_options = HashMap::from([
            (MapperKind::Krbd, "queue_depth=128,lock_on_read".into()),
            (MapperKind::Nbd, "io-timeout=5".into()),
        ]);
        let c = map_command(&req, Path::new("/k"));
        assert_eq!(
            c.args[c.args.len() - 2..],
            ["--options", "queue_depth=128,lock_on_read"]
        );
        req.map_options.remove(&MapperKind::Krbd);
        assert!(!map_command(&req, Path::new("/k"))
            .args
            .contains(&"--options".to_string()));
    }
}
