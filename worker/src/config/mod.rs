//! The worker's configuration: defaults, then one TOML file, then `CORRAL_*` environment
//! variables, then command-line flags, merged into a [`RawConfig`] (every key optional) and
//! validated into the typed [`Config`]. Every error names the dotted key, why it is wrong and
//! which layer set it. `deploy/corral.example.toml` documents every key and its default.

mod flags;
mod layers;
mod raw;
mod url;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_protocol::{ByteSize, Limits, PoolName};

use crate::cli::LogFormat;

pub use flags::{FlagValue, WorkerFlags};
pub use layers::{Key, Origin, keys};
pub use raw::{RawBytes, RawConfig};
pub use url::{AmqpUrl, StoreUrl};

/// Defaults that are not derived from other keys.
pub mod defaults {
    pub const DATA_DIR: &str = "/var/lib/corral";
    pub const INSTANCE: &str = "0";
    pub const CONCURRENCY: u16 = 2;

    /// One delivery more than there are build slots: while a job's image is stored and its
    /// result published, the next one already builds. A worker whose slots are all building
    /// then holds at most one job it has not started.
    pub const fn prefetch(concurrency: u16) -> u16 {
        concurrency.saturating_add(1)
    }
    /// Five minutes: most builds finish, and a host drains well within a rolling restart.
    pub const DRAIN_DEADLINE_SECONDS: u64 = 300;
    /// The broker a fresh RabbitMQ install runs: its `guest` account (loopback only), the
    /// default vhost. Without a password in the URL or `amqp.password`, the client sends
    /// RabbitMQ's default, `guest`.
    pub const AMQP_URL: &str = "amqp://guest@127.0.0.1:5672/%2f";
    pub const POOL: &str = "default";
    /// Exchange and queue names are `<prefix>.jobs`, `<prefix>.dead`, … unless set one by one.
    pub const AMQP_PREFIX: &str = "corral";
    pub const DELIVERY_LIMIT: u32 = 5;
    pub const HEARTBEAT_SECONDS: u64 = 15;
    /// RabbitMQ's own default `consumer_timeout` (30 min).
    pub const LEASE_SECONDS: u64 = 1800;
    /// Time kept for snapshot, upload and result after the build's wall limit.
    pub const LEASE_MARGIN_SECONDS: u64 = 300;
    pub const RECONNECT_MAX_SECONDS: u64 = 30;
    pub const BLOCKED_WAIT_SECONDS: u64 = 300;
    pub const CONSUMER_REFRESH_SECONDS: u64 = 30;
    pub const CANCEL_MEMORY_SECONDS: u64 = 3600;
    pub const UID_START: u32 = 1_000_000;
    pub const GID_START: u32 = 1_000_000;
    pub const ID_COUNT: u32 = 65_536;
    pub const CGROUP_PARENT: &str = "auto";
    pub const HELPER: &str = "self";
    pub const CPUS_PER_BUILD: f64 = 1.0;
    pub const KILL_GRACE_SECONDS: u64 = 10;
    pub const GZIP_LEVEL: u32 = 6;
    pub const ZSTD_LEVEL: u32 = 3;
    pub const SNAPSHOT_THREADS: u32 = 1;
    pub const MAX_OUTPUT_BYTES: u64 = 16 << 30;
}

/// The validated configuration of one worker process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub worker: WorkerConfig,
    /// Host-wide state shared by the instances on a host: bases, the local store, caches.
    pub data_dir: PathBuf,
    /// Builds (with their snapshots) run at once.
    pub concurrency: u16,
    /// How long running builds may go on after SIGTERM before they are cancelled and requeued.
    pub drain_deadline: Duration,
    pub store: StoreConfig,
    pub amqp: AmqpConfig,
    pub sandbox: SandboxConfig,
    /// This worker's maxima: a job asking for more is refused. Each is at most
    /// [`Limits::MAX`].
    pub limits: Limits,
    pub snapshot: SnapshotConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub egress: EgressConfig,
}

