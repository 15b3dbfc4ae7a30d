//! Thin wrappers over the raw syscalls the sandbox needs. The only place in the workspace
//! with `unsafe`; everything above speaks in `io::Result` and owned fds.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::{MaybeUninit, size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(path: &Path) -> io::Result<CString> {
    os_cstr(path.as_os_str())
}

fn os_cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Outcome of a fork-like call.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// `clone(flags | SIGCHLD)` with fork semantics (the child continues on a copy of the
/// stack). Only sound in a single-threaded process, which is why the worker re-executes a
/// helper instead of calling this.
pub fn clone_fork(flags: libc::c_int) -> io::Result<Forked> {
    // SAFETY: a null stack makes clone behave like fork; the caller (the helper) is
    // single-threaded, so the child's copy of the address space holds no foreign locks.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match check_long(ret)? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as libc::pid_t)),
    }
}

/// A set of CPUs a process may run on (`sched_setaffinity`).
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    /// The CPUs the calling process may run on.
    pub fn current() -> io::Result<CpuSet> {
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
        check(unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) })?;
        Ok(CpuSet(set))
    }

    /// This set without `cpu`, or `None` when nothing would be left.
    pub fn without(&self, cpu: usize) -> Option<CpuSet> {
        let mut set = self.0;
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: `cpu` is within the set's bounds (checked above).
            unsafe { libc::CPU_CLR(cpu, &mut set) };
        }
        // SAFETY: counts the bits of a valid set.
        (unsafe { libc::CPU_COUNT(&set) } > 0).then_some(CpuSet(set))
    }

    /// Restricts `pid` (0: the caller) to this set; a thread on a CPU outside it moves.
    pub fn apply(&self, pid: libc::pid_t) -> io::Result<()> {
        // SAFETY: the kernel only reads the set.
        check(unsafe { libc::sched_setaffinity(pid, std::mem::size_of_val(&self.0), &self.0) })
            .map(drop)
    }
}

/// Whether the caller is the only runnable task on the machine right now (the running
/// count in `/proc/loadavg`), i.e. every other CPU it could use is idle.
pub fn running_alone() -> bool {
    let mut buf = [0u8; 128];
    let Ok(n) = std::fs::File::open("/proc/loadavg").and_then(|mut f| {
        use std::io::Read;
        f.read(&mut buf)
    }) else {
        return false;
    };
    std::str::from_utf8(&buf[..n]).is_ok_and(alone_in)
}

/// `/proc/loadavg` text, e.g. "0.52 0.58 0.59 1/467 12345": the fourth field is
/// running/total, the reader included.
fn alone_in(loadavg: &str) -> bool {
    loadavg
        .split(' ')
        .nth(3)
        .and_then(|field| field.split_once('/'))
        .and_then(|(running, _)| running.parse::<u32>().ok())
        .is_some_and(|running| running <= 1)
}

/// The CPU the caller is running on right now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// `fork()`, used by the job's pid 1 (single-threaded) to start the job.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: only called from the single-threaded reaper.
    match check(unsafe { libc::fork() })? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on integer arguments.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

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

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain syscall; the fd is owned immediately.
    let sock =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `sock` is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the flags member of the union is the one SIOCGIFFLAGS filled.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
}

pub fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) }).map(drop)
}

pub fn set_dumpable(on: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, on as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Drops every capability from the bounding and ambient sets: no exec from here on can
/// gain one. Needs CAP_SETPCAP, so it comes before [`clear_capabilities`].
pub fn drop_inheritable_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments; EINVAL past the last capability ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    Ok(())
}

/// Empties the permitted, effective and inheritable sets of the calling thread.
pub fn clear_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data match the _LINUX_CAPABILITY_VERSION_3 layout (two u32 words).
    check_long(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) }).map(drop)
}

pub fn clear_supplementary_groups() -> io::Result<()> {
    // SAFETY: an empty list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }).map(drop)
}

pub fn set_rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: valid rlimit struct.
    check(unsafe { libc::setrlimit(resource, &lim) }).map(drop)
}

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

