//! Hand-written declarations of the librados and librbd C functions we use.
//!
//! Declared by hand rather than generated: the surface is small, it needs no libclang at build
//! time, and every function here exists in librbd 1.16 (Ceph 16.2, Pacific), so a newer Ceph keeps
//! working and an older one fails at link time rather than at run time.
#![allow(non_camel_case_types)]

use libc::{c_char, c_int, size_t, time_t, timespec};

pub type rados_t = *mut libc::c_void;
pub type rados_ioctx_t = *mut libc::c_void;
pub type rbd_image_t = *mut libc::c_void;
pub type rbd_image_options_t = *mut libc::c_void;

pub const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;
pub const RBD_IMAGE_OPTION_STRIPE_UNIT: c_int = 3;
pub const RBD_IMAGE_OPTION_STRIPE_COUNT: c_int = 4;
pub const RBD_IMAGE_OPTION_DATA_POOL: c_int = 10;
pub const RBD_IMAGE_OPTION_CLONE_FORMAT: c_int = 12;

pub const RBD_SNAP_NAMESPACE_TYPE_USER: c_int = 0;

pub const RBD_FEATURE_JOURNALING: u64 = 1 << 6;
pub const RBD_FEATURE_MIGRATING: u64 = 1 << 9;
pub const RBD_FEATURE_NON_PRIMARY: u64 = 1 << 10;

#[repr(C)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

#[repr(C)]
pub struct rbd_group_info_t {
    pub name: *mut c_char,
    pub pool: i64,
}

#[repr(C)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

#[repr(C)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

#[repr(C)]
pub struct rbd_linked_image_spec_t {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

#[repr(C)]
pub struct rbd_snap_spec_t {
    pub id: u64,
    pub namespace_type: c_int,
    pub name: *mut c_char,
}

#[repr(C)]
pub struct rbd_trash_image_info_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
    pub source: c_int,
    pub deletion_time: time_t,
    pub deferment_end_time: time_t,
}

