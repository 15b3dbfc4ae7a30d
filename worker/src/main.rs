//! `corral`: the command everyone types. It runs `corral sandbox` itself, from a binary
//! that holds little more than the sandbox, and hands every other command, unchanged, to
//! `corral-worker` installed beside it (the whole command line and the worker).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use clap::Parser;
use corral_worker::cli::SandboxCli;
use corral_worker::cmd;
use corral_worker::exit::{self, exit_code};

/// The binary every command but `sandbox` runs in, found beside this one.
const WORKER_BIN: &str = "corral-worker";

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "corral".into());
    if args.next().as_deref() == Some(OsStr::new(SandboxCli::COMMAND)) {
        // It logs nothing (its output is the job's, then one JSON line): no subscriber.
        let cli = SandboxCli::parse_from(std::env::args_os().skip(1));
        return exit_code(cmd::sandbox::run(cli.args));
    }
    // `current_exe` resolves symlinks: the worker binary sits beside the real file.
    let worker = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(WORKER_BIN),
        Err(err) => {
            eprintln!("corral: error: locating the corral binary: {err}");
            return ExitCode::from(exit::INTERNAL);
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
    ExitCode::from(exit::INTERNAL)
}
