//! The verdict: the one place that turns what happened to a job into its `JobResult` and
//! what the queue does with its delivery. A pure function of [`Facts`], so every way a job
//! can end is decided here and tested in one table.
//!
//! | what happened | result | delivery |
//! |---|---|---|
//! | the delivery died (connection, channel, lease) | none | left to the broker |
//! | unreadable message, ids unknown | none | dead-lettered |
//! | invalid input (decode, maxima, lease, unknown base, bad bundle) | `rejected` | dead-lettered |
//! | not started, the worker drains | none | requeued now |
//! | cancelled before it started | `cancelled` | acked |
//! | built (any exit, any limit), cache hit | its own | acked |
//! | stopped by a user's cancel | `cancelled` (usage and log kept, no artifact) | acked |
//! | stopped by the drain, ended `cancelled` or failed | none | requeued now |
//! | platform failure, retryable, below the delivery limit | none | requeued after a backoff |
//! | platform failure, permanent or at the delivery limit | `error` | dead-lettered |

use std::time::Duration;

use corral_protocol::{
    Artifact, Job, JobId, JobResult, Limits, ProjectId, ProtocolError, Reason, Status, Timings,
    Usage, WorkerInfo,
};
use corral_sandbox::{DeathReason, Exit};

use super::build::{Built, Output};
use super::error::{JobError, JobFault, error_chain};
use super::{Stop, ms};
use crate::backoff::Backoff;

/// How a job's run ended, before anyone decided what it means.
#[derive(Debug)]
pub enum Ending {
    /// Not started: the worker is draining.
    NotStarted,
    /// A Cancel for this job arrived before it started.
    CancelledEarly,
    /// The job's input is invalid (it never ran).
    Rejected(ProtocolError),
    /// The action cache answered: the earlier result, re-tagged for this job.
    Cached(Box<JobResult>),
    /// The sandbox ran the build to its end (whatever the end).
    Built(Box<Built>),
    /// A step failed: the platform's fault, or the job's when [`JobError::job_fault`] says so.
    Failed(JobError),
}

/// Where the delivery stands: how often it was tried, how often it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Earlier deliveries of this job (0 at first).
    pub count: u32,
    /// Deliveries after the first before a platform failure is final.
    pub limit: u32,
    /// The longest wait before a failed job is retried.
    pub backoff_max: Duration,
}

impl Delivery {
    /// One attempt and no retries: `corral replay`.
    pub const ONCE: Delivery = Delivery {
        count: 0,
        limit: 0,
        backoff_max: Duration::ZERO,
    };
}

/// Everything the verdict depends on.
#[derive(Debug)]
pub struct Facts {
    /// Unknown when the message could not be read.
    pub job_id: Option<JobId>,
    pub project: Option<ProjectId>,
    pub correlation_id: Option<String>,
    /// The job's limits, for the sentences that name them.
    pub limits: Limits,
    pub ending: Ending,
    /// Why the run was stopped from outside, if it was.
    pub stop: Option<Stop>,
    pub delivery: Delivery,
    pub worker: WorkerInfo,
    pub timings: Timings,
    /// The time the result is decided, in ms since the epoch.
    pub now_ms: u64,
}

impl Facts {
    /// The facts of `job`, nothing stopped, first delivery of one.
    pub fn new(job: &Job, ending: Ending, worker: WorkerInfo, now_ms: u64) -> Self {
        Facts {
            job_id: Some(job.job_id.clone()),
            project: Some(job.project.clone()),
            correlation_id: job.correlation_id.clone(),
            limits: job.limits,
            ending,
            stop: None,
            delivery: Delivery::ONCE,
            worker,
            timings: Timings::default(),
            now_ms,
        }
    }

    /// A message that is not a valid job: whatever ids could be read from it.
    pub fn unreadable(
        job_id: Option<JobId>,
        project: Option<ProjectId>,
        error: ProtocolError,
        worker: WorkerInfo,
        now_ms: u64,
    ) -> Self {
        Facts {
            job_id,
            project,
            correlation_id: None,
            limits: Limits::default(),
            ending: Ending::Rejected(error),
            stop: None,
            delivery: Delivery::ONCE,
            worker,
            timings: Timings::default(),
            now_ms,
        }
    }
}