#[repr(C)]
pub struct rbd_image_watcher_t {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct rados_pool_stat_t {
    pub num_bytes: u64,
    pub num_kb: u64,
    pub num_objects: u64,
    pub num_object_clones: u64,
    pub num_object_copies: u64,
    pub num_objects_missing_on_primary: u64,
    pub num_objects_unfound: u64,
    pub num_objects_degraded: u64,
    pub num_rd: u64,
    pub num_rd_kb: u64,
    pub num_wr: u64,
    pub num_wr_kb: u64,
    pub num_user_bytes: u64,
    pub compressed_bytes_orig: u64,
    pub compressed_bytes: u64,
    pub compressed_bytes_alloc: u64,
}

#[link(name = "rados")]
extern "C" {
    pub fn rados_create2(
        cluster: *mut rados_t,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_cluster_fsid(cluster: rados_t, buf: *mut c_char, len: size_t) -> c_int;
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
    pub fn rados_ioctx_pool_stat(io: rados_ioctx_t, stats: *mut rados_pool_stat_t) -> c_int;
    pub fn rados_write_full(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *const c_char,
        len: size_t,
    ) -> c_int;
    pub fn rados_append(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *const c_char,
        len: size_t,
    ) -> c_int;
    pub fn rados_exec(
        io: rados_ioctx_t,
        oid: *const c_char,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: size_t,
        buf: *mut c_char,
        out_len: size_t,
    ) -> c_int;
    pub fn rados_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *mut c_char,
        len: size_t,
        off: u64,
    ) -> c_int;
    pub fn rados_stat(
        io: rados_ioctx_t,
        oid: *const c_char,
        psize: *mut u64,
        pmtime: *mut time_t,
    ) -> c_int;
    pub fn rados_remove(io: rados_ioctx_t, oid: *const c_char) -> c_int;
    pub fn rados_mon_command(
        cluster: rados_t,
        cmd: *mut *const c_char,
        cmdlen: size_t,
        inbuf: *const c_char,
        inbuflen: size_t,
        outbuf: *mut *mut c_char,
        outbuflen: *mut size_t,
        outs: *mut *mut c_char,
        outslen: *mut size_t,
    ) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    pub fn rbd_image_options_destroy(opts: rbd_image_options_t);
    pub fn rbd_image_options_set_string(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: *const c_char,
    ) -> c_int;
    pub fn rbd_image_options_set_uint64(
        opts: rbd_image_options_t,
        optname: c_int,
        optval: u64,
    ) -> c_int;
    pub fn rbd_create4(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_clone3(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        c_opts: rbd_image_options_t,
    ) -> c_int;
    pub fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub fn rbd_list2(
        io: rados_ioctx_t,
        images: *mut rbd_image_spec_t,
        max_images: *mut size_t,
    ) -> c_int;
    pub fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num_images: size_t);
    pub fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
    pub fn rbd_trash_remove(io: rados_ioctx_t, id: *const c_char, force: bool) -> c_int;
    pub fn rbd_pool_init(io: rados_ioctx_t, force: bool) -> c_int;
    pub fn rbd_namespace_exists(
        io: rados_ioctx_t,
        namespace_name: *const c_char,
        exists: *mut bool,
    ) -> c_int;
    pub fn rbd_trash_list(
        io: rados_ioctx_t,
        entries: *mut rbd_trash_image_info_t,
        num: *mut size_t,
    ) -> c_int;
    pub fn rbd_trash_list_cleanup(entries: *mut rbd_trash_image_info_t, num: size_t);

    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_open_by_id(
        io: rados_ioctx_t,
        id: *const c_char,
        image: *mut rbd_image_t,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    pub fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: size_t) -> c_int;
    pub fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: size_t) -> c_int;
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    pub fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub fn rbd_flatten(image: rbd_image_t) -> c_int;
    pub fn rbd_snap_create(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_remove(image: rbd_image_t, name: *const c_char) -> c_int;
    pub fn rbd_snap_list(image: rbd_image_t, snaps: *mut rbd_snap_info_t, max: *mut c_int)
        -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    pub fn rbd_snap_get_timestamp(image: rbd_image_t, snap_id: u64, ts: *mut timespec) -> c_int;
    pub fn rbd_get_parent(
        image: rbd_image_t,
        parent: *mut rbd_linked_image_spec_t,
        snap: *mut rbd_snap_spec_t,
    ) -> c_int;
    pub fn rbd_linked_image_spec_cleanup(spec: *mut rbd_linked_image_spec_t);
    pub fn rbd_snap_spec_cleanup(spec: *mut rbd_snap_spec_t);
    pub fn rbd_list_children3(
        image: rbd_image_t,
        images: *mut rbd_linked_image_spec_t,
        max: *mut size_t,
    ) -> c_int;
    pub fn rbd_linked_image_spec_list_cleanup(images: *mut rbd_linked_image_spec_t, num: size_t);
    pub fn rbd_metadata_get(
        image: rbd_image_t,
        key: *const c_char,
        value: *mut c_char,
        len: *mut size_t,
    ) -> c_int;
    pub fn rbd_metadata_set(image: rbd_image_t, key: *const c_char, value: *const c_char) -> c_int;
    pub fn rbd_metadata_remove(image: rbd_image_t, key: *const c_char) -> c_int;
    pub fn rbd_watchers_list(
        image: rbd_image_t,
        watchers: *mut rbd_image_watcher_t,
        max: *mut size_t,
    ) -> c_int;
    pub fn rbd_watchers_list_cleanup(watchers: *mut rbd_image_watcher_t, num: size_t);
    pub fn rbd_get_group(
        image: rbd_image_t,
        group_info: *mut rbd_group_info_t,
        group_info_size: size_t,
    ) -> c_int;
    pub fn rbd_group_info_cleanup(
        group_info: *mut rbd_group_info_t,
        group_info_size: size_t,
    ) -> c_int;
}

pub type rados_write_op_t = *mut libc::c_void;

/// `rados_write_op_cmpxattr`: the stored value must equal the given one.
pub const LIBRADOS_CMPXATTR_OP_EQ: u8 = 1;

// Extended attributes, compound write operations and client addresses: the attachment record's
// compare-and-swap and the blocklisting of fenced clients.
#[link(name = "rados")]
extern "C" {
    pub fn rados_getxattr(
        io: rados_ioctx_t,
        o: *const c_char,
        name: *const c_char,
        buf: *mut c_char,
        len: size_t,
    ) -> c_int;
    pub fn rados_create_write_op() -> rados_write_op_t;
    pub fn rados_release_write_op(op: rados_write_op_t);
    pub fn rados_write_op_assert_exists(op: rados_write_op_t);
    pub fn rados_write_op_cmpxattr(
        op: rados_write_op_t,
        name: *const c_char,
        comparison_operator: u8,
        value: *const c_char,
        value_len: size_t,
    );
    pub fn rados_write_op_setxattr(
        op: rados_write_op_t,
        name: *const c_char,
        value: *const c_char,
        value_len: size_t,
    );
    pub fn rados_write_op_operate(
        op: rados_write_op_t,
        io: rados_ioctx_t,
        oid: *const c_char,
        mtime: *mut time_t,
        flags: c_int,
    ) -> c_int;
    /// The session's addresses, as watchers and the blocklist show them; free with `free(3)`.
    pub fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
}
