//! corral-protocol: the wire messages of corral and their rules.
//!
//! Every message is a JSON object tagged with its schema (`"schema": "corral.job.v1"`).
//! Decoding refuses unknown fields and unknown schema versions, and every failure is a
//! [`ProtocolError`] that names the field and the [`Rule`] it broke, e.g.
//! `limits.memory_bytes: 64 GiB exceeds the maximum of 16 GiB`.
//!
//! | message | schema tag | who sends it |
//! |---|---|---|
//! | [`Job`] | `corral.job.v1` | producers, to `corral.jobs` |
//! | [`JobResult`] | `corral.result.v1` | workers, to `corral.results` (and `reply_to`) |
//! | [`Event`] | `corral.event.v1` | workers, to `corral.events` |
//! | [`LogChunk`] | `corral.log.v1` | workers, to `corral.logs` |
//! | [`Cancel`] | `corral.cancel.v1` | producers, to `corral.control` |
//!
//! JSON Schemas generated from these types are committed under `protocol/schema/` (see
//! [`schemas`]); producers in other languages validate against them.
#![forbid(unsafe_code)]

mod bytesize; // ByteSize: bytes for humans, a plain integer on the wire
mod digest; // Digest: sha256 content addresses
mod error; // ProtocolError: which field broke which rule
mod event; // Event, LogChunk and Cancel
mod ids; // validated identifier newtypes: job, project, pool, base
mod job; // Job: one build request
mod limits; // Limits: defaults, hard maxima, a worker's lower maxima
mod result; // JobResult: the one final answer to a job
mod workdir; // WorkDir: an absolute, normalized path inside the sandbox

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

pub use bytesize::{ByteSize, GIB, KIB, MIB, TIB};
pub use digest::Digest;
pub use error::{FieldError, ProtocolError, Rule};
pub use event::{
    Cancel, CancelSchema, Event, EventKind, EventSchema, LogChunk, LogSchema, Severity, Stream,
};
pub use ids::{BaseName, JobId, PoolName, ProjectId};
pub use job::{
    Job, JobSchema, MAX_ARG_BYTES, MAX_ARGS, MAX_EGRESS, MAX_ENV_BYTES, MAX_ENV_VARS,
    NetworkPolicy, SourceRef, split_host_port,
};
pub use limits::Limits;
pub use result::{
    Artifact, BuildInputs, DestinationUsage, JobResult, Layer, LogRef, NetworkUsage, Reason,
    ResultSchema, Status, Timings, Usage, WorkerInfo,
};
pub use workdir::WorkDir;

/// Largest message accepted, in bytes. Anything bigger is refused before parsing.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// A wire message: its schema tag and its JSON Schema.
pub trait Message: DeserializeOwned + JsonSchema {
    /// The schema tag, e.g. `corral.job.v1`.
    const SCHEMA: &'static str;
}

impl Message for Job {
    const SCHEMA: &'static str = "corral.job.v1";
}
impl Message for JobResult {
    const SCHEMA: &'static str = "corral.result.v1";
}
impl Message for Event {
    const SCHEMA: &'static str = "corral.event.v1";
}
impl Message for LogChunk {
    const SCHEMA: &'static str = "corral.log.v1";
}
impl Message for Cancel {
    const SCHEMA: &'static str = "corral.cancel.v1";
}

/// Decodes one message: JSON syntax, then the schema tag, then the typed fields.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, ProtocolError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ProtocolError::new(
            "$",
            Rule::Size,
            format!(
                "{} bytes exceed the message limit of {MAX_MESSAGE_BYTES}",
                bytes.len()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|err| {
        let text = err.to_string();
        ProtocolError::new("$", Rule::Syntax, format!("not valid JSON: {text}"))
    })?;
    check_schema_tag(&value, M::SCHEMA)?;
    serde_path_to_error::deserialize(value)
        .map_err(|err| ProtocolError::from_serde(err.path(), err.inner()))
}

/// Decodes and validates a job against the hard maxima.
pub fn decode_job(bytes: &[u8]) -> Result<Job, ProtocolError> {
    decode_job_within(bytes, &Limits::MAX)
}

/// Decodes and validates a job against a worker's (possibly lower) maxima.
pub fn decode_job_within(bytes: &[u8], max: &Limits) -> Result<Job, ProtocolError> {
    let job: Job = decode(bytes)?;
    job.validate(max)?;
    Ok(job)
}

/// Best effort: the job id and project of a message that failed to decode, so that its
/// producer can still get a `rejected` result. Each is `None` unless present and valid.
pub fn recover_ids(bytes: &[u8]) -> (Option<JobId>, Option<ProjectId>) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(bytes)
    else {
        return (None, None);
    };
    let text = |key: &str| {
        map.get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    (
        text("job_id").and_then(|s| JobId::new(s).ok()),
        text("project").and_then(|s| ProjectId::new(s).ok()),
    )
}

