//! A `corral work` whose runner runs each job's command as a plain child process, WITHOUT a
//! sandbox, source or snapshot: the AMQP layer exercised end to end with real builds and
//! without root. It lives in test code so that no shipped binary can run a job outside the
//! sandbox; an integration-test binary re-executes itself as this worker ([`command`]), with
//! the shared `common` module beside it.
//!
//! Fault injection for tests of the delivery guarantees, read from the environment:
//! `CORRAL_FAULT_ABORT_JOB=<prefix>` aborts the whole worker process when a job whose id
//! starts with the prefix is run (a crash on every delivery);
//! `CORRAL_FAULT_PLATFORM_JOB=<prefix>` makes such jobs fail as platform errors.

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use corral_protocol::{Job, Stream, Timings};
use corral_sandbox::{DeathReason, Exit, Outcome, Usage};
use corral_worker::amqp::{AmqpSettings, Worker};
use corral_worker::cli::{Cli, Command as CorralCommand};
use corral_worker::config::{Config, Sources};
use corral_worker::job::{BuildLog, Built, Ending, JobError, Output, Ran, RunContext, Runner};
use tokio_util::sync::CancellationToken;

/// The worker's `corral` arguments, one per line: set, the test binary serves as the worker.
pub const ARGS_VAR: &str = "CORRAL_TEST_WORKER_ARGS";
/// The name of the `#[test]` entry that calls [`serve_if_asked`].
pub const ENTRY: &str = "process_worker";

/// Grace between SIGTERM and SIGKILL when a build is stopped.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// This test binary started as a process worker running `corral` with `args` (`work …`).
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary's path"));
    let libtest = [
        "--exact",
        ENTRY,
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ];
    crate::common::without_corral_settings(&mut cmd)
        .args(libtest)
        .env(ARGS_VAR, args.join("\n"));
    cmd
}

/// Serves as the worker when [`ARGS_VAR`] is set, until it drains; otherwise returns at once.
pub fn serve_if_asked() {
    let Some(args) = std::env::var_os(ARGS_VAR) else {
        return;
    };
    let args = args.to_string_lossy().into_owned();
    let cli = Cli::parse_from(std::iter::once("corral").chain(args.lines()));
    let CorralCommand::Work(work) = cli.command else {
        panic!("{ARGS_VAR} must start with `work`, not {args:?}");
    };
    corral_worker::logging::install(cli.global.log_format(), cli.global.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let (drain, kill) = corral_worker::cmd::work::on_signals().expect("signal handlers");
        tracing::warn!("process runner: jobs run WITHOUT a sandbox (tests only)");
        // The same layered config as `corral work`, broker settings included.
        let sources = Sources::from_process(work.config.clone(), work.flags.values());
        let config = Config::load(&sources).expect("the worker's config").config;
        let settings = AmqpSettings::from_config(&config);
        let worker = Worker::new(settings, ProcessRunner::from_env()).expect("the worker");
        worker.run(drain, kill).await.expect("the worker ran");
    });
}

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

    async fn build(&self, job: &Job, ctx: RunContext) -> Result<Built, JobError> {
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
            return Err(JobError::Join("fault injection: platform failure".into()));
        }
        let dir = tempfile::Builder::new()
            .prefix("corral-job-")
            .tempdir()
            .map_err(|source| JobError::Scratch {
                path: std::env::temp_dir(),
                source,
            })?;
        let log = BuildLog::new(
            job.limits.log_bytes.bytes(),
            None,
            ctx.logs.clone(),
            ctx.events.clone(),
        );
        let started = Instant::now();
        let mut cmd = Command::new(&job.command[0]);
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
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                // The program is missing or not executable: the job's fault, like exit 127.
                let msg = format!("cannot run {:?}: {err}\n", job.command[0]);
                let _ = ctx.logs.send((Stream::System, msg.into())).await;
                return Ok(built(
                    Exit::Code(127),
                    DeathReason::Completed,
                    started,
                    &log,
                ));
            }
        };
        ctx.events.started();
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let over_limit = CancellationToken::new();
        let mut readers = Vec::new();
        let on_limit = || {
            let over = over_limit.clone();
            move || over.cancel()
        };
        let pipe = |fd: std::os::fd::OwnedFd| std::io::PipeReader::from(fd);
        let stdout = child.stdout.take().map(|out| pipe(out.into()));
        let stderr = child.stderr.take().map(|err| pipe(err.into()));
        readers.push(log.read_pipes(stdout, stderr, on_limit()));
        drop(ctx.logs);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(child.wait());
        });
        tokio::pin!(done_rx);
        let wall = Duration::from_secs(job.limits.wall_seconds);
        let mut status = None;
        let reason = tokio::select! {
            ended = &mut done_rx => {
                status = Some(ended);
                None
            }
            () = tokio::time::sleep(wall) => Some(DeathReason::WallTimeout),
            () = ctx.stop.stopped() => Some(DeathReason::Cancelled),
            () = over_limit.cancelled() => Some(DeathReason::Cancelled),
        };
        if reason.is_some() {
            signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
            match tokio::time::timeout(KILL_GRACE, &mut done_rx).await {
                Ok(ended) => status = Some(ended),
                Err(_) => signal_group(pgid, nix::sys::signal::Signal::SIGKILL),
            }
        }
        // Whatever the main process left behind in its group goes with it.
        signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
        let ended = match status {
            Some(ended) => ended,
            None => (&mut done_rx).await,
        };
        let status: io::Result<std::process::ExitStatus> =
            ended.unwrap_or_else(|_| Err(io::Error::other("the waiting thread died")));
        let status = status.map_err(|source| JobError::Scratch {
            path: dir.path().to_path_buf(),
            source,
        })?;
        for reader in readers {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        let exit = match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Code(-1),
        };
        Ok(built(
            exit,
            reason.unwrap_or(DeathReason::Completed),
            started,
            &log,
        ))
    }
}

impl Runner for ProcessRunner {
    async fn run(&self, job: &Job, ctx: RunContext) -> Ran {
        let started = Instant::now();
        let ending = match self.build(job, ctx).await {
            Ok(built) => Ending::Built(Box::new(built)),
            Err(err) => Ending::Failed(err),
        };
        let build_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ran {
            ending,
            timings: Timings {
                build_ms,
                ..Timings::default()
            },
        }
    }
}

fn built(exit: Exit, reason: DeathReason, started: Instant, log: &BuildLog) -> Built {
    Built {
        outcome: Outcome {
            exit,
            reason,
            usage: Usage {
                wall: started.elapsed(),
                ..Usage::default()
            },
            denied_syscalls: Default::default(),
            network_attempts: 0,
            oom_kills: 0,
            pids_limit_hits: 0,
            events_dropped: 0,
        },
        log_truncated: log.truncated(),
        upper_bytes: 0,
        log: None,
        output: Output::NotTaken,
        inputs: None,
        network: None,
        network_cut: false,
    }
}

fn signal_group(pgid: nix::unistd::Pid, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(pgid, signal);
}
