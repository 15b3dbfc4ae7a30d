//! The seccomp filter and its user-notification listener.

use super::{check, check_long};
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Installs a seccomp filter and returns its user-notification listener.
/// Requires `no_new_privs` (or CAP_SYS_ADMIN).
pub fn seccomp_install_with_listener(program: &[SockFilter]) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    let prog = SockFprog {
        len: program.len() as u16,
        filter: program.as_ptr(),
    };
    const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
    const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_ulong = 1 << 3;
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let fd = check_long(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog,
        )
    })?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A syscall the filter handed to us (`struct seccomp_notif`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SeccompNotif {
    pub id: u64,
    pub pid: u32,
    pub flags: u32,
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

#[repr(C)]
struct SeccompNotifResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

const fn iowr(ty: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((3u32 << 30) | ((size as u32) << 16) | (ty << 8) | nr) as libc::c_ulong
}

/// Receives one pending notification from a seccomp listener.
pub fn seccomp_notif_recv(listener: RawFd) -> io::Result<SeccompNotif> {
    const RECV: libc::c_ulong = iowr(b'!' as u32, 0, size_of::<SeccompNotif>());
    // SAFETY: the kernel requires a zeroed struct; all-zero is valid for this POD type.
    let mut notif: SeccompNotif = unsafe { zeroed() };
    // SAFETY: `notif` has the exact layout of struct seccomp_notif.
    check(unsafe { libc::ioctl(listener, RECV, &mut notif) })?;
    Ok(notif)
}

/// Answers a notification: the syscall fails in the job with `errno`.
pub fn seccomp_notif_fail(listener: RawFd, id: u64, errno: i32) -> io::Result<()> {
    const SEND: libc::c_ulong = iowr(b'!' as u32, 1, size_of::<SeccompNotifResp>());
    let resp = SeccompNotifResp {
        id,
        val: 0,
        error: -errno,
        flags: 0,
    };
    // SAFETY: `resp` has the exact layout of struct seccomp_notif_resp.
    check(unsafe { libc::ioctl(listener, SEND, &resp) }).map(drop)
}
