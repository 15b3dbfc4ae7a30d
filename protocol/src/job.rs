//! [`Job`]: one build request, as a producer publishes it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ProtocolError, Rule};
use crate::ids::{BaseName, JobId, PoolName, ProjectId};
use crate::limits::Limits;
use crate::workdir::WorkDir;

/// The schema tag of a job message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum JobSchema {
    #[default]
    #[serde(rename = "corral.job.v1")]
    V1,
}

/// Most argv entries a command may have.
pub const MAX_ARGS: usize = 1024;
/// Longest single argv entry or env value, in bytes.
pub const MAX_ARG_BYTES: usize = 8192;
/// Most env variables.
pub const MAX_ENV_VARS: usize = 256;
/// All of env (`KEY=VALUE\0` for every entry), in bytes.
pub const MAX_ENV_BYTES: usize = 65536;
/// Longest `reply_to` or `correlation_id` (an AMQP short string).
pub const MAX_SHORTSTR: usize = 255;

/// A build job: run `command` in `workdir` on top of `base` and `source`, within `limits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "corral job", extend("$id" = "urn:corral:schema:corral.job.v1"))]
pub struct Job {
    /// Always `corral.job.v1`.
    pub schema: JobSchema,
    pub job_id: JobId,
    pub project: ProjectId,
    /// Worker pool the job is routed to.
    #[serde(default)]
    pub pool: PoolName,
    /// Name of the base root filesystem (the Python version and a few system binaries).
    pub base: BaseName,
    /// The source bundle, a tar or tar.gz in the store, addressed by digest.
    pub source: SourceRef,
    /// The build command as argv; the first entry is looked up in `PATH` of the base.
    #[schemars(
        length(min = 1, max = 1024),
        inner(length(max = 8192), regex(pattern = r"^[^\u0000]*$")),
        extend("prefixItems" = [{"type": "string", "minLength": 1, "maxLength": 8192, "pattern": "^[^\\u0000]*$"}])
    )]
    pub command: Vec<String>,
    /// Environment of the build, in addition to a minimal `PATH`, `HOME` and `LANG`.
    #[serde(default)]
    #[schemars(extend("maxProperties" = 256, "propertyNames" = {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,127}$"}, "additionalProperties" = {"type": "string", "maxLength": 8192, "pattern": "^[^\\u0000]*$"}))]
    pub env: BTreeMap<String, String>,
    /// Working directory: absolute, normalized, no `..`. Default `/app`.
    #[serde(default)]
    pub workdir: WorkDir,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Seconds since the Unix epoch; file times in the output are clamped to it, so the
    /// same inputs give the same layer digest. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 253402300799_u64))]
    pub source_date_epoch: Option<u64>,
    /// May the worker answer from its action cache when the same inputs were built before.
    #[serde(default = "yes")]
    pub cache: bool,
    /// An egress job (`network: {"egress": [...]}`) is answered from the action cache only
    /// when this is true: the producer vouches that what it downloads is pinned (e.g. pip's
    /// `--require-hashes`), so the same inputs give the same bytes. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cacheable: bool,
    /// Queue to which the result is also sent (AMQP `reply_to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub reply_to: Option<String>,
    /// Echoed in the result, for request/reply producers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub correlation_id: Option<String>,
    /// When the producer published the job (Unix milliseconds); gives the `queued` timing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// A content-addressed source bundle.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceRef {
    pub digest: Digest,
    /// Size of the bundle in bytes, when the producer knows it (checked on fetch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// What the build may reach over the network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// A fresh network namespace with no interface up: the build reaches nothing, not even
    /// the host or its own loopback.
    #[default]
    None,
    /// A fresh network namespace with its own loopback up (for test servers the build
    /// starts itself); the host stays unreachable.
    Loopback,
    /// Loopback only, plus an HTTP proxy the worker serves on the job's own loopback
    /// (`HTTP_PROXY`/`HTTPS_PROXY` point at it) that reaches exactly these `HOST:PORT`
    /// destinations: a subset of the worker's `[egress] allow` list. The namespace still has
    /// no route out.
    Egress(
        #[schemars(
            length(min = 1, max = 64),
            inner(regex(pattern = r"^[A-Za-z0-9.:\[\]_-]{1,260}:[0-9]{1,5}$"))
        )]
        Vec<String>,
    ),
}

/// Most destinations one job may ask for.
pub const MAX_EGRESS: usize = 64;

impl NetworkPolicy {
    /// The egress destinations, empty for the other policies.
    pub fn egress(&self) -> &[String] {
        match self {
            NetworkPolicy::Egress(list) => list,
            NetworkPolicy::None | NetworkPolicy::Loopback => &[],
        }
    }

