//! Unix sockets: seqpacket pairs and fd passing (`SCM_RIGHTS`).

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::{check, check_long};

/// A msghdr over `iov` with an SCM_RIGHTS control buffer (`control`, sized here) with
/// room for `fds` descriptors (none: no control buffer at all).
fn fd_message(iov: &mut libc::iovec, control: &mut Vec<u8>, fds: usize) -> libc::msghdr {
    // SAFETY: msghdr is POD; zero is valid (no name, no control buffer).
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    if fds > 0 {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) } as usize;
        control.clear();
        control.resize(space, 0);
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
    }
    msg
}

/// Sends `data` (at least one byte) in one message, with `fds` attached (if any). A
/// message that does not go out whole (a stream socket's partial send) is an error.
pub fn send_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = Vec::new();
    let msg = fd_message(&mut iov, &mut control, fds.len());
    if !fds.is_empty() {
        // SAFETY: msg_control holds CMSG_SPACE(fds.len() ints), so the first header and
        // all the fds fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(fds) as u32) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, &fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd);
            }
        }
    }
    // SAFETY: msg and its buffers are valid for the call; the kernel only reads `data`.
    let sent =
        check_long(unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } as libc::c_long)?;
    if sent as usize != data.len() {
        return Err(io::Error::from(io::ErrorKind::WriteZero));
    }
    Ok(())
}

/// The length of the next message of a datagram or seqpacket socket, waiting for one
/// (`MSG_PEEK | MSG_TRUNC`: the message stays queued). 0 at end of stream.
pub fn peek_len(sock: RawFd) -> io::Result<usize> {
    // SAFETY: a zero-length read into no buffer.
    let n = check_long(unsafe {
        libc::recv(
            sock,
            std::ptr::null_mut(),
            0,
            libc::MSG_PEEK | libc::MSG_TRUNC,
        )
    } as libc::c_long)?;
    Ok(n as usize)
}

/// Receives a message sent by [`send_fds`] into `data`, with up to `max_fds` descriptors
/// (close-on-exec). `Ok(None)` at end of stream.
pub fn recv_fds(
    sock: RawFd,
    data: &mut [u8],
    max_fds: usize,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut control = Vec::new();
    let mut msg = fd_message(&mut iov, &mut control, max_fds);
    // SAFETY: msg and its buffers are valid for the call.
    let n = check_long(
        unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) } as libc::c_long,
    )?;
    if n == 0 {
        return Ok(None);
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR checks the length, and the
    // number of fds comes from the header's own length.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            let header = libc::CMSG_LEN(0) as usize;
            let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
            let first = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for i in 0..count {
                fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(first.add(i))));
            }
        }
    }
    Ok(Some((n as usize, fds)))
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` unix sockets.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two fds.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Makes room in `sock`'s send buffer for a datagram of `bytes` (a unix datagram or
/// seqpacket socket refuses one larger than its buffer): `SO_SNDBUFFORCE` (root), else
/// `SO_SNDBUF` (up to `net.core.wmem_max`).
pub fn reserve_send_buffer(sock: RawFd, bytes: usize) -> io::Result<()> {
    let size =
        libc::c_int::try_from(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
    let set = |option: libc::c_int| {
        // SAFETY: a live fd and an int of the size passed, valid for the call.
        check(unsafe {
            libc::setsockopt(
                sock,
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(drop)
    };
    set(libc::SO_SNDBUFFORCE).or_else(|_| set(libc::SO_SNDBUF))
}