/// What the queue does with the job's delivery, once the result (if any) is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Done: ack.
    Ack,
    /// Final and not to be run again: reject without requeue, to the dead-letter queue.
    DeadLetter,
    /// Hand it back for another try, after `after` (up to half of it is shaved off at
    /// random, so retries of a fleet do not come back in step).
    Requeue { after: Duration },
    /// The delivery is gone; the broker hands the job out again.
    Leave,
}

/// The job's result (none when the job goes back to the queue unfinished) and its action.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub result: Option<JobResult>,
    pub action: Action,
}

impl Verdict {
    fn new(result: JobResult, action: Action) -> Self {
        Verdict {
            result: Some(result),
            action,
        }
    }

    fn without_result(action: Action) -> Self {
        Verdict {
            result: None,
            action,
        }
    }
}

/// The wire name of a status, reason or other snake_case enum (`timed_out`, `oom`).
pub fn wire_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

/// Decides the result and the queue action. See the module's table.
pub fn verdict(facts: Facts) -> Verdict {
    let Facts {
        job_id,
        project,
        correlation_id,
        limits,
        ending,
        stop,
        delivery,
        worker,
        timings,
        now_ms,
    } = facts;
    if stop == Some(Stop::Lost) {
        return Verdict::without_result(Action::Leave);
    }
    let Some(job_id) = job_id else {
        return Verdict::without_result(Action::DeadLetter);
    };
    let blank = |status| JobResult::new(job_id.clone(), project.clone(), status, worker.clone());
    let now = Action::Requeue {
        after: Duration::ZERO,
    };
    let stopped_by_user = match &stop {
        Some(Stop::Cancel(why)) => Some(why.clone()),
        _ => None,
    };
    let mut decided = match ending {
        Ending::NotStarted => return Verdict::without_result(now),
        Ending::Rejected(error) => {
            let result = JobResult::rejected(job_id, project, error, worker);
            return Verdict::new(result, Action::DeadLetter);
        }
        Ending::CancelledEarly => {
            let mut result = blank(Status::Cancelled);
            result.reason = Some(Reason::Cancelled);
            result.message = Some("cancelled before it started".into());
            Verdict::new(result, Action::Ack)
        }
        Ending::Cached(hit) => Verdict::new(*hit, Action::Ack),
        Ending::Built(built) => {
            let mut result = blank(Status::Succeeded);
            describe_build(&mut result, &built, &limits, stop.is_some());
            Verdict::new(result, Action::Ack)
        }
        Ending::Failed(error) => match error.job_fault() {
            Some(JobFault::Input(error)) => {
                let result = JobResult::rejected(job_id, project, error, worker);
                return Verdict::new(result, Action::DeadLetter);
            }
            Some(JobFault::Output(message)) => {
                let mut result = blank(Status::Failed);
                result.reason = Some(Reason::OutputLimit);
                result.message = Some(message);
                Verdict::new(result, Action::Ack)
            }
            // A platform failure while stopping is the stop's doing, not a failure.
            None if stop.is_some() => Verdict::without_result(now),
            None if error.is_retryable() && delivery.count < delivery.limit => {
                let after =
                    Backoff::new(Duration::from_secs(1), delivery.backoff_max).cap(delivery.count);
                return Verdict::without_result(Action::Requeue { after });
            }
            None => {
                let mut result = blank(Status::Error);
                result.reason = Some(Reason::PlatformError);
                let chain = error_chain(&error);
                result.message = Some(match delivery.count {
                    _ if !error.is_retryable() => chain,
                    0 => format!("platform failure: {chain}"),
                    n => format!(
                        "platform failure, giving up after {} attempts: {chain}",
                        n + 1
                    ),
                });
                Verdict::new(result, Action::DeadLetter)
            }
        },
    };
    match (&stop, &mut decided.result) {
        // The worker stops: an unfinished job goes to another worker, without a result.
        (Some(Stop::Drain), Some(result)) if result.status == Status::Cancelled => {
            return Verdict::without_result(now);
        }
        (Some(Stop::Drain), None) => return Verdict::without_result(now),
        // A user's cancel wins over whatever the run made of its end.
        (Some(Stop::Cancel(_)), result) => {
            let mut cancelled = result.take().unwrap_or_else(|| blank(Status::Cancelled));
            cancelled.status = Status::Cancelled;
            cancelled.reason = Some(Reason::Cancelled);
            cancelled.artifact = None;
            cancelled.message = Some(match stopped_by_user.flatten() {
                Some(why) => format!("cancelled: {why}"),
                None => "the build was cancelled".into(),
            });
            decided = Verdict::new(cancelled, Action::Ack);
        }
        _ => {}
    }
    if let Some(result) = decided.result.as_mut() {
        if !result.cached {
            result.timings = timings;
        }
        result.correlation_id = correlation_id;
        result.finished_at_ms = now_ms;
    }
    decided
}

