//! RADOS object attributes and the compare-and-swap write on them: a record that several
//! processes update stays consistent, because the OSD applies the comparison and the write as
//! one operation.

use super::{check, cstr, ffi, CephError, IoCtx, Result};

/// Owns a `rados_write_op_t`; released on drop.
struct WriteOp(ffi::rados_write_op_t);

impl Drop for WriteOp {
    fn drop(&mut self) {
        unsafe { ffi::rados_release_write_op(self.0) }
    }
}

impl IoCtx {
    /// An extended attribute of an object; `None` when the object has no such attribute, and
    /// a `not_found` error when the object itself does not exist.
    pub fn xattr(&self, oid: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let o = cstr("rados_getxattr", oid)?;
        let n = cstr("rados_getxattr", name)?;
        let mut len = 4096;
        loop {
            let mut buf = vec![0u8; len];
            let ret = self.seen(unsafe {
                ffi::rados_getxattr(
                    self.raw(),
                    o.as_ptr(),
                    n.as_ptr(),
                    buf.as_mut_ptr() as *mut libc::c_char,
                    buf.len(),
                )
            });
            match ret {
                r if r == -libc::ENODATA => return Ok(None),
                r if r == -libc::ERANGE && len < (1 << 24) => len *= 16,
                r => {
                    let n = check("rados_getxattr", &self.target(oid), r)? as usize;
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
            }
        }
    }

    /// Sets attribute `name` of an existing object to `value` if it still holds `expected`
    /// (`None`: the attribute is absent). `Ok(false)` when another writer got there first; a
    /// `not_found` error when the object is gone (it is never created here).
    pub fn replace_xattr(
        &self,
        oid: &str,
        name: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool> {
        if value.is_empty() {
            return Err(CephError::new(
                "rados_write_op_operate",
                name,
                -libc::EINVAL,
            ));
        }
        let o = cstr("rados_write_op_operate", oid)?;
        let n = cstr("rados_write_op_operate", name)?;
        let op = WriteOp(unsafe { ffi::rados_create_write_op() });
        // The OSD compares a missing attribute as empty; the values written here never are.
        let expected = expected.unwrap_or_default();
        let ret = unsafe {
            ffi::rados_write_op_assert_exists(op.0);
            ffi::rados_write_op_cmpxattr(
                op.0,
                n.as_ptr(),
                ffi::LIBRADOS_CMPXATTR_OP_EQ,
                expected.as_ptr() as *const libc::c_char,
                expected.len(),
            );
            ffi::rados_write_op_setxattr(
                op.0,
                n.as_ptr(),
                value.as_ptr() as *const libc::c_char,
                value.len(),
            );
            self.seen(ffi::rados_write_op_operate(
                op.0,
                self.raw(),
                o.as_ptr(),
                std::ptr::null_mut(),
                0,
            ))
        };
        if ret == -libc::ECANCELED {
            return Ok(false);
        }
        check("rados_write_op_operate", &self.target(oid), ret)?;
        Ok(true)
    }
}
