//! [`JobResult`]: the one final answer to a job.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::ProtocolError;
use crate::ids::{JobId, ProjectId};
use crate::job::NetworkPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum ResultSchema {
    #[default]
    #[serde(rename = "corral.result.v1")]
    V1,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The build exited 0 and its output is stored.
    Succeeded,
    /// The build's own fault: non-zero exit, a signal, a resource limit.
    Failed,
    /// The build ran past its wall-clock or CPU-time limit.
    TimedOut,
    /// The build was killed for breaking a rule (memory, pids, disk, logs, seccomp).
    Killed,
    /// A cancel message stopped it, or it was cancelled before it started.
    Cancelled,
    /// The job message was invalid; nothing ran.
    Rejected,
    /// The platform failed (store, host, worker) and gave up after retries.
    Error,
}

impl Status {
    /// Whether the job's output is usable.
    pub fn is_success(self) -> bool {
        self == Status::Succeeded
    }
}

/// Why a job did not succeed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The build exited with a non-zero code.
    NonzeroExit,
    /// The build's main process died of a signal it did not get from corral.
    Signal,
    Oom,
    WallTimeout,
    CpuLimit,
    PidsLimit,
    DiskLimit,
    LogLimit,
    /// The build's output exceeded the snapshot size cap.
    OutputLimit,
    /// A denied system call ended the build.
    Seccomp,
    /// The build moved more than `limits.network_bytes` through its egress proxy.
    NetworkLimit,
    Cancelled,
    InvalidJob,
    PlatformError,
}

/// A rule the job broke (for `rejected` results): the field, the rule and the text.
pub type ResultError = ProtocolError;

/// One layer of the built image.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// sha256 of the compressed blob.
    pub digest: Digest,
    /// sha256 of the uncompressed tar (the image config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Size of the compressed blob in bytes.
    pub size: u64,
    /// e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
}

/// The stored output of a build: an OCI image of layers [base, source, build].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Digest of the image manifest.
    pub manifest_digest: Digest,
    /// Where to fetch it (`oci-dir:/path:tag`, `registry:5000/repo:tag`…).
    pub reference: String,
    pub layers: Vec<Layer>,
}

/// The stored build log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogRef {
    pub digest: Digest,
    pub size: u64,
    /// The log reached `limits.log_bytes` and was cut there.
    pub truncated: bool,
}

/// What a build used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    pub memory_peak_bytes: u64,
    pub pids_peak: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    /// Bytes in the upper dir after the build (what the build added or changed).
    pub upper_bytes: u64,
    pub wall_ms: u64,
    /// Denied system calls by name, with how often each was tried.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub denied_syscalls: BTreeMap<String, u64>,
    /// Attempts to open a network socket that the job's network policy forbids.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub network_attempts: u64,
    /// What went through the egress proxy (egress jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkUsage>,
}

/// The traffic of an egress job through its proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkUsage {
    /// Bytes from the destinations to the build.
    pub bytes_in: u64,
    /// Bytes from the build to the destinations.
    pub bytes_out: u64,
    /// Connections made to allowed destinations.
    pub connections: u64,
    /// Requests refused (destination not allowed, bad request, connection cap).
    pub denied: u64,
    /// One row per destination tried, allowed or not, sorted by `host:port`.
    pub destinations: Vec<DestinationUsage>,
}

/// One destination's row of [`NetworkUsage`] (squid's access-log fields, summed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationUsage {
    /// `HOST:PORT` as the build asked for it.
    pub destination: String,
    /// The address connected to (empty when refused before resolving or none resolved).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connections: u64,
    pub denied: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Milliseconds spent in each stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// From `submitted_at_ms` to the worker picking the job up, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
    pub fetch_ms: u64,
    pub build_ms: u64,
    pub snapshot_ms: u64,
    pub upload_ms: u64,
    pub total_ms: u64,
}

/// Everything a build's bytes depend on, as the worker saw it: the action cache key is the
/// sha256 of the compact JSON object `{"kind":"corral.action.v2", …}` followed by these
/// fields in this order (all but `action_key`), so two results with different digests and
/// equal inputs point at the worker, and unequal inputs name what changed. What is not here does not reach the image: the worker's umask,
/// time zone, locale, data dir, uid range, concurrency, snapshot threads, cache state and
/// store (the reproducibility tests vary each of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildInputs {
    /// sha256 of the canonical inputs: the action cache key.
    pub action_key: Digest,
    /// The version of the layer format (tar layout, id mapping, permission policy).
    pub layer_format_version: u32,
    /// Digest of the base's layer (not its name: a rebuilt base is another input).
    pub base_digest: Digest,
    /// Digest of the source bundle.
    pub source_digest: Digest,
    pub command: Vec<String>,
    /// sha256 of the job's `env` as compact JSON with sorted keys (the values themselves
    /// are not repeated: results travel further than jobs).
    pub env_digest: Digest,
    pub workdir: String,
    /// The job's `source_date_epoch` (or its default): the clamp of every mtime.
    pub source_date_epoch: u64,
    pub network: NetworkPolicy,
    /// The layer encoding: media type and level, e.g. `gzip-6`, `zstd-3`.
    pub layer_encoding: String,
    /// The umask the build's processes start with, in octal (`0022`).
    pub umask: String,
}

/// Which worker produced a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    pub id: String,
    pub version: String,
}

/// The final result of one job. Exactly one is published per job; a redelivered job's
/// result repeats the first (it comes from the action cache).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "corral job result", extend("$id" = "urn:corral:schema:corral.result.v1"))]
pub struct JobResult {
    pub schema: ResultSchema,
    pub job_id: JobId,
    /// Absent only when a rejected message carried no readable project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<ProjectId>,
    pub status: Status,
    /// Why, when not `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// A human sentence on what happened, when not `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For `rejected`: the field and the rule that the job broke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResultError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What the build's digest depends on (absent when nothing was built or looked up,
    /// e.g. a rejected job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<BuildInputs>,
    #[serde(default)]
    pub timings: Timings,
    /// Whether the result came from the action cache instead of a build.
    #[serde(default)]
    pub cached: bool,
    pub worker: WorkerInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// When the result was made (Unix milliseconds).
    pub finished_at_ms: u64,
}

impl JobResult {
    /// A bare result with the given status; callers fill in the rest.
    pub fn new(
        job_id: JobId,
        project: Option<ProjectId>,
        status: Status,
        worker: WorkerInfo,
    ) -> Self {
        JobResult {
            schema: ResultSchema::V1,
            job_id,
            project,
            status,
            reason: None,
            message: None,
            error: None,
            exit_code: None,
            signal: None,
            artifact: None,
            log: None,
            usage: None,
            inputs: None,
            timings: Timings::default(),
            cached: false,
            worker,
            correlation_id: None,
            finished_at_ms: 0,
        }
    }

    /// The `rejected` result for a job message that failed validation.
    pub fn rejected(
        job_id: JobId,
        project: Option<ProjectId>,
        error: ProtocolError,
        worker: WorkerInfo,
    ) -> Self {
        let mut result = JobResult::new(job_id, project, Status::Rejected, worker);
        result.reason = Some(Reason::InvalidJob);
        result.message = Some(error.to_string());
        result.error = Some(error);
        result
    }
}
