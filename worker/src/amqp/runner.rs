//! The seam between the AMQP worker and the build pipeline: [`JobRunner`] runs one validated
//! job to its final result. [`ProcessRunner`] is the test implementation: it runs the job's
//! `command` as a plain child process (NO sandbox, no source, no snapshot) with its wall-clock
//! limit, so the AMQP layer can be exercised end to end with real builds.

use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corral_protocol::{Job, JobResult, Reason, Status, Stream, Usage};
use tokio::io::AsyncReadExt;

pub use crate::pipeline::{LogSink, RunContext};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The job's final result (succeeded, failed, timed_out, killed, cancelled…). Published,
    /// then the job is acked. Job failures are final: never retried.
    Final(Box<JobResult>),
    /// The platform failed (store down, disk full on the worker): the job is retried with
    /// backoff, and dead-lettered with an `error` result after the delivery limit.
    Retry(String),
    /// The run stopped because `cancel` fired and has no result of its own.
    Interrupted,
}

/// What the AMQP worker needs from the build pipeline.
pub trait JobRunner: Send + Sync + 'static {
    /// Run one validated job to its final result (see [`RunContext`] for cancellation and
    /// logs). Called concurrently, up to the worker's concurrency.
    fn run(&self, job: Job, ctx: RunContext) -> impl Future<Output = RunOutcome> + Send;
}

/// Grace between SIGTERM and SIGKILL when a build is stopped.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// TEST ONLY: runs `command` as a plain child process in a fresh temporary directory, its own
/// process group, `env` on top of `PATH`/`HOME`/`LANG`, under `limits.wall_seconds`.
///
/// Fault injection for tests of the delivery guarantees, read from the environment at
/// construction: `CORRAL_FAULT_ABORT_JOB=<prefix>` aborts the whole worker process when a job
/// whose id starts with the prefix is run (a crash on every delivery);
/// `CORRAL_FAULT_PLATFORM_JOB=<prefix>` makes such jobs fail as platform errors.
#[derive(Debug, Clone, Default)]
pub struct ProcessRunner {
    abort_prefix: Option<String>,
    platform_prefix: Option<String>,
}

impl ProcessRunner {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ProcessRunner {
            abort_prefix: var("CORRAL_FAULT_ABORT_JOB"),
            platform_prefix: var("CORRAL_FAULT_PLATFORM_JOB"),
        }
    }
}

impl JobRunner for ProcessRunner {
    async fn run(&self, job: Job, ctx: RunContext) -> RunOutcome {
        let id = job.job_id.as_str();
        if self
            .abort_prefix
            .as_deref()
            .is_some_and(|p| id.starts_with(p))
        {
            tracing::error!(job = id, "fault injection: aborting the worker");
            std::process::abort();
        }
        if self
            .platform_prefix
            .as_deref()
            .is_some_and(|p| id.starts_with(p))
        {
            return RunOutcome::Retry("fault injection: platform failure".into());
        }
        let dir = match tempfile::Builder::new().prefix("corral-job-").tempdir() {
            Ok(dir) => dir,
            Err(err) => return RunOutcome::Retry(format!("creating the job directory: {err}")),
        };
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&job.command[0]);
        cmd.args(&job.command[1..])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", dir.path())
            .env("LANG", "C.UTF-8")
            .envs(&job.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut result = JobResult::new(
            job.job_id.clone(),
            Some(job.project.clone()),
            Status::Failed,
            ctx.worker.clone(),
        );
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                // The program is missing or not executable: the job's fault, like exit 127.
                let msg = format!("cannot run {:?}: {err}\n", job.command[0]);
                let _ = ctx
                    .logs
                    .send((Stream::System, Bytes::from(msg.clone())))
                    .await;
                result.reason = Some(Reason::NonzeroExit);
                result.exit_code = Some(127);
                result.message = Some(msg.trim_end().to_owned());
                return RunOutcome::Final(Box::new(result));
            }
        };
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let readers = [
            child
                .stdout
                .take()
                .map(|r| pump(r, Stream::Stdout, ctx.logs.clone())),
            child
                .stderr
                .take()
                .map(|r| pump(r, Stream::Stderr, ctx.logs.clone())),
        ];
        drop(ctx.logs);
        let wall = Duration::from_secs(job.limits.wall_seconds);
        enum End {
            Exited(std::io::Result<std::process::ExitStatus>),
            Wall,
            Cancelled,
        }
        let end = tokio::select! {
            status = child.wait() => End::Exited(status),
            () = tokio::time::sleep(wall) => End::Wall,
            () = ctx.cancel.cancelled() => End::Cancelled,
        };
        let status = match end {
            End::Exited(status) => status,
            End::Wall | End::Cancelled => {
                signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
                match tokio::time::timeout(KILL_GRACE, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
                        child.wait().await
                    }
                }
                .inspect(|_| {
                    result.status = if matches!(end, End::Wall) {
                        Status::TimedOut
                    } else {
                        Status::Cancelled
                    };
                })
            }
        };
        // Whatever the main process left behind in its group goes with it.
        signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
        for reader in readers.into_iter().flatten() {
            let _ = reader.await;
        }
        let wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        result.usage = Some(Usage {
            wall_ms,
            ..Usage::default()
        });
        result.timings.build_ms = wall_ms;
        result.timings.total_ms = wall_ms;
        let status = match status {
            Ok(status) => status,
            Err(err) => return RunOutcome::Retry(format!("waiting for the build: {err}")),
        };
        use std::os::unix::process::ExitStatusExt;
        result.exit_code = status.code();
        result.signal = status.signal();
        match result.status {
            Status::TimedOut => {
                result.reason = Some(Reason::WallTimeout);
                result.message = Some(format!(
                    "the build ran past its wall-clock limit of {} s",
                    job.limits.wall_seconds
                ));
            }
            Status::Cancelled => {
                result.reason = Some(Reason::Cancelled);
                result.message = Some("the build was cancelled".into());
            }
            _ if status.success() => result.status = Status::Succeeded,
            _ if status.signal().is_some() => {
                result.reason = Some(Reason::Signal);
                result.message = Some(format!("the build died of signal {:?}", status.signal()));
            }
            _ => {
                result.reason = Some(Reason::NonzeroExit);
                result.message = Some(format!("the build exited with {:?}", status.code()));
            }
        }
        RunOutcome::Final(Box::new(result))
    }
}

fn signal_group(pgid: Option<i32>, signal: nix::sys::signal::Signal) {
    if let Some(pgid) = pgid {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}

fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut reader: R,
    stream: Stream,
    sink: LogSink,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut open = true;
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Keep draining after the sink is gone so the build never blocks on a pipe.
                    if open
                        && sink
                            .send((stream, Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                    {
                        open = false;
                    }
                }
            }
        }
    })
}
