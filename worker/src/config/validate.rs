//! Turns the merged [`RawConfig`] into a [`Config`]: fills defaults (some derived from other
//! keys), checks every rule, and collects every bad key rather than stopping at the first.
//! [`to_raw`] goes back the other way for printing.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use corral_protocol::{ByteSize, Limits, MIB, PoolName, TIB};

use super::layers::Layers;
use super::raw::*;
use super::url::{AmqpUrl, StoreUrl};
use super::{
    AmqpConfig, CgroupParent, Compression, Config, KeyError, LogConfig, MetricsConfig, REDACTED,
    RegistryAuth, SandboxConfig, SandboxHelper, Secret, SnapshotConfig, StoreConfig, WorkerConfig,
    defaults,
};
use crate::cli::LogFormat;

/// Instance names that would collide with host-wide directories in `data_dir`.
const RESERVED_INSTANCES: [&str; 4] = ["store", "bases", "cache", "tmp"];

struct Check<'a> {
    layers: &'a Layers,
    errors: Vec<KeyError>,
}

impl Check<'_> {
    fn fail(&mut self, key: &str, reason: impl Into<String>) {
        self.errors.push(KeyError {
            key: key.to_string(),
            reason: reason.into(),
            origin: self.layers.origin(key),
        });
    }

    /// `value` (or `default`) if within `lo..=hi`, else an error naming `key`.
    fn range(&mut self, key: &str, value: Option<u64>, default: u64, lo: u64, hi: u64) -> u64 {
        let v = value.unwrap_or(default);
        if v < lo || v > hi {
            self.fail(key, format!("{v} is outside {lo}..={hi}"));
            return default.clamp(lo, hi);
        }
        v
    }

    fn absolute(&mut self, key: &str, text: &str) -> PathBuf {
        let path = PathBuf::from(text);
        if !path.is_absolute() {
            self.fail(key, format!("{text:?} is not an absolute path"));
        } else if path.components().any(|c| c == Component::ParentDir) {
            self.fail(key, format!("{text:?} contains '..'"));
        }
        path
    }

    /// The secret given inline or in a file; both at once is an error.
    fn secret(
        &mut self,
        section: &str,
        name: &str,
        inline: Option<String>,
        file: Option<String>,
        warnings: &mut Vec<String>,
    ) -> Option<Secret> {
        let file_key = format!("{section}.{name}_file");
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.fail(
                    &file_key,
                    format!("set together with {section}.{name}; set only one"),
                );
                None
            }
            (Some(value), None) => Some(Secret { value, file: None }),
            (None, Some(path)) => {
                let path = self.absolute(&file_key, &path);
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        if let Ok(meta) = std::fs::metadata(&path) {
                            use std::os::unix::fs::PermissionsExt;
                            if meta.permissions().mode() & 0o004 != 0 {
                                warnings.push(format!(
                                    "{file_key}: {} is readable by every user",
                                    path.display()
                                ));
                            }
                        }
                        // Files written by `echo` end in a newline that is not part of it.
                        let value = text.trim_end_matches(['\n', '\r']).to_string();
                        if value.is_empty() {
                            self.fail(&file_key, format!("{} is empty", path.display()));
                        }
                        Some(Secret {
                            value,
                            file: Some(path),
                        })
                    }
                    Err(e) => {
                        self.fail(&file_key, format!("cannot read {}: {e}", path.display()));
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    fn amqp_name(&mut self, key: &str, value: Option<String>, default: &str) -> String {
        let name = value.unwrap_or_else(|| default.to_string());
        if name.is_empty() || name.len() > 255 {
            self.fail(key, "must be 1 to 255 bytes");
        } else if name.starts_with("amq.") {
            self.fail(
                key,
                format!("{name:?}: the amq. prefix is reserved by the broker"),
            );
        } else if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            self.fail(
                key,
                format!("{name:?} contains whitespace or control characters"),
            );
        }
        name
    }
}

