//! The mount table (from `/proc/self/mountinfo`) and the mount syscalls the node needs:
//! filesystem mounts, bind mounts, read-only bind remounts and unmounts.
//!
//! The syscalls go through `nix`. The mountinfo parser stays our own: the crates that read
//! mountinfo (procfs, libmount bindings) either drop the per-superblock options and the bind
//! root we match on, or pull in far more than one small parser.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::NodeError;

/// One line of mountinfo (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// `major:minor` of the mounted filesystem's device.
    pub dev: (u32, u32),
    /// Root of the mount within the filesystem (`/` unless it is a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub mount_options: String,
    pub fs_type: String,
    pub source: String,
    /// Per-superblock options; `ro` here means the filesystem itself went read-only.
    pub super_options: String,
}

impl MountEntry {
    pub fn is_read_only(&self) -> bool {
        has_option(&self.mount_options, "ro")
    }

    pub fn superblock_read_only(&self) -> bool {
        has_option(&self.super_options, "ro")
    }
}

fn has_option(options: &str, name: &str) -> bool {
    options.split(',').any(|o| o == name)
}

/// A snapshot of the mount table.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    pub entries: Vec<MountEntry>,
}

impl MountTable {
    pub fn load() -> Result<Self, NodeError> {
        let path = "/proc/self/mountinfo";
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::io("reading", path, e))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, NodeError> {
        let entries = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(parse_line)
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// The mount visible at `path`: the last (topmost) entry mounted there.
    pub fn at(&self, path: &Path) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mount_point == path)
    }

    pub fn is_mountpoint(&self, path: &Path) -> bool {
        self.at(path).is_some()
    }

    /// All mounts of the filesystem on `device` (matched by device number, falling back to the
    /// source string), including bind mounts of it.
    pub fn mounts_of(&self, device: &Path) -> Vec<&MountEntry> {
        let dev = std::fs::metadata(device).ok().and_then(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type()
                .is_block_device()
                .then(|| (libc::major(m.rdev()), libc::minor(m.rdev())))
        });
        // A device node bind-mounted onto a file (block publish) shows up as a devtmpfs mount
        // whose root is the node's path inside /dev.
        let node_bind = |e: &MountEntry| {
            e.fs_type == "devtmpfs"
                && e.root
                    .strip_prefix("/")
                    .is_ok_and(|r| Path::new("/dev").join(r) == device)
        };
        self.entries
            .iter()
            .filter(|e| {
                node_bind(e)
                    || match dev {
                        Some(d) => e.dev == d,
                        None => Path::new(&e.source) == device,
                    }
            })
            .collect()
    }

    /// Mounts whose mount point lies under `dir` (including `dir` itself).
    pub fn under<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = &'a MountEntry> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.mount_point.starts_with(dir))
    }
}