/// A msghdr over `iov` with an SCM_RIGHTS control buffer (`control`, sized here) with
/// room for `fds` descriptors.
fn fd_message(iov: &mut libc::iovec, control: &mut Vec<u8>, fds: usize) -> libc::msghdr {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) } as usize;
    control.clear();
    control.resize(space, 0);
    // SAFETY: msghdr is POD; zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    msg
}

/// Sends `data` (at least one byte) with `fds` attached.
pub fn send_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = Vec::new();
    let msg = fd_message(&mut iov, &mut control, fds.len());
    // SAFETY: msg_control holds CMSG_SPACE(fds.len() ints), so the first header and all
    // the fds fit.
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
    // SAFETY: msg and its buffers are valid for the call; the kernel only reads `data`.
    check_long(unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) } as libc::c_long).map(drop)
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

/// Sends one fd (with a single zero byte).
pub fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    send_fds(sock, &[0], &[fd])
}

/// Receives one fd sent by [`send_fd`]. `Ok(None)` at end of stream or without an fd.
pub fn recv_fd(sock: RawFd) -> io::Result<Option<OwnedFd>> {
    Ok(recv_fds(sock, &mut [0u8; 1], 1)?.and_then(|(_, fds)| fds.into_iter().next()))
}

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

pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall on integers.
    let fd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Wait status and resource usage of a reaped child.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    pub pid: libc::pid_t,
    pub status: libc::c_int,
    pub usage: Usage,
}

/// CPU time and block I/O of every child the caller has waited for, with theirs.
pub fn children_usage() -> io::Result<Usage> {
    let mut usage = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: usage is a valid out-pointer.
    check(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) })?;
    // SAFETY: zero-initialised and filled by the kernel.
    Ok(Usage::from(unsafe { usage.assume_init() }))
}

/// The part of a `struct rusage` the sandbox reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub utime: std::time::Duration,
    pub stime: std::time::Duration,
    pub inblock: u64,
    pub oublock: u64,
}

impl From<libc::rusage> for Usage {
    fn from(usage: libc::rusage) -> Self {
        let tv = |t: libc::timeval| {
            std::time::Duration::new(t.tv_sec as u64, (t.tv_usec as u32).saturating_mul(1000))
        };
        Usage {
            utime: tv(usage.ru_utime),
            stime: tv(usage.ru_stime),
            inblock: usage.ru_inblock as u64,
            oublock: usage.ru_oublock as u64,
        }
    }
}

/// `wait4`; `Ok(None)` when `WNOHANG` found nothing (or no child is left).
pub fn wait4(pid: libc::pid_t, flags: libc::c_int) -> io::Result<Option<Reaped>> {
    let mut status = 0;
    let mut usage = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: status and usage are valid out-pointers.
    let ret = unsafe { libc::wait4(pid, &mut status, flags, usage.as_mut_ptr()) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ECHILD) {
            return Ok(None);
        }
        return Err(err);
    }
    if ret == 0 {
        return Ok(None);
    }
    // SAFETY: zero-initialised and filled by the kernel.
    let usage = Usage::from(unsafe { usage.assume_init() });
    Ok(Some(Reaped {
        pid: ret,
        status,
        usage,
    }))
}

pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on integers.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
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

/// A close-on-exec pipe `(read, write)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two fds.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Blocks (or, with `block = false`, unblocks) the given signals for the calling thread.
pub fn mask_signals(signals: &[libc::c_int], block: bool) -> io::Result<()> {
    let set = sigset(signals);
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: valid sigset.
    check(unsafe { libc::sigprocmask(how, &set, std::ptr::null_mut()) }).map(drop)
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before use.
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
        libc::sigemptyset(set.as_mut_ptr());
        for &s in signals {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        set.assume_init()
    }
}

/// Waits for one of the (blocked) signals; returns its number.
pub fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = sigset(signals);
    loop {
        // SAFETY: valid sigset; a null info pointer is allowed.
        let ret = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        if ret >= 0 {
            return Ok(ret);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Blocks `signals` for the calling thread and returns a close-on-exec signalfd that
/// becomes readable when one of them arrives.
pub fn signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    mask_signals(signals, true)?;
    let set = sigset(signals);
    // SAFETY: valid sigset; -1 asks for a new fd.
    let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) })?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal from a signalfd; returns its number.
