//! `corral`: the build-farm worker's command line. Reads as a pipeline: parse the command
//! line, install logging, run one command, turn its outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;
use corral_worker::cli::{Cli, Command};
use corral_worker::{cmd, exit, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::install(cli.log_format, cli.verbose);
    let outcome = match cli.command {
        Command::Validate(args) => cmd::validate::run(args),
        Command::Schema(args) => cmd::schema::run(args),
        Command::Snapshot(args) => cmd::snapshot::run(args),
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("corral: error: {err:#}");
            ExitCode::from(exit::INTERNAL)
        }
    }
}
