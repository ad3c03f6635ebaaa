//! Keeping the mapper daemons (rbd-fuse, rbd-nbd) out of the plugin container's cgroups, so that
//! deleting or upgrading the plugin's pod does not take the node's volumes down with it.
//!
//! Everything that ends a container finds its processes through its cgroups, never through the
//! process tree: runc (`kill --all`, which containerd's shim runs when the init of a container
//! sharing the host's PID namespace exits) freezes the cgroup and signals every pid it lists
//! (cgroup v1: the `devices` hierarchy; v2: the unified one); kubelet, removing a pod's cgroup,
//! SIGKILLs the pids it finds in *any* hierarchy; systemd stopping a container's scope kills what
//! its `name=systemd` (or unified) cgroup holds. A new process session (`setsid`) or process group
//! changes none of that. So each daemon joins `/<name>` (default `rook-rbd-mappers`) at the root
//! of every mounted hierarchy, and is in no cgroup of the container at all.
//!
//! The move happens in the child between fork and exec (it writes `0` to each `cgroup.procs`),
//! before the daemon runs any code of its own, so every process it forks (rbd-fuse daemonizes)
//! is born outside the container. Only processes the mappers start are ever moved.
//!
//! Hierarchies come from `/proc/self/mountinfo`: `cgroup`/`cgroup2` mounts of a hierarchy's root
//! (root field `/`) that are visible at their mount point. In the node DaemonSet that is the
//! host's `/sys/fs/cgroup`, reached through the host `/sys` mounted over the container's own
//! cgroup view (whose root field is the container's cgroup path). Privileged containers share the
//! host's cgroup namespace under containerd and CRI-O; a hierarchy seen only through the
//! container's view or a private cgroup namespace cannot be left, which is logged at start-up.
//! A v1 cpuset cgroup starts with no CPUs and memory nodes, so it gets its parent's.
//!
//! One cgroup holds every daemon of the node. It is created when missing and kept while empty,
//! like a systemd slice: removing it after the last unmap would race the next map. The few
//! file writes here are our own rather than the `cgroups-rs` crate's: it moves processes from
//! the parent, after they have started, which is exactly what must not happen.

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::node::mount::{MountEntry, MountTable};
use crate::node::NodeError;

/// `--mapper-cgroup`'s default.
pub const DEFAULT_MAPPER_CGROUP: &str = "rook-rbd-mappers";

/// Where the mapper daemons run: a cgroup of that name at each hierarchy's root, or (`none`) in
/// the plugin's own cgroups, dying with its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSetting {
    None,
    Named(String),
}

impl Default for CgroupSetting {
    fn default() -> Self {
        CgroupSetting::Named(DEFAULT_MAPPER_CGROUP.into())
    }
}

impl FromStr for CgroupSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "none" {
            return Ok(CgroupSetting::None);
        }
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(CgroupSetting::Named(s.into()))
        } else {
            Err(format!(
                "{s:?}: a cgroup name is 1 to 64 of [A-Za-z0-9._-], not starting with '.', or none"
            ))
        }
    }
}

impl fmt::Display for CgroupSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupSetting::None => f.write_str("none"),
            CgroupSetting::Named(n) => f.write_str(n),
        }
    }
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its controllers (`cpu,cpuacct`, `name=systemd`), or `unified` for cgroup v2: for logs.
    pub label: String,
    /// Where its root cgroup is mounted.
    pub root: PathBuf,
    /// v1 cpuset: a child needs `cpuset.cpus` and `cpuset.mems` before it takes a process.
    pub cpuset: bool,
    dev: (u32, u32),
}

/// Options of a v1 cgroup superblock that are not controllers.
const NOT_CONTROLLERS: &[&str] = &[
    "rw",
    "ro",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "favordynmods",
];

fn label(e: &MountEntry) -> String {
    if e.fs_type == "cgroup2" {
        return "unified".into();
    }
    e.super_options
        .split(',')
        .filter(|o| !NOT_CONTROLLERS.contains(o) && !o.starts_with("release_agent="))
        .collect::<Vec<_>>()
        .join(",")
}

/// The hierarchies whose root is mounted somewhere in `table` (one mount each), and the labels
/// of those mounted only below their root (a container's view), which cannot be left.
pub fn hierarchies(table: &MountTable) -> (Vec<Hierarchy>, Vec<String>) {
    let cgroup_mounts = || {
        table
            .entries
            .iter()
            .filter(|e| e.fs_type == "cgroup" || e.fs_type == "cgroup2")
    };
    let mut found: Vec<Hierarchy> = Vec::new();
    for e in cgroup_mounts().filter(|e| e.root == Path::new("/")) {
        if found.iter().all(|h| h.dev != e.dev) {
            let label = label(e);
            found.push(Hierarchy {
                cpuset: e.fs_type == "cgroup" && label.split(',').any(|c| c == "cpuset"),
                label,
                root: e.mount_point.clone(),
                dev: e.dev,
            });
        }
    }
    let mut below: Vec<String> = Vec::new();
    for e in cgroup_mounts() {
        let l = label(e);
        if found.iter().all(|h| h.dev != e.dev) && !below.contains(&l) {
            below.push(l);
        }
    }
    (found, below)
}

