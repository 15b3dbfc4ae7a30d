//! The job's exec, prepared before the process that makes it exists.

use super::caps::clear_capabilities;
use super::signal::sigset;
use super::{check, os_cstr};
use std::ffi::{CString, OsStr};
use std::io;

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
        // The child's own stack (it must not run on ours, which we return through). Left
        // uninitialised: zeroing it would touch (fault in) all of its pages, where the
        // child uses one or two.
        const STACK: usize = 64 << 10;
        let mut stack: Vec<u8> = Vec::with_capacity(STACK);
        // SAFETY: the allocation holds at least STACK bytes; the stack grows down from its
        // (16-byte aligned) top, and nothing on our side ever reads those bytes.
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
