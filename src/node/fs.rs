//! Filesystems on mapped devices: probe, create, check, grow, and usage statistics.

use std::fmt;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::command::{self, CommandSpec};
use super::NodeError;

/// Filesystems the driver can create and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// `mkfs` with the given options, or sensible defaults when `options` is `None`.
    /// ext4 defaults skip the slow inode-table/journal zeroing and discard: the image is thin.
    /// Never killed half-way: a half-written filesystem can pass for a real one later.
    pub fn mkfs_command(self, device: &Path, options: Option<&str>) -> CommandSpec {
        let dev = device.to_string_lossy().into_owned();
        let user: Vec<String> = options
            .map(|o| o.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        match self {
            FsType::Ext4 => {
                let mut c = CommandSpec::new("mkfs.ext4").arg("-F");
                if options.is_none() {
                    c = c.args([
                        "-m0",
                        "-E",
                        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    ]);
                }
                c.args(user).arg(dev).to_end()
            }
            FsType::Xfs => CommandSpec::new("mkfs.xfs")
                .args(["-f", "-K"])
                .args(user)
                .arg(dev)
                .to_end(),
        }
    }

    /// The command that grows the filesystem to fill its device.
    /// ext4 grows through the device; xfs only through its mount point.
    pub fn expand_command(self, device: &Path, mount_point: &Path) -> CommandSpec {
        match self {
            FsType::Ext4 => CommandSpec::new("resize2fs").arg(device.to_string_lossy()),
            FsType::Xfs => CommandSpec::new("xfs_growfs").arg(mount_point.to_string_lossy()),
        }
        .to_end()
    }

    /// Options added to every mount of this filesystem.
    /// xfs refuses a second filesystem with the same UUID (a clone or restored snapshot).
    pub fn default_mount_data(self) -> &'static str {
        match self {
            FsType::Ext4 => "",
            FsType::Xfs => "nouuid",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = NodeError;
    /// An empty string means the default, ext4.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(NodeError::InvalidArgument(format!(
                "unsupported filesystem {other:?} (supported: ext4, xfs)"
            ))),
        }
    }
}

/// What `blkid` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No filesystem and no partition table: safe to format.
    Empty,
    Filesystem(String),
    /// A partition table but no filesystem: never formatted over.
    PartitionTable(String),
}

pub fn probe_command(device: &Path) -> CommandSpec {
    CommandSpec::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device.to_string_lossy())
}

/// Interprets `blkid -p -o export`: exit 2 means nothing was found.
pub fn parse_probe(code: Option<i32>, stdout: &str) -> Option<Probe> {
    match code {
        Some(2) => Some(Probe::Empty),
        Some(0) => {
            let field = |name: &str| {
                stdout.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|r| r.strip_prefix('='))
                        .map(str::to_string)
                })
            };
            Some(match (field("TYPE"), field("PTTYPE")) {
                (Some(t), _) => Probe::Filesystem(t),
                (None, Some(pt)) => Probe::PartitionTable(pt),
                (None, None) => Probe::Empty,
            })
        }
        _ => None,
    }
}

pub async fn probe(device: &Path, timeout: Duration) -> Result<Probe, NodeError> {
    let spec = probe_command(device);
    let out = command::run(&spec, timeout).await?;
    parse_probe(out.code(), &out.stdout).ok_or_else(|| command::failed(&spec, &out))
}

pub async fn mkfs(
    fs: FsType,
    device: &Path,
    options: Option<&str>,
    timeout: Duration,
) -> Result<(), NodeError> {
    let spec = fs.mkfs_command(device, options);
    tracing::info!(device = %device.display(), fs = %fs, "creating filesystem");
    command::run_ok(&spec, timeout).await.map(drop)
}

/// Checks (and, for ext4, repairs what is safe to repair) before a read-write mount.
///
/// ext4: `e2fsck -p`; exit 1 and 2 mean errors were fixed, 4 and above are failures.
/// xfs: nothing; xfs replays its log at mount and `xfs_repair` is not meant for unattended use.
pub async fn check(fs: FsType, device: &Path, timeout: Duration) -> Result<(), NodeError> {
    if fs != FsType::Ext4 {
        return Ok(());
    }
    let spec = CommandSpec::new("e2fsck")
        .arg("-p")
        .arg(device.to_string_lossy())
        .to_end();
    let out = command::run(&spec, timeout).await?;
    match out.code() {
        Some(0) => Ok(()),
        Some(1) | Some(2) => {
            tracing::warn!(device = %device.display(), "e2fsck fixed errors: {}", out.stdout.trim());
            Ok(())
        }
        _ => Err(command::failed(&spec, &out)),
    }
}