/// Whether the hierarchy's mount is what its mount point shows (not covered by a later mount).
fn visible(h: &Hierarchy) -> bool {
    let want = libc::makedev(h.dev.0, h.dev.1);
    std::fs::metadata(&h.root).is_ok_and(|m| m.dev() == want)
}

/// The mappers' cgroup, in every hierarchy where it could be made.
#[derive(Debug)]
pub struct MapperCgroup {
    name: String,
    hierarchies: Vec<Hierarchy>,
}

impl MapperCgroup {
    /// Makes the cgroup in each visible hierarchy of this process's mount table; `None` when the
    /// setting is `none` or no hierarchy is writable (logged: the daemons would die with the
    /// plugin's container).
    pub fn prepare(setting: &CgroupSetting) -> Option<MapperCgroup> {
        let CgroupSetting::Named(name) = setting else {
            tracing::warn!("--mapper-cgroup none: rbd-fuse and rbd-nbd stay in the plugin's cgroups and die with its container");
            return None;
        };
        let table = match MountTable::load() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the mount table: mapper daemons stay in the plugin's cgroups");
                return None;
            }
        };
        let (all, below) = hierarchies(&table);
        let (seen, hidden): (Vec<_>, Vec<_>) = all.into_iter().partition(visible);
        let mut cg = MapperCgroup::in_hierarchies(name, seen);
        for h in hidden {
            tracing::warn!(hierarchy = %h.label, root = %h.root.display(), "cgroup hierarchy root is covered by another mount; mapper daemons stay in the plugin's cgroup there");
        }
        for l in below {
            tracing::warn!(hierarchy = %l, "only a container's view of this cgroup hierarchy is mounted (mount the host's /sys); mapper daemons stay in the plugin's cgroup there and die with it");
        }
        cg.hierarchies.retain(|h| match ensure(name, h) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(hierarchy = %h.label, error = %e, "cannot make the mapper cgroup; mapper daemons stay in the plugin's cgroup there");
                false
            }
        });
        if cg.hierarchies.is_empty() {
            tracing::warn!(cgroup = %name, "no writable cgroup hierarchy: mapper daemons die with the plugin's container");
            return None;
        }
        let labels: Vec<&str> = cg.hierarchies.iter().map(|h| h.label.as_str()).collect();
        tracing::info!(cgroup = %name, hierarchies = ?labels, "mapper daemons run outside the plugin's cgroups");
        Some(cg)
    }

    /// The cgroup `name` in exactly these hierarchies (made on first use).
    pub fn in_hierarchies(name: &str, hierarchies: Vec<Hierarchy>) -> MapperCgroup {
        MapperCgroup {
            name: name.into(),
            hierarchies,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `cgroup.procs` files a daemon joins, making again what someone removed since.
    pub fn procs_files(&self) -> Result<Vec<PathBuf>, NodeError> {
        self.hierarchies
            .iter()
            .map(|h| {
                ensure(&self.name, h).map_err(|e| {
                    NodeError::io("making the mapper cgroup", h.root.join(&self.name), e)
                })?;
                Ok(h.root.join(&self.name).join("cgroup.procs"))
            })
            .collect()
    }
}

/// Creates `<root>/<name>` if missing; a new v1 cpuset cgroup gets its parent's CPUs and nodes.
fn ensure(name: &str, h: &Hierarchy) -> io::Result<()> {
    let dir = h.root.join(name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if h.cpuset {
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let parent = std::fs::read_to_string(h.root.join(f))?;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(f))?
                .write_all(parent.trim().as_bytes())?;
        }
    }
    Ok(())
}

/// Makes the child join the cgroups whose `cgroup.procs` files are given, after fork and before
/// exec, so nothing of the program runs (or forks) in ours; a failed join fails the spawn.
pub(crate) fn join_before_exec(
    cmd: &mut tokio::process::Command,
    procs: &[PathBuf],
) -> io::Result<()> {
    // Opened here, O_CLOEXEC: the child only writes (async-signal-safe), and the program does
    // not inherit them.
    let files = procs
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p))
        .collect::<io::Result<Vec<_>>>()?;
    // SAFETY: the closure makes only write(2) calls on descriptors opened above and builds its
    // error from errno; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                // "0" means the writing process itself.
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::command::{self, CommandSpec};
    use std::time::Duration;

    /// This machine's hybrid layout, a container's own view, a second mount of one hierarchy
    /// and a pure v2 mount elsewhere.
    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 23 0:29 / /mnt/again rw,relatime - cgroup cgroup rw,cpu,cpuacct