fn id_like(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text.as_bytes()[0].is_ascii_alphanumeric()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(super) fn validate(
    raw: RawConfig,
    layers: &Layers,
    hostname: &str,
    warnings: &mut Vec<String>,
) -> Result<Config, Vec<KeyError>> {
    let mut c = Check {
        layers,
        errors: Vec::new(),
    };

    let data_dir = c.absolute(
        "data_dir",
        raw.data_dir.as_deref().unwrap_or(defaults::DATA_DIR),
    );
    #[allow(clippy::cast_possible_truncation)] // range-checked to 1..=1024
    let concurrency = c.range(
        "concurrency",
        raw.concurrency,
        u64::from(defaults::CONCURRENCY),
        1,
        1024,
    ) as u16;
    let drain_deadline = Duration::from_secs(c.range(
        "drain_deadline_seconds",
        raw.drain_deadline_seconds,
        defaults::DRAIN_DEADLINE_SECONDS,
        0,
        86_400,
    ));

    // worker
    let w = raw.worker.unwrap_or_default();
    let instance = w.instance.unwrap_or_else(|| defaults::INSTANCE.to_string());
    if !id_like(&instance, 64) || instance.bytes().any(|b| b.is_ascii_uppercase()) {
        c.fail(
            "worker.instance",
            format!("{instance:?} must be 1 to 64 lowercase letters, digits, '.', '_' or '-'"),
        );
    } else if RESERVED_INSTANCES.contains(&instance.as_str()) {
        c.fail(
            "worker.instance",
            format!("{instance:?} is reserved for a host-wide directory in data_dir"),
        );
    }
    let id = w.id.unwrap_or_else(|| format!("{hostname}-{instance}"));
    if !id_like(&id, 128) {
        c.fail(
            "worker.id",
            format!("{id:?} must be 1 to 128 ASCII letters, digits, '.', '_' or '-'"),
        );
    }
    let scratch_dir = match w.scratch_dir {
        Some(dir) => c.absolute("worker.scratch_dir", &dir),
        None => data_dir.join(&instance),
    };

    // store
    let s = raw.store.unwrap_or_default();
    let store_url = match s.url {
        Some(text) => StoreUrl::parse(&text).unwrap_or_else(|reason| {
            c.fail("store.url", reason);
            StoreUrl::Dir(data_dir.join("store"))
        }),
        None => StoreUrl::Dir(data_dir.join("store")),
    };
    let password = c.secret("store", "password", s.password, s.password_file, warnings);
    let token = c.secret("store", "token", s.token, s.token_file, warnings);
    let auth = match (s.username, password, token) {
        (None, None, None) => RegistryAuth::Anonymous,
        (Some(username), Some(password), None) => RegistryAuth::Basic { username, password },
        (None, None, Some(token)) => RegistryAuth::Bearer(token),
        (Some(_), None, None) => {
            c.fail(
                "store.username",
                "set without store.password or store.password_file",
            );
            RegistryAuth::Anonymous
        }
        (None, Some(_), None) => {
            c.fail("store.password", "set without store.username");
            RegistryAuth::Anonymous
        }
        (_, _, Some(_)) => {
            c.fail(
                "store.token",
                "set together with a username or password; use one kind of credential",
            );
            RegistryAuth::Anonymous
        }
    };
    if matches!(store_url, StoreUrl::Dir(_)) && auth != RegistryAuth::Anonymous {
        c.fail(
            "store.url",
            "is an oci-dir: store, which takes no credentials",
        );
    }

    // amqp
    let a = raw.amqp.unwrap_or_default();
    let url_texts = a
        .url
        .map(|u| u.urls())
        .unwrap_or_else(|| vec![defaults::AMQP_URL.to_string()]);
    // A file is copied, diffed and printed, so it names the password's file instead; a
    // flag or variable may carry it in the URL, as every AMQP client's does.
    let url_in_file = matches!(layers.origin("amqp.url"), super::Origin::File(_));
    let mut urls = Vec::new();
    let mut url_password: Option<String> = None;
    if url_texts.is_empty() {
        c.fail("amqp.url", "is an empty list; name at least one broker");
    }
    for url_text in &url_texts {
        let parsed = if url_in_file {
            AmqpUrl::parse(url_text).map(|url| (url, None))
        } else {
            AmqpUrl::parse_with_password(url_text)
        };
        match parsed {
            Ok((url, password)) => {
                if let Some(password) = password {
                    if url_password.as_ref().is_some_and(|p| *p != password) {
                        c.fail(
                            "amqp.url",
                            "the brokers' URLs carry different passwords; a cluster's nodes share one user",
                        );
                    }
                    url_password = Some(password);
                }
                if urls.contains(&url) {
                    c.fail("amqp.url", format!("names {url} twice"));
                }
                urls.push(url);
            }
            Err(reason) => c.fail("amqp.url", reason),
        }
    }
    if urls.is_empty() {
        urls.push(AmqpUrl::parse(defaults::AMQP_URL).expect("default AMQP URL parses"));
    }
    let url = urls.remove(0);
    let more_urls = urls;
    let mut amqp_password = c.secret("amqp", "password", a.password, a.password_file, warnings);
    if let Some(value) = url_password {
        if amqp_password.is_some() {
            c.fail(
                "amqp.url",
                "carries a password and amqp.password or amqp.password_file is set too; give one",
            );
        }
        amqp_password = Some(Secret { value, file: None });
    }
    for url in std::iter::once(&url).chain(&more_urls) {
        if !url.tls && !url.is_loopback() && amqp_password.is_some() {
            warnings.push(format!(
                "amqp.url: {url} is plain AMQP to another host; the password crosses the network in clear (use amqps://)"
            ));
        }
    }
    let pool_text = a.pool.unwrap_or_else(|| defaults::POOL.to_string());
    let pool = PoolName::new(pool_text.clone()).unwrap_or_else(|e| {
        c.fail("amqp.pool", e.message);
        PoolName::default()
    });
    let prefix = c.amqp_name("amqp.prefix", a.prefix, defaults::AMQP_PREFIX);
    let mut name = |key: &str, value: Option<String>, suffix: &str| {
        c.amqp_name(key, value, &format!("{prefix}.{suffix}"))
    };
    let jobs_exchange = name("amqp.jobs_exchange", a.jobs_exchange, "jobs");
    let dead_letter_exchange = name("amqp.dead_letter_exchange", a.dead_letter_exchange, "dead");
    let dead_letter_queue = name("amqp.dead_letter_queue", a.dead_letter_queue, "jobs.dead");
    let results_exchange = name("amqp.results_exchange", a.results_exchange, "results");
    let events_exchange = name("amqp.events_exchange", a.events_exchange, "events");
    let logs_exchange = name("amqp.logs_exchange", a.logs_exchange, "logs");
    let control_exchange = name("amqp.control_exchange", a.control_exchange, "control");
    let jobs_queue_default = format!("{jobs_exchange}.{pool}");
    let jobs_queue = c.amqp_name("amqp.jobs_queue", a.jobs_queue, &jobs_queue_default);
    if jobs_queue == dead_letter_queue {
        c.fail(
            "amqp.dead_letter_queue",
            "is the same queue as amqp.jobs_queue",
        );
    }
    #[allow(clippy::cast_possible_truncation)] // range-checked to concurrency..=65535
    let prefetch = c.range(
        "amqp.prefetch",
        a.prefetch,
        u64::from(defaults::prefetch(concurrency)),
        u64::from(concurrency),
        u64::from(u16::MAX),
    ) as u16;
    #[allow(clippy::cast_possible_truncation)] // range-checked
    let delivery_limit = c.range(
        "amqp.delivery_limit",
        a.delivery_limit,
        u64::from(defaults::DELIVERY_LIMIT),
        1,
        1000,
    ) as u32;
    let heartbeat = Duration::from_secs(c.range(
        "amqp.heartbeat_seconds",
        a.heartbeat_seconds,
        defaults::HEARTBEAT_SECONDS,
        5,
        60,
    ));
    let lease_s = c.range(
        "amqp.lease_seconds",
        a.lease_seconds,
        defaults::LEASE_SECONDS,
        60,
        7 * 86_400,
    );
    let margin_s = c.range(
        "amqp.lease_margin_seconds",
        a.lease_margin_seconds,
        defaults::LEASE_MARGIN_SECONDS,
        0,
        86_400,
    );
    if margin_s >= lease_s {
        c.fail(
            "amqp.lease_margin_seconds",
            format!("{margin_s} s leaves no time for a build in amqp.lease_seconds ({lease_s} s)"),
        );
    }
    let reconnect_max = Duration::from_secs(c.range(
        "amqp.reconnect_max_seconds",
        a.reconnect_max_seconds,
        defaults::RECONNECT_MAX_SECONDS,
        1,
        600,
    ));
    let blocked_wait = Duration::from_secs(c.range(
        "amqp.blocked_wait_seconds",
        a.blocked_wait_seconds,
        defaults::BLOCKED_WAIT_SECONDS,
        1,
        86_400,
    ));
    let cancel_memory = Duration::from_secs(c.range(
        "amqp.cancel_memory_seconds",
        a.cancel_memory_seconds,
        defaults::CANCEL_MEMORY_SECONDS,
        0,
        7 * 86_400,
    ));
    let consumer_refresh = Duration::from_secs(c.range(
        "amqp.consumer_refresh_seconds",
        a.consumer_refresh_seconds,
        defaults::CONSUMER_REFRESH_SECONDS,
        1,
        3600,
    ));

    // sandbox
    let sb = raw.sandbox.unwrap_or_default();
    let id_count = c.range(
        "sandbox.id_count",
        sb.id_count,
        u64::from(defaults::ID_COUNT),
        1,
        1 << 31,
    );
    // (uid_t)-1 means "no change" to the kernel, and ids below 65536 are the host's own.
    let id_top = u64::from(u32::MAX) - id_count;
    let uid_start = c.range(
        "sandbox.uid_start",
        sb.uid_start,
        u64::from(defaults::UID_START),
        65_536,
        id_top,
    );
    let gid_start = c.range(
        "sandbox.gid_start",
        sb.gid_start,
        u64::from(defaults::GID_START),
        65_536,
        id_top,
    );
    let cgroup_parent = match sb.cgroup_parent.as_deref() {
        None | Some("auto") => CgroupParent::Delegated,
        Some(path) => CgroupParent::Path(c.absolute("sandbox.cgroup_parent", path)),
    };
    let helper = match sb.helper.as_deref() {
        None | Some("self") => SandboxHelper::SelfExe,
        Some(path) => SandboxHelper::Path(c.absolute("sandbox.helper", path)),
    };
    let cpus_per_build = sb.cpus_per_build.unwrap_or(defaults::CPUS_PER_BUILD);
    if !(cpus_per_build.is_finite() && (0.01..=1024.0).contains(&cpus_per_build)) {
        c.fail(
            "sandbox.cpus_per_build",
            format!("{cpus_per_build} is outside 0.01..=1024 CPUs"),
        );
    }
    let cpu_saturated_after = Duration::from_secs(c.range(
        "sandbox.cpu_saturated_seconds",
        sb.cpu_saturated_seconds,
        corral_sandbox::CPU_SATURATED_AFTER.as_secs(),
        1,
        86_400,
    ));
    let kill_grace = Duration::from_secs(c.range(
        "sandbox.kill_grace_seconds",
        sb.kill_grace_seconds,
        defaults::KILL_GRACE_SECONDS,
        1,
        300,
    ));

    // limits (maxima)
    let l = raw.limits.unwrap_or_default();
    let max = Limits::MAX;
    let bytes = |b: Option<RawBytes>, d: ByteSize| b.map_or(d, |b| b.0);
    let limits = Limits {
        // What fits the lease, so that raising the lease raises it.
        wall_seconds: l
            .wall_seconds
            .unwrap_or_else(|| lease_s.saturating_sub(margin_s).clamp(1, max.wall_seconds)),
        cpu_seconds: l.cpu_seconds.unwrap_or(max.cpu_seconds),
        memory_bytes: bytes(l.memory_bytes, max.memory_bytes),
        pids: l.pids.unwrap_or(max.pids),
        disk_bytes: bytes(l.disk_bytes, max.disk_bytes),
        open_files: l.open_files.unwrap_or(max.open_files),
        log_bytes: bytes(l.log_bytes, max.log_bytes),
        disk_bytes_per_second: bytes(l.disk_bytes_per_second, max.disk_bytes_per_second),
        network_bytes: bytes(l.network_bytes, max.network_bytes),
    };
    let limits_ok = match limits.within(&max) {
        Ok(()) => true,
        Err(e) => {
            c.fail(&e.field, e.message);
            false
        }
    };
    if limits_ok && limits.wall_seconds + margin_s > lease_s {
        c.fail(
            "limits.wall_seconds",
            format!(
                "{} s plus amqp.lease_margin_seconds ({margin_s} s) exceeds amqp.lease_seconds ({lease_s} s): \
                 the broker would take a long build's job back before it is acked; raise the broker's \
                 consumer_timeout and amqp.lease_seconds together, or lower this",
                limits.wall_seconds
            ),
        );
    }

    // snapshot
    let sn = raw.snapshot.unwrap_or_default();
    let compression = match sn.compression.as_deref() {
        None | Some("gzip") => Compression::Gzip,
        Some("zstd") => Compression::Zstd,
        Some(other) => {
            c.fail(
                "snapshot.compression",
                format!("{other:?} is not one of \"gzip\", \"zstd\""),
            );
            Compression::Gzip
        }
    };
    let (level_default, level_lo, level_hi) = match compression {
        Compression::Gzip => (defaults::GZIP_LEVEL, 1, 9),
        Compression::Zstd => (defaults::ZSTD_LEVEL, 1, 19),
    };
    #[allow(clippy::cast_possible_truncation)] // range-checked
    let level = c.range(
        "snapshot.level",
        sn.level,
        u64::from(level_default),
        level_lo,
        level_hi,
    ) as u32;
    #[allow(clippy::cast_possible_truncation)] // range-checked
    let threads = c.range(
        "snapshot.threads",
        sn.threads,
        u64::from(defaults::SNAPSHOT_THREADS),
        1,
        256,
    ) as u32;
    let max_output_bytes = bytes(sn.max_output_bytes, ByteSize(defaults::MAX_OUTPUT_BYTES));
    if max_output_bytes.0 < MIB || max_output_bytes.0 > TIB {
        c.fail(
            "snapshot.max_output_bytes",
            format!("{max_output_bytes} is outside 1 MiB..=1 TiB"),
        );
    }

    // metrics, log
    let listen = match raw.metrics.unwrap_or_default().listen.as_deref() {
        None | Some("") => None,
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                c.fail(
                    "metrics.listen",
                    format!("{text:?} is not an address such as 127.0.0.1:9464 or [::]:9464 (empty: off)"),
                );
                None
            }
        },
    };
    let format = match raw.log.unwrap_or_default().format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            c.fail(
                "log.format",
                format!("{other:?} is not one of \"text\", \"json\""),
            );
            LogFormat::Text
        }
    };

    let raw_egress = raw.egress.unwrap_or_default();
    let allow =
        match crate::egress::AllowList::parse(raw_egress.allow.as_deref().unwrap_or_default()) {
            Ok(list) => list,
            Err(e) => {
                c.fail("egress.allow", e.to_string());
                crate::egress::AllowList::default()
            }
        };
    let egress_connections = c.range(
        "egress.connections",
        raw_egress.connections,
        crate::egress::ProxyLimits::default().connections as u64,
        1,
        4096,
    ) as usize;

    let egress_ca = match raw_egress.ca.as_deref() {
        None | Some("") => None,
        Some(p) if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
        Some(p) => {
            c.fail("egress.ca", format!("{p:?} is not an absolute path"));
            None
        }
    };

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    #[allow(clippy::cast_possible_truncation)] // range-checked against u32::MAX above
    let (uid_start, gid_start, id_count) = (uid_start as u32, gid_start as u32, id_count as u32);
    Ok(Config {
        worker: WorkerConfig {
            id,
            instance,
            scratch_dir,
        },
        data_dir,
        concurrency,
        drain_deadline,
        store: StoreConfig {
            url: store_url,
            auth,
        },
        amqp: AmqpConfig {
            url,
            more_urls,
            prefix,
            password: amqp_password,
            pool,
            jobs_exchange,
            jobs_queue,
            dead_letter_exchange,
            dead_letter_queue,
            results_exchange,
            events_exchange,
            logs_exchange,
            control_exchange,
            delivery_limit,
            heartbeat,
            prefetch,
            lease: Duration::from_secs(lease_s),
            lease_margin: Duration::from_secs(margin_s),
            reconnect_max,
            blocked_wait,
            cancel_memory,
            consumer_refresh,
        },
        sandbox: SandboxConfig {
            uid_start,
            gid_start,
            id_count,
            cgroup_parent,
            helper,
            cpus_per_build,
            cpu_saturated_after,
            kill_grace,
        },
        limits,
        snapshot: SnapshotConfig {
            compression,
            level,
            threads,
            max_output_bytes,
        },
        metrics: MetricsConfig { listen },
        log: LogConfig { format },
        egress: super::EgressConfig {
            allow,
            connections: egress_connections,
            ca: egress_ca,
        },
    })
}

