//! Signal masks, dispositions, waiting for signals and signalfds.

use super::{check, check_long};
use std::io;
use std::mem::{MaybeUninit, zeroed};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

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

pub(super) fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
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