fn check_schema_tag(value: &serde_json::Value, expected: &str) -> Result<(), ProtocolError> {
    let serde_json::Value::Object(map) = value else {
        return Err(ProtocolError::new(
            "$",
            Rule::Syntax,
            "a message must be a JSON object",
        ));
    };
    match map.get("schema") {
        None => Err(ProtocolError::new(
            "schema",
            Rule::MissingField,
            format!("is required (\"{expected}\")"),
        )),
        Some(serde_json::Value::String(tag)) if tag == expected => Ok(()),
        Some(serde_json::Value::String(tag)) => {
            let (family, _) = expected.rsplit_once('.').unwrap_or((expected, ""));
            let why = if tag.starts_with(&format!("{family}.")) {
                format!("{tag:?} is not supported; this worker speaks {expected:?}")
            } else {
                format!("{tag:?} is not a {expected:?} message")
            };
            Err(ProtocolError::new("schema", Rule::Schema, why))
        }
        Some(_) => Err(ProtocolError::new(
            "schema",
            Rule::Type,
            format!("must be the string \"{expected}\""),
        )),
    }
}

/// JSON Schema (draft 2020-12) of one message type.
pub fn schema_of<M: Message>() -> serde_json::Value {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<M>();
    schema.to_value()
}

/// Every message's JSON Schema as `(file name, schema)`, as committed under
/// `protocol/schema/`.
pub fn schemas() -> Vec<(String, serde_json::Value)> {
    vec![
        (format!("{}.schema.json", Job::SCHEMA), schema_of::<Job>()),
        (
            format!("{}.schema.json", JobResult::SCHEMA),
            schema_of::<JobResult>(),
        ),
        (
            format!("{}.schema.json", Event::SCHEMA),
            schema_of::<Event>(),
        ),
        (
            format!("{}.schema.json", LogChunk::SCHEMA),
            schema_of::<LogChunk>(),
        ),
        (
            format!("{}.schema.json", Cancel::SCHEMA),
            schema_of::<Cancel>(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_json() -> serde_json::Value {
        serde_json::json!({
            "schema": "corral.job.v1",
            "job_id": "j1",
            "project": "acme",
            "base": "python-3.11",
            "source": {"digest": format!("sha256:{}", "a".repeat(64))},
            "command": ["sh", "-c", "true"],
        })
    }

    fn err_of(value: serde_json::Value) -> ProtocolError {
        decode_job(value.to_string().as_bytes()).unwrap_err()
    }

    #[test]
    fn minimal_job_takes_defaults() {
        let job = decode_job(job_json().to_string().as_bytes()).unwrap();
        assert_eq!(job.workdir.as_str(), "/app");
        assert_eq!(job.limits, Limits::DEFAULT);
        assert_eq!(job.network, NetworkPolicy::None);
        assert!(job.cache);
        assert_eq!(job.pool.as_str(), "default");
    }

    #[test]
    fn errors_name_field_and_rule() {
        let mut v = job_json();
        v["limits"] = serde_json::json!({"memory_bytes": 64u64 << 30});
        assert_eq!(
            err_of(v).to_string(),
            "limits.memory_bytes: 64 GiB exceeds the maximum of 16 GiB"
        );

        let mut v = job_json();
        v["extra"] = serde_json::json!(1);
        let e = err_of(v);
        assert_eq!((e.field.as_str(), e.rule), ("extra", Rule::UnknownField));

        let mut v = job_json();
        v["limits"] = serde_json::json!({"bogus": 1});
        let e = err_of(v);
        assert_eq!(
            (e.field.as_str(), e.rule),
            ("limits.bogus", Rule::UnknownField)
        );

        let mut v = job_json();
        v.as_object_mut().unwrap().remove("command");
        let e = err_of(v);
        assert_eq!((e.field.as_str(), e.rule), ("command", Rule::MissingField));

        let mut v = job_json();
        v["source"]["digest"] = serde_json::json!("sha256:xyz");
        let e = err_of(v);
        assert_eq!((e.field.as_str(), e.rule), ("source.digest", Rule::Digest));

        let mut v = job_json();
        v["workdir"] = serde_json::json!("/app/../etc");
        let e = err_of(v);
        assert_eq!((e.field.as_str(), e.rule), ("workdir", Rule::Path));

        let mut v = job_json();
        v["schema"] = serde_json::json!("corral.job.v2");
        let e = err_of(v);
        assert_eq!((e.field.as_str(), e.rule), ("schema", Rule::Schema));

        let mut v = job_json();
        v["network"] = serde_json::json!("host");
        let e = err_of(v);
        assert_eq!((e.field.as_str(), e.rule), ("network", Rule::Type));

        let e = decode_job(b"{not json").unwrap_err();
        assert_eq!((e.field.as_str(), e.rule), ("$", Rule::Syntax));
    }

    #[test]
    fn recovers_ids_from_invalid_messages() {
        let mut v = job_json();
        v["limits"] = serde_json::json!({"pids": 1_000_000});
        let (job, project) = recover_ids(v.to_string().as_bytes());
        assert_eq!(job.unwrap().as_str(), "j1");
        assert_eq!(project.unwrap().as_str(), "acme");
        assert_eq!(recover_ids(b"garbage"), (None, None));
    }

    #[test]
    fn results_round_trip() {
        let worker = WorkerInfo {
            id: "w1".into(),
            version: "0.1.0".into(),
        };
        let err = ProtocolError::new("command", Rule::Length, "must have at least one entry");
        let result = JobResult::rejected(JobId::new("j1").unwrap(), None, err, worker);
        let bytes = serde_json::to_vec(&result).unwrap();
        let back: JobResult = decode(&bytes).unwrap();
        assert_eq!(back, result);
    }
}