pub async fn expand(
    fs: FsType,
    device: &Path,
    mount_point: &Path,
    timeout: Duration,
) -> Result<(), NodeError> {
    let spec = fs.expand_command(device, mount_point);
    command::run_ok(&spec, timeout).await.map(drop)
}

/// Bytes the filesystem spans, from `dumpe2fs -h` (ext4, unmounted or not) or `xfs_info` (xfs,
/// mounted at `mount_point`), and its block size.
pub async fn fs_span(
    fs: FsType,
    device: &Path,
    mount_point: &Path,
    timeout: Duration,
) -> Result<(u64, u64), NodeError> {
    type Parse = fn(&str) -> Option<(u64, u64)>;
    let (spec, parse): (CommandSpec, Parse) = match fs {
        FsType::Ext4 => (
            CommandSpec::new("dumpe2fs")
                .arg("-h")
                .arg(device.to_string_lossy()),
            parse_dumpe2fs,
        ),
        FsType::Xfs => (
            CommandSpec::new("xfs_info").arg(mount_point.to_string_lossy()),
            parse_xfs_info,
        ),
    };
    let out = command::run_ok(&spec, timeout).await?;
    parse(&out.stdout).ok_or_else(|| NodeError::Parse {
        program: spec.program.clone(),
        detail: "no block count and block size".into(),
    })
}

fn parse_dumpe2fs(out: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    let (count, size) = (field("Block count:")?, field("Block size:")?);
    Some((count * size, size))
}

/// The data section of `xfs_info`: `data     =    bsize=4096   blocks=262144, imaxpct=25`.
fn parse_xfs_info(out: &str) -> Option<(u64, u64)> {
    let data = out.lines().find(|l| l.trim_start().starts_with("data"))?;
    let value = |key: &str| {
        data.split(|c: char| c.is_whitespace() || c == ',')
            .find_map(|w| w.strip_prefix(key)?.parse::<u64>().ok())
    };
    let (bsize, blocks) = (value("bsize=")?, value("blocks=")?);
    Some((blocks * bsize, bsize))
}

/// Whether a filesystem spanning `fs_bytes` (blocks of `block` bytes) leaves at least one whole
/// block of its device unused: a volume restored or cloned into a larger one.
pub fn needs_growth(device_bytes: u64, fs_bytes: u64, block: u64) -> bool {
    device_bytes.saturating_sub(fs_bytes) >= block.max(1)
}

/// An unmounted ext4 grown to its device: `resize2fs` wants a forced check first. Offline, so it
/// needs no CAP_SYS_RESOURCE (which online ext4 growth does).
pub async fn grow_unmounted_ext4(device: &Path, timeout: Duration) -> Result<(), NodeError> {
    let fsck = CommandSpec::new("e2fsck")
        .args(["-f", "-p"])
        .arg(device.to_string_lossy())
        .to_end();
    let out = command::run(&fsck, timeout).await?;
    if !matches!(out.code(), Some(0..=2)) {
        return Err(command::failed(&fsck, &out));
    }
    expand(FsType::Ext4, device, Path::new("/"), timeout).await
}

/// Filesystem usage of the filesystem holding `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    pub bytes_total: u64,
    pub bytes_used: u64,
    pub bytes_available: u64,
    pub inodes_total: u64,
    pub inodes_used: u64,
    pub inodes_free: u64,
}

/// statvfs(2). Blocking: call it off the async threads, it can hang on a dead fuse mount.
pub fn stats(path: &Path) -> Result<FsStats, NodeError> {
    let s =
        nix::sys::statvfs::statvfs(path).map_err(|e| NodeError::io("statvfs", path, e.into()))?;
    let frsize = s.fragment_size() as u64;
    let (blocks, bfree) = (s.blocks() as u64, s.blocks_free() as u64);
    let (files, ffree) = (s.files() as u64, s.files_free() as u64);
    Ok(FsStats {
        bytes_total: blocks * frsize,
        bytes_used: blocks.saturating_sub(bfree) * frsize,
        bytes_available: s.blocks_available() as u64 * frsize,
        inodes_total: files,
        inodes_used: files.saturating_sub(ffree),
        inodes_free: ffree,
    })
}

