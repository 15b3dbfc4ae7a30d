//! `corral`: the command everyone types. It runs `corral sandbox` itself, from a binary
//! that holds little more than the sandbox, and hands every other command, unchanged, to
//! `corral-worker` installed beside it (the whole command line and the worker).
//!
//! `main` is the C entry point: std's own start-up reads `/proc/self/maps` and sets up a
//! stack overflow handler, ~0.09 ms of a sandbox run that takes ~4. What of it this
//! program relies on is done here (see [`start`]); `std::env::args` still works, as glibc
//! hands std the arguments before `main`.
#![no_main]

use std::ffi::{OsStr, c_char, c_int};
use std::os::unix::process::CommandExt;

use clap::Parser;
use corral_worker::cli::{SandboxArgs, SandboxCli};
use corral_worker::cmd;
use corral_worker::exit;

/// The binary every command but `sandbox` runs in, found beside this one.
const WORKER_BIN: &str = "corral-worker";

#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    start();
    // Not a return: std::process::exit flushes stdout first.
    std::process::exit(c_int::from(run()))
}

/// The parts of std's start-up this program needs: fds 0-2 open (a closed one would be
/// reused by the first file we open, and the outcome written into it), and SIGPIPE
/// ignored (a closed stdout is an error to report, not death before the cleanup).
fn start() {
    use nix::libc;
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
                // SAFETY: abort takes no arguments; a closed fd 0-2 that cannot be reopened
                // where it was leaves nothing sane to do.
                unsafe { libc::abort() };
            }
        }
    }
    // SAFETY: setting a signal to SIG_IGN runs no code of ours.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

fn run() -> u8 {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "corral".into());
    if args.next().as_deref() == Some(OsStr::new(SandboxCli::COMMAND)) {
        // It logs nothing (its output is the job's, then one JSON line): no subscriber.
        let rest: Vec<_> = args.collect();
        let parsed = SandboxArgs::parse_plain(&rest)
            .unwrap_or_else(|| SandboxCli::parse_from(std::env::args_os().skip(1)).args);
        return exit::code(cmd::sandbox::run(parsed));
    }
    // `current_exe` resolves symlinks: the worker binary sits beside the real file.
    let worker = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(WORKER_BIN),
        Err(err) => {
            eprintln!("corral: error: locating the corral binary: {err}");
            return exit::INTERNAL;
        }
    };
    let err = std::process::Command::new(&worker)
        .arg0(arg0)
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!(
        "corral: error: running {}: {err} (`{WORKER_BIN}` is installed beside `corral`)",
        worker.display()
    );
    exit::INTERNAL
}