    /// Checks the egress list's shape: 1 to [`MAX_EGRESS`] entries, each `HOST:PORT` with a
    /// port in 1..=65535 (an IPv6 address in brackets).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let NetworkPolicy::Egress(list) = self else {
            return Ok(());
        };
        if list.is_empty() || list.len() > MAX_EGRESS {
            return Err(ProtocolError::new(
                "network.egress",
                Rule::Length,
                format!("must have 1 to {MAX_EGRESS} destinations"),
            ));
        }
        for (i, entry) in list.iter().enumerate() {
            if let Err(why) = split_host_port(entry) {
                return Err(ProtocolError::new(
                    format!("network.egress[{i}]"),
                    Rule::Charset,
                    format!("{entry:?}: {why}"),
                ));
            }
        }
        Ok(())
    }
}

/// `HOST:PORT` (`[v6]:PORT` for IPv6) into its host (lower-cased, without brackets) and
/// port. The host is a DNS name or an IP address.
pub fn split_host_port(entry: &str) -> Result<(String, u16), String> {
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT".to_owned())?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {port:?} is not in 1..=65535"))?;
    let host = match host.strip_prefix('[') {
        Some(v6) => {
            let v6 = v6
                .strip_suffix(']')
                .ok_or_else(|| "an unclosed '['".to_owned())?;
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
            v6.to_owned()
        }
        None => host.to_owned(),
    };
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !name_ok && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!("{host:?} is neither a host name nor an IP address"));
    }
    Ok((host.to_ascii_lowercase(), port))
}

impl Job {
    /// Rules that a JSON decode alone does not enforce: argv and env contents and budgets,
    /// and the limits against `max` (the hard maxima or a worker's lower ones).
    pub fn validate(&self, max: &Limits) -> Result<(), ProtocolError> {
        if self.command.is_empty() {
            return Err(ProtocolError::new(
                "command",
                Rule::Length,
                "must have at least one entry",
            ));
        }
        if self.command.len() > MAX_ARGS {
            return Err(ProtocolError::new(
                "command",
                Rule::Length,
                format!(
                    "{} entries exceed the maximum of {MAX_ARGS}",
                    self.command.len()
                ),
            ));
        }
        if self.command[0].is_empty() {
            return Err(ProtocolError::new(
                "command[0]",
                Rule::Length,
                "the program name must not be empty",
            ));
        }
        for (i, arg) in self.command.iter().enumerate() {
            check_text(&format!("command[{i}]"), arg)?;
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(ProtocolError::new(
                "env",
                Rule::Length,
                format!(
                    "{} variables exceed the maximum of {MAX_ENV_VARS}",
                    self.env.len()
                ),
            ));
        }
        let mut total = 0usize;
        for (key, value) in &self.env {
            let field = format!("env.{key}");
            let mut chars = key.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if !first_ok || key.len() > 128 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(ProtocolError::new(
                    field,
                    Rule::Charset,
                    "variable names are 1 to 128 of [A-Za-z0-9_], not starting with a digit",
                ));
            }
            check_text(&field, value)?;
            total += key.len() + value.len() + 2;
        }
        if total > MAX_ENV_BYTES {
            return Err(ProtocolError::new(
                "env",
                Rule::Size,
                format!("{total} bytes exceed the budget of {MAX_ENV_BYTES}"),
            ));
        }
        self.limits.within(max)?;
        self.network.validate()?;
        for (field, value) in [
            ("reply_to", &self.reply_to),
            ("correlation_id", &self.correlation_id),
        ] {
            if let Some(value) = value
                && (value.is_empty() || value.len() > MAX_SHORTSTR)
            {
                return Err(ProtocolError::new(
                    field,
                    Rule::Length,
                    format!("must be 1 to {MAX_SHORTSTR} bytes, got {}", value.len()),
                ));
            }
        }
        Ok(())
    }

    /// The epoch that output timestamps are clamped to.
    pub fn epoch(&self) -> u64 {
        self.source_date_epoch.unwrap_or(0)
    }
}

fn check_text(field: &str, value: &str) -> Result<(), ProtocolError> {
    if value.len() > MAX_ARG_BYTES {
        return Err(ProtocolError::new(
            field,
            Rule::Length,
            format!(
                "{} bytes exceed the maximum of {MAX_ARG_BYTES}",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(ProtocolError::new(
            field,
            Rule::Charset,
            "must not contain NUL",
        ));
    }
    Ok(())
}