/// What builds with an egress network may reach through their proxy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressConfig {
    /// The ceiling of every job's `network.egress` list (this worker serves one pool, so
    /// this is the pool's). Empty: no job of this worker may have egress.
    pub allow: crate::egress::AllowList,
    /// A job's proxy connections at once; more are refused (503).
    pub connections: usize,
    /// CA certificates (PEM) that egress builds trust for the allowed destinations (a
    /// private package mirror's), bound read-only at [`crate::egress::BUILD_CA`] with
    /// `PIP_CERT` pointing at it.
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Names this worker in results, events, consumer tags and its control queue.
    pub id: String,
    /// The systemd instance (`%i`); several run on one host.
    pub instance: String,
    /// Per-instance job directories (upper and work dirs of running builds).
    pub scratch_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub url: StoreUrl,
    pub auth: RegistryAuth,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    Anonymous,
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// The first broker, where a worker connects first.
    pub url: AmqpUrl,
    /// The other nodes of the broker's cluster, tried in turn when the one in use fails.
    pub more_urls: Vec<AmqpUrl>,
    /// The default exchange and queue names are `<prefix>.jobs`, `<prefix>.dead`, ….
    pub prefix: String,
    pub password: Option<Secret>,
    pub pool: PoolName,
    pub jobs_exchange: String,
    pub jobs_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub results_exchange: String,
    pub events_exchange: String,
    pub logs_exchange: String,
    pub control_exchange: String,
    /// `x-delivery-limit` of the quorum job queue.
    pub delivery_limit: u32,
    pub heartbeat: Duration,
    /// Deliveries the broker hands this worker at once (at least `concurrency`): the jobs
    /// building, and those storing their image and publishing their result or waiting for a
    /// build slot.
    pub prefetch: u16,
    /// How long the broker lets a delivery stay unacked (its `consumer_timeout`).
    pub lease: Duration,
    /// Kept after a job's wall limit for fetch, snapshot, upload and result: a job whose wall
    /// limit plus this exceeds the lease is refused.
    pub lease_margin: Duration,
    /// Longest pause between reconnect attempts and platform-failure retries.
    pub reconnect_max: Duration,
    /// How long a publish waits while the broker blocks the connection (resource alarm).
    pub blocked_wait: Duration,
    /// How long a Cancel for a job not running here is remembered.
    pub cancel_memory: Duration,
    /// How long a worker holding no job waits for a delivery before it consumes afresh.
    pub consumer_refresh: Duration,
}

impl AmqpConfig {
    /// The URI to connect with, password included. Never log it.
    pub fn connection_uri(&self) -> String {
        self.url
            .with_password(self.password.as_ref().map(Secret::expose))
    }

    /// Every broker URL, the first one first.
    pub fn urls(&self) -> impl Iterator<Item = &AmqpUrl> {
        std::iter::once(&self.url).chain(&self.more_urls)
    }

    /// The URIs of every broker in order, passwords included. Never log them.
    pub fn connection_uris(&self) -> Vec<String> {
        let password = self.password.as_ref().map(Secret::expose);
        self.urls().map(|url| url.with_password(password)).collect()
    }

    /// The longest wall limit a job may ask for and still be acked within the lease.
    pub fn max_wall(&self) -> Duration {
        self.lease.saturating_sub(self.lease_margin)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    /// First host uid of the range that project identities are mapped into.
    pub uid_start: u32,
    pub gid_start: u32,
    /// Size of both ranges.
    pub id_count: u32,
    pub cgroup_parent: CgroupParent,
    pub helper: SandboxHelper,
    /// CPU quota of one build, in CPUs (1.5 = 150 ms per 100 ms period).
    pub cpus_per_build: f64,
    /// A build using all of `cpus_per_build` this long on end raises `cpu_saturated`.
    pub cpu_saturated_after: Duration,
    /// Between SIGTERM and SIGKILL when a build is cancelled.
    pub kill_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupParent {
    /// The cgroup systemd delegated to the service (`Delegate=`); the worker moves itself
    /// into a leaf below it and creates one cgroup per build beside that leaf.
    Delegated,
    /// A cgroup path below each controller's mount, e.g. `/corral/builds`.
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxHelper {
    /// The running `corral-worker` binary re-executed as the helper.
    SelfExe,
    Path(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotConfig {
    pub compression: Compression,
    pub level: u32,
    pub threads: u32,
    /// A compressed layer larger than this fails the job (`disk_limit`).
    pub max_output_bytes: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `None`: no listener.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// A password or token. Never printed: `Debug` and the effective config show it redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    /// The file it was read from, shown instead of the value.
    file: Option<PathBuf>,
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.value
    }
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(path) => write!(f, "Secret(from {})", path.display()),
            None => f.write_str("Secret(<redacted>)"),
        }
    }
}

/// Shown in place of a secret's value.
pub const REDACTED: &str = "<redacted>";

/// One bad key: its dotted name, why, and the layer that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub reason: String,
    pub origin: Origin,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)?;
        if self.origin != Origin::Default {
            write!(f, " (set by {})", self.origin)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<KeyError>),
}