/// Status, reason, message, exit, usage, log and artifact of a build that ran to its end.
/// `stopped`: someone outside stopped it, so a `Cancelled` death is theirs, not the log
/// limit's.
fn describe_build(result: &mut JobResult, built: &Built, limits: &Limits, stopped: bool) {
    let outcome = &built.outcome;
    result.usage = Some(usage(built));
    result.log.clone_from(&built.log);
    match outcome.exit {
        Exit::Code(code) => result.exit_code = Some(code),
        Exit::Signal(sig) => result.signal = Some(sig),
    }
    let (status, reason, message) = match outcome.reason {
        DeathReason::Oom => (
            Status::Killed,
            Reason::Oom,
            format!(
                "the build ran out of memory (limit {})",
                limits.memory_bytes
            ),
        ),
        DeathReason::PidsLimit => (
            Status::Killed,
            Reason::PidsLimit,
            format!(
                "the build hit its process limit ({} processes and threads)",
                limits.pids
            ),
        ),
        DeathReason::DiskLimit => (
            Status::Killed,
            Reason::DiskLimit,
            format!("the build filled its disk (limit {})", limits.disk_bytes),
        ),
        DeathReason::WallTimeout => (
            Status::TimedOut,
            Reason::WallTimeout,
            format!(
                "the build ran past its wall-clock limit of {} s",
                limits.wall_seconds
            ),
        ),
        DeathReason::CpuLimit => (
            Status::TimedOut,
            Reason::CpuLimit,
            format!(
                "the build used more than its {} CPU seconds",
                limits.cpu_seconds
            ),
        ),
        DeathReason::Seccomp => (
            Status::Killed,
            Reason::Seccomp,
            "the build used a forbidden system call ABI".into(),
        ),
        DeathReason::Cancelled if built.log_truncated && !stopped => (
            Status::Killed,
            Reason::LogLimit,
            format!(
                "the build wrote more than its log limit of {}",
                limits.log_bytes
            ),
        ),
        DeathReason::Cancelled => (
            Status::Cancelled,
            Reason::Cancelled,
            "the build was cancelled".into(),
        ),
        DeathReason::Completed => match outcome.exit {
            Exit::Code(0) => {
                match &built.output {
                    Output::Stored(artifact) => result.artifact = Some(Artifact::clone(artifact)),
                    Output::Refused(why) => {
                        result.status = Status::Failed;
                        result.reason = Some(Reason::OutputLimit);
                        result.message = Some(why.clone());
                    }
                    Output::NotTaken => {}
                }
                return;
            }
            Exit::Code(code) => (
                Status::Failed,
                Reason::NonzeroExit,
                format!("the build exited with code {code}"),
            ),
            Exit::Signal(sig) => (
                Status::Failed,
                Reason::Signal,
                format!("the build was killed by signal {sig}"),
            ),
        },
    };
    result.status = status;
    result.reason = Some(reason);
    result.message = Some(message);
}

fn usage(built: &Built) -> Usage {
    let outcome = &built.outcome;
    let u = &outcome.usage;
    Usage {
        cpu_user_ms: ms(u.cpu_user),
        cpu_system_ms: ms(u.cpu_system),
        memory_peak_bytes: u.memory_peak,
        pids_peak: u.pids_peak,
        io_read_bytes: u.io_read,
        io_write_bytes: u.io_write,
        upper_bytes: built.upper_bytes,
        wall_ms: ms(u.wall),
        denied_syscalls: outcome.denied_syscalls.clone(),
        network_attempts: outcome.network_attempts,
    }
}
