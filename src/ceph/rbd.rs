//! Safe, blocking wrappers over librbd: image create/clone/remove/list in a pool, and the
//! per-image operations (resize, snapshots, metadata, watchers, parent and children).

use super::rados::IoHandle;
use super::{check, cstr, ffi, owned, CephError, IoCtx, Result};
use std::ptr;
use std::sync::Arc;

/// Creation options for `rbd_create4` and `rbd_clone3`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOptions {
    pub features: u64,
    pub data_pool: Option<String>,
    pub order: Option<u8>,
    /// (stripe unit in bytes, stripe count); librbd adds the striping-v2 feature when needed.
    pub stripe: Option<(u64, u64)>,
}

struct Options(ffi::rbd_image_options_t);

impl Drop for Options {
    fn drop(&mut self) {
        unsafe { ffi::rbd_image_options_destroy(self.0) }
    }
}

impl ImageOptions {
    fn build(&self, op: &'static str, clone: bool) -> Result<Options> {
        let mut raw = ptr::null_mut();
        unsafe { ffi::rbd_image_options_create(&mut raw) };
        let opts = Options(raw);
        let set_u64 = |k, v| {
            check(op, "image options", unsafe {
                ffi::rbd_image_options_set_uint64(opts.0, k, v)
            })
        };
        if clone {
            set_u64(ffi::RBD_IMAGE_OPTION_CLONE_FORMAT, 2)?;
        } else {
            set_u64(ffi::RBD_IMAGE_OPTION_FORMAT, 2)?;
        }
        set_u64(ffi::RBD_IMAGE_OPTION_FEATURES, self.features)?;
        if let Some(order) = self.order {
            set_u64(ffi::RBD_IMAGE_OPTION_ORDER, order as u64)?;
        }
        if let Some((unit, count)) = self.stripe {
            set_u64(ffi::RBD_IMAGE_OPTION_STRIPE_UNIT, unit)?;
            set_u64(ffi::RBD_IMAGE_OPTION_STRIPE_COUNT, count)?;
        }
        if let Some(dp) = &self.data_pool {
            let v = cstr(op, dp)?;
            check(op, "data pool", unsafe {
                ffi::rbd_image_options_set_string(
                    opts.0,
                    ffi::RBD_IMAGE_OPTION_DATA_POOL,
                    v.as_ptr(),
                )
            })?;
        }
        Ok(opts)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentInfo {
    pub pool: String,
    /// RADOS namespace; empty for the pool's default.
    pub namespace: String,
    pub image_name: String,
    pub image_id: String,
    pub snap_name: String,
    pub trashed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    pub pool: String,
    pub image_name: String,
    pub image_id: String,
    pub trashed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashEntry {
    pub id: String,
    pub name: String,
    pub source: i32,
}

impl IoCtx {
    pub fn create_image(&self, name: &str, size: u64, opts: &ImageOptions) -> Result<()> {
        let n = cstr("rbd_create4", name)?;
        let o = opts.build("rbd_create4", false)?;
        check("rbd_create4", &self.target(name), unsafe {
            self.seen(ffi::rbd_create4(self.raw(), n.as_ptr(), size, o.0))
        })?;
        Ok(())
    }

    /// Sets image metadata with the object-class call librbd itself makes, without opening the
    /// image: two round trips instead of librbd's open, watch, exclusive lock and close. Only for
    /// an image nobody has open (one just created): an open handle would not see the change.
    pub fn metadata_set_unopened(&self, name: &str, pairs: &[(&str, &str)]) -> Result<()> {
        let id_object = format!("rbd_id.{name}");
        let bad = |errno: i32| CephError::new("rados_read", self.target(&id_object), -errno);
        let raw = self
            .read_small(&id_object)?
            .ok_or_else(|| bad(libc::ENOENT))?;
        let id = decode_string(&raw).ok_or_else(|| bad(libc::EINVAL))?;
        // cls_rbd's metadata_set takes a Ceph-encoded map<string, bufferlist>.
        let mut input = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            encode_bytes(&mut input, k.as_bytes());
            encode_bytes(&mut input, v.as_bytes());
        }
        self.exec(&format!("rbd_header.{id}"), "rbd", "metadata_set", &input)
    }

    /// Clone `parent@snap` (in this pool) into `child` in `child_io` (clone v2: no protect needed).
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        child_io: &IoCtx,
        child: &str,
        opts: &ImageOptions,
    ) -> Result<()> {
        let p = cstr("rbd_clone3", parent)?;
        let s = cstr("rbd_clone3", snap)?;
        let c = cstr("rbd_clone3", child)?;
        let o = opts.build("rbd_clone3", true)?;
        check("rbd_clone3", &child_io.target(child), unsafe {
            self.seen(ffi::rbd_clone3(
                self.raw(),
                p.as_ptr(),
                s.as_ptr(),
                child_io.raw(),
                c.as_ptr(),
                o.0,
            ))
        })?;
        Ok(())
    }

    pub fn remove_image(&self, name: &str) -> Result<()> {
        let n = cstr("rbd_remove", name)?;
        check("rbd_remove", &self.target(name), unsafe {
            self.seen(ffi::rbd_remove(self.raw(), n.as_ptr()))
        })?;
        Ok(())
    }

    pub fn open_image(&self, name: &str) -> Result<Image> {
        let n = cstr("rbd_open", name)?;
        let mut raw = ptr::null_mut();
        check("rbd_open", &self.target(name), unsafe {
            self.seen(ffi::rbd_open(self.raw(), n.as_ptr(), &mut raw, ptr::null()))
        })?;
        Ok(Image {
            raw,
            name: self.target(name),
            io: self.handle(),
        })
    }

    /// Opens without registering a watch, so `watchers()` sees only other clients.
    pub fn open_image_read_only(&self, name: &str) -> Result<Image> {
        let n = cstr("rbd_open_read_only", name)?;
        let mut raw = ptr::null_mut();
        check("rbd_open_read_only", &self.target(name), unsafe {
            self.seen(ffi::rbd_open_read_only(
                self.raw(),
                n.as_ptr(),
                &mut raw,
                ptr::null(),
            ))
        })?;
        Ok(Image {
            raw,
            name: self.target(name),
            io: self.handle(),
        })
    }

    pub fn open_image_by_id(&self, id: &str) -> Result<Image> {
        let n = cstr("rbd_open_by_id", id)?;
        let mut raw = ptr::null_mut();
        check("rbd_open_by_id", &self.target(id), unsafe {
            self.seen(ffi::rbd_open_by_id(
                self.raw(),
                n.as_ptr(),
                &mut raw,
                ptr::null(),
            ))
        })?;
        Ok(Image {
            raw,
            name: self.target(id),
            io: self.handle(),
        })
    }

    /// All image names in the pool (not the trash).
    pub fn list_images(&self) -> Result<Vec<String>> {
        let mut max: usize = 64;
        loop {
            let mut specs: Vec<ffi::rbd_image_spec_t> = Vec::with_capacity(max);
            let mut n = max;
            let ret = self.seen(unsafe { ffi::rbd_list2(self.raw(), specs.as_mut_ptr(), &mut n) });
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            check("rbd_list2", self.pool(), ret)?;
            unsafe { specs.set_len(n) };
            let names = specs.iter().map(|s| unsafe { owned(s.name) }).collect();
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// `rbd pool init`: tags the pool for RBD and checks that it can hold images.
    pub fn pool_init(&self) -> Result<()> {
        check("rbd_pool_init", self.pool(), unsafe {
            self.seen(ffi::rbd_pool_init(self.raw(), false))
        })?;
        Ok(())
    }

    pub fn trash_move(&self, name: &str) -> Result<()> {
        let n = cstr("rbd_trash_move", name)?;
        check("rbd_trash_move", &self.target(name), unsafe {
            self.seen(ffi::rbd_trash_move(self.raw(), n.as_ptr(), 0))
        })?;
        Ok(())
    }

    /// Moves image `name`, whose ID is `id`, to the trash (no deferment) with the object-class
    /// calls of librbd's own move request, in its order: an entry "moving" in `rbd_trash`, the
    /// name's `rbd_id` object and directory entry removed, the entry "normal". What
    /// `rbd_trash_move` wraps around those calls (open, watch, exclusive lock, close: most of
    /// its round trips) is for images this does not take: the caller has opened the image
    /// read-only and checked that nobody watches it and that librbd's move would do nothing
    /// more for it (`librbd_moves_specially`, `mirrored`). A move cut short leaves what an
    /// interrupted `rbd_trash_move` leaves, which a later `rbd_trash_move` of the name finishes.
    pub fn trash_move_unopened(&self, name: &str, id: &str) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut input = Vec::new();
        encode_bytes(&mut input, id.as_bytes());
        // The spec carries its own version and length, so no length of ours goes before it.
        input.extend_from_slice(&trash_image_spec(name, now, TRASH_STATE_MOVING));
        match self.exec(RBD_TRASH, "rbd", "trash_add", &input) {
            // An earlier move of this image was cut short: carry on where it stopped.
            Err(e) if e.is(libc::EEXIST) => {}
            r => r?,
        }
        self.remove_object(&format!("rbd_id.{name}"))?;
        let mut input = Vec::new();
        encode_bytes(&mut input, name.as_bytes());
        encode_bytes(&mut input, id.as_bytes());
        match self.exec("rbd_directory", "rbd", "dir_remove_image", &input) {
            Err(e) if e.not_found() => {}
            r => r?,
        }
        let mut input = Vec::new();
        encode_bytes(&mut input, id.as_bytes());
        input.extend_from_slice(&[TRASH_STATE_NORMAL, TRASH_STATE_MOVING]);
        self.exec(RBD_TRASH, "rbd", "trash_state_set", &input)
    }

    /// Whether the image has a mirroring entry, in any state (one round trip).
    pub fn mirrored(&self, id: &str) -> Result<bool> {
        let mut input = Vec::new();
        encode_bytes(&mut input, id.as_bytes());
        match self.exec("rbd_mirroring", "rbd", "mirror_image_get", &input) {
            Err(e) if e.not_found() => Ok(false),
            // It answered with an entry, which `exec` has no room for.
            Err(e) if e.is(libc::ERANGE) => Ok(true),
            Err(e) => Err(e),
            Ok(()) => Ok(true),
        }
    }

    pub fn trash_remove(&self, id: &str) -> Result<()> {
        let n = cstr("rbd_trash_remove", id)?;
        check("rbd_trash_remove", &self.target(id), unsafe {
            self.seen(ffi::rbd_trash_remove(self.raw(), n.as_ptr(), true))
        })?;
        Ok(())
    }

    pub fn trash_list(&self) -> Result<Vec<TrashEntry>> {
        let mut max: usize = 32;
        loop {
            let mut entries: Vec<ffi::rbd_trash_image_info_t> = Vec::with_capacity(max);
            let mut n = max;
            let ret =
                self.seen(unsafe { ffi::rbd_trash_list(self.raw(), entries.as_mut_ptr(), &mut n) });
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            let count = check("rbd_trash_list", self.pool(), ret)? as usize;
            unsafe { entries.set_len(count) };
            let out = entries
                .iter()
                .map(|e| TrashEntry {
                    id: unsafe { owned(e.id) },
                    name: unsafe { owned(e.name) },
                    source: e.source,
                })
                .collect();
            unsafe { ffi::rbd_trash_list_cleanup(entries.as_mut_ptr(), count) };
            return Ok(out);
        }
    }

    pub fn pool_stat(&self) -> Result<ffi::rados_pool_stat_t> {
        let mut st = ffi::rados_pool_stat_t::default();
        check("rados_ioctx_pool_stat", self.pool(), unsafe {
            self.seen(ffi::rados_ioctx_pool_stat(self.raw(), &mut st))
        })?;
        Ok(st)
    }
}

/// An open image. Closed on drop. Holds its I/O context, and through it the cluster
/// handle, so an image can never outlive its connection; every call's outcome goes into the
/// connection's health.
pub struct Image {
    raw: ffi::rbd_image_t,
    name: String,
    io: Arc<IoHandle>,
}

unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        unsafe { ffi::rbd_close(self.raw) };
    }
}

