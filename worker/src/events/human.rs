//! One line per event for people, in Falco's shape: time, priority, rule, then the fields
//! that explain it.
//!
//! ```text
//! ! 18:31:02.123 warning log_flood demo/flood: the build wrote 3.0 MiB of output within a second (threshold 1.0 MiB/s) [bytes_per_second=3145728 stream=stdout]
//! - 18:31:05.456 info job_finished demo/flood: job flood finished succeeded [alerts=log_flood]
//! ```
//!
//! Alerts start with `!`, lifecycle events with `-`, so `grep '^!'` keeps the alerts.

use corral_protocol::Event;
use serde_json::Value;

/// Details too large for a line (a whole `usage` or `limits` object) are left to `--json`.
const SKIPPED_DETAILS: &[&str] = &["usage", "limits", "error"];
/// A detail's value is cut here on a line: a job's command or output is the job's to choose.
const MAX_VALUE_CHARS: usize = 64;

/// The human line of `event` (without a newline), time in UTC.
pub fn line(event: &Event) -> String {
    let mark = if event.kind.is_lifecycle() { '-' } else { '!' };
    let mut out = format!(
        "{mark} {} {} {}",
        clock(event.at_ms),
        event.severity.as_str(),
        event.kind.as_str()
    );
    match (&event.project, &event.job_id) {
        (Some(project), Some(job)) => out.push_str(&format!(" {project}/{job}")),
        (Some(project), None) => out.push_str(&format!(" {project}")),
        (None, Some(job)) => out.push_str(&format!(" -/{job}")),
        (None, None) => {}
    }
    out.push_str(&format!(" @{}: {}", event.worker, one_line(&event.message)));
    let fields: Vec<String> = event
        .details
        .iter()
        .filter(|(key, _)| !SKIPPED_DETAILS.contains(&key.as_str()))
        .filter_map(|(key, value)| Some(format!("{key}={}", cut(compact(value)?))))
        .collect();
    if !fields.is_empty() {
        out.push_str(&format!(" [{}]", fields.join(" ")));
    }
    out
}

fn cut(value: String) -> String {
    if value.chars().count() <= MAX_VALUE_CHARS {
        return value;
    }
    let mut kept: String = value.chars().take(MAX_VALUE_CHARS - 1).collect();
    kept.push('…');
    kept
}

/// `HH:MM:SS.mmm` of a Unix-milliseconds time, UTC.
fn clock(at_ms: u64) -> String {
    let ms = at_ms % 1000;
    let secs = (at_ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A message cannot break the one-line shape (a job's own text may end up in one).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A detail's value on a line: scalars as they are, a list or a map of scalars joined with
/// commas (`read×3,keyctl×1`), anything deeper left out.
fn compact(value: &Value) -> Option<String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(one_line(s).replace(' ', "_")),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some("-".into()),
        _ => None,
    };
    match value {
        Value::Array(items) => {
            let items: Option<Vec<String>> = items.iter().map(scalar).collect();
            let items = items?;
            Some(if items.is_empty() {
                "none".into()
            } else {
                items.join(",")
            })
        }
        Value::Object(map) => {
            let items: Option<Vec<String>> = map
                .iter()
                .map(|(k, v)| Some(format!("{k}×{}", scalar(v)?)))
                .collect();
            let items = items?;
            (!items.is_empty()).then(|| items.join(","))
        }
        other => scalar(other),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use corral_protocol::{EventKind, EventSchema, JobId, ProjectId, Severity};
    use serde_json::json;

    use super::*;

    fn event(kind: EventKind, severity: Severity, details: Value) -> Event {
        Event {
            schema: EventSchema::V1,
            kind,
            severity,
            project: Some(ProjectId::new("acme").unwrap()),
            job_id: Some(JobId::new("j1").unwrap()),
            worker: "w1".into(),
            // 2026-12-04 18:31:02.123 UTC
            at_ms: 1_796_409_062_123,
            message: "pid 42 (python3) killed at 812 MiB".into(),
            details: serde_json::from_value::<BTreeMap<String, Value>>(details).unwrap(),
        }
    }

    #[test]
    fn an_alert_reads_as_time_severity_kind_and_the_facts() {
        let e = event(
            EventKind::Oom,
            Severity::Warning,
            json!({"pid": 42, "command": "python3", "usage": {"memory_peak_bytes": 1}}),
        );
        assert_eq!(
            line(&e),
            "! 18:31:02.123 warning oom acme/j1 @w1: pid 42 (python3) killed at 812 MiB \
             [command=python3 pid=42]"
        );
    }

    #[test]
    fn lifecycle_lines_and_collections_stay_on_one_line() {
        let mut e = event(
            EventKind::JobFinished,
            Severity::Info,
            json!({"alerts": ["log_flood", "oom"], "dropped": {"log_flood": 3}, "status": "succeeded"}),
        );
        e.message = "job j1 finished\nsucceeded".into();
        assert_eq!(
            line(&e),
            "- 18:31:02.123 info job_finished acme/j1 @w1: job j1 finished succeeded \
             [alerts=log_flood,oom dropped=log_flood×3 status=succeeded]"
        );
        let quiet = event(
            EventKind::JobFinished,
            Severity::Info,
            json!({"alerts": [], "dropped": {}}),
        );
        assert!(line(&quiet).ends_with("[alerts=none]"), "{}", line(&quiet));
        let long = event(
            EventKind::JobStarted,
            Severity::Info,
            json!({"command": ["sh", "-c", "x".repeat(500)]}),
        );
        let cut = line(&long);
        assert!(cut.ends_with("xxx…]"), "{cut}");
        assert!(cut.len() < 200, "{cut}");
    }
}