pub fn read_signal(fd: RawFd) -> io::Result<libc::c_int> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` has room for one siginfo record.
    let n = unsafe { libc::read(fd, info.as_mut_ptr().cast(), size) };
    if n != size as isize {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the whole record.
    Ok(unsafe { info.assume_init() }.ssi_signo as libc::c_int)
}

/// With `on`, children that exit are reaped by the kernel (SIGCHLD ignored with
/// `SA_NOCLDWAIT`); without, SIGCHLD is back to its default and children must be waited for.
pub fn auto_reap_children(on: bool) -> io::Result<()> {
    // SAFETY: sigaction is POD; zero is a valid empty mask and no flags.
    let mut action: libc::sigaction = unsafe { zeroed() };
    action.sa_sigaction = if on { libc::SIG_IGN } else { libc::SIG_DFL };
    action.sa_flags = if on { libc::SA_NOCLDWAIT } else { 0 };
    // SAFETY: a valid action without handler code; the old action is not read.
    check(unsafe { libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut()) }).map(drop)
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
    let st = unsafe { st.assume_init() };
    Ok(FsSpace {
        bytes_total: st.f_blocks.saturating_mul(st.f_frsize),
        bytes_available: st.f_bavail.saturating_mul(st.f_frsize),
        files_available: st.f_favail,
        files_total: st.f_files,
    })
}

/// Bytes the names of `path`'s extended attributes take (0: it has none). Does not follow
/// a final symlink.
pub fn llistxattr_size(path: &Path) -> io::Result<usize> {
    let p = cstr(path)?;
    // SAFETY: valid NUL-terminated path; a null buffer of size 0 asks only for the size.
    let n = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    check_long(n as libc::c_long).map(|n| n as usize)
}

/// Attaches `image` to a free loop device and returns its path and an open handle. The
/// device detaches itself when the last handle closes and nothing mounts it (autoclear), so
/// keep the handle until the filesystem is mounted.
pub fn loop_attach(image: &std::fs::File) -> io::Result<(std::path::PathBuf, std::fs::File)> {
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
    const LO_FLAGS_AUTOCLEAR: u32 = 4;
    #[repr(C)]
    struct LoopInfo64 {
        lo_device: u64,
        lo_inode: u64,
        lo_rdevice: u64,
        lo_offset: u64,
        lo_sizelimit: u64,
        lo_number: u32,
        lo_encrypt_type: u32,
        lo_encrypt_key_size: u32,
        lo_flags: u32,
        lo_file_name: [u8; 64],
        lo_crypt_name: [u8; 64],
        lo_encrypt_key: [u8; 32],
        lo_init: [u64; 2],
    }
    #[repr(C)]
    struct LoopConfig {
        fd: u32,
        block_size: u32,
        info: LoopInfo64,
        reserved: [u64; 8],
    }
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // The free device can be taken by someone else between GET_FREE and CONFIGURE: retry.
    for _ in 0..16 {
        // SAFETY: ioctl on integers.
        let n = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
        let path = std::path::PathBuf::from(format!("/dev/loop{n}"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        // SAFETY: LoopConfig is POD; zero is valid.
        let mut config: LoopConfig = unsafe { zeroed() };
        config.fd = image.as_raw_fd() as u32;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: `config` matches struct loop_config.
        let ret = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if ret == 0 {
            return Ok((path, dev));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    Err(io::Error::from(io::ErrorKind::ResourceBusy))
}

/// Exits immediately, without running destructors or flushing stdio: for forked children.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
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

/// Duplicates `fd` to a new close-on-exec fd that we own.
pub fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on integers; the result is a fresh fd.
    let new = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
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

/// Resets every signal's disposition to the default. Ignored signals survive exec, and the
/// Rust runtime ignores SIGPIPE: a job must not inherit that (`yes | head` would complain
/// about broken pipes instead of ending quietly).
pub fn reset_signal_dispositions() -> io::Result<()> {
    // The raw syscall: glibc's wrappers refuse its reserved real-time signals (32, 33),
    // which would otherwise stay as inherited.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let action = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: a valid kernel sigaction (SIG_DFL, no handler code) for a valid signal
        // number, with the kernel's 8-byte signal set size; the old action is not read.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &action,
                std::ptr::null::<u8>(),
                8usize,
            )
        })?;
    }
    Ok(())
}

/// An exec prepared in full before the process that makes it exists. The job's process is
/// started with `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does: it borrows pid 1's
/// memory until its exec (no page tables copied, none torn down by the exec) and pid 1
/// waits meanwhile. So the child may not allocate or take a lock: everything it touches is
/// built here, and it makes raw syscalls only.
pub struct PreparedExec {
    /// Tried in order, as `execvp` does with `PATH`.
    candidates: Vec<CString>,
    /// For the exec failure message.
    argv0: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    dev_null: CString,
    uid: u32,
    gid: u32,
    unblock: libc::sigset_t,
}

