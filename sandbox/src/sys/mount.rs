//! Mounts, `pivot_root` and device nodes of the job's root.

use super::{check, check_long, cstr, os_cstr};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|s| os_cstr(OsStr::new(s))).transpose()?;
    let data = data.map(|s| os_cstr(OsStr::new(s))).transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })
    .map(drop)
}

pub fn umount2(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: NUL-terminated path valid for the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let new_root = cstr(new_root)?;
    let put_old = cstr(put_old)?;
    // SAFETY: NUL-terminated paths valid for the call.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
        .map(drop)
}

/// `mknod(path, S_IFCHR | mode, makedev(major, minor))`, then `chmod` so the umask does
/// not narrow the mode.
pub fn mknod_char(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = cstr(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: valid NUL-terminated path; integers otherwise.
    check(unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | mode, dev) })?;
    // SAFETY: as above.
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

// The new mount API (`linux/mount.h`), for mounts made before the job is known: a
// filesystem instance is created and mounted detached (in no tree; reachable only through
// its fd), filled in, then attached where the job's root needs it.
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// A new instance of `fstype`, configured with `flags` and `options` (`key=value`), mounted
/// detached with the `MOUNT_ATTR_*` bits of `attrs` (`fsopen`, `fsconfig`, `fsmount`).
/// `ENOSYS` on kernels before 5.2.
pub fn mount_detached(
    fstype: &str,
    flags: &[&str],
    options: &[(&str, &str)],
    attrs: u64,
) -> io::Result<OwnedFd> {
    let name = os_cstr(OsStr::new(fstype))?;
    // SAFETY: NUL-terminated name valid for the call.
    let fs = check_long(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: a new fd that nothing else owns.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    let config = |cmd: libc::c_uint, key: Option<&CString>, value: Option<&CString>| {
        // SAFETY: fd owned above; every pointer null or a NUL-terminated string.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                cmd,
                key.map_or(std::ptr::null(), |k| k.as_ptr()),
                value.map_or(std::ptr::null(), |v| v.as_ptr()),
                0,
            )
        })
        .map(drop)
    };
    for flag in flags {
        config(FSCONFIG_SET_FLAG, Some(&os_cstr(OsStr::new(flag))?), None)?;
    }
    for (key, value) in options {
        let key = os_cstr(OsStr::new(key))?;
        let value = os_cstr(OsStr::new(value))?;
        config(FSCONFIG_SET_STRING, Some(&key), Some(&value))?;
    }
    config(FSCONFIG_CMD_CREATE, None, None)?;
    // SAFETY: the configured fs context above; integers otherwise.
    let mnt = check_long(unsafe {
        libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs)
    })?;
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt as RawFd) })
}

/// Attaches the detached mount `mount` at `target` (`move_mount`).
pub fn attach_mount(mount: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: a live fd, an empty and a NUL-terminated path valid for the call.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Sets the `MOUNT_ATTR_*` bits of `attrs` on the mount `mount` (`mount_setattr`, 5.12).
pub fn set_mount_attrs(mount: BorrowedFd<'_>, attrs: u64) -> io::Result<()> {
    /// `struct mount_attr`.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a live fd, an empty path, and a struct of the size passed, valid for the call.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// `mknodat(dir, name, S_IFCHR | mode, makedev(major, minor))`, then `fchmodat` so the
/// umask does not narrow the mode.
pub fn mknod_char_at(
    dir: BorrowedFd<'_>,
    name: &str,
    mode: u32,
    major: u32,
    minor: u32,
) -> io::Result<()> {
    let n = os_cstr(OsStr::new(name))?;
    let dev = libc::makedev(major, minor);
    // SAFETY: a live dir fd and a NUL-terminated name; integers otherwise.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), n.as_ptr(), libc::S_IFCHR | mode, dev) })?;
    // SAFETY: as above.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), n.as_ptr(), mode, 0) }).map(drop)
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<()> {
    let n = os_cstr(OsStr::new(name))?;
    // SAFETY: a live dir fd and a NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) }).map(drop)
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &str, dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let t = os_cstr(OsStr::new(target))?;
    let n = os_cstr(OsStr::new(name))?;
    // SAFETY: NUL-terminated strings and a live dir fd.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) }).map(drop)
}
