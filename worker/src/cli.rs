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
    /// Validate a worker config file (plus `CORRAL_*` environment and flags) and print the
    /// effective config with secrets redacted; exit 65 naming the bad key otherwise.
    CheckConfig(CheckConfigArgs),
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
pub struct CheckConfigArgs {
    /// The TOML config file.
    pub file: PathBuf,
    /// Print nothing on success (for `validate:` in Ansible and scripts).
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub flags: crate::config::ConfigFlags,
}
