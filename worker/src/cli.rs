//! The command line: every subcommand and its flags. Each subcommand's behaviour lives in
//! `cmd/<name>.rs`; this file only says what can be typed.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "corral",
    version,
    about = "A build-farm worker: runs customer builds in a sandbox and snapshots their output as OCI layers",
    propagate_version = true
)]
pub struct Cli {
    /// Log format: human text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CORRAL_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// More log detail (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a job message (JSON) against the wire protocol and print the typed error, if any.
    Validate(ValidateArgs),
    /// Print or write the JSON Schemas of the wire messages.
    Schema(SchemaArgs),
    /// Consume build jobs from RabbitMQ until SIGTERM (then drain).
    Work(WorkArgs),
    /// Publish a job message to RabbitMQ; with --wait, print its result.
    Submit(SubmitArgs),
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Job message files (JSON). `-` reads standard input.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print each verdict as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// Write every schema into this directory (as `<name>.schema.json`) instead of printing one.
    #[arg(long, conflicts_with = "message")]
    pub write: Option<PathBuf>,
    /// Which message's schema to print.
    #[arg(value_parser = ["job", "result", "event", "log", "cancel"], default_value = "job")]
    pub message: String,
}

#[derive(Debug, clap::Args)]
pub struct WorkArgs {
    #[command(flatten)]
    pub amqp: crate::amqp::AmqpSettings,
    /// What runs a job. `process` runs the command as a plain child process WITHOUT any
    /// sandbox (tests and benchmarks only).
    #[arg(long, value_enum, env = "CORRAL_RUNNER")]
    pub runner: RunnerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunnerKind {
    /// Unsandboxed child process (tests and benchmarks only).
    Process,
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The job message (JSON). `-` reads standard input.
    pub job: PathBuf,
    /// Wait for the job's result (through a reply queue) and print it as JSON.
    #[arg(long)]
    pub wait: bool,
    /// Broker URL.
    #[arg(
        long,
        alias = "amqp",
        env = "CORRAL_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of the exchange names (`<prefix>.jobs`).
    #[arg(long, env = "CORRAL_AMQP_PREFIX", default_value = "corral")]
    pub prefix: String,
    /// With --wait: give up after this long (exit 75).
    #[arg(long, default_value = "1h", value_parser = crate::amqp::parse_duration)]
    pub timeout: std::time::Duration,
}
