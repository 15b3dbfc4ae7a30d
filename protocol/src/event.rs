//! Messages besides jobs and results: operator [`Event`]s, build [`LogChunk`]s and
//! [`Cancel`] requests.

use std::collections::BTreeMap;

use base64::Engine;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{JobId, ProjectId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum EventSchema {
    #[default]
    #[serde(rename = "corral.event.v1")]
    V1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum LogSchema {
    #[default]
    #[serde(rename = "corral.log.v1")]
    V1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum CancelSchema {
    #[default]
    #[serde(rename = "corral.cancel.v1")]
    V1,
}

/// What happened. Alerts (something a job did that operators should see) and lifecycle.
///
/// Kinds are only ever added within `corral.event.v1`; a consumer that routes on the
/// routing key sees new kinds under new keys. The facts each kind carries in `details`:
///
/// | kind | `details` |
/// |---|---|
/// | `oom` | `pid`, `command`, `memory_bytes` (when known), `usage` |
/// | `pids_limit` | `limit`, `usage` |
/// | `seccomp_denied` | `syscalls` (name → count) |
/// | `network_attempt`, `egress_denied` | `attempts`, `destination` (when known) |
/// | `cpu_saturated` | `cpus`, `seconds` |
/// | `disk_limit` (live) | `mount`, `bytes_total`, `bytes_available` |
/// | `log_flood` | `bytes_per_second`, `threshold_bytes_per_second`, `stream` |
/// | `unexpected_listen` | `port`, `protocol`, `address` |
/// | `boot_timeout` | `port`, `boot_timeout_seconds` |
/// | `app_crashed` | `reason` (`oom`, `pids_limit`, `exit_code`, `signal`), `exit_code`, `signal`, `restarts`, `restart_in_ms` |
/// | `crash_loop` | `crashes`, `within_seconds` |
/// | `app_started` | `image`, `port`, `publish`, `attempt` |
/// | `app_ready` | `port`, `publish`, `boot_ms`, `attempt` |
/// | `app_stopped` | `outcome` (`stopped`, `boot_timeout`, `crashed`, `crash_loop`), `reason`, `exit_code`, `signal`, `usage`, `restarts` |
/// | `job_started` | `pool`, `base`, `limits` |
/// | `job_finished` | `status`, `reason`, `exit_code`, `usage`, `alerts`, `dropped` |
/// | any alert summarising repeats | `repeated`: occurrences since the last one sent |
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    // Alerts.
    Oom,
    PidsLimit,
    WallTimeout,
    CpuLimit,
    DiskLimit,
    LogLimit,
    OutputLimit,
    SeccompDenied,
    NetworkAttempt,
    Cancelled,
    InvalidJob,
    PlatformError,
    /// The job sat at its CPU quota for a long stretch (a miner looks like this).
    CpuSaturated,
    /// The job's output rate passed the worker's threshold.
    LogFlood,
    /// An app opened a listening socket other than its published port.
    UnexpectedListen,
    /// The egress proxy refused a destination.
    EgressDenied,
    /// An app did not listen on its port within its boot timeout (it is stopped).
    BootTimeout,
    /// An app's process tree ended without being asked to.
    AppCrashed,
    /// An app crashed too often in too short a time; it is not restarted again.
    CrashLoop,
    // Lifecycle.
    JobStarted,
    JobFinished,
    JobRedelivered,
    WorkerStarted,
    WorkerDraining,
    WorkerStopped,
    BrokerReconnected,
    /// An app's process started (again, after a crash, with `attempt` > 1).
    AppStarted,
    /// An app accepts connections on its port (and answered its health check).
    AppReady,
    /// An app ended for good: its outcome and why.
    AppStopped,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 29] = [
        EventKind::Oom,
        EventKind::PidsLimit,
        EventKind::WallTimeout,
        EventKind::CpuLimit,
        EventKind::DiskLimit,
        EventKind::LogLimit,
        EventKind::OutputLimit,
        EventKind::SeccompDenied,
        EventKind::NetworkAttempt,
        EventKind::Cancelled,
        EventKind::InvalidJob,
        EventKind::PlatformError,
        EventKind::CpuSaturated,
        EventKind::LogFlood,
        EventKind::UnexpectedListen,
        EventKind::EgressDenied,
        EventKind::BootTimeout,
        EventKind::AppCrashed,
        EventKind::CrashLoop,
        EventKind::JobStarted,
        EventKind::JobFinished,
        EventKind::JobRedelivered,
        EventKind::WorkerStarted,
        EventKind::WorkerDraining,
        EventKind::WorkerStopped,
        EventKind::BrokerReconnected,
        EventKind::AppStarted,
        EventKind::AppReady,
        EventKind::AppStopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Oom => "oom",
            EventKind::PidsLimit => "pids_limit",
            EventKind::WallTimeout => "wall_timeout",
            EventKind::CpuLimit => "cpu_limit",
            EventKind::DiskLimit => "disk_limit",
            EventKind::LogLimit => "log_limit",
            EventKind::OutputLimit => "output_limit",
            EventKind::SeccompDenied => "seccomp_denied",
            EventKind::NetworkAttempt => "network_attempt",
            EventKind::Cancelled => "cancelled",
            EventKind::InvalidJob => "invalid_job",
            EventKind::PlatformError => "platform_error",
            EventKind::CpuSaturated => "cpu_saturated",
            EventKind::LogFlood => "log_flood",
            EventKind::UnexpectedListen => "unexpected_listen",
            EventKind::EgressDenied => "egress_denied",
            EventKind::BootTimeout => "boot_timeout",
            EventKind::AppCrashed => "app_crashed",
            EventKind::CrashLoop => "crash_loop",
            EventKind::JobStarted => "job_started",
            EventKind::JobFinished => "job_finished",
            EventKind::JobRedelivered => "job_redelivered",
            EventKind::WorkerStarted => "worker_started",
            EventKind::WorkerDraining => "worker_draining",
            EventKind::WorkerStopped => "worker_stopped",
            EventKind::BrokerReconnected => "broker_reconnected",
            EventKind::AppStarted => "app_started",
            EventKind::AppReady => "app_ready",
            EventKind::AppStopped => "app_stopped",
        }
    }

    /// Whether the kind is about a job's or the worker's life rather than something unusual.
    pub fn is_lifecycle(self) -> bool {
        matches!(
            self,
            EventKind::JobStarted
                | EventKind::JobFinished
                | EventKind::JobRedelivered
                | EventKind::WorkerStarted
                | EventKind::WorkerDraining
                | EventKind::WorkerStopped
                | EventKind::BrokerReconnected
                | EventKind::AppStarted
                | EventKind::AppReady
                | EventKind::AppStopped
        )
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown event kind {s:?} (one of {})", known.join(", "))
            })
    }
}

