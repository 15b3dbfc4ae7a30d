//! `corral`: the command everyone types. It runs `corral sandbox` itself, from a binary
//! that holds little more than the sandbox, and hands every other command, unchanged, to
//! `corral-worker` installed beside it (the whole command line and the worker). The
//! worker's sandbox zygote runs from it too (`__sandbox-zygote`, `__sandbox-shim`).
//!
//! `main` is the C entry point: std's own start-up reads `/proc/self/maps` and sets up a
//! stack overflow handler, ~0.09 ms of a sandbox run that takes ~4. What of it this
//! program relies on is done by [`corral_sandbox::c_main_start`]; `std::env::args` still
//! works, as glibc hands std the arguments before `main`.
#![no_main]
#![deny(unsafe_code)]

use std::ffi::{OsStr, c_char, c_int};
use std::os::unix::process::CommandExt;

use clap::Parser;
use corral_worker::cli::{SandboxArgs, SandboxCli};
use corral_worker::cmd;
use corral_worker::exit;

/// The binary every command but `sandbox` runs in, found beside this one.
const WORKER_BIN: &str = "corral-worker";
/// glibc's cap on malloc arenas, read when a process starts.
const MALLOC_ARENA_MAX: &str = "MALLOC_ARENA_MAX";

// The C entry point is `no_mangle`, which the unsafe-code lint counts as unsafe: allowed
// for this one function, whose body is safe code.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    corral_sandbox::c_main_start();
    // Not a return: std::process::exit flushes stdout first.
    std::process::exit(c_int::from(run()))
}

fn run() -> u8 {
    // For `corral sandbox --trace-timings`: the first mark, before the arguments are read.
    let started = corral_sandbox::trace::now();
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "corral".into());
    let first = args.next();
    // The worker's sandbox zygote, and a shim exec'd without one, run from this binary
    // rather than the worker's: a smaller process to keep for the worker's life and to fork
    // for every job (`SandboxHelper::SelfExe`).
    if first.as_deref() == Some(OsStr::new(corral_sandbox::ZYGOTE_ARG)) {
        corral_sandbox::zygote_main();
    }
    if first.as_deref() == Some(OsStr::new(corral_sandbox::SHIM_ARG)) {
        corral_sandbox::shim_main();
    }
    if first.as_deref() == Some(OsStr::new(SandboxCli::COMMAND)) {
        // It logs nothing (its output is the job's, then one JSON line): no subscriber.
        let rest: Vec<_> = args.collect();
        let parsed = SandboxArgs::parse_plain(&rest)
            .unwrap_or_else(|| SandboxCli::parse_from(std::env::args_os().skip(1)).args);
        return exit::code(cmd::sandbox::run_timed(parsed, Some(started)));
    }
    // `current_exe` resolves symlinks: the worker binary sits beside the real file.
    let worker = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(WORKER_BIN),
        Err(err) => {
            eprintln!("corral: error: locating the corral binary: {err}");
            return exit::INTERNAL;
        }
    };
    let mut command = std::process::Command::new(&worker);
    command.arg0(arg0).args(std::env::args_os().skip(1));
    // A long-lived `corral work` keeps what glibc's per-thread malloc arenas hold after the
    // jobs' threads are gone: 2 arenas instead of up to 8 per core bring an idle worker
    // from ~9 to ~6 MiB of anonymous memory (`scripts/bench-idle`). An operator's own
    // setting wins.
    let work = std::env::args_os()
        .skip(1)
        .find(|a| !a.as_encoded_bytes().starts_with(b"-"))
        .is_some_and(|a| a == "work");
    if work && std::env::var_os(MALLOC_ARENA_MAX).is_none() {
        command.env(MALLOC_ARENA_MAX, "2");
    }
    let err = command.exec();
    eprintln!(
        "corral: error: running {}: {err} (`{WORKER_BIN}` is installed beside `corral`)",
        worker.display()
    );
    exit::INTERNAL
}
