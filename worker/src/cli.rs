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
    /// Write a directory (an overlay upper dir, or a plain tree with --plain) as a
    /// deterministic OCI layer and print its digests as JSON.
    Snapshot(SnapshotArgs),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayerCompression {
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    Skip,
    Refuse,
    Keep,
}

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// The directory to snapshot.
    pub dir: PathBuf,
    /// Where to write the layer blob (written to FILE.partial, renamed when complete).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Source-date epoch: later mtimes are clamped to it.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub epoch: u64,
    /// Layer compression (media type `…tar+gzip` or `…tar+zstd`).
    #[arg(long, value_enum, default_value_t = LayerCompression::Gzip)]
    pub compression: LayerCompression,
    /// Compression level (default: 6 for gzip, 3 for zstd).
    #[arg(long)]
    pub level: Option<i32>,
    /// Compression threads (default: the available CPUs). The output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Snapshot a plain tree: no whiteout or opaque-directory semantics.
    #[arg(long)]
    pub plain: bool,
    /// Keep setuid/setgid bits (default: strip them and report the count).
    #[arg(long)]
    pub keep_setid: bool,
    /// What to do with device nodes.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Skip)]
    pub devices: DeviceChoice,
    /// Fail once the compressed layer would exceed this many bytes.
    #[arg(long)]
    pub max_output_bytes: Option<u64>,
    /// Fail once the uncompressed tar would exceed this many bytes.
    #[arg(long)]
    pub max_tar_bytes: Option<u64>,
    /// Map a host uid to an in-sandbox uid (HOST:INNER), repeatable.
    #[arg(long, value_parser = parse_id_pair)]
    pub map_uid: Vec<(u32, u32)>,
    /// Map a host gid to an in-sandbox gid (HOST:INNER), repeatable.
    #[arg(long, value_parser = parse_id_pair)]
    pub map_gid: Vec<(u32, u32)>,
}

fn parse_id_pair(s: &str) -> Result<(u32, u32), String> {
    let (host, inner) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:INNER"))?;
    let parse = |v: &str| v.parse::<u32>().map_err(|e| format!("{v:?}: {e}"));
    Ok((parse(host)?, parse(inner)?))
}
