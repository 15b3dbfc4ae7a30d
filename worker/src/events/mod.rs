//! A job's events on one path: whatever sees something during a run (the build's output
//! reader, the verdict, and the kernel watchers that will follow) hands it to the job's
//! [`JobEvents`], which rate-limits it per kind ([`limit`]), counts it, and passes it to the
//! run's [`EventSink`]s: `corral.events` on the broker for `corral work`, JSON lines and a
//! human line on stderr for `corral replay`.
//!
//! Sinks never block the job: the broker sink queues for a publisher task, the file sinks
//! write one short line. The final result keeps the totals; `job_finished` lists the alert
//! kinds the job raised and what the limit held back.

pub mod alerts;
pub mod human;
pub mod limit;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use corral_protocol::{Event, EventKind, Job, JobId, JobResult, ProjectId, Severity};
use serde_json::{Value, json};

use crate::job::{Action, Verdict, wire_name};
use crate::metrics::Metrics;
use limit::{Admit, RateLimiter};

/// Where a run's events go. `send` must return promptly: it is called from the build's
/// output readers and, later, from kernel-notification watchers.
pub trait EventSink: Send + Sync {
    fn send(&self, event: &Event);
}

/// One JSON object per line (`--events FILE|-`), flushed per event so a reader follows live.
pub struct JsonLines {
    out: Mutex<Box<dyn Write + Send>>,
}

impl JsonLines {
    pub fn new(out: impl Write + Send + 'static) -> Self {
        JsonLines {
            out: Mutex::new(Box::new(out)),
        }
    }
}

impl EventSink for JsonLines {
    fn send(&self, event: &Event) {
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = out.write_all(&line).and_then(|()| out.flush());
    }
}

/// [`human::line`]s, e.g. on stderr while `corral replay` runs.
pub struct HumanLines {
    out: Mutex<Box<dyn Write + Send>>,
    alerts_only: bool,
}

impl HumanLines {
    /// Writes every event, or with `alerts_only` the alerts alone.
    pub fn new(out: impl Write + Send + 'static, alerts_only: bool) -> Self {
        HumanLines {
            out: Mutex::new(Box::new(out)),
            alerts_only,
        }
    }
}

impl EventSink for HumanLines {
    fn send(&self, event: &Event) {
        if self.alerts_only && event.kind.is_lifecycle() {
            return;
        }
        let line = format!("{}\n", human::line(event));
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
    }
}

/// An alert or lifecycle fact about a job, before the job's ids, the worker and the time
/// are added.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    pub kind: EventKind,
    /// What within the kind this is about, when the rate limit should keep it apart from
    /// the kind's other subjects (a denied system call's name).
    pub subject: Option<String>,
    pub severity: Severity,
    pub message: String,
    pub details: BTreeMap<String, Value>,
}

impl Fact {
    pub fn new(kind: EventKind, severity: Severity, message: impl Into<String>) -> Self {
        Fact {
            kind,
            subject: None,
            severity,
            message: message.into(),
            details: BTreeMap::new(),
        }
    }

    /// Rate-limited apart from the kind's other subjects (see [`limit::MAX_SUBJECTS`]).
    pub fn about(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.details.insert(key.to_owned(), json!(value));
        self
    }
}

struct State {
    limiter: RateLimiter,
    /// Alert kinds sent for this job.
    raised: BTreeSet<EventKind>,
    started: bool,
    finished: bool,
}

struct Inner {
    job_id: JobId,
    project: ProjectId,
    worker: String,
    started_details: BTreeMap<String, Value>,
    sinks: Vec<Arc<dyn EventSink>>,
    metrics: Option<Arc<Metrics>>,
    state: Mutex<State>,
}

/// The event path of one job. Clones share the same limiter and sinks.
#[derive(Clone)]
pub struct JobEvents {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JobEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobEvents")
            .field("job_id", &self.inner.job_id)
            .field("sinks", &self.inner.sinks.len())
            .finish_non_exhaustive()
    }
}

impl JobEvents {
    /// The events of `job` run by `worker`, to `sinks`, counted in `metrics`.
    pub fn new(
        job: &Job,
        worker: &str,
        sinks: Vec<Arc<dyn EventSink>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let started_details = BTreeMap::from([
            ("pool".to_owned(), json!(job.pool)),
            ("base".to_owned(), json!(job.base)),
            ("limits".to_owned(), json!(job.limits)),
            ("command".to_owned(), json!(job.command)),
        ]);
        JobEvents {
            inner: Arc::new(Inner {
                job_id: job.job_id.clone(),
                project: job.project.clone(),
                worker: worker.to_owned(),
                started_details,
                sinks,
                metrics,
                state: Mutex::new(State {
                    limiter: RateLimiter::default(),
                    raised: BTreeSet::new(),
                    started: false,
                    finished: false,
                }),
            }),
        }
    }

