//! Processes: fork and clone, death signals, dumpability, rlimits, waiting, usage, kill,
//! and the start-up a `#![no_main]` binary needs.

use super::{check, check_long};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Outcome of a fork-like call.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// `clone(flags | SIGCHLD)` with fork semantics (the child continues on a copy of the
/// stack). Only sound in a single-threaded process, which is why the worker re-executes a
/// shim instead of calling this.
pub fn clone_fork(flags: libc::c_int) -> io::Result<Forked> {
    // SAFETY: a null stack makes clone behave like fork; the caller (the shim) is
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

/// `fork()`, used by the job's pid 1 (single-threaded) to start the job.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: only called from the single-threaded init (pid 1).
    match check(unsafe { libc::fork() })? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

pub fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Starts a new session (and process group) led by the caller.
pub fn setsid() -> io::Result<()> {
    // SAFETY: plain syscall without arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

pub fn set_dumpable(on: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, on as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Sets the calling process's umask (inherited across fork and exec); returns the old one.
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and touches no memory.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

pub fn set_rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: valid rlimit struct.
    check(unsafe { libc::setrlimit(resource, &lim) }).map(drop)
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

/// Exits immediately, without running destructors or flushing stdio: for forked children.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// The parts of std's start-up that a `#![no_main]` binary (the `corral` front command)
/// still needs: fds 0-2 open (a closed one would be reused by the first file it opens, and
/// its output written into that file) and SIGPIPE ignored (a closed stdout is an error to
/// report, not death before the cleanup). Aborts when a closed fd 0-2 cannot be reopened
/// where it was: nothing sane is left to do.
pub fn c_main_start() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: `fds` is a valid array of three pollfds for the duration of the call.
    let polled = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) };
    if polled >= 0 {
        for pfd in fds.iter().filter(|p| p.revents & libc::POLLNVAL != 0) {
            // SAFETY: opens a file; the path is a NUL-terminated literal.
            let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            if null != pfd.fd {
                std::process::abort();
            }
        }
    }
    // SAFETY: setting a signal to SIG_IGN runs no code of ours.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}
