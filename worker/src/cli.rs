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
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts.
#[derive(Debug, clap::Args)]
pub struct GlobalArgs {
    /// Log format: human text or one JSON object per line (`log.format`; default text).
    #[arg(long, global = true, value_enum, env = "CORRAL_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// More log detail (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl GlobalArgs {
    /// The format of commands that read no config.
    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or(LogFormat::Text)
    }

    /// `--log-format` as a layer of the config. clap also fills it from `CORRAL_LOG_FORMAT`,
    /// which the config's environment layer reads itself: only a value the variable does not
    /// already give came from the command line.
    pub fn config_flags(&self) -> Vec<crate::config::FlagValue> {
        let Some(format) = self.log_format else {
            return Vec::new();
        };
        let text = match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        if std::env::var("CORRAL_LOG_FORMAT").is_ok_and(|v| v == text) {
            return Vec::new();
        }
        vec![crate::config::FlagValue::new(
            "log.format",
            text,
            "--log-format",
        )]
    }
}

/// `corral sandbox …` on its own. Building the whole command tree costs about a third of a
/// millisecond, a measurable share of a sandbox's lifecycle, so `main` parses this command
/// with this parser alone when it comes first; it accepts exactly what `corral sandbox`
/// accepts under [`Cli`] (the global flags included).
#[derive(Debug, Parser)]
#[command(
    name = "corral",
    bin_name = "corral sandbox",
    version,
    about = "Run one command in a sandbox over a root filesystem and print its outcome as JSON"
)]
pub struct SandboxCli {
    /// Accepted for symmetry with the other commands; `corral sandbox` logs nothing.
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub args: SandboxArgs,
}