    /// The events of an app (`corral run`): `app_id` stands where a job's id does.
    pub fn for_app(
        app_id: JobId,
        project: ProjectId,
        worker: &str,
        sinks: Vec<Arc<dyn EventSink>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        JobEvents {
            inner: Arc::new(Inner {
                job_id: app_id,
                project,
                worker: worker.to_owned(),
                started_details: BTreeMap::new(),
                sinks,
                metrics,
                state: Mutex::new(State {
                    limiter: RateLimiter::default(),
                    raised: BTreeSet::new(),
                    started: false,
                    finished: false,
                }),
            }),
        }
    }

    /// Sends a lifecycle `fact` at once, past the rate limit: an app's starts, readiness
    /// and end are few, and each one matters.
    pub fn lifecycle(&self, fact: Fact) {
        self.deliver(fact, 0);
    }

    /// Events that go nowhere (but are still limited and counted): for runs nobody watches.
    pub fn unwatched(job: &Job) -> Self {
        JobEvents::new(job, "unwatched", Vec::new(), None)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `fact` now, unless the rate limit holds it back. Returns whether it went out.
    pub fn raise(&self, fact: Fact) -> bool {
        self.raise_at(fact, Instant::now())
    }

    fn raise_at(&self, fact: Fact, now: Instant) -> bool {
        let admit = {
            let mut state = self.state();
            let admit = state
                .limiter
                .admit_about(fact.kind, fact.subject.as_deref(), now);
            if admit != Admit::Hold && !fact.kind.is_lifecycle() {
                state.raised.insert(fact.kind);
            }
            admit
        };
        let Admit::Send { suppressed } = admit else {
            if let Some(metrics) = &self.inner.metrics {
                metrics.event_dropped(fact.kind.as_str());
            }
            return false;
        };
        self.deliver(fact, suppressed);
        true
    }

    fn deliver(&self, mut fact: Fact, suppressed: u64) {
        if suppressed > 0 {
            fact.details.insert("suppressed".into(), json!(suppressed));
        }
        let event = alerts::event(
            fact.kind,
            fact.severity,
            Some(self.inner.project.clone()),
            Some(self.inner.job_id.clone()),
            &self.inner.worker,
            fact.message,
        );
        let event = Event {
            details: fact.details,
            ..event
        };
        if let Some(metrics) = &self.inner.metrics {
            metrics.event_sent(event.kind.as_str(), !event.kind.is_lifecycle());
        }
        for sink in &self.inner.sinks {
            sink.send(&event);
        }
    }

    /// `job_started`: the build's process tree exists.
    pub fn started(&self) {
        {
            let mut state = self.state();
            if state.started {
                return;
            }
            state.started = true;
        }
        let mut fact = Fact::new(
            EventKind::JobStarted,
            Severity::Info,
            format!("job {} started", self.inner.job_id),
        );
        fact.details = self.inner.started_details.clone();
        self.raise(fact);
    }

    /// `job_redelivered`: the broker delivered this job before.
    pub fn redelivered(&self, earlier: u32) {
        self.raise(
            Fact::new(
                EventKind::JobRedelivered,
                Severity::Info,
                format!(
                    "job {} delivered again (earlier deliveries: {earlier})",
                    self.inner.job_id
                ),
            )
            .with("earlier_deliveries", earlier),
        );
    }

    /// The alerts the verdict's result calls for (a kind already raised while the job ran is
    /// not raised again: the result carries the totals), then `job_finished` with the alert
    /// kinds raised and what the rate limit held back. A run that ends without a result
    /// (handed back to the queue) finishes only if it started.
    pub fn finished(&self, verdict: &Verdict) {
        if std::mem::replace(&mut self.state().finished, true) {
            return;
        }
        if let Some(result) = &verdict.result {
            for alert in alerts::for_result(result, &self.inner.worker) {
                if self.state().raised.contains(&alert.kind) {
                    continue;
                }
                let mut fact = Fact::new(alert.kind, alert.severity, alert.message);
                fact.details = alert.details;
                self.raise(fact);
            }
        } else if !self.state().started {
            return;
        }
        let fact = self.finished_fact(verdict.result.as_ref(), verdict.action);
        self.raise(fact);
    }

    fn finished_fact(&self, result: Option<&JobResult>, action: Action) -> Fact {
        let (raised, dropped) = {
            let state = self.state();
            let dropped: BTreeMap<&'static str, u64> = state
                .limiter
                .held()
                .into_iter()
                .map(|(kind, n)| (kind.as_str(), n))
                .collect();
            let raised: Vec<&'static str> = state.raised.iter().map(|k| k.as_str()).collect();
            (raised, dropped)
        };
        let action = match action {
            Action::Ack => "ack",
            Action::DeadLetter => "dead_letter",
            Action::Requeue { .. } => "requeue",
            Action::Leave => "leave",
        };
        let id = &self.inner.job_id;
        let Some(result) = result else {
            return Fact::new(
                EventKind::JobFinished,
                Severity::Info,
                format!("job {id} ended without a result; it goes back to the queue"),
            )
            .with("action", action)
            .with("alerts", raised)
            .with("dropped", dropped);
        };
        let status = wire_name(result.status);
        let mut message = format!("job {id} finished {status}");
        if let Some(reason) = result.reason {
            message.push_str(&format!(" ({})", wire_name(reason)));
        }
        let mut fact = Fact::new(EventKind::JobFinished, Severity::Info, message)
            .with("status", &status)
            .with("action", action)
            .with("alerts", raised)
            .with("dropped", dropped);
        if let Some(reason) = result.reason {
            fact = fact.with("reason", wire_name(reason));
        }
        if let Some(code) = result.exit_code {
            fact = fact.with("exit_code", code);
        }
        if result.cached {
            // Answered from the action cache: no sandbox ran, so no job_started came first.
            fact = fact.with("cached", true);
        }
        if let Some(usage) = &result.usage {
            fact = fact.with("usage", usage);
        }
        fact
    }

    /// Alert kinds sent for this job so far.
    pub fn raised(&self) -> BTreeSet<EventKind> {
        self.state().raised.clone()
    }

    /// Occurrences the rate limit held back so far, per kind.
    pub fn dropped(&self) -> BTreeMap<EventKind, u64> {
        self.state().limiter.held()
    }
}

#[cfg(test)]
mod tests {
    use corral_protocol::{JobResult, Reason, Status, WorkerInfo};

