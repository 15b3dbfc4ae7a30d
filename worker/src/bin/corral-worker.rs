//! `corral-worker`: the whole `corral` command line, the worker included. `corral` hands it
//! every command but `sandbox`; it is the binary the worker's sandbox shims are started
//! from. Reads as a pipeline: parse the command line, install logging, run one command,
//! turn its outcome into an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use corral_worker::cli::{Cli, Command};
use corral_worker::{cmd, logging};

fn main() -> ExitCode {
    // The hidden sandbox shim must start before anything spawns a thread.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(corral_sandbox::SHIM_ARG))
    {
        corral_sandbox::shim_main();
    }
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(corral_sandbox::ZYGOTE_ARG))
    {
        corral_sandbox::zygote_main();
    }
    let cli = Cli::parse();
    // `work` installs its logging once its config says which format.
    if !matches!(cli.command, Command::Sandbox(_) | Command::Work(_)) {
        logging::install(cli.global.log_format(), cli.global.verbose);
    }
    let outcome = match cli.command {
        Command::Validate(args) => cmd::validate::run(args),
        Command::Schema(args) => cmd::schema::run(args),
        Command::Replay(args) => cmd::replay::run(args),
        Command::Snapshot(args) => cmd::snapshot::run(args),
        Command::Base(args) => cmd::base::run(args),
        Command::Source(command) => cmd::source::run(command),
        Command::CheckConfig(args) => cmd::check_config::run(*args, &cli.global),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Sandbox(args) => cmd::sandbox::run(*args),
        Command::Work(args) => cmd::work::run(*args, &cli.global),
        Command::Submit(args) => cmd::submit::run(args),
        Command::Events(args) => cmd::events::run(args),
        Command::Run(args) => cmd::run::run(*args),
        Command::BenchSandbox(args) => cmd::bench_sandbox::run(*args),
    };
    ExitCode::from(corral_worker::exit::code(outcome))
}
