//! Kernel notifications of file changes: inotify, eventfd, and a non-blocking send for
//! links whose reader must never stall the sender.

use super::{check, cstr};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// A non-blocking, close-on-exec inotify instance.
pub fn inotify() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall on flags; the result is a fresh fd.
    let fd = check(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watches `path` for `IN_MODIFY`, which kernfs raises when a cgroup event file changes.
pub fn inotify_watch_modify(inotify: RawFd, path: &Path) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: valid fd and NUL-terminated path for the duration of the call.
    check(unsafe { libc::inotify_add_watch(inotify, path.as_ptr(), libc::IN_MODIFY) }).map(drop)
}

/// A non-blocking, close-on-exec eventfd starting at 0.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall on integers; the result is a fresh fd.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads and discards what is pending on a non-blocking fd (inotify records, an eventfd
/// counter): the caller rereads the files the notification was about. Whether anything
/// was pending.
pub fn drain(fd: RawFd) -> bool {
    let mut buf = [0u8; 4096];
    let mut any = false;
    loop {
        // SAFETY: writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return any;
        }
        any = true;
    }
}

/// Sends what the socket takes now, without blocking and without SIGPIPE; `Ok(0)` when
/// its buffer is full.
pub fn send_nowait(sock: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: reads at most bytes.len() bytes from bytes.
    let n = unsafe {
        libc::send(
            sock,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn inotify_sees_a_write_and_drains() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.events");
        std::fs::write(&file, "oom_kill 0\n").unwrap();
        let ino = inotify().unwrap();
        inotify_watch_modify(ino.as_raw_fd(), &file).unwrap();
        let ready = |fd| super::super::poll(&[(fd, libc::POLLIN)], 0).unwrap()[0];
        assert_eq!(ready(ino.as_raw_fd()), 0);
        std::fs::write(&file, "oom_kill 1\n").unwrap();
        assert_ne!(ready(ino.as_raw_fd()), 0);
        assert!(drain(ino.as_raw_fd()));
        assert!(!drain(ino.as_raw_fd()));
        assert_eq!(ready(ino.as_raw_fd()), 0);
    }

    #[test]
    fn a_full_socket_takes_nothing_instead_of_blocking() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let chunk = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = send_nowait(a.as_raw_fd(), &chunk).unwrap();
            if n == 0 {
                break;
            }
            total += n;
            assert!(total < 1 << 30, "the socket never filled");
        }
        assert!(total > 0);
    }
}