    use super::*;

    /// Keeps what it is sent.
    #[derive(Default)]
    struct Kept(Mutex<Vec<Event>>);

    impl EventSink for Kept {
        fn send(&self, event: &Event) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    fn job() -> Job {
        corral_protocol::decode_job(
            br#"{"schema":"corral.job.v1","job_id":"j1","project":"acme","base":"python-3.11",
                 "source":{"digest":"sha256:69a629b3319f1fe501bfbdaec2ece11fc3aed33e39c8e3f1fbc7a16167281cbe"},
                 "command":["true"]}"#,
        )
        .unwrap()
    }

    #[test]
    fn an_apps_lifecycle_passes_the_limit_and_its_alerts_do_not() {
        let kept = Arc::new(Kept::default());
        let events = JobEvents::for_app(
            JobId::new("app-1").unwrap(),
            ProjectId::new("acme").unwrap(),
            "run@h",
            vec![kept.clone()],
            None,
        );
        for _ in 0..3 {
            events.lifecycle(Fact::new(EventKind::AppStarted, Severity::Info, "started"));
            events.raise(Fact::new(
                EventKind::AppCrashed,
                Severity::Warning,
                "crashed",
            ));
        }
        let sent = kept.0.lock().unwrap();
        let count = |kind| sent.iter().filter(|e| e.kind == kind).count();
        assert_eq!(count(EventKind::AppStarted), 3);
        assert_eq!(count(EventKind::AppCrashed), 1, "one per 10 s");
        assert_eq!(sent[0].job_id.as_ref().unwrap().as_str(), "app-1");
        assert_eq!(sent[0].project.as_ref().unwrap().as_str(), "acme");
        assert_eq!(events.raised(), BTreeSet::from([EventKind::AppCrashed]));
    }

    fn watched() -> (JobEvents, Arc<Kept>, Arc<Metrics>) {
        let kept = Arc::new(Kept::default());
        let metrics = Arc::new(Metrics::new());
        let events = JobEvents::new(&job(), "w1", vec![kept.clone()], Some(metrics.clone()));
        (events, kept, metrics)
    }

    fn result(status: Status, reason: Option<Reason>) -> Verdict {
        let job = job();
        let mut r = JobResult::new(job.job_id, Some(job.project), status, WorkerInfo::default());
        r.reason = reason;
        Verdict {
            result: Some(r),
            action: Action::Ack,
        }
    }

