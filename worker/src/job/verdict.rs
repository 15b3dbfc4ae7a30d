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
    let rejected = |error| {
        let result = JobResult::rejected(job_id.clone(), project.clone(), error, worker.clone());
        Verdict::new(result, Action::DeadLetter)
    };
    let mut decided = stopped(
        ran(ending, &limits, &stop, delivery, blank, rejected),
        &stop,
        blank,
    );
    if let Some(result) = decided.result.as_mut() {
        if !result.cached {
            result.timings = timings;
        }
        result.correlation_id = correlation_id;
        result.finished_at_ms = now_ms;
    }
    decided
}

/// The verdict on how a run ended, before any stop from outside is considered.
fn ran(
    ending: Ending,
    limits: &Limits,
    stop: &Option<Stop>,
    delivery: Delivery,
    blank: impl Fn(Status) -> JobResult,
    rejected: impl Fn(ProtocolError) -> Verdict,
) -> Verdict {
    let now = Action::Requeue {
        after: Duration::ZERO,
    };
    match ending {
        Ending::NotStarted => Verdict::without_result(now),
        Ending::CancelledEarly => {
            let mut result = blank(Status::Cancelled);
            result.reason = Some(Reason::Cancelled);
            result.message = Some("cancelled before it started".into());
            Verdict::new(result, Action::Ack)
        }
        Ending::Cached(hit) => Verdict::new(*hit, Action::Ack),
        Ending::Built(built) => {
            let mut result = blank(Status::Succeeded);
            describe_build(&mut result, &built, limits, stop.is_some());
            Verdict::new(result, Action::Ack)
        }
        Ending::Rejected(error) => rejected(error),
        Ending::Failed(error) => match error.job_fault() {
            Some(JobFault::Output(message)) => {
                let mut result = blank(Status::Failed);
                result.reason = Some(Reason::OutputLimit);
                result.message = Some(message);
                Verdict::new(result, Action::Ack)
            }
            Some(JobFault::Input(error)) => rejected(error),
            // A platform failure while stopping is the stop's doing, not a failure.
            None if stop.is_some() => Verdict::without_result(now),
            None if error.is_retryable() && delivery.count < delivery.limit => {
                let after =
                    Backoff::new(Duration::from_secs(1), delivery.backoff_max).cap(delivery.count);
                Verdict::without_result(Action::Requeue { after })
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
    }
}

/// What a stop from outside makes of a run's verdict.
fn stopped(
    mut decided: Verdict,
    stop: &Option<Stop>,
    blank: impl Fn(Status) -> JobResult,
) -> Verdict {
    let requeue_now = Verdict::without_result(Action::Requeue {
        after: Duration::ZERO,
    });
    let never_ran = |v: &Verdict| {
        v.result
            .as_ref()
            .is_some_and(|r| r.status == Status::Rejected)
    };
    match stop {
        // Invalid input stays rejected whatever else happened.
        _ if never_ran(&decided) => decided,
        None | Some(Stop::Lost) => decided,
        // The worker stops: an unfinished job goes to another worker, without a result.
        Some(Stop::Drain) => match &decided.result {
            Some(result) if result.status != Status::Cancelled => decided,
            _ => requeue_now,
        },
        // A user's cancel wins over whatever the run made of its end; its usage and log stay.
        Some(Stop::Cancel(why)) => {
            let mut result = decided
                .result
                .take()
                .unwrap_or_else(|| blank(Status::Cancelled));
            result.status = Status::Cancelled;
            result.reason = Some(Reason::Cancelled);
            result.artifact = None;
            result.message = Some(match why {
                Some(why) => format!("cancelled: {why}"),
                None => "the build was cancelled".into(),
            });
            Verdict::new(result, Action::Ack)
        }
    }
}

/// Status, reason, message, exit, usage, log and artifact of a build that ran to its end.
/// `stopped`: someone outside stopped it, so a `Cancelled` death is theirs, not the log
/// limit's.
fn describe_build(result: &mut JobResult, built: &Built, limits: &Limits, stopped: bool) {
    let outcome = &built.outcome;
    result.usage = Some(usage(built));
    result.log.clone_from(&built.log);
    result.inputs = built.inputs.as_deref().cloned();
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
        DeathReason::Cancelled if built.network_cut && !stopped => (
            Status::Killed,
            Reason::NetworkLimit,
            format!(
                "the build moved more than its network limit of {} through its egress proxy",
                limits.network_bytes
            ),
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
        network: built.network.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use corral_protocol::Reason::{
        CpuLimit, DiskLimit, InvalidJob, LogLimit, NetworkLimit, NonzeroExit, Oom, OutputLimit,
        PidsLimit, PlatformError, Seccomp, Signal, WallTimeout,
    };
    use corral_protocol::Status::{
        Cancelled, Error, Failed, Killed, Rejected, Succeeded, TimedOut,
    };
    use corral_protocol::{Digest, LogRef, Rule};
    use corral_sandbox::Outcome;

    use super::*;
    use crate::base::BaseError;
    use crate::layer::LayerError;
    use crate::source::SourceError;
    use crate::store::StoreError;

    const NOW: u64 = 1_700_000_123_000;

    fn job() -> Job {
        corral_protocol::decode_job(
            br#"{"schema": "corral.job.v1", "job_id": "j1", "project": "acme",
                 "base": "python-3.11", "correlation_id": "c-1",
                 "source": {"digest": "sha256:0f61d9381c01fdd051ca294bb7cda181a98579b0031ec5319804d3242cc79304"},
                 "command": ["true"]}"#,
        )
        .unwrap()
    }

    fn worker() -> WorkerInfo {
        WorkerInfo {
            id: "w1".into(),
            version: "0.1.0".into(),
        }
    }

    fn artifact() -> Artifact {
        let digest = Digest::parse(format!("sha256:{}", "a".repeat(64))).unwrap();
        Artifact {
            manifest_digest: digest,
            reference: "oci-dir:/store:j1".into(),
            layers: Vec::new(),
        }
    }

    fn log() -> LogRef {
        LogRef {
            digest: Digest::parse(format!("sha256:{}", "b".repeat(64))).unwrap(),
            size: 7,
            truncated: false,
        }
    }

    fn built(exit: Exit, reason: DeathReason, log_truncated: bool, output: Output) -> Ending {
        Ending::Built(Box::new(Built {
            outcome: Outcome {
                exit,
                reason,
                usage: corral_sandbox::Usage {
                    wall: Duration::from_millis(1500),
                    memory_peak: 42,
                    ..corral_sandbox::Usage::default()
                },
                denied_syscalls: [("ptrace".to_string(), 2)].into(),
                network_attempts: 1,
                oom_kills: 0,
                pids_limit_hits: 0,
                events_dropped: 0,
            },
            log_truncated,
            upper_bytes: 99,
            log: Some(log()),
            output,
            inputs: None,
            network: None,
            network_cut: false,
        }))
    }

    /// A build the proxy stopped at its byte limit.
    fn network_cut() -> Ending {
        let Ending::Built(mut built) = ended(DeathReason::Cancelled) else {
            unreachable!()
        };
        built.network_cut = true;
        built.network = Some(corral_protocol::NetworkUsage {
            bytes_in: 1 << 20,
            ..Default::default()
        });
        Ending::Built(built)
    }

    fn ended(reason: DeathReason) -> Ending {
        built(Exit::Signal(9), reason, false, Output::NotTaken)
    }

    fn exited(code: i32, output: Output) -> Ending {
        built(Exit::Code(code), DeathReason::Completed, false, output)
    }

    fn io() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    fn retryable() -> Ending {
        Ending::Failed(JobError::Scratch {
            path: PathBuf::from("/data/tmp/job-j1"),
            source: io(),
        })
    }

    fn permanent() -> Ending {
        Ending::Failed(JobError::Store {
            what: "the image",
            source: StoreError::Url {
                url: "oci://nowhere".into(),
                reason: "refused".into(),
            },
        })
    }

    fn tries(count: u32) -> Delivery {
        Delivery {
            count,
            limit: 2,
            backoff_max: Duration::from_secs(3),
        }
    }

    fn decide(ending: Ending, stop: Option<Stop>, delivery: Delivery) -> Verdict {
        verdict(Facts {
            stop,
            delivery,
            timings: Timings {
                build_ms: 1500,
                total_ms: 1600,
                ..Timings::default()
            },
            ..Facts::new(&job(), ending, worker(), NOW)
        })
    }

    /// (status, reason, exit code, signal, artifact?, message contains)
    type Expected = (
        Status,
        Option<Reason>,
        Option<i32>,
        Option<i32>,
        bool,
        &'static str,
    );
    /// (name, ending, stop, delivery, expected result, action)
    type Case = (
        &'static str,
        Ending,
        Option<Stop>,
        Delivery,
        Option<Expected>,
        Action,
    );

    #[test]
    fn every_way_a_job_ends_has_one_result_and_one_action() {
        let cancel = |why: Option<&str>| Some(Stop::Cancel(why.map(String::from)));
        let stored = || Output::Stored(Box::new(artifact()));
        let at = |secs| Action::Requeue {
            after: Duration::from_secs(secs),
        };
        let requeue_now = at(0);
        let truncated = built(
            Exit::Signal(15),
            DeathReason::Cancelled,
            true,
            Output::NotTaken,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // The build ran to its end.
            ("exit 0, stored", exited(0, stored()), None, tries(0), Some((Succeeded, None, Some(0), None, true, "")), Action::Ack),
            ("exit 0, no output kept", exited(0, Output::NotTaken), None, tries(0), Some((Succeeded, None, Some(0), None, false, "")), Action::Ack),
            ("exit 0, output refused", exited(0, Output::Refused("too big".into())), None, tries(0), Some((Failed, Some(OutputLimit), Some(0), None, false, "too big")), Action::Ack),
            ("exit 3", exited(3, Output::NotTaken), None, tries(0), Some((Failed, Some(NonzeroExit), Some(3), None, false, "exited with code 3")), Action::Ack),
            ("killed by a signal", built(Exit::Signal(11), DeathReason::Completed, false, Output::NotTaken), None, tries(0), Some((Failed, Some(Signal), None, Some(11), false, "signal 11")), Action::Ack),
            ("oom", ended(DeathReason::Oom), None, tries(0), Some((Killed, Some(Oom), None, Some(9), false, "out of memory (limit 2 GiB)")), Action::Ack),
            ("pids", ended(DeathReason::PidsLimit), None, tries(0), Some((Killed, Some(PidsLimit), None, Some(9), false, "process limit (512")), Action::Ack),
            ("disk", ended(DeathReason::DiskLimit), None, tries(0), Some((Killed, Some(DiskLimit), None, Some(9), false, "filled its disk")), Action::Ack),
            ("wall", ended(DeathReason::WallTimeout), None, tries(0), Some((TimedOut, Some(WallTimeout), None, Some(9), false, "wall-clock limit of 900 s")), Action::Ack),
            ("cpu", ended(DeathReason::CpuLimit), None, tries(0), Some((TimedOut, Some(CpuLimit), None, Some(9), false, "1800 CPU seconds")), Action::Ack),
            ("seccomp", ended(DeathReason::Seccomp), None, tries(0), Some((Killed, Some(Seccomp), None, Some(9), false, "forbidden system call")), Action::Ack),
            ("log limit", truncated, None, tries(0), Some((Killed, Some(LogLimit), None, Some(15), false, "log limit of 4 MiB")), Action::Ack),
            ("network limit", network_cut(), None, tries(0), Some((Killed, Some(NetworkLimit), None, Some(9), false, "network limit of 1 GiB")), Action::Ack),
            ("user cancel past the network limit is a cancel", network_cut(), cancel(None), tries(0), Some((Cancelled, Some(Reason::Cancelled), None, Some(9), false, "cancelled")), Action::Ack),
            ("stopped by the sandbox's own cancel", ended(DeathReason::Cancelled), None, tries(0), Some((Cancelled, Some(Reason::Cancelled), None, Some(9), false, "was cancelled")), Action::Ack),
            // Stopped from outside.
            ("user cancel, with a reason", ended(DeathReason::Cancelled), cancel(Some("superseded")), tries(0), Some((Cancelled, Some(Reason::Cancelled), None, Some(9), false, "cancelled: superseded")), Action::Ack),
            ("user cancel, no reason", ended(DeathReason::Cancelled), cancel(None), tries(0), Some((Cancelled, Some(Reason::Cancelled), None, Some(9), false, "the build was cancelled")), Action::Ack),
            ("user cancel past the log limit is a cancel", built(Exit::Signal(15), DeathReason::Cancelled, true, Output::NotTaken), cancel(None), tries(0), Some((Cancelled, Some(Reason::Cancelled), None, Some(15), false, "cancelled")), Action::Ack),
            ("user cancel after the upload drops the artifact", exited(0, stored()), cancel(None), tries(0), Some((Cancelled, Some(Reason::Cancelled), Some(0), None, false, "cancelled")), Action::Ack),
            ("user cancel during a platform failure", retryable(), cancel(None), tries(0), Some((Cancelled, Some(Reason::Cancelled), None, None, false, "cancelled")), Action::Ack),
            ("drain stops a build", ended(DeathReason::Cancelled), Some(Stop::Drain), tries(0), None, requeue_now),
            ("drain during a platform failure", retryable(), Some(Stop::Drain), tries(0), None, requeue_now),
            ("drain after the build finished", exited(0, stored()), Some(Stop::Drain), tries(0), Some((Succeeded, None, Some(0), None, true, "")), Action::Ack),
            ("lost delivery, built", exited(0, stored()), Some(Stop::Lost), tries(0), None, Action::Leave),
            ("lost delivery, cancelled", ended(DeathReason::Cancelled), Some(Stop::Lost), tries(0), None, Action::Leave),
            ("lost delivery, failed", retryable(), Some(Stop::Lost), tries(2), None, Action::Leave),
            // Never started.
            ("draining before the start", Ending::NotStarted, None, tries(0), None, requeue_now),
            ("cancelled before the start", Ending::CancelledEarly, None, tries(0), Some((Cancelled, Some(Reason::Cancelled), None, None, false, "cancelled before it started")), Action::Ack),
            // Rejected input, each way.
            ("rejected at decode or lease", Ending::Rejected(ProtocolError::new("limits.wall_seconds", Rule::Maximum, "above the lease")), None, tries(0), Some((Rejected, Some(InvalidJob), None, None, false, "above the lease")), Action::DeadLetter),
            ("above this worker's maxima", Ending::Failed(JobError::Spec(ProtocolError::new("limits.pids", Rule::Maximum, "too many pids"))), None, tries(0), Some((Rejected, Some(InvalidJob), None, None, false, "too many pids")), Action::DeadLetter),
            ("unknown base", Ending::Failed(JobError::Base(BaseError::Unknown { name: corral_protocol::BaseName::new("python-9").unwrap(), available: Vec::new(), dir: PathBuf::from("/data/bases") })), None, tries(0), Some((Rejected, Some(InvalidJob), None, None, false, "python-9")), Action::DeadLetter),
            ("source bundle missing", Ending::Failed(JobError::Source(SourceError::NotFound { digest: Digest::parse(format!("sha256:{}", "c".repeat(64))).unwrap() })), None, tries(0), Some((Rejected, Some(InvalidJob), None, None, false, "not in the store")), Action::DeadLetter),
            ("source bundle hostile", Ending::Failed(JobError::Source(SourceError::ParentDir { path: "../etc".into() })), None, tries(0), Some((Rejected, Some(InvalidJob), None, None, false, "..")), Action::DeadLetter),
            ("a rejection outlives a cancel", Ending::Rejected(ProtocolError::new("base", Rule::Unknown, "no such base")), cancel(None), tries(0), Some((Rejected, Some(InvalidJob), None, None, false, "no such base")), Action::DeadLetter),
            // The output's tree, when only the snapshot sees it.
            ("snapshot tree fault", Ending::Failed(JobError::Snapshot { what: "the build's upper dir", source: LayerError::OutputTooLarge { limit: 10 } }), None, tries(0), Some((Failed, Some(OutputLimit), None, None, false, "cannot be stored")), Action::Ack),
            // Platform failures.
            ("platform, first try", retryable(), None, tries(0), None, at(1)),
            ("platform, second try", retryable(), None, tries(1), None, at(2)),
            ("platform, at the delivery limit", retryable(), None, tries(2), Some((Error, Some(PlatformError), None, None, false, "giving up after 3 attempts: preparing the job's scratch dir /data/tmp/job-j1: disk on fire")), Action::DeadLetter),
            ("platform, no retries (replay)", retryable(), None, Delivery::ONCE, Some((Error, Some(PlatformError), None, None, false, "platform failure: preparing")), Action::DeadLetter),
            ("platform, permanent", permanent(), None, tries(0), Some((Error, Some(PlatformError), None, None, false, "storing the image: store URL")), Action::DeadLetter),
        ];
        for (name, ending, stop, delivery, expected, action) in cases {
            let v = decide(ending, stop, delivery);
            assert_eq!(v.action, action, "{name}: action");
            match (expected, v.result) {
                (None, None) => {}
                (Some((status, reason, code, signal, artifact, message)), Some(r)) => {
                    assert_eq!(r.status, status, "{name}: status");
                    assert_eq!(r.reason, reason, "{name}: reason");
                    assert_eq!(r.exit_code, code, "{name}: exit code");
                    assert_eq!(r.signal, signal, "{name}: signal");
                    assert_eq!(r.artifact.is_some(), artifact, "{name}: artifact");
                    let text = r.message.clone().unwrap_or_default();
                    assert!(
                        text.contains(message),
                        "{name}: message {text:?} lacks {message:?}"
                    );
                    assert_eq!(r.job_id.as_str(), "j1", "{name}");
                    assert_eq!(r.worker, worker(), "{name}");
                    assert_eq!(r.finished_at_ms, NOW, "{name}");
                    assert_eq!(r.correlation_id.as_deref(), Some("c-1"), "{name}");
                    assert_eq!(r.timings.total_ms, 1600, "{name}: the run's timings");
                    if status == Rejected {
                        assert!(r.error.is_some(), "{name}: a rejection carries its error");
                    }
                }
                (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn a_build_keeps_its_usage_and_log_even_when_cancelled() {
        for stop in [None, Some(Stop::Cancel(None))] {
            let r = decide(ended(DeathReason::Cancelled), stop.clone(), tries(0))
                .result
                .unwrap();
            let usage = r.usage.expect("usage");
            assert_eq!(
                (usage.wall_ms, usage.memory_peak_bytes, usage.upper_bytes),
                (1500, 42, 99),
                "{stop:?}"
            );
            assert_eq!(usage.denied_syscalls["ptrace"], 2);
            assert_eq!(usage.network_attempts, 1);
            assert_eq!(r.log, Some(log()), "{stop:?}");
        }
    }

    #[test]
    fn a_cache_hit_is_answered_as_it_was_recorded() {
        let mut hit = JobResult::new(
            JobId::new("j1").unwrap(),
            Some(ProjectId::new("acme").unwrap()),
            Succeeded,
            worker(),
        );
        hit.cached = true;
        hit.artifact = Some(artifact());
        hit.timings.build_ms = 4000;
        let v = decide(Ending::Cached(Box::new(hit)), None, tries(1));
        assert_eq!(v.action, Action::Ack);
        let r = v.result.unwrap();
        assert!(r.cached && r.artifact.is_some());
        assert_eq!(r.timings.build_ms, 4000, "the recorded build's timings");
        assert_eq!(r.finished_at_ms, NOW);
    }

    #[test]
    fn an_unreadable_message_is_dead_lettered_with_a_result_only_when_it_names_a_job() {
        let err = ProtocolError::new("job_id", Rule::Syntax, "not JSON");
        let v = verdict(Facts::unreadable(None, None, err.clone(), worker(), NOW));
        assert_eq!((v.result, v.action), (None, Action::DeadLetter));
        let v = verdict(Facts::unreadable(
            Some(JobId::new("j2").unwrap()),
            Some(ProjectId::new("acme").unwrap()),
            err.clone(),
            worker(),
            NOW,
        ));
        assert_eq!(v.action, Action::DeadLetter);
        let r = v.result.unwrap();
        assert_eq!((r.status, r.error), (Rejected, Some(err)));
    }
}
