//! rbd-nbd: librbd in a user-space daemon behind the kernel's nbd driver.
//!
//! The test machine's kernel has no `nbd` module, so only command construction and output parsing
//! are unit-tested here. The daemon is started in its own process group and in the mappers'
//! cgroup, so it survives a restart of the plugin and of its container.

use std::path::Path;

use super::krbd::{parse_device, parse_list};
use super::{
    cluster_args, kill_all, ImageRef, KeyFile, MapRequest, Mapper, MapperConfig, MapperKind,
    Mapping,
};
use crate::node::command::{self, CommandSpec};
use crate::node::NodeError;

#[derive(Debug)]
pub struct NbdMapper {
    config: MapperConfig,
}

impl NbdMapper {
    pub fn new(config: MapperConfig) -> Self {
        Self { config }
    }

    /// [`map_command`], started in the mappers' cgroup.
    fn map_spec(&self, req: &MapRequest, keyfile: &Path) -> Result<CommandSpec, NodeError> {
        self.config.daemon(map_command(req, keyfile))
    }
}

/// `rbd-nbd map POOL[/NS]/IMAGE -c /dev/null --id U -m MONS --keyfile F [--read-only] [--OPT[=VAL]]...`
///
/// The nbd part of `mapOptions`, like `io-timeout=120,try-netlink`, becomes
/// `--io-timeout=120 --try-netlink`, as ceph-csi hands it to rbd-nbd.
pub fn map_command(req: &MapRequest, keyfile: &Path) -> CommandSpec {
    let mut c = CommandSpec::new("rbd-nbd")
        .arg("map")
        .arg(req.image_spec())
        .args(cluster_args(req, keyfile))
        .detached();
    if req.read_only {
        c = c.arg("--read-only");
    }
    c.args(cli_options(req.map_options_for(MapperKind::Nbd)))
}

/// `o1,o2=v` as rbd-nbd flags: `--o1 --o2=v`.
fn cli_options(options: Option<&str>) -> Vec<String> {
    options
        .unwrap_or("")
        .split(',')
        .filter(|o| !o.is_empty())
        .map(|o| format!("--{o}"))
        .collect()
}

pub fn list_command() -> CommandSpec {
    CommandSpec::new("rbd-nbd").args(["-c", "/dev/null", "list-mapped", "--format", "json"])
}

/// `rbd-nbd unmap [--OPT[=VAL]]... DEVICE`, with the nbd part of `unmapOptions`.
pub fn unmap_command(mapping: &Mapping) -> CommandSpec {
    CommandSpec::new("rbd-nbd")
        .args(["-c", "/dev/null", "unmap"])
        .args(cli_options(mapping.unmap_options.as_deref()))
        .arg(mapping.device.to_string_lossy())
}

impl Mapper for NbdMapper {
    fn kind(&self) -> MapperKind {
        MapperKind::Nbd
    }