impl Image {
    fn err(&self, op: &'static str, ret: i32) -> CephError {
        CephError::new(op, self.name.clone(), ret)
    }

    /// Records a librbd return code in the connection's health and turns it into a `Result`.
    fn check(&self, op: &'static str, ret: i32) -> Result<i32> {
        self.check_local(op, self.io.seen(ret))
    }

    /// For getters that librbd answers from the open image's memory: their success says nothing
    /// about whether the cluster answers, so they leave the health record alone.
    fn check_local(&self, op: &'static str, ret: i32) -> Result<i32> {
        if ret < 0 {
            Err(self.err(op, ret))
        } else {
            Ok(ret)
        }
    }

    pub fn size(&self) -> Result<u64> {
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        self.check_local("rbd_stat", unsafe {
            ffi::rbd_stat(
                self.raw,
                &mut info,
                std::mem::size_of::<ffi::rbd_image_info_t>(),
            )
        })?;
        Ok(info.size)
    }

    pub fn id(&self) -> Result<String> {
        let mut buf = [0 as libc::c_char; 64];
        self.check_local("rbd_get_id", unsafe {
            ffi::rbd_get_id(self.raw, buf.as_mut_ptr(), buf.len())
        })?;
        Ok(unsafe { owned(buf.as_ptr()) })
    }

    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        self.check_local("rbd_get_features", unsafe {
            ffi::rbd_get_features(self.raw, &mut f)
        })?;
        Ok(f)
    }

    pub fn resize(&self, size: u64) -> Result<()> {
        self.check("rbd_resize", unsafe { ffi::rbd_resize(self.raw, size) })
            .map(|_| ())
    }

    pub fn flatten(&self) -> Result<()> {
        self.check("rbd_flatten", unsafe { ffi::rbd_flatten(self.raw) })
            .map(|_| ())
    }

    pub fn snap_create(&self, snap: &str) -> Result<()> {
        let s = cstr("rbd_snap_create", snap)?;
        self.check("rbd_snap_create", unsafe {
            ffi::rbd_snap_create(self.raw, s.as_ptr())
        })
        .map(|_| ())
    }

    /// Removes a snapshot. With clone v2, a snapshot that still has clones moves to the trash
    /// namespace and disappears by itself when its last clone goes.
    pub fn snap_remove(&self, snap: &str) -> Result<()> {
        let s = cstr("rbd_snap_remove", snap)?;
        self.check("rbd_snap_remove", unsafe {
            ffi::rbd_snap_remove(self.raw, s.as_ptr())
        })
        .map(|_| ())
    }

    /// User-namespace snapshots.
    pub fn snaps(&self) -> Result<Vec<SnapInfo>> {
        let mut max: libc::c_int = 16;
        loop {
            let mut v: Vec<ffi::rbd_snap_info_t> = Vec::with_capacity(max as usize + 1);
            let mut n = max;
            let ret = unsafe { ffi::rbd_snap_list(self.raw, v.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            let count = self.check("rbd_snap_list", ret)? as usize;
            unsafe { v.set_len(count) };
            let out = v
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    size: s.size,
                    name: unsafe { owned(s.name) },
                })
                .collect();
            unsafe { ffi::rbd_snap_list_end(v.as_mut_ptr()) };
            return Ok(out);
        }
    }

    pub fn snap_timestamp(&self, snap_id: u64) -> Result<(i64, i32)> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        self.check_local("rbd_snap_get_timestamp", unsafe {
            ffi::rbd_snap_get_timestamp(self.raw, snap_id, &mut ts)
        })?;
        Ok((ts.tv_sec, ts.tv_nsec as i32))
    }

    pub fn parent(&self) -> Result<Option<ParentInfo>> {
        let mut img: ffi::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        let mut snap: ffi::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        let ret = unsafe { ffi::rbd_get_parent(self.raw, &mut img, &mut snap) };
        if ret == -libc::ENOENT {
            self.io.seen(ret);
            return Ok(None);
        }
        self.check("rbd_get_parent", ret)?;
        let info = unsafe {
            ParentInfo {
                pool: owned(img.pool_name),
                namespace: owned(img.pool_namespace),
                image_name: owned(img.image_name),
                image_id: owned(img.image_id),
                snap_name: owned(snap.name),
                trashed: img.trash,
            }
        };
        unsafe {
            ffi::rbd_linked_image_spec_cleanup(&mut img);
            ffi::rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(info))
    }

    /// Clones of any of this image's snapshots, trashed ones included.
    pub fn children(&self) -> Result<Vec<ChildInfo>> {
        let mut max: usize = 16;
        loop {
            let mut v: Vec<ffi::rbd_linked_image_spec_t> = Vec::with_capacity(max);
            let mut n = max;
            let ret = unsafe { ffi::rbd_list_children3(self.raw, v.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            self.check("rbd_list_children3", ret)?;
            unsafe { v.set_len(n) };
            let out = v
                .iter()
                .map(|c| unsafe {
                    ChildInfo {
                        pool: owned(c.pool_name),
                        image_name: owned(c.image_name),
                        image_id: owned(c.image_id),
                        trashed: c.trash,
                    }
                })
                .collect();
            unsafe { ffi::rbd_linked_image_spec_list_cleanup(v.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    pub fn metadata_get(&self, key: &str) -> Result<Option<String>> {
        let k = cstr("rbd_metadata_get", key)?;
        let mut len: usize = 512;
        loop {
            let mut buf = vec![0u8; len];
            let mut n = len;
            let ret = unsafe {
                ffi::rbd_metadata_get(
                    self.raw,
                    k.as_ptr(),
                    buf.as_mut_ptr() as *mut libc::c_char,
                    &mut n,
                )
            };
            match ret {
                r if r == -libc::ENOENT => {
                    self.io.seen(r);
                    return Ok(None);
                }
                r if r == -libc::ERANGE => {
                    len = n.max(len * 2);
                    continue;
                }
                r => self.check("rbd_metadata_get", r)?,
            };
            // librbd leaves `n` alone on success: the value ends at its NUL.
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<()> {
        let k = cstr("rbd_metadata_set", key)?;
        let v = cstr("rbd_metadata_set", value)?;
        self.check("rbd_metadata_set", unsafe {
            ffi::rbd_metadata_set(self.raw, k.as_ptr(), v.as_ptr())
        })
        .map(|_| ())
    }

    pub fn metadata_remove(&self, key: &str) -> Result<()> {
        let k = cstr("rbd_metadata_remove", key)?;
        match self
            .io
            .seen(unsafe { ffi::rbd_metadata_remove(self.raw, k.as_ptr()) })
        {
            r if r == -libc::ENOENT => Ok(()),
            r => check("rbd_metadata_remove", &self.name, r).map(|_| ()),
        }
    }

    /// Addresses of clients watching the image's header (a mapped image has at least one).
    pub fn watchers(&self) -> Result<Vec<String>> {
        let mut max: usize = 8;
        loop {
            let mut v: Vec<ffi::rbd_image_watcher_t> = Vec::with_capacity(max);
            let mut n = max;
            let ret = unsafe { ffi::rbd_watchers_list(self.raw, v.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            self.check("rbd_watchers_list", ret)?;
            unsafe { v.set_len(n) };
            let out = v.iter().map(|w| unsafe { owned(w.addr) }).collect();
            unsafe { ffi::rbd_watchers_list_cleanup(v.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Whether librbd's `rbd_trash_move` does more for this image than move it: it refuses a
    /// migrating image (and, after Pacific, one in a group) and disables journaling and
    /// mirroring first. Such images keep librbd's move, whatever this librbd does with them.
    /// Answered from the open image's memory.
    pub fn librbd_moves_specially(&self) -> Result<bool> {
        let special =
            ffi::RBD_FEATURE_JOURNALING | ffi::RBD_FEATURE_MIGRATING | ffi::RBD_FEATURE_NON_PRIMARY;
        if self.features()? & special != 0 {
            return Ok(true);
        }
        let mut g = ffi::rbd_group_info_t {
            name: ptr::null_mut(),
            pool: -1,
        };
        let size = std::mem::size_of::<ffi::rbd_group_info_t>();
        self.check_local("rbd_get_group", unsafe {
            ffi::rbd_get_group(self.raw, &mut g, size)
        })?;
        let grouped = g.pool != -1;
        unsafe { ffi::rbd_group_info_cleanup(&mut g, size) };
        Ok(grouped)
    }

    /// The RADOS object that holds the image's header (format 2): it lives exactly as long as
    /// the image, and clones and copies never inherit its attributes.
    pub fn header_object(&self) -> Result<String> {
        Ok(format!("rbd_header.{}", self.id()?))
    }
}

const RBD_TRASH: &str = "rbd_trash";
/// `cls::rbd::TrashImageSource::USER` and `TrashImageState`, as cls_rbd encodes them (u8).
const TRASH_SOURCE_USER: u8 = 0;
const TRASH_STATE_NORMAL: u8 = 0;
const TRASH_STATE_MOVING: u8 = 1;

/// `cls::rbd::TrashImageSpec` (version 2, compatible with 1) of a user's trash entry whose
/// deferment ends at once, as `rbd_trash_move` with no delay writes it.
fn trash_image_spec(name: &str, now: std::time::Duration, state: u8) -> Vec<u8> {
    let mut body = vec![TRASH_SOURCE_USER];
    encode_bytes(&mut body, name.as_bytes());
    // utime_t: u32 seconds, u32 nanoseconds; deletion time, then the deferment's end.
    for _ in 0..2 {
        body.extend_from_slice(&(now.as_secs() as u32).to_le_bytes());
        body.extend_from_slice(&now.subsec_nanos().to_le_bytes());
    }
    body.push(state);
    let mut out = vec![2, 1];
    encode_bytes(&mut out, &body);
    out
}

/// Ceph's encoding of a string or buffer: a little-endian u32 length, then the bytes.
fn encode_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn decode_string(raw: &[u8]) -> Option<String> {
    let (len, rest) = raw.split_first_chunk::<4>()?;
    let b = rest.get(..u32::from_le_bytes(*len) as usize)?;
    String::from_utf8(b.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceph_strings_round_trip_and_short_input_is_refused() {
        let mut b = Vec::new();
        encode_bytes(&mut b, b"10ab3f9c2e");
        assert_eq!(b[..4], [10, 0, 0, 0]);
        assert_eq!(decode_string(&b).as_deref(), Some("10ab3f9c2e"));
        assert_eq!(decode_string(&b[..8]), None);
        assert_eq!(decode_string(&[1, 0]), None);
    }

    #[test]
    fn a_trash_image_spec_is_encoded_as_cls_rbd_decodes_it() {
        let now = std::time::Duration::new(0x0102_0304, 5);
        let b = trash_image_spec("ab", now, TRASH_STATE_MOVING);
        // version 2, compat 1, then the body's length.
        assert_eq!(b[..6], [2, 1, 24, 0, 0, 0]);
        assert_eq!(b.len(), 6 + 24);
        assert_eq!(b[6], TRASH_SOURCE_USER);
        assert_eq!(decode_string(&b[7..]).as_deref(), Some("ab"));
        let times = [4, 3, 2, 1, 5, 0, 0, 0];
        assert_eq!(b[13..21], times);
        assert_eq!(b[21..29], times);
        assert_eq!(b[29], TRASH_STATE_MOVING);
    }
}