/// How urgently an operator should look. Events are routed on `<severity>.<kind>.<project>`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// An operator alert or lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "corral event", extend("$id" = "urn:corral:schema:corral.event.v1"))]
pub struct Event {
    pub schema: EventSchema,
    pub kind: EventKind,
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<ProjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// The worker that saw it.
    pub worker: String,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// A one-line summary for humans.
    pub message: String,
    /// Kind-specific facts (syscall names and counts, limits, peaks…): see [`EventKind`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, serde_json::Value>,
}

impl Event {
    /// The topic routing key: `<severity>.<kind>.<project>` (`-` when there is no project).
    pub fn routing_key(&self) -> String {
        let project = self.project.as_ref().map_or("-", ProjectId::as_str);
        format!(
            "{}.{}.{}",
            self.severity.as_str(),
            self.kind.as_str(),
            project
        )
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
    /// Lines the worker adds (stage changes, limit notices).
    System,
}

/// A piece of a build's output, published while the build runs. Chunks of one job carry
/// consecutive `seq` numbers from 0; the last has `eof: true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "corral log chunk", extend("$id" = "urn:corral:schema:corral.log.v1"))]
pub struct LogChunk {
    pub schema: LogSchema,
    pub job_id: JobId,
    pub project: ProjectId,
    pub seq: u64,
    pub stream: Stream,
    /// The bytes, base64 (standard alphabet, padded): build output need not be UTF-8.
    #[schemars(extend("contentEncoding" = "base64"))]
    pub data: String,
    #[serde(default)]
    pub eof: bool,
}

impl LogChunk {
    pub fn new(
        job_id: JobId,
        project: ProjectId,
        seq: u64,
        stream: Stream,
        bytes: &[u8],
        eof: bool,
    ) -> Self {
        LogChunk {
            schema: LogSchema::V1,
            job_id,
            project,
            seq,
            stream,
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
            eof,
        }
    }

    /// The decoded bytes, or `None` when `data` is not valid base64.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .ok()
    }
}

/// Ask the workers to stop a job: a running one ends `cancelled`; one not yet started is
/// answered `cancelled` without building.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "corral cancel", extend("$id" = "urn:corral:schema:corral.cancel.v1"))]
pub struct Cancel {
    pub schema: CancelSchema,
    pub job_id: JobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<ProjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_wire_name_and_parses_back() {
        for kind in EventKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
        }
        assert!("fire".parse::<EventKind>().is_err());
    }
}