fn path(p: &Path) -> Option<String> {
    Some(p.display().to_string())
}

/// Inline secrets print as [`REDACTED`]; secrets from files print as their file.
fn secret(s: &Secret) -> (Option<String>, Option<String>) {
    match s.file() {
        Some(file) => (None, path(file)),
        None => (Some(REDACTED.to_string()), None),
    }
}

pub(super) fn to_raw(c: &Config) -> RawConfig {
    let (store_password, store_password_file, store_token, store_token_file, username) =
        match &c.store.auth {
            RegistryAuth::Anonymous => (None, None, None, None, None),
            RegistryAuth::Basic { username, password } => {
                let (p, pf) = secret(password);
                (p, pf, None, None, Some(username.clone()))
            }
            RegistryAuth::Bearer(token) => {
                let (t, tf) = secret(token);
                (None, None, t, tf, None)
            }
        };
    let (amqp_password, amqp_password_file) = c.amqp.password.as_ref().map_or((None, None), secret);
    let secs = |d: Duration| Some(d.as_secs());
    RawConfig {
        data_dir: path(&c.data_dir),
        concurrency: Some(u64::from(c.concurrency)),
        drain_deadline_seconds: secs(c.drain_deadline),
        worker: Some(RawWorker {
            id: Some(c.worker.id.clone()),
            instance: Some(c.worker.instance.clone()),
            scratch_dir: path(&c.worker.scratch_dir),
        }),
        store: Some(RawStore {
            url: Some(c.store.url.to_string()),
            username,
            password: store_password,
            password_file: store_password_file,
            token: store_token,
            token_file: store_token_file,
        }),
        amqp: Some(RawAmqp {
            url: Some(if c.amqp.more_urls.is_empty() {
                RawUrls::One(c.amqp.url.to_string())
            } else {
                RawUrls::Many(c.amqp.urls().map(ToString::to_string).collect())
            }),
            prefix: Some(c.amqp.prefix.clone()),
            password: amqp_password,
            password_file: amqp_password_file,
            pool: Some(c.amqp.pool.to_string()),
            jobs_exchange: Some(c.amqp.jobs_exchange.clone()),
            jobs_queue: Some(c.amqp.jobs_queue.clone()),
            dead_letter_exchange: Some(c.amqp.dead_letter_exchange.clone()),
            dead_letter_queue: Some(c.amqp.dead_letter_queue.clone()),
            results_exchange: Some(c.amqp.results_exchange.clone()),
            events_exchange: Some(c.amqp.events_exchange.clone()),
            logs_exchange: Some(c.amqp.logs_exchange.clone()),
            control_exchange: Some(c.amqp.control_exchange.clone()),
            prefetch: Some(u64::from(c.amqp.prefetch)),
            delivery_limit: Some(u64::from(c.amqp.delivery_limit)),
            heartbeat_seconds: secs(c.amqp.heartbeat),
            lease_seconds: secs(c.amqp.lease),
            lease_margin_seconds: secs(c.amqp.lease_margin),
            reconnect_max_seconds: secs(c.amqp.reconnect_max),
            blocked_wait_seconds: secs(c.amqp.blocked_wait),
            cancel_memory_seconds: secs(c.amqp.cancel_memory),
            consumer_refresh_seconds: secs(c.amqp.consumer_refresh),
        }),
        sandbox: Some(RawSandbox {
            uid_start: Some(u64::from(c.sandbox.uid_start)),
            gid_start: Some(u64::from(c.sandbox.gid_start)),
            id_count: Some(u64::from(c.sandbox.id_count)),
            cgroup_parent: Some(match &c.sandbox.cgroup_parent {
                CgroupParent::Delegated => "auto".to_string(),
                CgroupParent::Path(p) => p.display().to_string(),
            }),
            helper: Some(match &c.sandbox.helper {
                SandboxHelper::SelfExe => "self".to_string(),
                SandboxHelper::Path(p) => p.display().to_string(),
            }),
            cpus_per_build: Some(c.sandbox.cpus_per_build),
            cpu_saturated_seconds: Some(c.sandbox.cpu_saturated_after.as_secs()),
            kill_grace_seconds: secs(c.sandbox.kill_grace),
        }),
        limits: Some(RawLimits {
            wall_seconds: Some(c.limits.wall_seconds),
            cpu_seconds: Some(c.limits.cpu_seconds),
            memory_bytes: Some(RawBytes(c.limits.memory_bytes)),
            pids: Some(c.limits.pids),
            disk_bytes: Some(RawBytes(c.limits.disk_bytes)),
            open_files: Some(c.limits.open_files),
            log_bytes: Some(RawBytes(c.limits.log_bytes)),
            disk_bytes_per_second: Some(RawBytes(c.limits.disk_bytes_per_second)),
            network_bytes: Some(RawBytes(c.limits.network_bytes)),
        }),
        snapshot: Some(RawSnapshot {
            compression: Some(c.snapshot.compression.as_str().to_string()),
            level: Some(u64::from(c.snapshot.level)),
            threads: Some(u64::from(c.snapshot.threads)),
            max_output_bytes: Some(RawBytes(c.snapshot.max_output_bytes)),
        }),
        metrics: Some(RawMetrics {
            listen: Some(c.metrics.listen.map(|a| a.to_string()).unwrap_or_default()),
        }),
        log: Some(RawLog {
            format: Some(
                match c.log.format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }
                .to_string(),
            ),
        }),
        egress: Some(super::raw::RawEgress {
            allow: Some(c.egress.allow.entries().map(ToString::to_string).collect()),
            connections: Some(c.egress.connections as u64),
            ca: Some(c.egress.ca.as_deref().and_then(path).unwrap_or_default()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Sources;
    use super::*;

    fn load(toml: &str) -> Result<Config, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, toml).unwrap();
        let sources = Sources {
            file: Some(file),
            env: vec![],
            flags: Vec::new(),
            hostname: "h".into(),
        };
        Config::load(&sources)
            .map(|l| l.config)
            .map_err(|e| e.keys().iter().map(ToString::to_string).collect())
    }

    #[test]
    fn defaults_derive_from_other_keys() {
        let c = load("data_dir = \"/srv/c\"\n[worker]\ninstance = \"3\"\n[amqp]\npool = \"gpu\"\n")
            .unwrap();
        assert_eq!(c.worker.id, "h-3");
        assert_eq!(c.worker.scratch_dir, PathBuf::from("/srv/c/3"));
        assert_eq!(c.store.url, StoreUrl::Dir("/srv/c/store".into()));
        assert_eq!(c.amqp.jobs_queue, "corral.jobs.gpu");
        assert_eq!(c.amqp.prefetch, c.concurrency + 1);
    }

    #[test]
    fn every_bad_key_is_named() {
        let bad = load(
            "concurrency = 0\n[amqp]\nheartbeat_seconds = 1\npool = \"Bad Pool\"\n[limits]\nmemory_bytes = \"64GiB\"\n[worker]\ninstance = \"store\"\n",
        )
        .unwrap_err();
        for key in [
            "concurrency",
            "amqp.heartbeat_seconds",
            "amqp.pool",
            "limits.memory_bytes",
            "worker.instance",
        ] {
            assert!(bad.contains(&key.to_string()), "{key} missing from {bad:?}");
        }
    }

    #[test]
    fn prefetch_is_at_least_the_concurrency() {
        assert_eq!(
            load("concurrency = 4\n[amqp]\nprefetch = 3\n").unwrap_err(),
            vec!["amqp.prefetch"]
        );
        let c = load("concurrency = 4\n[amqp]\nprefetch = 4\n").unwrap();
        assert_eq!((c.concurrency, c.amqp.prefetch), (4, 4));
        assert_eq!(load("concurrency = 4\n").unwrap().amqp.prefetch, 5);
    }

    #[test]
    fn wall_limit_must_fit_the_lease() {
        assert_eq!(
            load("[limits]\nwall_seconds = 7200\n").unwrap_err(),
            vec!["limits.wall_seconds"]
        );
        load("[limits]\nwall_seconds = 7200\n[amqp]\nlease_seconds = 7500\n").unwrap();
    }

    #[test]
    fn printed_config_parses_back_to_itself() {
        let c = load("[store]\nurl = \"oci+http://127.0.0.1:5000/corral\"\n[snapshot]\ncompression = \"zstd\"\n")
            .unwrap();
        assert_eq!(c.snapshot.level, defaults::ZSTD_LEVEL);
        assert_eq!(load(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn a_broker_cluster_is_a_list_of_urls() {
        let c = load(
            "[amqp]\nurl = [\"amqp://corral@10.0.0.1/corral\", \"amqp://corral@10.0.0.2/corral\"]\npassword = \"p\"\n",
        )
        .unwrap();
        assert_eq!(c.amqp.url.to_string(), "amqp://corral@10.0.0.1:5672/corral");
        assert_eq!(c.amqp.more_urls.len(), 1);
        assert_eq!(
            c.amqp.connection_uris(),
            vec![
                "amqp://corral:p@10.0.0.1:5672/corral".to_string(),
                "amqp://corral:p@10.0.0.2:5672/corral".to_string()
            ]
        );
        // Printed as a list, it reads back the same; one URL stays a plain string.
        let c = load(
            "[amqp]\nurl = [\"amqp://corral@10.0.0.1/corral\", \"amqp://corral@10.0.0.2/corral\"]\n",
        )
        .unwrap();
        assert!(
            c.to_toml()
                .contains("url = [\"amqp://corral@10.0.0.1:5672/corral\"")
        );
        assert_eq!(load(&c.to_toml()).unwrap(), c);
        let one = load("[amqp]\nurl = \"amqp://corral@10.0.0.1/corral\"\n").unwrap();
        assert!(one.amqp.more_urls.is_empty());
        assert!(
            one.to_toml()
                .contains("url = \"amqp://corral@10.0.0.1:5672/corral\"")
        );
        for bad in [
            "[amqp]\nurl = []\n",
            "[amqp]\nurl = [\"amqp://a/\", \"amqp://a/\"]\n",
            "[amqp]\nurl = [\"amqp://a/\", \"http://b/\"]\n",
        ] {
            assert_eq!(load(bad).unwrap_err(), vec!["amqp.url"], "{bad}");
        }
    }

    #[test]
    fn a_broker_list_from_the_environment_is_separated_by_spaces() {
        let sources = Sources {
            file: None,
            env: vec![(
                "CORRAL_AMQP_URL".into(),
                "amqp://u:p@127.0.0.1:5701/%2f amqp://u:p@127.0.0.1:5702/%2f".into(),
            )],
            flags: Vec::new(),
            hostname: "h".into(),
        };
        let c = Config::load(&sources).unwrap().config;
        assert_eq!(
            c.amqp.connection_uris(),
            vec![
                "amqp://u:p@127.0.0.1:5701/%2F".to_string(),
                "amqp://u:p@127.0.0.1:5702/%2F".to_string()
            ]
        );
    }
}
