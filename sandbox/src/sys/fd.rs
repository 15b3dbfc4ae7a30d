//! File descriptors: duplicate, close, pipe, poll.

use super::{check, check_long};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `poll` over `(fd, events)`; returns the revents of each entry (0 on timeout).
pub fn poll(fds: &[(RawFd, libc::c_short)], timeout_ms: i32) -> io::Result<Vec<libc::c_short>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd of the given length.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds.iter().map(|p| p.revents).collect())
}

/// Closes the fds from `first` to `last` (`u32::MAX`: every fd from `first` upwards).
pub fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: closes fds the caller declared it does not own any more.
    check_long(unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) }).map(drop)
}

pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on integers; `to` is replaced atomically.
    check(unsafe { libc::dup2(from, to) }).map(drop)
}

/// Duplicates `fd` to a new close-on-exec fd that we own.
pub fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on integers; the result is a fresh fd.
    let new = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
