//! The configuration as typed by an operator: every key optional, names exactly as in the TOML
//! file. Layers (file, environment, flags) are merged as TOML tables before they land here;
//! [`super::validate`] turns the result into the typed [`super::Config`].

use std::borrow::Cow;
use std::fmt;

use corral_protocol::{ByteSize, GIB, KIB, MIB, TIB};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_deadline_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<RawWorker>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<RawStore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<RawAmqp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<RawSandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<RawLimits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<RawSnapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<RawMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<RawLog>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<RawEgress>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_dir: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAmqp {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<RawUrls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs_queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_exchange: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_margin_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_max_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_wait_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_memory_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_refresh_seconds: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSandbox {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid_start: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid_start: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helper: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus_per_build: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_saturated_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_grace_seconds: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<RawBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<RawBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<RawBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes_per_second: Option<RawBytes>,
    pub network_bytes: Option<RawBytes>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshot {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<RawBytes>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// A byte size as an operator writes it: an integer (`4096`) or a string with a unit
/// (`"2 GiB"`, `"512MiB"`). Prints back exactly (`"2 GiB"`, or the integer when no binary
/// unit divides it) so the effective config parses to the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBytes(pub ByteSize);

impl Serialize for RawBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0.bytes();
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if n >= size && n.is_multiple_of(size) {
                return s.serialize_str(&format!("{} {unit}", n / size));
            }
        }
        s.serialize_u64(n)
    }
}

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl Visitor<'_> for Bytes {
            type Value = RawBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as 4096, \"512 MiB\" or \"2 GiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawBytes, E> {
                Ok(RawBytes(ByteSize(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawBytes, E> {
                u64::try_from(v)
                    .map(|v| RawBytes(ByteSize(v)))
                    .map_err(|_| E::custom(format!("{v} is negative; a byte size is at least 0")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBytes, E> {
                v.parse::<ByteSize>().map(RawBytes).map_err(|_| {
                    E::custom(format!(
                        "{v:?} is not a byte size such as 4096, \"512 MiB\" or \"2 GiB\""
                    ))
                })
            }
        }
        d.deserialize_any(Bytes)
    }
}

impl JsonSchema for RawBytes {
    fn schema_name() -> Cow<'static, str> {
        "RawBytes".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": ["integer", "string"] })
    }
}

/// `amqp.url` as an operator writes it: one URL, or the brokers of a cluster as a list
/// (`["amqp://corral@mq1/corral", "amqp://corral@mq2/corral"]`). A string from the
/// environment or a flag may name several, separated by whitespace (which no URL contains).
/// Prints back as a string when there is one URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawUrls {
    One(String),
    Many(Vec<String>),
}

impl RawUrls {
    /// Every URL, in the order given.
    pub fn urls(&self) -> Vec<String> {
        match self {
            RawUrls::One(s) => s.split_whitespace().map(str::to_owned).collect(),
            RawUrls::Many(v) => v.clone(),
        }
    }
}

impl From<String> for RawUrls {
    fn from(s: String) -> Self {
        RawUrls::One(s)
    }
}

impl Serialize for RawUrls {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RawUrls::One(url) => s.serialize_str(url),
            RawUrls::Many(urls) => urls.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RawUrls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Urls;
        impl<'de> Visitor<'de> for Urls {
            type Value = RawUrls;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a broker URL or a list of broker URLs")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawUrls, E> {
                Ok(RawUrls::One(v.to_owned()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawUrls, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    urls.push(url);
                }
                Ok(RawUrls::Many(urls))
            }
        }
        d.deserialize_any(Urls)
    }
}

impl JsonSchema for RawUrls {
    fn schema_name() -> Cow<'static, str> {
        "RawUrls".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": ["string", "array"], "items": { "type": "string" } })
    }
}