impl ConfigError {
    /// The keys at fault (empty when the file could not be read or parsed).
    pub fn keys(&self) -> Vec<&str> {
        match self {
            ConfigError::Invalid(errors) => errors.iter().map(|e| e.key.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

/// Everything a config is built from. [`Sources::from_process`] reads the real ones.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// The command line's keys, in the order given (a later one wins).
    pub flags: Vec<FlagValue>,
    /// For the default `worker.id`.
    pub hostname: String,
}

impl Sources {
    pub fn from_process(file: Option<PathBuf>, flags: Vec<FlagValue>) -> Sources {
        Sources {
            file,
            env: std::env::vars().collect(),
            flags,
            hostname: hostname(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A validated config and what deserves a look without being wrong.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
    /// The layer each key set outside the defaults came from.
    pub origins: BTreeMap<String, Origin>,
}

impl Loaded {
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    /// The effective config as TOML (it parses back to the same config), each key followed
    /// by a comment naming where its value came from, as `git config --show-origin` does.
    /// Secrets are redacted.
    pub fn annotated_toml(&self) -> String {
        let table = toml::Table::try_from(self.config.to_raw()).unwrap_or_default();
        let mut out = String::new();
        let mut sections = Vec::new();
        let line = |out: &mut String, key: &str, name: &str, value: &toml::Value| {
            let entry = format!("{name} = {value}");
            out.push_str(&format!("{entry:<48} # {}\n", self.origin(key)));
        };
        for (name, value) in &table {
            match value {
                toml::Value::Table(inner) => sections.push((name, inner)),
                value => line(&mut out, name, name, value),
            }
        }
        for (section, inner) in sections {
            out.push_str(&format!("\n[{section}]\n"));
            for (name, value) in inner {
                line(&mut out, &format!("{section}.{name}"), name, value);
            }
        }
        out
    }
}

impl Config {
    /// Layers the sources, then validates. All bad keys are reported at once.
    pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
        let mut layers = layers::Layers::default();
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        if let Some(path) = &sources.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                path: path.clone(),
                source,
            })?;
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::ParseFile {
                        path: path.clone(),
                        message: e.to_string().trim_end().to_string(),
                    })?;
            let origin = Origin::File(path.clone());
            for key in layers.overlay(table, &origin) {
                errors.push(KeyError {
                    key,
                    reason: "unknown key".into(),
                    origin: origin.clone(),
                });
            }
        }
        for var in layers::from_env(&sources.env, &mut layers) {
            let origin = Origin::Env(var.clone());
            match layers::renamed_var(&var) {
                Some(key) => errors.push(KeyError {
                    reason: format!(
                        "no longer read; set {} (the key {key}) instead",
                        layers::key(key).map_or_else(String::new, Key::env_var)
                    ),
                    key: var,
                    origin,
                }),
                None if layers::read_elsewhere(&var) => {}
                None => warnings.push(format!("{var}: ignored, names no config key")),
            }
        }
        for flag in &sources.flags {
            let origin = Origin::Flag(flag.flag.clone());
            let reason = match &flag.value {
                Ok(value) => match layers.set(&flag.key, value, &origin) {
                    Ok(()) => continue,
                    Err(_) => "unknown key".to_string(),
                },
                Err(reason) => reason.clone(),
            };
            errors.push(KeyError {
                key: flag.key.clone(),
                reason,
                origin,
            });
        }
        // A value of the wrong type is reported, dropped, and the rest read again, so that
        // one run names every bad key.
        let raw: RawConfig = loop {
            match serde_path_to_error::deserialize(layers.table.clone()) {
                Ok(raw) => break raw,
                Err(e) => {
                    let key = e.path().to_string();
                    errors.push(KeyError {
                        origin: layers.origin(&key),
                        reason: e.inner().message().trim_end().to_string(),
                        key: key.clone(),
                    });
                    if !layers.remove(&key) {
                        return Err(ConfigError::Invalid(errors));
                    }
                }
            }
        };
        match validate::validate(raw, &layers, &sources.hostname, &mut warnings) {
            Ok(config) if errors.is_empty() => {
                let mut origins = layers.origins;
                // A password given inside amqp.url comes from where the URL came from.
                if config.amqp.password.is_some()
                    && !origins.contains_key("amqp.password")
                    && !origins.contains_key("amqp.password_file")
                    && let Some(origin) = origins.get("amqp.url").cloned()
                {
                    origins.insert("amqp.password".into(), origin);
                }
                Ok(Loaded {
                    config,
                    warnings,
                    origins,
                })
            }
            Ok(_) => Err(ConfigError::Invalid(errors)),
            Err(more) => {
                errors.extend(more);
                Err(ConfigError::Invalid(errors))
            }
        }
    }

    /// The config built from defaults alone, on a host of this name.
    pub fn defaults(hostname: &str) -> Config {
        let sources = Sources {
            hostname: hostname.to_string(),
            ..Sources::default()
        };
        match Config::load(&sources) {
            Ok(loaded) => loaded.config,
            Err(err) => panic!("the built-in defaults are invalid: {err}"),
        }
    }

    /// The effective config in the file's own shape (it parses back to the same config),
    /// with secret values replaced by [`REDACTED`] or by the file they came from.
    pub fn to_raw(&self) -> RawConfig {
        validate::to_raw(self)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_raw()).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}