fn parse_line(line: &str) -> Result<MountEntry, NodeError> {
    let bad = |detail: &str| NodeError::Parse {
        program: "mountinfo".into(),
        detail: format!("{detail}: {line:?}"),
    };
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields
        .iter()
        .position(|f| *f == "-")
        .ok_or_else(|| bad("no separator"))?;
    if sep < 6 || fields.len() < sep + 4 {
        return Err(bad("too few fields"));
    }
    let (major, minor) = fields[2].split_once(':').ok_or_else(|| bad("bad device"))?;
    let num = |s: &str| s.parse::<u32>().map_err(|_| bad("bad number"));
    Ok(MountEntry {
        mount_id: num(fields[0])?,
        parent_id: num(fields[1])?,
        dev: (num(major)?, num(minor)?),
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        mount_options: fields[5].to_string(),
        fs_type: unescape(fields[sep + 1]),
        source: unescape(fields[sep + 2]),
        super_options: fields[sep + 3].to_string(),
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
pub fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount flags and filesystem data split out of CSI `mount_flags` / StorageClass `mountOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Options the filesystem interprets, comma-joined (e.g. `discard,errors=remount-ro`).
    pub data: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MsFlags::empty(),
            data: String::new(),
        }
    }
}

impl MountOptions {
    /// Splits generic VFS flags from filesystem options; entries may themselves be comma lists.
    pub fn parse<S: AsRef<str>>(options: &[S]) -> Self {
        let none = MsFlags::empty();
        let mut flags = none;
        let mut data = Vec::new();
        for opt in options
            .iter()
            .flat_map(|o| o.as_ref().split(','))
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            let (set, clear) = match opt {
                "defaults" => (none, none),
                "ro" => (MsFlags::MS_RDONLY, none),
                "rw" => (none, MsFlags::MS_RDONLY),
                "nosuid" => (MsFlags::MS_NOSUID, none),
                "suid" => (none, MsFlags::MS_NOSUID),
                "nodev" => (MsFlags::MS_NODEV, none),
                "dev" => (none, MsFlags::MS_NODEV),
                "noexec" => (MsFlags::MS_NOEXEC, none),
                "exec" => (none, MsFlags::MS_NOEXEC),
                "sync" => (MsFlags::MS_SYNCHRONOUS, none),
                "async" => (none, MsFlags::MS_SYNCHRONOUS),
                "dirsync" => (MsFlags::MS_DIRSYNC, none),
                "mand" => (MsFlags::MS_MANDLOCK, none),
                "nomand" => (none, MsFlags::MS_MANDLOCK),
                "noatime" => (MsFlags::MS_NOATIME, none),
                "atime" => (none, MsFlags::MS_NOATIME),
                "nodiratime" => (MsFlags::MS_NODIRATIME, none),
                "diratime" => (none, MsFlags::MS_NODIRATIME),
                "relatime" => (MsFlags::MS_RELATIME, none),
                "norelatime" => (none, MsFlags::MS_RELATIME),
                "strictatime" => (MsFlags::MS_STRICTATIME, none),
                "lazytime" => (MsFlags::MS_LAZYTIME, none),
                "nolazytime" => (none, MsFlags::MS_LAZYTIME),
                "silent" => (MsFlags::MS_SILENT, none),
                "loud" => (none, MsFlags::MS_SILENT),
                other => {
                    data.push(other.to_string());
                    (none, none)
                }
            };
            flags = (flags | set) & !clear;
        }
        Self {
            flags,
            data: data.join(","),
        }
    }

    pub fn read_only(&self) -> bool {
        self.flags.contains(MsFlags::MS_RDONLY)
    }
}

fn sys_mount(
    source: &Path,
    target: &Path,
    fs_type: Option<&str>,
    flags: MsFlags,
    data: &str,
) -> Result<(), NodeError> {
    let data = (!data.is_empty()).then_some(data);
    nix::mount::mount(Some(source), target, fs_type, flags, data)
        .map_err(|e| NodeError::io("mount onto", target, e.into()))
}

/// Mounts the filesystem of type `fs_type` on `device` at `target`.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &MountOptions,
) -> Result<(), NodeError> {
    sys_mount(device, target, Some(fs_type), options.flags, &options.data)
}

/// Bind-mounts `source` (a directory or a device node) onto `target`.
pub fn bind(source: &Path, target: &Path) -> Result<(), NodeError> {
    sys_mount(source, target, None, MsFlags::MS_BIND, "")
}

/// Applies per-mount flags to an existing bind mount (a bind mount ignores flags at creation).
/// With `MS_RDONLY` in `flags` this makes the bind read-only without touching the source.
pub fn remount_bind(target: &Path, flags: MsFlags) -> Result<(), NodeError> {
    sys_mount(
        Path::new("none"),
        target,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
        "",
    )
}

/// Unmounts `target`; nothing mounted there (EINVAL) or no such path (ENOENT) is success.
/// `detach` uses `MNT_DETACH` (lazy unmount).
pub fn unmount(target: &Path, detach: bool) -> Result<(), NodeError> {
    let flags = if detach {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match nix::mount::umount2(target, flags) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(NodeError::io("unmounting", target, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
43 27 0:40 / /var/lib/rook\\040rbd/fuse/ab rw,nosuid,nodev,relatime - fuse.rbd-fuse rbd-fuse rw,user_id=0,group_id=0
50 27 7:0 / /var/lib/kubelet/staging ro,relatime - ext4 /dev/loop0 ro,errors=remount-ro
51 27 7:0 / /var/lib/kubelet/pods/x rw,relatime shared:3 master:2 - ext4 /dev/loop0 rw
52 27 0:5 /loop0 /var/lib/kubelet/pods/y/dev rw,nosuid - devtmpfs udev rw,size=100k
";

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let t = MountTable::parse(SAMPLE).unwrap();
        assert_eq!(t.entries.len(), 6);
        let e = &t.entries[1];
        assert_eq!(e.dev, (98, 0));
        assert_eq!(e.root, PathBuf::from("/mnt1"));
        assert_eq!(e.fs_type, "ext3");
        assert_eq!(e.source, "/dev/root");
        let f = t
            .at(Path::new("/var/lib/rook rbd/fuse/ab"))
            .expect("escaped space");
        assert_eq!(f.fs_type, "fuse.rbd-fuse");
        let s = t.at(Path::new("/var/lib/kubelet/staging")).unwrap();
        assert!(s.is_read_only() && s.superblock_read_only());
        let p = t.at(Path::new("/var/lib/kubelet/pods/x")).unwrap();
        assert!(!p.is_read_only());
        assert_eq!(t.mounts_of(Path::new("/dev/loop0")).len(), 3);
        assert!(!t.is_mountpoint(Path::new("/var/lib/kubelet")));
    }

    #[test]
    fn unescapes_octal_sequences_only() {
        assert_eq!(unescape(r"a\040b\011c\012d\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape(r"plain\x"), r"plain\x");
        assert_eq!(unescape(r"end\04"), r"end\04");
    }

    #[test]
    fn rejects_garbage_lines() {
        assert!(MountTable::parse("1 2 3\n").is_err());
    }

    #[test]
    fn splits_vfs_flags_from_filesystem_options() {
        let o = MountOptions::parse(&["noatime,nodev", "discard", "ro", "errors=remount-ro"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, "discard,errors=remount-ro");
        assert!(o.read_only());
        let o = MountOptions::parse(&["ro", "rw", "sync", "nosuid", "noexec", "defaults"]);
        assert_eq!(
            o.flags,
            MsFlags::MS_SYNCHRONOUS | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC
        );
        assert!(o.data.is_empty());
    }
}