impl SandboxCli {
    /// The name `main` looks for in the first argument.
    pub const COMMAND: &str = "sandbox";
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
    /// Run one job through the whole pipeline locally (sandbox, snapshot, store) and print
    /// its result. Fixture bases and bundles are created on first use.
    Replay(ReplayArgs),
    /// Write a directory (an overlay upper dir, or a plain tree with --plain) as a
    /// deterministic OCI layer and print its digests as JSON.
    Snapshot(SnapshotArgs),
    /// Build, import and list bases: the read-only root filesystems builds run on.
    #[command(subcommand)]
    Base(BaseCommand),
    /// Work with source bundles in a store.
    #[command(subcommand)]
    Source(SourceCommand),
    /// Validate a worker config file (plus `CORRAL_*` environment and flags) and print the
    /// effective config with secrets redacted; exit 65 naming the bad key otherwise.
    CheckConfig(Box<CheckConfigArgs>),
    /// Check that this host can run builds (kernel, namespaces, overlayfs, cgroups, seccomp,
    /// disk limits, tools, data dir; with --config also the broker and the store), one line
    /// per check with the fix beside each failure. Exit 0 when nothing fails, 1 otherwise.
    Doctor(DoctorArgs),
    /// Run one command in a sandbox over a root filesystem and print its outcome as JSON.
    Sandbox(Box<SandboxArgs>),
    /// Consume build jobs from RabbitMQ until SIGTERM (then drain).
    Work(Box<WorkArgs>),
    /// Publish a job message to RabbitMQ; with --wait, print its result.
    Submit(SubmitArgs),
    /// Show the workers' events (alerts and lifecycle) from the broker's events exchange.
    Events(EventsArgs),
    /// Run an image from the store as an app server in the sandbox, with one published
    /// port, until SIGINT/SIGTERM (or it ends for good).
    Run(Box<RunArgs>),
    /// The in-worker sandbox start benchmark (`scripts/bench-sandbox` runs it).
    #[command(hide = true)]
    BenchSandbox(Box<crate::cmd::bench_sandbox::BenchSandboxArgs>),
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
pub struct ReplayArgs {
    /// The job message (JSON), e.g. fixtures/jobs/python-app.json.
    pub job: PathBuf,
    /// Store URL (`store.url`; default: the config's, i.e. `oci-dir:<data dir>/store`).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// The worker's data dir (`data_dir`: bases, store, caches, job dirs).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Rebuild even when the action cache has this job's inputs.
    #[arg(long)]
    pub no_cache: bool,
    /// Print the JobResult as JSON on stdout (the build's output goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Write the job's events (`corral.event.v1`, alerts and lifecycle) to FILE as JSON
    /// lines while the job runs; `-` writes them to stdout, between the build's output (or,
    /// with --json, before the result). Alerts are also printed on stderr as human lines,
    /// with or without this flag.
    #[arg(long, value_name = "FILE|-")]
    pub events: Option<PathBuf>,
    /// A worker config file (TOML) to take limits, sandbox and store settings from.
    #[arg(long, env = "CORRAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Never install a missing host package (debootstrap, python3-venv) with apt; stop and
    /// name it instead. Installing happens only as root on Debian or Ubuntu.
    #[arg(long, env = "CORRAL_NO_INSTALL", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_install: bool,
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print the report as one JSON object (stable keys; see `corral_worker::doctor`).
    #[arg(long)]
    pub json: bool,
    /// A worker config file: its data dir, cgroup parent, broker and store are checked.
    #[arg(long, env = "CORRAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data dir to check (default: the config's, else /var/lib/corral).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ReplayArgs {
    /// The config keys these flags set.
    pub fn config_flags(&self) -> Vec<crate::config::FlagValue> {
        use crate::config::FlagValue;
        let mut out = Vec::new();
        if let Some(dir) = &self.data_dir {
            let dir = dir.display().to_string();
            out.push(FlagValue::new("data_dir", dir, "--data-dir"));
        }
        if let Some(store) = &self.store {
            out.push(FlagValue::new("store.url", store.as_str(), "--store"));
        }
        out
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// An image in the store: a tag (e.g. `python-app`, what a replay stored) or a
    /// `sha256:` manifest digest.
    pub image: String,
    /// The host address the app is reached on; connections are forwarded to `$PORT` inside.
    #[arg(
        long,
        value_name = "HOST_ADDR:HOST_PORT",
        default_value = "127.0.0.1:8080"
    )]
    pub publish: std::net::SocketAddr,
    /// The port the app listens on inside (its `$PORT`).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Environment variable `KEY=VALUE` (repeatable), over the image's.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Memory limit (RAM, no swap).
    #[arg(long, default_value = "512MiB")]
    pub memory: corral_protocol::ByteSize,
    /// Maximum processes and threads.
    #[arg(long, default_value_t = 256)]
    pub pids: u64,
    /// CPU quota in cores.
    #[arg(long, default_value_t = 1.0)]
    pub cpus: f64,
    /// Size of the app's writable layer and of its /tmp (tmpfs, charged to its memory).
    #[arg(long, default_value = "64MiB")]
    pub disk: corral_protocol::ByteSize,
    /// Seconds the app has to listen on `$PORT` before it is stopped (`boot_timeout`).
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub boot_timeout: f64,
    /// Seconds between SIGTERM and SIGKILL when the app is stopped.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub grace: f64,
    /// Restart the app when it crashes, with exponential backoff (`crash_loop` ends it).
    #[arg(long, value_enum, default_value_t = RestartPolicy::No)]
    pub restart: RestartPolicy,
    /// Ready means this path answers HTTP 2xx on `$PORT` (e.g. `/healthz`).
    #[arg(long, value_name = "/PATH")]
    pub health_path: Option<String>,
    /// How connections reach the app: `auto` routes them through the kernel (a link into
    /// the app's namespace and a DNAT rule) when run as root for an IPv4 address and the app
    /// listens on every address inside, else copies them in userspace; `userspace` always
    /// copies (as with Docker's userland proxy).
    #[arg(long, value_enum, default_value_t = crate::app::route::Forwarding::Auto)]
    pub forwarding: crate::app::route::Forwarding,
    /// Let the app reach HOST:PORT through an egress proxy of its own on its loopback, as
    /// builds do (repeatable; within the config's `[egress] allow`; `HTTP_PROXY` and
    /// `HTTPS_PROXY` set). Without it the app reaches nothing outside.
    #[arg(long = "egress", value_name = "HOST:PORT")]
    pub egress: Vec<String>,
    /// The project the app belongs to: it runs as that project's uid.
    #[arg(long, default_value = "demo")]
    pub project: String,
    /// The app's id in events (default: `app-<project>`).
    #[arg(long)]
    pub app_id: Option<String>,
    /// Write every lifecycle and alert event (`corral.event.v1`) as JSON lines to FILE as it
    /// happens; `-` writes them to stdout. Human lines always go to stderr.
    #[arg(long, value_name = "FILE|-")]
    pub events: Option<PathBuf>,
    /// Store URL (`store.url`; default: the config's, i.e. `oci-dir:<data dir>/store`).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// The worker's data dir (the layer cache is `<data dir>/layers`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A worker config file (TOML) to take sandbox and store settings from.
    #[arg(long, env = "CORRAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The command and its arguments, instead of the image's Entrypoint and Cmd.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestartPolicy {
    No,
    OnFailure,
}