/// Size of a block device (or a file) in bytes, by seeking to its end. Blocking.
pub fn device_size(device: &Path) -> Result<u64, NodeError> {
    let mut f = std::fs::File::open(device).map_err(|e| NodeError::io("opening", device, e))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| NodeError::io("sizing", device, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_span_of_a_filesystem_comes_from_dumpe2fs_and_xfs_info() {
        let ext = "Filesystem volume name:   <none>\nBlock count:              262144\nReserved block count:     13107\nBlock size:               4096\n";
        assert_eq!(parse_dumpe2fs(ext), Some((1 << 30, 4096)));
        let xfs = "meta-data=/dev/loop0 isize=512    agcount=4, agsize=65536 blks\n         =                       sectsz=512   attr=2\ndata     =                       bsize=4096   blocks=262144, imaxpct=25\n         =                       sunit=0      swidth=0 blks\nnaming   =version 2              bsize=4096   ascii-ci=0\n";
        assert_eq!(parse_xfs_info(xfs), Some((1 << 30, 4096)));
        assert_eq!(parse_dumpe2fs("garbage"), None);
        assert_eq!(parse_xfs_info("naming =version 2 bsize=4096"), None);
    }

    #[test]
    fn only_a_whole_unused_block_asks_for_growth() {
        assert!(needs_growth(2 << 30, 1 << 30, 4096));
        assert!(!needs_growth((1 << 30) + 4095, 1 << 30, 4096));
        assert!(!needs_growth(1 << 30, 1 << 30, 4096));
        assert!(
            !needs_growth(1 << 20, 1 << 30, 4096),
            "a device smaller than its fs never grows it"
        );
    }

    #[test]
    fn ext4_defaults_are_lazy_and_user_options_replace_them() {
        let d = Path::new("/dev/loop3");
        assert_eq!(
            FsType::Ext4.mkfs_command(d, None).args,
            [
                "-F",
                "-m0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                "/dev/loop3"
            ]
        );
        assert_eq!(
            FsType::Ext4
                .mkfs_command(d, Some("-b 4096  -O ^metadata_csum"))
                .args,
            ["-F", "-b", "4096", "-O", "^metadata_csum", "/dev/loop3"]
        );
        let x = FsType::Xfs.mkfs_command(d, None);
        assert_eq!(x.program, "mkfs.xfs");
        assert_eq!(x.args, ["-f", "-K", "/dev/loop3"]);
        assert!(x.must_finish && FsType::Ext4.mkfs_command(d, None).must_finish);
    }

    #[test]
    fn xfs_grows_through_the_mount_point_and_ext4_through_the_device() {
        let e = FsType::Ext4.expand_command(Path::new("/dev/loop1"), Path::new("/m"));
        assert_eq!(
            (e.program.as_str(), e.args[0].as_str()),
            ("resize2fs", "/dev/loop1")
        );
        assert!(e.must_finish);
        let x = FsType::Xfs.expand_command(Path::new("/dev/loop1"), Path::new("/m"));
        assert_eq!(
            (x.program.as_str(), x.args[0].as_str()),
            ("xfs_growfs", "/m")
        );
    }

    #[test]
    fn probe_output_distinguishes_empty_fs_and_partition_table() {
        assert_eq!(parse_probe(Some(2), ""), Some(Probe::Empty));
        assert_eq!(
            parse_probe(
                Some(0),
                "DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"
            ),
            Some(Probe::Filesystem("ext4".into()))
        );
        assert_eq!(
            parse_probe(Some(0), "DEVNAME=/dev/loop0\nPTTYPE=gpt\n"),
            Some(Probe::PartitionTable("gpt".into()))
        );
        assert_eq!(parse_probe(Some(4), ""), None);
    }

    #[test]
    fn fs_type_parses_default_and_rejects_unknown() {
        assert_eq!("".parse::<FsType>().unwrap(), FsType::Ext4);
        assert_eq!("xfs".parse::<FsType>().unwrap(), FsType::Xfs);
        assert!("btrfs".parse::<FsType>().is_err());
    }

    #[test]
    fn statvfs_reports_sane_numbers() {
        let s = stats(Path::new("/")).unwrap();
        assert!(s.bytes_total >= s.bytes_used && s.inodes_total >= s.inodes_used);
    }

    #[test]
    fn device_size_of_a_file_is_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("img");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        assert_eq!(device_size(&f).unwrap(), 4096);
    }
}
