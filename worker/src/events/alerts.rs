//! Alerts from a job's final result: every unusual outcome becomes an [`Event`], sent through
//! the job's [`super::JobEvents`] like the live ones, so a kind already raised while the job
//! ran is not raised twice.

use std::collections::BTreeMap;

use corral_protocol::{
    Event, EventKind, EventSchema, JobId, JobResult, ProjectId, Reason, Severity, Status,
};

use crate::job::now_ms;

/// An event with the worker's id and the current time.
pub fn event(
    kind: EventKind,
    severity: Severity,
    project: Option<ProjectId>,
    job_id: Option<JobId>,
    worker: &str,
    message: impl Into<String>,
) -> Event {
    Event {
        schema: EventSchema::V1,
        kind,
        severity,
        project,
        job_id,
        worker: worker.to_owned(),
        at_ms: now_ms(),
        message: message.into(),
        details: BTreeMap::new(),
    }
}

/// The alerts a final result calls for: none for a plain success or a build that merely
/// exited non-zero (the producer sees those in the result), one per unusual outcome else.
pub fn for_result(result: &JobResult, worker: &str) -> Vec<Event> {
    let mut out = Vec::new();
    let kind = match result.reason {
        Some(Reason::Oom) => Some((EventKind::Oom, Severity::Warning)),
        Some(Reason::PidsLimit) => Some((EventKind::PidsLimit, Severity::Warning)),
        Some(Reason::WallTimeout) => Some((EventKind::WallTimeout, Severity::Warning)),
        Some(Reason::CpuLimit) => Some((EventKind::CpuLimit, Severity::Warning)),
        Some(Reason::DiskLimit) => Some((EventKind::DiskLimit, Severity::Warning)),
        Some(Reason::LogLimit) => Some((EventKind::LogLimit, Severity::Warning)),
        Some(Reason::OutputLimit) => Some((EventKind::OutputLimit, Severity::Warning)),
        Some(Reason::Seccomp) => Some((EventKind::SeccompDenied, Severity::Critical)),
        // The proxy refused the rest of the job's traffic.
        Some(Reason::NetworkLimit) => Some((EventKind::EgressDenied, Severity::Warning)),
        Some(Reason::Cancelled) => Some((EventKind::Cancelled, Severity::Info)),
        Some(Reason::InvalidJob) => Some((EventKind::InvalidJob, Severity::Warning)),
        Some(Reason::PlatformError) => Some((EventKind::PlatformError, Severity::Critical)),
        Some(Reason::NonzeroExit | Reason::Signal) | None => None,
    };
    if let Some((kind, severity)) = kind {
        let mut e = event(
            kind,
            severity,
            result.project.clone(),
            Some(result.job_id.clone()),
            worker,
            result
                .message
                .clone()
                .unwrap_or_else(|| format!("job {} ended {}", result.job_id, kind.as_str())),
        );
        e.details
            .insert("status".into(), serde_json::json!(result.status));
        if let Some(error) = &result.error {
            e.details.insert("error".into(), serde_json::json!(error));
        }
        if let Some(usage) = &result.usage {
            e.details.insert("usage".into(), serde_json::json!(usage));
        }
        out.push(e);
    }
    // Denied syscalls are worth an alert even when the build survived them.
    if let Some(usage) = &result.usage
        && !usage.denied_syscalls.is_empty()
        && result.reason != Some(Reason::Seccomp)
    {
        let mut e = event(
            EventKind::SeccompDenied,
            Severity::Critical,
            result.project.clone(),
            Some(result.job_id.clone()),
            worker,
            format!("job {} tried denied system calls", result.job_id),
        );
        e.details
            .insert("syscalls".into(), serde_json::json!(usage.denied_syscalls));
        out.push(e);
    }
    // A network attempt from a job without network is an attack or a misconfigured build:
    // operators see it whatever the build's own outcome.
    if let Some(usage) = &result.usage
        && usage.network_attempts > 0
    {
        let mut e = event(
            EventKind::NetworkAttempt,
            Severity::Warning,
            result.project.clone(),
            Some(result.job_id.clone()),
            worker,
            format!(
                "job {} tried to open {} network socket(s) without network access",
                result.job_id, usage.network_attempts
            ),
        );
        e.details
            .insert("attempts".into(), serde_json::json!(usage.network_attempts));
        out.push(e);
    }
    if result.status == Status::Error && kind.is_none() {
        out.push(event(
            EventKind::PlatformError,
            Severity::Critical,
            result.project.clone(),
            Some(result.job_id.clone()),
            worker,
            result.message.clone().unwrap_or_default(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_protocol::WorkerInfo;

    #[test]
    fn unusual_outcomes_alert_and_plain_failures_do_not() {
        let mut r = JobResult::new(
            JobId::new("j").unwrap(),
            Some(ProjectId::new("acme").unwrap()),
            Status::Failed,
            WorkerInfo::default(),
        );
        r.reason = Some(Reason::NonzeroExit);
        assert!(for_result(&r, "w").is_empty());
        r.status = Status::TimedOut;
        r.reason = Some(Reason::WallTimeout);
        let events = for_result(&r, "w");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].routing_key(), "warning.wall_timeout.acme");
    }

    #[test]
    fn network_attempts_and_denied_syscalls_alert_even_on_success() {
        let mut r = JobResult::new(
            JobId::new("j").unwrap(),
            Some(ProjectId::new("acme").unwrap()),
            Status::Succeeded,
            WorkerInfo::default(),
        );
        let mut usage = corral_protocol::Usage {
            network_attempts: 3,
            ..Default::default()
        };
        usage.denied_syscalls.insert("keyctl".into(), 2);
        r.usage = Some(usage);
        let keys: Vec<String> = for_result(&r, "w").iter().map(Event::routing_key).collect();
        assert_eq!(
            keys,
            [
                "critical.seccomp_denied.acme",
                "warning.network_attempt.acme"
            ]
        );
    }
}
