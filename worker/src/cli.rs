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
    /// Work with source bundles in a store.
    #[command(subcommand)]
    Source(SourceCommand),
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

#[derive(Debug, Subcommand)]
pub enum SourceCommand {
    /// Pack a directory (deterministically) or check a tar(.gz) bundle, upload it to the
    /// store and print its digest, the `source.digest` of a job.
    Push(SourcePushArgs),
}

#[derive(Debug, clap::Args)]
pub struct SourcePushArgs {
    /// A directory to pack, or a .tar / .tar.gz bundle to upload as it is.
    pub path: PathBuf,
    /// Store URL: oci-dir:/path, oci://host:port/repo or oci+http://host:port/repo.
    #[arg(
        long,
        env = "CORRAL_STORE",
        default_value = "oci-dir:/var/lib/corral/store"
    )]
    pub store: String,
    /// Registry user name.
    #[arg(long, env = "CORRAL_STORE_USERNAME")]
    pub username: Option<String>,
    /// File holding the registry password (first line).
    #[arg(long, env = "CORRAL_STORE_PASSWORD_FILE", requires = "username")]
    pub password_file: Option<PathBuf>,
}