/// What the child reads, built from a [`PreparedExec`] right before the clone.
struct ExecArgs<'a> {
    exec: &'a PreparedExec,
    argv: Vec<*const libc::c_char>,
    env: Vec<*const libc::c_char>,
}

impl PreparedExec {
    /// The first of `candidates` that can be executed is run with `argv` and exactly `env`
    /// (a candidate that does not exist or may not be executed passes the turn, as with
    /// `execvp`), as `uid`/`gid`, with no capabilities, `no_new_privs`, its own session,
    /// `/dev/null` on stdin, `unblock` unblocked and only fds 0-2 open.
    pub fn new(
        candidates: &[String],
        argv: &[String],
        env: &[String],
        uid: u32,
        gid: u32,
        unblock: &[libc::c_int],
    ) -> io::Result<Self> {
        let to_c = |v: &[String]| -> io::Result<Vec<CString>> {
            v.iter().map(|s| os_cstr(OsStr::new(s))).collect()
        };
        Ok(PreparedExec {
            candidates: to_c(candidates)?,
            argv0: os_cstr(OsStr::new(argv.first().map_or("", String::as_str)))?,
            argv: to_c(argv)?,
            env: to_c(env)?,
            dev_null: CString::from(c"/dev/null"),
            uid,
            gid,
            unblock: sigset(unblock),
        })
    }

    /// Starts the process; returns once it has exec'd (or died trying: its exit status says
    /// so, 127 or 126, and its stderr says why).
    pub fn spawn(&self) -> io::Result<libc::pid_t> {
        let nul_terminated = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let args = ExecArgs {
            exec: self,
            argv: nul_terminated(&self.argv),
            env: nul_terminated(&self.env),
        };
        // The child's own stack (it must not run on ours, which we return through).
        const STACK: usize = 64 << 10;
        let mut stack = vec![0u8; STACK];
        // SAFETY: the stack grows down from its (16-byte aligned) top.
        let top = unsafe { stack.as_mut_ptr().add(STACK) };
        let top = (top as usize & !15) as *mut libc::c_void;
        // SAFETY: `exec_child` only reads `args` and makes raw syscalls; with CLONE_VFORK
        // we are suspended until it execs or exits, so `args` and `stack` outlive its use.
        let pid = unsafe {
            libc::clone(
                exec_child,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &args as *const ExecArgs<'_> as *mut libc::c_void,
            )
        };
        check(pid)
    }
}