    async fn map(&self, req: &MapRequest) -> Result<Mapping, NodeError> {
        let unmap_options = req.unmap_options_for(MapperKind::Nbd);
        if let Some(m) = self.find(&req.into()).await? {
            return Ok(Mapping { unmap_options, ..m });
        }
        let keyfile = KeyFile::create(&self.config.key_dir, &req.key)?;
        let spec = self.map_spec(req, keyfile.path())?;
        let out = command::run_ok(&spec, self.config.command_timeout).await?;
        drop(keyfile);
        let device = parse_device("rbd-nbd", &out.stdout)?;
        // The daemon's pid comes from list-mapped.
        let pid = self
            .find(&req.into())
            .await
            .ok()
            .flatten()
            .and_then(|m| m.pid);
        Ok(Mapping {
            mapper: MapperKind::Nbd,
            device,
            fuse_mountpoint: None,
            pid,
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

    /// Kills the daemon: the kernel then fails the I/O that waits on the device.
    async fn force(&self, mapping: &Mapping) -> Result<(), NodeError> {
        match mapping.pid {
            Some(pid) => {
                kill_all(&[pid], nix::sys::signal::Signal::SIGKILL);
                Ok(())
            }
            None => Err(NodeError::NotFound(format!(
                "no rbd-nbd process recorded for {}",
                mapping.device.display()
            ))),
        }
    }

    async fn find(&self, image: &ImageRef<'_>) -> Result<Option<Mapping>, NodeError> {
        let out = command::run_ok(&list_command(), self.config.command_timeout).await?;
        Ok(parse_list("rbd-nbd", &out.stdout)?
            .into_iter()
            .find(|d| d.is(image))
            .map(|d| Mapping {
                mapper: MapperKind::Nbd,
                device: d.device,
                fuse_mountpoint: None,
                pid: d.id.parse().ok(),
                unmap_options: None,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mapper::sample_request;
    use std::collections::HashMap;
    use std::path::PathBuf;

    #[test]
    fn map_command_translates_map_options_and_is_detached() {
        let mut req = sample_request();
        req.namespace = Some("ns".into());
        req.map_options = HashMap::from([(MapperKind::Nbd, "io-timeout=120,try-netlink".into())]);
        req.read_only = true;
        let c = map_command(&req, Path::new("/s/k"));
        assert!(c.own_process_group);
        assert_eq!(c.program, "rbd-nbd");
        assert_eq!(
            c.args,
            [
                "map",
                "rbd/ns/csi-vol-1",
                "-c",
                "/dev/null",
                "--id",
                "csi",
                "-m",
                "10.0.0.1:6789,10.0.0.2:6789",
                "--keyfile",
                "/s/k",
                "--read-only",
                "--io-timeout=120",
                "--try-netlink"
            ]
        );
    }

    #[test]
    fn the_daemon_starts_in_the_mappers_cgroup_of_every_hierarchy() {
        use crate::node::mapper::cgroup::{hierarchies, MapperCgroup};
        use crate::node::mount::MountTable;
        use std::sync::Arc;
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("cpu"), tmp.path().join("unified"));
        let table = MountTable::parse(&format!(
            "1 0 0:1 / {} rw - cgroup cgroup rw,cpu\n2 0 0:2 / {} rw - cgroup2 cgroup2 rw\n",
            a.display(),
            b.display()
        ))
        .unwrap();
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
        }
        let (found, _) = hierarchies(&table);
        let config = |cgroup| MapperConfig {
            state_dir: tmp.path().into(),
            key_dir: tmp.path().into(),
            command_timeout: Duration::from_secs(1),
            fuse_connect_timeout: Duration::from_secs(1),
            unmount_timeout: Duration::from_secs(1),
            cgroup,
        };
        let cg = Arc::new(MapperCgroup::in_hierarchies("m", found));
        let spec = NbdMapper::new(config(Some(cg)))
            .map_spec(&sample_request(), Path::new("/k"))
            .unwrap();
        assert_eq!(
            spec.cgroup_procs,
            [a.join("m/cgroup.procs"), b.join("m/cgroup.procs")]
        );
        assert!(spec.own_process_group);
        let spec = NbdMapper::new(config(None))
            .map_spec(&sample_request(), Path::new("/k"))
            .unwrap();
        assert!(spec.cgroup_procs.is_empty());
    }

    #[test]
    fn parses_list_mapped_with_numeric_pid() {
        let json = r#"[{"id":4242,"pool":"rbd","namespace":"","image":"csi-vol-1","snap":"-","device":"/dev/nbd0"}]"#;
        let list = parse_list("rbd-nbd", json).unwrap();
        assert_eq!(list[0].id, "4242");
        assert_eq!(list[0].device, PathBuf::from("/dev/nbd0"));
        assert!(list[0].is(&ImageRef {
            pool: "rbd",
            namespace: None,
            image: "csi-vol-1"
        }));
        let mut m = Mapping {
            mapper: MapperKind::Nbd,
            device: "/dev/nbd0".into(),
            fuse_mountpoint: None,
            pid: None,
            unmap_options: None,
        };
        assert_eq!(
            unmap_command(&m).args,
            ["-c", "/dev/null", "unmap", "/dev/nbd0"]
        );
        m.unmap_options = Some("force".into());
        assert_eq!(
            unmap_command(&m).args,
            ["-c", "/dev/null", "unmap", "--force", "/dev/nbd0"]
        );
    }

    #[test]
    fn map_command_passes_only_the_nbd_part_of_ceph_csi_map_options() {
        let mut req = sample_request();
        req.map_options = HashMap::from([
            (MapperKind::Krbd, "queue_depth=128".into()),
            (MapperKind::Nbd, "io-timeout=5,try-netlink".into()),
        ]);
        let c = map_command(&req, Path::new("/k"));
        assert_eq!(
            c.args[c.args.len() - 2..],
            ["--io-timeout=5", "--try-netlink"]
        );
        assert!(!c.args.iter().any(|a| a.contains("queue_depth")));
    }
}