60 23 0:40 /kubepods/pod1/ctr /sys/fs/cgroup/pids ro,relatime - cgroup cgroup rw,pids
61 23 0:31 /kubepods/pod1/ctr /ctr/cpuset ro,relatime - cgroup cgroup rw,cpuset
";

    #[test]
    fn hierarchies_are_the_mounted_roots_once_each_and_container_views_are_reported() {
        let table = MountTable::parse(MOUNTINFO).unwrap();
        let (found, below) = hierarchies(&table);
        let got: Vec<(&str, &str, bool)> = found
            .iter()
            .map(|h| (h.label.as_str(), h.root.to_str().unwrap(), h.cpuset))
            .collect();
        assert_eq!(
            got,
            [
                ("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct", false),
                ("cpuset", "/sys/fs/cgroup/cpuset", true),
                ("name=systemd", "/sys/fs/cgroup/systemd", false),
                ("unified", "/sys/fs/cgroup/unified", false),
            ]
        );
        assert_eq!(below, ["pids"]);
    }

    #[test]
    fn setting_is_none_or_one_plain_cgroup_name() {
        assert_eq!("none".parse(), Ok(CgroupSetting::None));
        assert_eq!(
            "rook-rbd-mappers".parse(),
            Ok(CgroupSetting::Named("rook-rbd-mappers".into()))
        );
        for bad in ["", "..", ".hidden", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(bad.parse::<CgroupSetting>().is_err(), "{bad:?}");
        }
        assert_eq!(CgroupSetting::default().to_string(), DEFAULT_MAPPER_CGROUP);
    }

    fn fake_hierarchy(root: &Path, cpuset: bool) -> Hierarchy {
        Hierarchy {
            label: "fake".into(),
            root: root.into(),
            cpuset,
            dev: (0, 0),
        }
    }

    #[test]
    fn a_missing_cgroup_is_made_again_and_a_cpuset_one_gets_its_parents_cpus_and_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        let (plain, cpuset) = (tmp.path().join("plain"), tmp.path().join("cpuset"));
        std::fs::create_dir(&plain).unwrap();
        std::fs::create_dir(&cpuset).unwrap();
        std::fs::write(cpuset.join("cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(cpuset.join("cpuset.mems"), "0\n").unwrap();
        let cg = MapperCgroup::in_hierarchies(
            "m",
            vec![fake_hierarchy(&plain, false), fake_hierarchy(&cpuset, true)],
        );
        let files = cg.procs_files().unwrap();
        assert_eq!(
            files,
            [plain.join("m/cgroup.procs"), cpuset.join("m/cgroup.procs")]
        );
        assert_eq!(
            std::fs::read_to_string(cpuset.join("m/cpuset.cpus")).unwrap(),
            "0-1"
        );
        assert_eq!(
            std::fs::read_to_string(cpuset.join("m/cpuset.mems")).unwrap(),
            "0"
        );
        std::fs::remove_dir(plain.join("m")).unwrap();
        cg.procs_files().unwrap();
        assert!(plain.join("m").is_dir());
        // Not writable (a read-only cgroupfs): the error names the cgroup.
        let cg =
            MapperCgroup::in_hierarchies("m", vec![fake_hierarchy(Path::new("/proc/self"), false)]);
        let err = cg.procs_files().unwrap_err().to_string();
        assert!(err.contains("/proc/self/m"), "{err}");
    }

    #[tokio::test]
    async fn the_child_joins_before_exec_and_a_failed_join_fails_the_spawn() {
        let tmp = tempfile::tempdir().unwrap();
        let procs = [tmp.path().join("a.procs"), tmp.path().join("b.procs")];
        for p in &procs {
            std::fs::write(p, "").unwrap();
        }
        // The program sees the writes done: they happened before it started.
        let spec = CommandSpec::new("cat")
            .args(procs.iter().map(|p| p.to_string_lossy().into_owned()))
            .in_cgroups(procs.to_vec());
        let out = command::run_ok(&spec, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(out.stdout, "00");
        // Writes to /dev/full fail with ENOSPC, as a cgroup that refuses the process would.
        let spec = CommandSpec::new("true").in_cgroups(vec![PathBuf::from("/dev/full")]);
        let err = command::run(&spec, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, NodeError::CommandSpawn { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{err}"
        );
    }
}