/// The vfork child of [`PreparedExec::spawn`]: raw syscalls only, nothing allocated.
extern "C" fn exec_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ExecArgs` that `spawn` keeps alive until we exec or exit.
    let args = unsafe { &*(arg as *const ExecArgs<'_>) };
    let exec = args.exec;
    let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: syscalls on integers and on NUL-terminated strings and arrays
    // that `args` owns.
    unsafe {
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_UNBLOCK,
            &exec.unblock,
            std::ptr::null_mut::<libc::sigset_t>(),
            8usize,
        ) < 0
        {
            child_fail(b"sigprocmask", None, errno(), 127);
        }
        // Own session: the job cannot signal or read the terminal of anything outside.
        libc::syscall(libc::SYS_setsid);
        let null = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            exec.dev_null.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if null < 0 || libc::syscall(libc::SYS_dup2, null, 0) < 0 {
            child_fail(b"stdin from /dev/null", None, errno(), 127);
        }
        if libc::syscall(libc::SYS_setresgid, exec.gid, exec.gid, exec.gid) < 0
            || libc::syscall(libc::SYS_setresuid, exec.uid, exec.uid, exec.uid) < 0
        {
            child_fail(b"setresuid", None, errno(), 127);
        }
        if clear_capabilities().is_err() {
            child_fail(b"dropping capabilities", None, errno(), 127);
        }
        if libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            child_fail(b"no_new_privs", None, errno(), 127);
        }
        // Only 0-2 reach the job, whatever its supervisor had open without close-on-exec.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let mut failure = libc::ENOENT;
        for path in &exec.candidates {
            libc::syscall(
                libc::SYS_execve,
                path.as_ptr(),
                args.argv.as_ptr(),
                args.env.as_ptr(),
            );
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                // Remembered, but a later candidate may still do.
                libc::EACCES => failure = libc::EACCES,
                other => {
                    failure = other;
                    break;
                }
            }
        }
        child_fail(
            b"exec",
            Some(exec.argv0.as_bytes()),
            failure,
            if failure == libc::ENOENT { 127 } else { 126 },
        )
    }
}

/// `corral-sandbox: WHAT [DETAIL]: errno N` on stderr, then `_exit(code)`; from a stack
/// buffer, so a vfork child can call it.
fn child_fail(what: &[u8], detail: Option<&[u8]>, errno: i32, code: i32) -> ! {
    let mut buf = [0u8; 512];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"corral-sandbox: ");
    put(what);
    if let Some(d) = detail {
        put(b" ");
        put(d);
    }
    put(b": ");
    if let Some(text) = errno_text(errno) {
        put(text);
        put(b" (");
    }
    put(b"errno ");
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    let mut n = errno.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[i..]);
    if errno_text(errno).is_some() {
        put(b")");
    }
    put(b"\n");
    // SAFETY: writes our own buffer, then leaves without running anything of the parent's
    // (`_exit` is the bare syscall).
    unsafe {
        libc::syscall(libc::SYS_write, 2, buf.as_ptr(), len);
        libc::_exit(code)
    }
}

/// The usual text of the errors an exec and its preparations meet (`strerror` may take
/// locale locks, which a vfork child must not).
fn errno_text(errno: i32) -> Option<&'static [u8]> {
    Some(match errno {
        libc::EPERM => b"Operation not permitted",
        libc::ENOENT => b"No such file or directory",
        libc::E2BIG => b"Argument list too long",
        libc::ENOEXEC => b"Exec format error",
        libc::ENOMEM => b"Cannot allocate memory",
        libc::EACCES => b"Permission denied",
        libc::ENOTDIR => b"Not a directory",
        libc::EINVAL => b"Invalid argument",
        libc::EMFILE => b"Too many open files",
        libc::ETXTBSY => b"Text file busy",
        libc::ELOOP => b"Too many levels of symbolic links",
        libc::ENAMETOOLONG => b"File name too long",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg_running_count_says_whether_we_run_alone() {
        assert!(alone_in("0.52 0.58 0.59 1/467 12345\n"));
        assert!(!alone_in("2.08 2.18 2.25 3/138 8797\n"));
        assert!(!alone_in("garbage"), "unreadable means not alone");
    }

    #[test]
    fn a_cpu_set_without_its_only_cpu_is_none() {
        let all = CpuSet::current().unwrap();
        let cpu = current_cpu().unwrap();
        // SAFETY: counts the bits of a valid set.
        let count = |s: &CpuSet| unsafe { libc::CPU_COUNT(&s.0) };
        match all.without(cpu) {
            Some(rest) => assert_eq!(count(&rest), count(&all) - 1),
            None => assert_eq!(count(&all), 1),
        }
    }
}