    #[test]
    fn a_flooding_job_sends_little_and_job_finished_counts_the_rest() {
        let (events, kept, metrics) = watched();
        events.started();
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let fact = Fact::new(EventKind::SeccompDenied, Severity::Critical, "denied")
                .with("syscalls", BTreeMap::from([("keyctl", 1)]));
            events.raise_at(fact, t0 + std::time::Duration::from_micros(u64::from(i)));
        }
        events.finished(&result(Status::Succeeded, None));
        let kept = kept.0.lock().unwrap();
        let kinds: Vec<&str> = kept.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["job_started", "seccomp_denied", "job_finished"]);
        let finished = &kept[2];
        assert_eq!(finished.details["alerts"], json!(["seccomp_denied"]));
        assert_eq!(finished.details["dropped"], json!({"seccomp_denied": 9999}));
        assert_eq!(finished.details["status"], json!("succeeded"));
        assert_eq!(finished.job_id.as_ref().unwrap().as_str(), "j1");
        assert_eq!(kept[0].details["pool"], json!("default"));
        let text = metrics.render();
        assert!(
            text.contains(r#"corral_events_total{kind="seccomp_denied"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_events_dropped_total{kind="seccomp_denied"} 9999"#),
            "{text}"
        );
        assert!(
            text.contains(r#"corral_alerts_total{kind="seccomp_denied"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_denied_call_is_seen_while_another_floods() {
        let (events, kept, _) = watched();
        let t0 = Instant::now();
        let denied = |syscall: &str, count: u64| {
            crate::job::build::live_fact(&corral_sandbox::LiveEventKind::SeccompDenied {
                syscall: syscall.into(),
                count,
            })
        };
        for i in 0..10_000u64 {
            events.raise_at(
                denied("keyctl", i + 1),
                t0 + std::time::Duration::from_micros(i),
            );
        }
        // Within the same 10 s window as the flood: a different call goes out at once.
        assert!(events.raise_at(denied("bpf", 1), t0 + std::time::Duration::from_secs(1)));
        assert!(!events.raise_at(denied("bpf", 2), t0 + std::time::Duration::from_secs(2)));
        let kept = kept.0.lock().unwrap();
        let calls: Vec<&serde_json::Value> = kept.iter().map(|e| &e.details["syscalls"]).collect();
        assert_eq!(calls, [&json!({"keyctl": 1}), &json!({"bpf": 1})]);
        assert_eq!(
            events.dropped(),
            BTreeMap::from([(EventKind::SeccompDenied, 9999 + 1)])
        );
    }

    #[test]
    fn the_final_outcome_does_not_repeat_a_kind_raised_live() {
        let (events, kept, _) = watched();
        events.started();
        events.raise(Fact::new(
            EventKind::LogLimit,
            Severity::Warning,
            "the log passed its limit",
        ));
        events.finished(&result(Status::Failed, Some(Reason::LogLimit)));
        // A second verdict (never expected) adds nothing.
        events.finished(&result(Status::Failed, Some(Reason::LogLimit)));
        let kept = kept.0.lock().unwrap();
        let kinds: Vec<&str> = kept.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["job_started", "log_limit", "job_finished"]);
        assert_eq!(kept[2].details["alerts"], json!(["log_limit"]));
        assert_eq!(kept[2].details["reason"], json!("log_limit"));
    }

    #[test]
    fn final_alerts_come_from_the_outcome_when_nothing_was_raised_live() {
        let (events, kept, _) = watched();
        events.started();
        events.finished(&result(Status::TimedOut, Some(Reason::WallTimeout)));
        let kept = kept.0.lock().unwrap();
        let kinds: Vec<&str> = kept.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["job_started", "wall_timeout", "job_finished"]);
        assert_eq!(kept[2].details["alerts"], json!(["wall_timeout"]));
        assert!(kept[1].at_ms <= kept[2].at_ms);
    }

    #[test]
    fn a_run_handed_back_unstarted_says_nothing() {
        let (events, kept, _) = watched();
        events.finished(&Verdict {
            result: None,
            action: Action::Requeue {
                after: std::time::Duration::ZERO,
            },
        });
        assert!(kept.0.lock().unwrap().is_empty());
    }

    #[test]
    fn json_lines_are_one_event_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let sink = JsonLines::new(std::fs::File::create(&path).unwrap());
        let events = JobEvents::new(&job(), "w1", vec![Arc::new(sink)], None);
        events.started();
        events.finished(&result(Status::Succeeded, None));
        let text = std::fs::read_to_string(&path).unwrap();
        let kinds: Vec<EventKind> = text
            .lines()
            .map(|l| corral_protocol::decode::<Event>(l.as_bytes()).unwrap().kind)
            .collect();
        assert_eq!(kinds, [EventKind::JobStarted, EventKind::JobFinished]);
    }
}
