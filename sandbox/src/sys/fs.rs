//! Filesystem queries and locks: free space, xattr names, `flock`.

use super::{check, check_long, cstr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Free space of the filesystem holding `path`.
#[derive(Debug, Clone, Copy)]
pub struct FsSpace {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub files_available: u64,
    pub files_total: u64,
}

pub fn statvfs(path: &Path) -> io::Result<FsSpace> {
    let p = cstr(path)?;
    let mut st = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid path and out-pointer.
    check(unsafe { libc::statvfs(p.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: filled by the kernel.
    Ok(space(unsafe { st.assume_init() }))
}

/// Free space of the filesystem of the open file or directory `file`.
pub fn fstatvfs(file: &impl AsRawFd) -> io::Result<FsSpace> {
    let mut st = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: an open fd (borrowed for the call) and a valid out-pointer.
    check(unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: filled by the kernel.
    Ok(space(unsafe { st.assume_init() }))
}

fn space(st: libc::statvfs) -> FsSpace {
    FsSpace {
        bytes_total: st.f_blocks.saturating_mul(st.f_frsize),
        bytes_available: st.f_bavail.saturating_mul(st.f_frsize),
        files_available: st.f_favail,
        files_total: st.f_files,
    }
}

/// Bytes the names of `path`'s extended attributes take (0: it has none). Does not follow
/// a final symlink.
pub fn llistxattr_size(path: &Path) -> io::Result<usize> {
    let p = cstr(path)?;
    // SAFETY: valid NUL-terminated path; a null buffer of size 0 asks only for the size.
    let n = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    check_long(n as libc::c_long).map(|n| n as usize)
}

/// Takes an exclusive `flock` on `file`, blocking until it is free.
pub fn flock_exclusive(file: &std::fs::File) -> io::Result<()> {
    loop {
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