impl RunArgs {
    /// The config keys these flags set.
    pub fn config_flags(&self) -> Vec<crate::config::FlagValue> {
        use crate::config::FlagValue;
        let mut out = Vec::new();
        if let Some(dir) = &self.data_dir {
            let dir = dir.display().to_string();
            out.push(FlagValue::new("data_dir", dir, "--data-dir"));
        }
        if let Some(store) = &self.store {
            out.push(FlagValue::new("store.url", store.as_str(), "--store"));
        }
        out
    }
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

#[derive(Debug, clap::Args)]
pub struct DataDirArg {
    /// The worker's data dir; bases live in `<DIR>/bases`.
    #[arg(long = "data-dir", value_name = "DIR", env = "CORRAL_DATA_DIR", default_value = crate::base::DEFAULT_DATA_DIR)]
    pub dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum BaseCommand {
    /// Build a base with debootstrap (minbase variant); needs root and a Debian mirror.
    Build(BaseBuildArgs),
    /// Import a base from a rootfs tarball or a single-layer image tarball (.tar or .tar.gz).
    Import(BaseImportArgs),
    /// List the bases with their sizes and layer digests.
    List(BaseListArgs),
    /// Show one base's facts (its base.json).
    Show(BaseShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct BaseBuildArgs {
    /// Name of the new base, e.g. `python-3.11`.
    pub name: corral_protocol::BaseName,
    /// Debian suite.
    #[arg(long, default_value = "bookworm", conflicts_with = "recipe")]
    pub suite: String,
    /// Packages beyond minbase, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "PKG,...",
        conflicts_with = "recipe"
    )]
    pub include: Vec<String>,
    /// Take suite and packages from a recipe file, e.g. `fixtures/bases/python-3.11.json`.
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Debian mirror URL. Default: the host's, from /etc/apt/sources.list.d/*.sources or
    /// /etc/apt/sources.list.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Keep /usr/share/doc, man and info pages (removed by default; license files stay).
    #[arg(long)]
    pub docs: bool,
    /// Rebuild the base if it exists, swapping the new one in when it is complete.
    #[arg(long)]
    pub replace: bool,
    /// Never install debootstrap with apt when it is missing; stop and name it instead.
    #[arg(long, env = "CORRAL_NO_INSTALL", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_install: bool,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

#[derive(Debug, clap::Args)]
pub struct BaseImportArgs {
    /// Name of the new base.
    pub name: corral_protocol::BaseName,
    /// A tar or tar.gz of a root filesystem, or of a single-layer image (`docker save`,
    /// OCI archive).
    pub tarball: PathBuf,
    /// Replace the base if it exists, swapping the new one in when it is complete.
    #[arg(long)]
    pub replace: bool,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

#[derive(Debug, clap::Args)]
pub struct BaseListArgs {
    /// Print the bases as a JSON array of their base.json objects.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data_dir: DataDirArg,
}

#[derive(Debug, clap::Args)]
pub struct BaseShowArgs {
    pub name: corral_protocol::BaseName,
    /// Print the base.json object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data_dir: DataDirArg,
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
    /// Store URL (`store.url`): oci-dir:/path, oci://host:port/repo or
    /// oci+http://host:port/repo. Default: the config's, `oci-dir:<data_dir>/store`.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Registry user name (`store.username`).
    #[arg(long)]
    pub username: Option<String>,
    /// File holding the registry password (`store.password_file`).
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
    /// The workers' config file (TOML), for the store and its credentials.
    #[arg(long, env = "CORRAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl SourcePushArgs {
    /// The config keys these flags set.
    pub fn config_flags(&self) -> Vec<crate::config::FlagValue> {
        use crate::config::FlagValue;
        let mut out = Vec::new();
        if let Some(store) = &self.store {
            out.push(FlagValue::new("store.url", store.as_str(), "--store"));
        }
        if let Some(user) = &self.username {
            out.push(FlagValue::new(
                "store.username",
                user.as_str(),
                "--username",
            ));
        }
        if let Some(file) = &self.password_file {
            let file = file.display().to_string();
            out.push(FlagValue::new(
                "store.password_file",
                file,
                "--password-file",
            ));
        }
        out
    }
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The TOML config file. Without one: the defaults, the environment and the flags, as
    /// `corral work` without `--config` runs.
    #[arg(env = "CORRAL_CONFIG", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Print nothing on success (for `validate:` in Ansible and scripts).
    #[arg(short, long)]
    pub quiet: bool,
    /// Follow each key with where its value came from: `default`, `file PATH`,
    /// `environment CORRAL_…` or `flag --…`.
    #[arg(long, conflicts_with = "quiet")]
    pub effective: bool,
    #[command(flatten)]
    pub flags: crate::config::WorkerFlags,
}

// `corral sandbox`'s defaults, shared by clap and [`SandboxArgs::parse_plain`].
const SANDBOX_DISK_DIR: &str = "/var/tmp/corral-jobs";
const SANDBOX_MEMORY: &str = "2GiB";
const SANDBOX_PIDS: u64 = 512;
const SANDBOX_CPUS: f64 = 1.0;
const SANDBOX_WALL: f64 = 600.0;
const SANDBOX_TMP: &str = "256MiB";
const SANDBOX_UID: u32 = 65_000;
const SANDBOX_CWD: &str = "/";

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Read-only root filesystem (lowest layer).
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Extra read-only layers above the rootfs, top first.
    #[arg(long = "layer")]
    pub layers: Vec<PathBuf>,
    /// Upper dir that keeps the command's changes (and a `work` dir beside it is created).
    /// Default: a tmpfs as large as --memory that exists only inside the sandbox and goes
    /// away with it.
    #[arg(long)]
    pub upper: Option<PathBuf>,
    /// Put the upper dir on a loop filesystem of this size (e.g. `512MiB`) under this dir.
    #[arg(long, value_name = "SIZE", conflicts_with = "upper")]
    pub disk: Option<corral_protocol::ByteSize>,
    /// Where `--disk` creates the job dir.
    #[arg(long, value_name = "DIR", default_value = SANDBOX_DISK_DIR)]
    pub disk_dir: PathBuf,
    /// Memory limit (RAM, no swap).
    #[arg(long, default_value = SANDBOX_MEMORY)]
    pub memory: corral_protocol::ByteSize,
    /// Maximum processes and threads.
    #[arg(long, default_value_t = SANDBOX_PIDS)]
    pub pids: u64,
    /// CPU quota in cores.
    #[arg(long, default_value_t = SANDBOX_CPUS)]
    pub cpus: f64,
    /// Wall-clock limit in seconds.
    #[arg(long, default_value_t = SANDBOX_WALL)]
    pub wall: f64,
    /// CPU-seconds limit of the whole job.
    #[arg(long)]
    pub cpu_seconds: Option<u64>,
    /// Disk bandwidth of the job on its `--disk` filesystem, bytes per second for reads and
    /// writes each (e.g. "8MiB"): cgroup v2 io.max, v1 blkio throttling.
    #[arg(long)]
    pub disk_bandwidth: Option<corral_protocol::ByteSize>,
    /// Seconds the job must use its whole CPU quota on end to raise `cpu_saturated`.
    #[arg(long, default_value_t = corral_sandbox::CPU_SATURATED_AFTER.as_secs())]
    pub cpu_saturated_after: u64,
    /// Size of the private /tmp.
    #[arg(long, default_value = SANDBOX_TMP)]
    pub tmp: corral_protocol::ByteSize,
    #[arg(long, value_enum, default_value_t = SandboxNetwork::None)]
    pub network: SandboxNetwork,
    /// Host uid (and gid) the command runs as; it is uid 1000 inside.
    #[arg(long, default_value_t = SANDBOX_UID)]
    pub uid: u32,
    /// Working directory inside the sandbox.
    #[arg(long, default_value = SANDBOX_CWD)]
    pub cwd: PathBuf,
    /// Environment variable `KEY=VALUE` (repeatable); PATH and HOME have defaults.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read-only bind `HOST:SANDBOX` (repeatable).
    #[arg(long = "bind", value_name = "HOST:SANDBOX")]
    pub binds: Vec<String>,
    /// Let the command reach HOST:PORT through an egress proxy served from outside on its
    /// loopback (repeatable; implies a loopback network; `HTTP_PROXY`/`HTTPS_PROXY` set).
    #[arg(long = "egress", value_name = "HOST:PORT")]
    pub egress: Vec<String>,
    /// Do not copy the command's stdout/stderr to ours.
    #[arg(long)]
    pub quiet: bool,
    /// Write what the command does while it runs (OOM kills, refused forks, denied
    /// syscalls, network attempts) as JSON lines, as it happens, to FILE (`-`: stderr).
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Print where the run's time went on stderr once it ends: each phase of this
    /// process, the supervisor and the job's pid 1, with its duration.
    #[arg(long)]
    pub trace_timings: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl SandboxArgs {
    /// The arguments after `sandbox` when they are plain: long flags (`--name value` or
    /// `--name=value`), each single-valued one at most once, then `--` and the command.
    /// That is what scripts and benchmarks pass, and building clap's parser costs ~0.1 ms
    /// of a ~4 ms sandbox run. Anything else (help, version, short flags, a value that does
    /// not parse, a conflict) gives `None`, and clap parses it, with its messages. Where
    /// this answers, it answers as clap does (tested against it).
    pub fn parse_plain(args: &[std::ffi::OsString]) -> Option<SandboxArgs> {
        // clap would read (and check) it: let clap handle that run.
        if std::env::var_os("CORRAL_LOG_FORMAT").is_some() {
            return None;
        }
        let mut parsed = SandboxArgs {
            rootfs: PathBuf::new(),
            layers: Vec::new(),
            upper: None,
            disk: None,
            disk_dir: PathBuf::from(SANDBOX_DISK_DIR),
            memory: SANDBOX_MEMORY.parse().ok()?,
            pids: SANDBOX_PIDS,
            cpus: SANDBOX_CPUS,
            wall: SANDBOX_WALL,
            cpu_seconds: None,
            cpu_saturated_after: corral_sandbox::CPU_SATURATED_AFTER.as_secs(),
            disk_bandwidth: None,
            tmp: SANDBOX_TMP.parse().ok()?,
            network: SandboxNetwork::None,
            uid: SANDBOX_UID,
            cwd: PathBuf::from(SANDBOX_CWD),
            env: Vec::new(),
            binds: Vec::new(),
            egress: Vec::new(),
            quiet: false,
            events: None,
            trace_timings: false,
            command: Vec::new(),
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let arg = arg.to_str()?;
            if arg == "--" {
                parsed.command = rest
                    .map(|a| a.to_str().map(str::to_owned))
                    .collect::<Option<_>>()?;
                break;
            }
            let flag = arg.strip_prefix("--")?;
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (flag, None),
            };
            if inline.is_none() && matches!(name, "quiet" | "trace-timings") {
                let flag = match name {
                    "quiet" => &mut parsed.quiet,
                    _ => &mut parsed.trace_timings,
                };
                if *flag {
                    return None; // clap refuses a repeated flag
                }
                *flag = true;
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => rest.next()?.to_str()?,
            };
            if value.is_empty() || value.starts_with('-') {
                return None;
            }
            let repeatable = matches!(name, "layer" | "env" | "bind");
            if !repeatable && !seen.insert(name) {
                return None;
            }
            match name {
                "rootfs" => parsed.rootfs = value.into(),
                "layer" => parsed.layers.push(value.into()),
                "upper" => parsed.upper = Some(value.into()),
                "disk" => parsed.disk = Some(value.parse().ok()?),
                "disk-dir" => parsed.disk_dir = value.into(),
                "memory" => parsed.memory = value.parse().ok()?,
                "pids" => parsed.pids = value.parse().ok()?,
                "cpus" => parsed.cpus = value.parse().ok()?,
                "wall" => parsed.wall = value.parse().ok()?,
                "cpu-seconds" => parsed.cpu_seconds = Some(value.parse().ok()?),
                "cpu-saturated-after" => parsed.cpu_saturated_after = value.parse().ok()?,
                "disk-bandwidth" => parsed.disk_bandwidth = Some(value.parse().ok()?),
                "tmp" => parsed.tmp = value.parse().ok()?,
                "network" => {
                    parsed.network = match value {
                        "none" => SandboxNetwork::None,
                        "loopback" => SandboxNetwork::Loopback,
                        _ => return None,
                    }
                }
                "uid" => parsed.uid = value.parse().ok()?,
                "cwd" => parsed.cwd = value.into(),
                "env" => parsed.env.push(value.to_owned()),
                "bind" => parsed.binds.push(value.to_owned()),
                "events" => parsed.events = Some(value.into()),
                "log-format" if matches!(value, "text" | "json") => {}
                _ => return None,
            }
        }
        let complete = seen.contains("rootfs")
            && !parsed.command.is_empty()
            && !(parsed.disk.is_some() && parsed.upper.is_some());
        complete.then_some(parsed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SandboxNetwork {
    None,
    Loopback,
}

#[derive(Debug, clap::Args)]
pub struct WorkArgs {
    #[command(flatten)]
    pub flags: crate::config::WorkerFlags,
    /// The worker's config file (TOML). `CORRAL_*` variables and the flags above override its
    /// keys; `corral check-config --effective` shows the result.
    #[arg(long, env = "CORRAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The job message (JSON). `-` reads standard input.
    pub job: PathBuf,
    /// Wait for the job's result (through a reply queue) and print it as JSON.
    #[arg(long)]
    pub wait: bool,
    /// Broker URL (`amqp.url`).
    #[arg(long, alias = "amqp", value_name = "URL")]
    pub amqp_url: Option<String>,
    /// Prefix of the exchange names (`amqp.prefix`): the job goes to `<prefix>.jobs`.
    #[arg(long)]
    pub prefix: Option<String>,
    /// The workers' config file (TOML), for the broker and store settings.
    #[arg(long, env = "CORRAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// With --wait: give up after this long (exit 75).
    #[arg(long, default_value = "1h", value_parser = crate::amqp::parse_duration)]
    pub timeout: std::time::Duration,
    /// Pack this directory deterministically, upload it to `--store` and submit the job with
    /// its digest as `source` (what `corral source push DIR` does, in one step).
    #[arg(long, value_name = "DIR")]
    pub source: Option<PathBuf>,
    /// Store the workers read sources from (with --source; `store.url`).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
}

impl SubmitArgs {
    /// The config keys these flags set.
    pub fn config_flags(&self) -> Vec<crate::config::FlagValue> {
        use crate::config::FlagValue;
        let mut out = Vec::new();
        if let Some(url) = &self.amqp_url {
            out.push(FlagValue::new("amqp.url", url.as_str(), "--amqp-url"));
        }
        if let Some(prefix) = &self.prefix {
            out.push(FlagValue::new("amqp.prefix", prefix.as_str(), "--prefix"));
        }
        if let Some(store) = &self.store {
            out.push(FlagValue::new("store.url", store.as_str(), "--store"));
        }
        out
    }
}

/// `corral events`: an operator's view of the events exchange.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Without --follow, corral events prints the events that arrive within \
--wait (2 s by default) of it being subscribed and exits 0: events published before it \
started are not shown (the exchange keeps nothing). With --follow it prints them until \
interrupted (Ctrl-C, SIGTERM). Its queue is its own, exclusive and deleted when it exits."
)]
pub struct EventsArgs {
    /// Keep printing events until interrupted.
    #[arg(long, short)]
    pub follow: bool,
    /// Only events of these kinds (repeatable, or comma-separated), e.g. `oom,log_flood`.
    #[arg(long, value_delimiter = ',', value_name = "KIND")]
    pub kind: Vec<corral_protocol::EventKind>,
    /// Only events of this project.
    #[arg(long, value_name = "PROJECT", value_parser = parse_project)]
    pub project: Option<corral_protocol::ProjectId>,
    /// Print each event as one JSON object per line (`corral.event.v1`) instead of a
    /// human line.
    #[arg(long)]
    pub json: bool,
    /// Without --follow: how long to listen before exiting.
    #[arg(long, default_value = "2s", value_parser = crate::amqp::parse_duration, conflicts_with = "follow")]
    pub wait: std::time::Duration,
    /// The workers' config file (TOML): its broker URL, password and events exchange
    /// (`amqp.events_exchange`) are used; `CORRAL_*` variables and the flags below override it.
    #[arg(long, env = "CORRAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Broker URL (`amqp.url`).
    #[arg(long, alias = "amqp", value_name = "URL")]
    pub amqp_url: Option<String>,
    /// Prefix of the exchange names (`amqp.prefix`): events come from `<prefix>.events`.
    #[arg(long)]
    pub prefix: Option<String>,
}

impl EventsArgs {
    /// The config keys these flags set.
    pub fn config_flags(&self) -> Vec<crate::config::FlagValue> {
        use crate::config::FlagValue;
        let mut out = Vec::new();
        if let Some(url) = &self.amqp_url {
            out.push(FlagValue::new("amqp.url", url.as_str(), "--amqp-url"));
        }
        if let Some(prefix) = &self.prefix {
            out.push(FlagValue::new("amqp.prefix", prefix.as_str(), "--prefix"));
        }
        out
    }
}

fn parse_project(s: &str) -> Result<corral_protocol::ProjectId, String> {
    corral_protocol::ProjectId::new(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// What clap makes of `corral sandbox ARGS…`, or `None` where it refuses them.
    fn by_clap(args: &[&str]) -> Option<String> {
        SandboxCli::try_parse_from(std::iter::once("sandbox").chain(args.iter().copied()))
            .ok()
            .map(|cli| format!("{:?}", cli.args))
    }

    fn by_hand(args: &[&str]) -> Option<String> {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        SandboxArgs::parse_plain(&args).map(|a| format!("{a:?}"))
    }

    #[test]
    fn plain_sandbox_arguments_parse_as_clap_parses_them() {
        let answered = [
            &["--rootfs", "/r", "--quiet", "--", "/bin/true"][..],
            &[
                "--rootfs",
                "/r",
                "--trace-timings",
                "--quiet",
                "--",
                "/bin/true",
            ],
            &["--rootfs", "/r", "--", "sh", "-c", "echo --memory"],
            &[
                "--rootfs=/r",
                "--layer",
                "/a",
                "--layer=/b",
                "--upper",
                "/u",
                "--memory",
                "512MiB",
                "--pids=16",
                "--cpus",
                "0.5",
                "--wall",
                "2.5",
                "--cpu-seconds",
                "9",
                "--tmp",
                "1MiB",
                "--network",
                "loopback",
                "--uid",
                "70000",
                "--cwd",
                "/build",
                "--env",
                "A=B=C",
                "--env=D=",
                "--bind",
                "/h:/s",
                "--log-format",
                "json",
                "--disk-dir",
                "/d",
                "--events",
                "/tmp/events.jsonl",
                "--",
                "x",
                "--",
                "-y",
            ],
            &["--disk", "64MiB", "--rootfs", "/r", "--", "x"],
            &["--rootfs", "/r", "--events=/e", "--", "x"],
        ];
        for args in answered {
            let hand = by_hand(args);
            assert!(hand.is_some(), "{args:?} should take the plain path");
            assert_eq!(hand, by_clap(args), "{args:?}");
        }
        // Left to clap (which accepts some and refuses others, with its own messages).
        let declined = [
            &["--help"][..],
            &["--version"],
            &["-v", "--rootfs", "/r", "--", "x"],
            &["--verbose", "--rootfs", "/r", "--", "x"],
            &["--rootfs", "/r"],
            &["--rootfs", "/r", "--"],
            &["--rootfs", "/r", "x"],
            &["--", "x"],
            &["--rootfs", "/r", "--rootfs", "/s", "--", "x"],
            &["--rootfs", "/r", "--quiet", "--quiet", "--", "x"],
            &["--rootfs", "/r", "--quiet=true", "--", "x"],
            &[
                "--rootfs",
                "/r",
                "--trace-timings",
                "--trace-timings",
                "--",
                "x",
            ],
            &["--rootfs", "/r", "--memory", "lots", "--", "x"],
            &["--rootfs", "/r", "--pids", "-1", "--", "x"],
            &["--rootfs", "/r", "--uid", "4294967296", "--", "x"],
            &["--rootfs", "/r", "--network", "host", "--", "x"],
            &["--rootfs", "/r", "--log-format", "xml", "--", "x"],
            &[
                "--rootfs", "/r", "--upper", "/u", "--disk", "1GiB", "--", "x",
            ],
            &["--rootfs", "", "--", "x"],
            &["--rootfs", "--quiet", "--", "x"],
            &["--rootf", "/r", "--", "x"],
            &["--rootfs"],
            &[
                "--rootfs", "/r", "--events", "/e", "--events", "/f", "--", "x",
            ],
        ];
        for args in declined {
            assert_eq!(by_hand(args), None, "{args:?}");
        }
    }
}
