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
    /// Run one command in a sandbox over a root filesystem and print its outcome as JSON.
    Sandbox(Box<SandboxArgs>),
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
pub struct SandboxArgs {
    /// Read-only root filesystem (lowest layer).
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Extra read-only layers above the rootfs, top first.
    #[arg(long = "layer")]
    pub layers: Vec<PathBuf>,
    /// Upper dir that keeps the command's changes (and a `work` dir beside it is created).
    /// Default: a temporary dir on /dev/shm (tmpfs), deleted afterwards.
    #[arg(long)]
    pub upper: Option<PathBuf>,
    /// Put the upper dir on a loop filesystem of this size (e.g. `512MiB`) under this dir.
    #[arg(long, value_name = "SIZE", conflicts_with = "upper")]
    pub disk: Option<corral_protocol::ByteSize>,
    /// Where `--disk` creates the job dir.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/corral-jobs")]
    pub disk_dir: PathBuf,
    /// Memory limit (RAM, no swap).
    #[arg(long, default_value = "2GiB")]
    pub memory: corral_protocol::ByteSize,
    /// Maximum processes and threads.
    #[arg(long, default_value_t = 512)]
    pub pids: u64,
    /// CPU quota in cores.
    #[arg(long, default_value_t = 1.0)]
    pub cpus: f64,
    /// Wall-clock limit in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub wall: f64,
    /// CPU-seconds limit of the whole job.
    #[arg(long)]
    pub cpu_seconds: Option<u64>,
    /// Size of the private /tmp.
    #[arg(long, default_value = "256MiB")]
    pub tmp: corral_protocol::ByteSize,
    #[arg(long, value_enum, default_value_t = SandboxNetwork::None)]
    pub network: SandboxNetwork,
    /// Host uid (and gid) the command runs as; it is uid 1000 inside.
    #[arg(long, default_value_t = 65_000)]
    pub uid: u32,
    /// Working directory inside the sandbox.
    #[arg(long, default_value = "/")]
    pub cwd: PathBuf,
    /// Environment variable `KEY=VALUE` (repeatable); PATH and HOME have defaults.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read-only bind `HOST:SANDBOX` (repeatable).
    #[arg(long = "bind", value_name = "HOST:SANDBOX")]
    pub binds: Vec<String>,
    /// Do not copy the command's stdout/stderr to ours.
    #[arg(long)]
    pub quiet: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SandboxNetwork {
    None,
    Loopback,
}
