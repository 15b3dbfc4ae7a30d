//! The worker's side of a run: create the job's cgroup, launch the shim, hand it the
//! spec, stream the job's output, relay cancellation, and turn the shim's report plus the
//! cgroup's counters into an [`Outcome`]. Safe to call from a multi-threaded process: it
//! only spawns a process and reads and writes files.

use std::io::{PipeReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Error;
use crate::cgroup::{self, CgroupStats, Counters, JobCgroup};
use crate::event::LiveEvent;
use crate::handshake::{
    self, EndedBy, Frames, FromShim, HandshakeError, Report, Request, SetupError, SetupStep, ToShim,
};
use crate::outcome::{DeathReason, Exit, Outcome, Usage};
use crate::shim::{CgroupSetup, JobOutput, SHIM_ARG, Supervisor};
use crate::spec::{SandboxConfig, SandboxSpec};
use crate::trace::{self, Mark, Timings};

/// Entry points: [`Sandbox::spawn`] (from any process, e.g. the tokio worker: the
/// supervisor is a shim process) and [`Sandbox::run`] (a single-threaded caller, the
/// `corral sandbox` command: the caller supervises the job itself).
pub struct Sandbox;

/// What [`Sandbox::run`] returns: the job's [`Outcome`], known once every process of the
/// job is dead and its cgroup has been read and removed. The job's pid 1 (the sandbox's
/// init: no job code runs in it by then, and it has closed its standard streams) may
/// still be exiting, its namespaces going away with it, the overlay mount among them.
/// [`Ended::wait`] (or dropping this) waits for that, which matters before unmounting or
/// reusing what the root was made of; [`Ended::detach`] does not, for a caller that is
/// about to exit and lets its own reaper collect pid 1, as `bwrap` does.
#[derive(Debug)]
pub struct Ended {
    outcome: Option<Outcome>,
    exiting: Option<libc::pid_t>,
    timings: Timings,
}

impl Ended {
    /// The run's timing marks: empty unless [`crate::trace::enable`] was called first.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    pub fn outcome(&self) -> &Outcome {
        self.outcome
            .as_ref()
            .expect("an Ended always holds its outcome until it is taken")
    }

    /// Waits until the job's pid 1 is gone, its namespaces and mounts with it.
    pub fn wait(mut self) -> Outcome {
        self.reap();
        self.take()
    }

    /// Returns without waiting for pid 1 to finish exiting. If the caller does not exit
    /// soon, pid 1 stays a zombie child of it until it does.
    pub fn detach(mut self) -> Outcome {
        self.exiting = None;
        self.take()
    }

    fn take(&mut self) -> Outcome {
        self.outcome
            .take()
            .expect("an Ended always holds its outcome until it is taken")
    }

    fn reap(&mut self) {
        if let Some(pid) = self.exiting.take() {
            let _ = crate::sys::wait4(pid, 0);
        }
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.reap();
    }
}

/// Where [`Sandbox::run`] sends the job's output.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    /// The caller's own standard output and error.
    Inherit,
    /// Discarded.
    Discard,
}

/// A started job. Take [`Running::stdout`] and [`Running::stderr`] and drain them (the
/// job blocks when a pipe is full), optionally take [`Running::events`], then call
/// [`Running::wait`]; or take none of them and call [`Running::wait_outcome_live`], which
/// reads the output, the events and the shim's report on the calling thread.
pub struct Running {
    pub stdout: Option<PipeReader>,
    pub stderr: Option<PipeReader>,
    shim: Shim,
    ctl: UnixStream,
    cancel: CancelHandle,
    cgroup: JobCgroup,
    /// The cgroup's counters, opened ahead by the pool (read at the end without a path
    /// walk); `None` for a cgroup made on the spot.
    counters: Option<Counters>,
    waited: bool,
    events: Option<Receiver<LiveEvent>>,
    /// The egress proxy's listening socket, once the shim has handed it over.
    egress: Option<Receiver<OwnedFd>>,
    /// Reads the shim's link on a thread of its own (events into the channel as they
    /// come, then the report): started by [`Running::events`] or
    /// [`Running::egress_listener`]. Without it the waiting thread reads the link itself.
    /// The shim never blocks on an unread link (its outbox keeps or drops).
    reader: Option<JoinHandle<ShimWords>>,
    /// Our own timing marks, when the run is traced ([`Sandbox::spawn_traced`]).
    timings: Option<Timings>,
    /// Where the cgroup goes back once the job is over, if it came from a pool.
    cgroup_pool: Option<Arc<crate::CgroupPool>>,
}

/// How many live events wait for their consumer before new ones are dropped (and
/// counted in [`Outcome::events_dropped`]).
pub const EVENTS_QUEUED: usize = 256;

/// One of the job's output pipes, as [`Live::output`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPipe {
    Stdout,
    Stderr,
}

/// A job's output pipes, read as `poll` says they are ready, each dropped at its end.
pub struct OutputPipes {
    pipes: Vec<(PipeReader, OutputPipe)>,
    buf: Vec<u8>,
}

impl OutputPipes {
    pub fn new(stdout: Option<PipeReader>, stderr: Option<PipeReader>) -> OutputPipes {
        OutputPipes {
            pipes: [(stdout, OutputPipe::Stdout), (stderr, OutputPipe::Stderr)]
                .into_iter()
                .filter_map(|(pipe, name)| pipe.map(|pipe| (pipe, name)))
                .collect(),
            buf: Vec::new(),
        }
    }

    /// Every pipe is at its end (or there was none).
    pub fn is_empty(&self) -> bool {
        self.pipes.is_empty()
    }

    /// The pipes to wait on, in order, for [`OutputPipes::read_ready`].
    fn poll_fds(&self) -> Vec<(i32, libc::c_short)> {
        self.pipes
            .iter()
            .map(|(pipe, _)| (pipe.as_raw_fd(), libc::POLLIN))
            .collect()
    }

    /// Reads once from each pipe whose `revents` (in [`OutputPipes::poll_fds`] order) is
    /// set: end of stream and errors (POLLHUP, POLLERR) show as ready too, and the read
    /// says which.
    fn read_ready(
        &mut self,
        revents: &[libc::c_short],
        on_output: &mut dyn FnMut(OutputPipe, &[u8]),
    ) {
        if self.buf.is_empty() {
            self.buf = vec![0u8; 64 << 10];
        }
        let mut i = self.pipes.len();
        while i > 0 {
            i -= 1;
            if revents[i] == 0 {
                continue;
            }
            match self.pipes[i].0.read(&mut self.buf) {
                Ok(0) => {
                    self.pipes.swap_remove(i);
                }
                Ok(n) => on_output(self.pipes[i].1, &self.buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.pipes.swap_remove(i);
                }
            }
        }
    }

    /// Reads every pipe to its end on this thread, whichever has output first.
    pub fn drain(mut self, on_output: &mut dyn FnMut(OutputPipe, &[u8])) {
        while !self.is_empty() {
            let Ok(revents) = crate::sys::poll(&self.poll_fds(), -1) else {
                return;
            };
            self.read_ready(&revents, on_output);
        }
    }
}

/// What [`Running::wait_outcome_live`] hands on while the job runs, from the waiting
/// thread, as it comes. No method may wait for long: the link and the pipes are read
/// between calls (the shim never waits for us; the job waits when its pipe is full).
pub trait Live {
    /// Bytes the job wrote, from a pipe [`Running`] still holds (not taken).
    fn output(&mut self, pipe: OutputPipe, bytes: &[u8]) {
        let _ = (pipe, bytes);
    }
    /// A live event (OOM kill, refused fork, denied syscall…).
    fn event(&mut self, event: LiveEvent) {
        let _ = event;
    }
    /// The egress proxy's listening socket (`Network::Egress`), before the job starts.
    fn egress(&mut self, listener: OwnedFd) {
        let _ = listener;
    }
}

/// Events handed to a [`Live`] are taken: none counts as dropped.
struct Taken<'a>(&'a mut dyn Live);

/// What the shim said: the report (or why there is none), and events dropped on our side.
struct ShimWords {
    report: Result<Option<Report>, HandshakeError>,
    dropped: u64,
}

/// Where what comes over the shim's link goes, and the output of pipes read with it.
trait Link {
    /// Bytes of the job's output.
    fn output(&mut self, pipe: OutputPipe, bytes: &[u8]);
    /// False: the event was not taken (counted as dropped).
    fn event(&mut self, event: LiveEvent) -> bool;
    fn egress(&mut self, listener: OwnedFd);
}

impl Link for Taken<'_> {
    fn output(&mut self, pipe: OutputPipe, bytes: &[u8]) {
        self.0.output(pipe, bytes);
    }
    fn event(&mut self, event: LiveEvent) -> bool {
        self.0.event(event);
        true
    }
    fn egress(&mut self, listener: OwnedFd) {
        self.0.egress(listener);
    }
}

/// Nobody listens: output and events are dropped (the events not counted), the egress
/// socket closed.
struct Unheard;

impl Link for Unheard {
    fn output(&mut self, _: OutputPipe, _: &[u8]) {}
    fn event(&mut self, _: LiveEvent) -> bool {
        true
    }
    fn egress(&mut self, _: OwnedFd) {}
}

/// The reader thread's: into the channels of [`Running::events`] and
/// [`Running::egress_listener`], never waiting for their consumer.
struct Channels {
    events: std::sync::mpsc::SyncSender<LiveEvent>,
    egress: std::sync::mpsc::SyncSender<OwnedFd>,
}

impl Link for Channels {
    fn output(&mut self, _: OutputPipe, _: &[u8]) {}
    fn event(&mut self, event: LiveEvent) -> bool {
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
    fn egress(&mut self, listener: OwnedFd) {
        let _ = self.egress.try_send(listener);
    }
}

/// Hands one message from the shim on; the report when it is one.
fn dispatch(
    message: FromShim,
    frames: &mut Frames,
    live: &mut dyn Link,
    dropped: &mut u64,
) -> Option<Report> {
    match message {
        FromShim::Egress => {
            if let Some(listener) = frames.take_fd() {
                live.egress(listener);
            }
        }
        FromShim::Event(event) => {
            if !live.event(event) {
                *dropped += 1;
            }
        }
        FromShim::Report(report) => return Some(*report),
    }
    None
}

/// Reads frames from the shim until its report, passing events on as they come, never
/// waiting for their consumer: the shim's socket must not fill while the job runs.
fn read_shim(ctl: &UnixStream, live: &mut dyn Link) -> ShimWords {
    let mut frames = Frames::default();
    let mut dropped = 0;
    loop {
        match frames.read_with_fds::<FromShim>(ctl.as_raw_fd()) {
            Ok(Some(FromShim::Report(report))) => {
                return ShimWords {
                    report: Ok(Some(*report)),
                    dropped,
                };
            }
            Ok(Some(message)) => {
                dispatch(message, &mut frames, live, &mut dropped);
            }
            other => {
                return ShimWords {
                    report: other.map(|_| None),
                    dropped,
                };
            }
        }
    }
}

/// [`read_shim`] on the waiting thread, with the output pipes not taken: polls them and the
/// link together, until the report is in and the pipes are at their end.
fn read_here(
    ctl: &UnixStream,
    stdout: Option<PipeReader>,
    stderr: Option<PipeReader>,
    live: &mut dyn Link,
) -> ShimWords {
    let mut pipes = OutputPipes::new(stdout, stderr);
    if pipes.is_empty() {
        return read_shim(ctl, live);
    }
    let mut frames = Frames::default();
    let mut dropped = 0;
    let mut report: Option<Result<Option<Report>, HandshakeError>> = None;
    while report.is_none() || !pipes.is_empty() {
        let mut fds = pipes.poll_fds();
        let link = fds.len();
        if report.is_none() {
            fds.push((ctl.as_raw_fd(), libc::POLLIN));
        }
        let Ok(revents) = crate::sys::poll(&fds, -1) else {
            // The kernel is out of memory for the poll: the link alone, the output unread.
            let mut words = match report {
                Some(report) => ShimWords { report, dropped: 0 },
                None => read_shim(ctl, live),
            };
            words.dropped += dropped;
            return words;
        };
        if report.is_none() && revents[link] != 0 {
            report = match frames.fill_with_fds(ctl.as_raw_fd()) {
                Ok(true) => loop {
                    match frames.next::<FromShim>() {
                        Ok(Some(message)) => {
                            if let Some(r) = dispatch(message, &mut frames, live, &mut dropped) {
                                break Some(Ok(Some(r)));
                            }
                        }
                        Ok(None) => break None,
                        Err(err) => break Some(Err(err)),
                    }
                },
                Ok(false) if frames.is_empty() => Some(Ok(None)),
                Ok(false) => Some(Err(HandshakeError::Truncated)),
                Err(err) => Some(Err(err.into())),
            };
        }
        pipes.read_ready(&revents[..link], &mut |pipe, bytes| {
            live.output(pipe, bytes)
        });
    }
    ShimWords {
        report: report.unwrap_or(Ok(None)),
        dropped,
    }
}

/// The supervising shim: exec'd by us, or forked by the zygote (whose child it is).
enum Shim {
    Exec(Child),
    Forked(u32),
    /// Handed to a [`Teardown`]: nothing left to wait for here.
    Handed,
}

impl Shim {
    fn pid(&self) -> u32 {
        match self {
            Shim::Exec(child) => child.id(),
            Shim::Forked(pid) => *pid,
            Shim::Handed => 0,
        }
    }

    /// Returns once the shim has exited. A forked shim is not our child: its exit shows
    /// as the end of the control stream (nothing else holds the shim's end by then).
    fn wait(&mut self, ctl: &mut UnixStream) {
        match self {
            Shim::Exec(child) => {
                let _ = child.wait();
            }
            Shim::Forked(_) => {
                let mut rest = Vec::new();
                let _ = ctl.read_to_end(&mut rest);
            }
            Shim::Handed => {}
        }
    }
}

/// The end of a run that [`Running::wait_outcome`] does not wait for: the job's pid 1
/// finishing its exit (every process of the job is dead and its cgroup removed by then),
/// its namespaces and the overlay mount going away with it, then the shim's exit. Reusing
/// or unmounting what the root was made of (the job dir) must wait for it:
/// [`Teardown::wait`], or [`crate::PooledJobDir::mark_quiescent_after`], which waits on
/// the pool's background thread. Dropping it waits too.
pub struct Teardown {
    shim: Shim,
    ctl: Option<UnixStream>,
}

impl std::fmt::Debug for Teardown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teardown")
            .field("shim", &self.shim.pid())
            .finish_non_exhaustive()
    }
}

impl Teardown {
    /// Returns once the shim has exited, which it does once pid 1 is gone.
    pub fn wait(mut self) {
        self.settle();
    }

    fn settle(&mut self) {
        let shim = std::mem::replace(&mut self.shim, Shim::Handed);
        match (shim, self.ctl.take()) {
            (mut shim @ (Shim::Exec(_) | Shim::Forked(_)), Some(mut ctl)) => shim.wait(&mut ctl),
            (Shim::Exec(mut child), None) => {
                let _ = child.wait();
            }
            _ => {}
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Cancels a running job from any thread: TERM to every process, `grace`, then KILL.
#[derive(Clone)]
pub struct CancelHandle {
    ctl: Arc<Mutex<UnixStream>>,
}

impl CancelHandle {
    /// Idempotent; a later call with a shorter grace shortens the wait.
    pub fn cancel(&self, grace: Duration) {
        if let Ok(mut ctl) = self.ctl.lock() {
            // A closed socket means the shim already finished: nothing left to cancel.
            let _ = handshake::write(&mut *ctl, &ToShim::Cancel { grace });
        }
    }
}

impl Sandbox {
    /// Takes the job's cgroup and starts the shim, which writes the cgroup's limits before
    /// the job starts. The job is running (or failing to start, which [`Running::wait`]
    /// reports, a limit the kernel refused included) when this returns.
    pub fn spawn(spec: &SandboxSpec, config: &SandboxConfig) -> Result<Running, Error> {
        Self::spawn_with(spec, config, None)
    }

    /// [`Sandbox::spawn`], taking timing marks here, in the shim and in the job's pid 1:
    /// [`Running::wait_timed`] returns them.
    pub fn spawn_traced(spec: &SandboxSpec, config: &SandboxConfig) -> Result<Running, Error> {
        let mut timings = Timings::default();
        timings.mark(Mark::Start);
        Self::spawn_with(spec, config, Some(timings))
    }

    fn spawn_with(
        spec: &SandboxSpec,
        config: &SandboxConfig,
        mut timings: Option<Timings>,
    ) -> Result<Running, Error> {
        let (cg, counters) = Self::spawn_cgroup(config)?;
        if let Some(t) = timings.as_mut() {
            t.mark(Mark::CallerCgroupMade);
        }
        let root = Self::root_mount_point(config);
        match Self::start(spec, config, &root, &cg, counters, timings) {
            Ok(running) => Ok(running),
            Err(err) => {
                // Nothing ran: the shim never got the request, or exited without it.
                match &config.cgroup_pool {
                    Some(pool) => pool.give_back(cg),
                    None => drop(cg.destroy()),
                }
                Err(err)
            }
        }
    }

    /// Runs the job to its end with the calling process as its supervisor: no shim
    /// process, no control socket. SIGINT, SIGTERM and SIGHUP cancel the job (TERM, a short
    /// grace, KILL; a second one kills at once) and the outcome still comes back. The
    /// caller must be single-threaded (the job's pid 1 is cloned from it and mounts as
    /// root), which is checked. It returns as soon as every process of the job is dead and
    /// the cgroup has been read and removed; see [`Ended`] for pid 1's own exit.
    pub fn run(spec: &SandboxSpec, config: &SandboxConfig, output: Output) -> Result<Ended, Error> {
        Self::run_with_events(spec, config, output, &mut |_| {})
    }

    /// [`Sandbox::run_with_events`], handing the egress proxy's listening socket
    /// (`Network::Egress`) to `on_egress` before the job starts. The caller serves it from
    /// another thread (started in `on_egress`: the job's pid 1 has been cloned by then).
    pub fn run_with_egress(
        spec: &SandboxSpec,
        config: &SandboxConfig,
        output: Output,
        on_event: &mut dyn FnMut(LiveEvent),
        on_egress: &mut dyn FnMut(OwnedFd),
    ) -> Result<Ended, Error> {
        Self::run_supervised(spec, config, output, on_event, on_egress)
    }

    /// [`Sandbox::run`], handing each [`LiveEvent`] to `on_event` as it happens, on the
    /// supervising thread: it must return quickly (the job's seccomp notifications wait
    /// meanwhile).
    pub fn run_with_events(
        spec: &SandboxSpec,
        config: &SandboxConfig,
        output: Output,
        on_event: &mut dyn FnMut(LiveEvent),
    ) -> Result<Ended, Error> {
        Self::run_supervised(spec, config, output, on_event, &mut |_| {})
    }

    fn run_supervised(
        spec: &SandboxSpec,
        config: &SandboxConfig,
        output: Output,
        on_event: &mut dyn FnMut(LiveEvent),
        on_egress: &mut dyn FnMut(OwnedFd),
    ) -> Result<Ended, Error> {
        if !single_threaded() {
            return Err(Error::NotSingleThreaded);
        }
        let root = Self::root_mount_point(config);
        // Made by the supervisor after the clone (see `CgroupSetup::Create`); kept here to
        // read and remove afterwards, with the typed error if making it failed.
        let mut made: Option<JobCgroup> = None;
        let mut failed: Option<Error> = None;
        let report = (|| -> Result<crate::shim::Supervised, Error> {
            let null = match output {
                Output::Inherit => None,
                Output::Discard => Some(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open("/dev/null")
                        .map_err(|e| SetupError::io_on(SetupStep::Output, "/dev/null", &e))?,
                ),
            };
            let signals = crate::sys::signalfd(&CANCEL_SIGNALS).map_err(|e| {
                SetupError::io_on(
                    SetupStep::Signals,
                    "a signalfd for SIGINT, SIGTERM, SIGHUP",
                    &e,
                )
            })?;
            let job_output = match &null {
                Some(f) => JobOutput::Fds(f.as_raw_fd(), f.as_raw_fd()),
                None => JobOutput::Inherit,
            };
            let mut create = || {
                let made_now = Self::job_cgroup(config).and_then(|cg| {
                    made = Some(cg.clone());
                    trace::mark(Mark::CgroupMade);
                    cg.version().apply(&crate::cgroup::limits_for(spec))?;
                    trace::mark(Mark::CgroupLimits);
                    Ok(cg)
                });
                made_now.map_err(|err| {
                    let setup = SetupError::chain(SetupStep::Cgroup, &err);
                    failed = Some(err);
                    setup
                })
            };
            // Pid 1 starts on the other CPU, so that it builds the root while we make the
            // cgroup (see `start_init`). Only when nothing else is runnable: next to a busy
            // task on the other CPU, pid 1 would run at half speed instead of waiting
            // ~0.3 ms for ours (measured: 1.47x bwrap against 1.02x with a spinning process
            // on the second of two CPUs).
            let cpus = crate::sys::running_alone()
                .then(|| crate::sys::CpuSet::current().ok())
                .flatten();
            let init = crate::shim::start_init(None, &job_output, cpus);
            let report = crate::shim::supervise(
                spec,
                &root,
                CgroupSetup::Create(&mut create),
                Supervisor {
                    ctl: None,
                    signals: Some(signals),
                    init,
                    events: on_event,
                    egress: on_egress,
                },
            );
            let _ = crate::sys::mask_signals(&CANCEL_SIGNALS, false);
            Ok(report)
        })();
        // The cgroup is read and removed while pid 1 may still be exiting (it has left the
        // cgroup then, and every process of the job is dead).
        let ended = made.map(|cg| {
            let stats = cg.version().stats();
            trace::mark(Mark::CountersRead);
            let destroyed = cg.destroy();
            trace::mark(Mark::CgroupRemoved);
            (stats, destroyed)
        });
        let (report, exiting) = match report {
            Ok(supervised) => {
                let (report, exiting) = supervised.into_parts();
                (Ok(report), exiting)
            }
            Err(err) => (Err(err), None),
        };
        // Waits for pid 1 when dropped: on every early return below.
        let mut done = Ended {
            outcome: None,
            exiting,
            timings: trace::take(),
        };
        if let Some(err) = failed {
            return Err(err);
        }
        let report = report?;
        match ended {
            Some((stats, destroyed)) => {
                destroyed?;
                done.outcome = Some(finish(report, stats)?);
                Ok(done)
            }
            // The run stopped before the clone: the report says why.
            None => Err(Error::Setup(report.error.unwrap_or_else(|| {
                SetupError::new(SetupStep::Cgroup, "no job cgroup was made")
            }))),
        }
    }

    /// The mount point of the job's root.
    ///
    /// Every job mounts its root on the same empty directory, each in its own private
    /// mount namespace (the host never sees those mounts). A per-job directory would have
    /// to be removed afterwards, and removing a directory that is still a mount point in a
    /// dying namespace waits for an RCU grace period (milliseconds per job).
    fn root_mount_point(config: &SandboxConfig) -> std::path::PathBuf {
        config.run_dir.join("root")
    }

    /// A fresh job cgroup for [`Sandbox::spawn`]: from the config's pool when it has one,
    /// with its counters open (the pool opened them).
    fn spawn_cgroup(config: &SandboxConfig) -> Result<(JobCgroup, Option<Counters>), Error> {
        match &config.cgroup_pool {
            Some(pool) => Ok(pool.take()?),
            None => Self::job_cgroup(config).map(|cg| (cg, None)),
        }
    }

    /// A fresh, uniquely named job cgroup.
    fn job_cgroup(config: &SandboxConfig) -> Result<JobCgroup, Error> {
        let mountinfo = match &config.mountinfo {
            Some(m) => m.clone(),
            None => crate::mountinfo::read_own().map_err(|source| Error::Mountinfo { source })?,
        };
        trace::mark(Mark::MountinfoRead);
        let layout = cgroup::discover_required(&mountinfo)?;
        trace::mark(Mark::CgroupFound);
        let name = cgroup::job_cgroup_name();
        Ok(JobCgroup::create(&layout, &config.cgroup_parent, &name)?)
    }

    fn start(
        spec: &SandboxSpec,
        config: &SandboxConfig,
        root: &std::path::Path,
        cg: &JobCgroup,
        counters: Option<Counters>,
        mut timings: Option<Timings>,
    ) -> Result<Running, Error> {
        // The shim writes the cgroup's limits, while pid 1 builds the root.
        let request = handshake::encode(&ToShim::Request(Box::new(Request {
            spec: spec.clone(),
            cgroup: cg.clone(),
            root: root.to_owned(),
            trace: timings.is_some(),
        })));
        let spawn_err = |source| Error::SpawnShim {
            path: config.helper_exe.clone(),
            source,
        };
        // A new control socket, our end holding as much of the request as it takes. Put in
        // before the shim exists, the request is waiting for the shim as it starts instead of
        // the zygote's answer and our write taking turns with it. What does not fit in the
        // socket's buffer follows once the shim runs.
        let new_link = || {
            let (ours, theirs) = UnixStream::pair()?;
            let sent = early_write(&ours, &request)?;
            Ok((ours, theirs, sent))
        };
        let new_link = || new_link().map_err(|source| Error::ControlSocket { source });
        // A shim the zygote forked ahead, waiting for this request: nothing to fork now.
        let ready = config.zygote.as_ref().and_then(|z| z.take_ready());
        let (ours, sent, shim, stdout, stderr) = match (ready, &config.zygote) {
            (Some(ready), _) => (
                ready.ctl,
                0,
                Shim::Forked(ready.pid),
                ready.stdout,
                ready.stderr,
            ),
            (None, Some(zygote)) => {
                let (ours, theirs, sent) = new_link()?;
                let pipes = (|| Ok::<_, std::io::Error>((std::io::pipe()?, std::io::pipe()?)))();
                let ((out_r, out_w), (err_r, err_w)) = pipes.map_err(spawn_err)?;
                let pid = zygote
                    .fork_shim(
                        &OwnedFd::from(theirs),
                        &OwnedFd::from(out_w),
                        &OwnedFd::from(err_w),
                    )
                    .map_err(spawn_err)?;
                (ours, sent, Shim::Forked(pid), out_r, err_r)
            }
            (None, None) => {
                let (ours, theirs, sent) = new_link()?;
                let mut child = Command::new(&config.helper_exe)
                    .arg(SHIM_ARG)
                    .env_clear()
                    .stdin(Stdio::from(OwnedFd::from(theirs)))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(spawn_err)?;
                let out = child.stdout.take().map(OwnedFd::from);
                let err = child.stderr.take().map(OwnedFd::from);
                let (Some(out), Some(err)) = (out, err) else {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::ShimDied);
                };
                (
                    ours,
                    sent,
                    Shim::Exec(child),
                    PipeReader::from(out),
                    PipeReader::from(err),
                )
            }
        };
        if let Some(t) = timings.as_mut() {
            t.mark(Mark::ShimForked);
        }
        let cancel_side = ours
            .try_clone()
            .map_err(|source| Error::ControlSocket { source })?;
        let mut running = Running {
            stdout: Some(stdout),
            stderr: Some(stderr),
            shim,
            ctl: ours,
            cancel: CancelHandle {
                ctl: Arc::new(Mutex::new(cancel_side)),
            },
            cgroup: cg.clone(),
            counters,
            waited: false,
            events: None,
            egress: None,
            reader: None,
            timings: None,
            cgroup_pool: config.cgroup_pool.clone(),
        };
        if let Err(source) = std::io::Write::write_all(&mut running.ctl, &request[sent..]) {
            // Dropping the control socket ends the shim; the caller removes the cgroup.
            running.waited = true;
            running.cancel.cancel(Duration::ZERO);
            running.shim.wait(&mut running.ctl);
            return Err(Error::ControlSocket { source });
        }
        running.timings = timings.map(|mut t| {
            t.mark(Mark::RequestSent);
            t
        });
        Ok(running)
    }
}

impl Running {
    /// Pid of the shim process (for metrics and crash tests; the job is its child).
    pub fn shim_pid(&self) -> u32 {
        self.shim.pid()
    }

    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// The job's network namespace, entered by a thread of its own (see
    /// [`crate::JobNetwork`]). `NotFound` until the job's first process has joined its
    /// cgroup; callers retry.
    pub fn network(&self) -> std::io::Result<crate::JobNetwork> {
        let pids = self
            .cgroup
            .version()
            .pids()
            .map_err(std::io::Error::other)?;
        let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
        for pid in pids {
            match crate::JobNetwork::of_pid(pid.unsigned_abs()) {
                Ok(network) => return Ok(network),
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// What the job does while it runs, as it happens (within milliseconds of the kernel's
    /// notification), once: the first call takes the receiver. It ends after the last
    /// event, before [`Running::wait`] returns. Events are kept for the consumer up to
    /// [`EVENTS_QUEUED`]; past that they are dropped, never blocking the job, and counted
    /// in [`Outcome::events_dropped`].
    ///
    /// Starts the thread that reads the shim's link. `None` when it cannot start (the
    /// link is then read by [`Running::wait`], events dropped).
    pub fn events(&mut self) -> Option<Receiver<LiveEvent>> {
        self.start_reader();
        self.events.take()
    }

    /// The egress proxy's listening socket on the job's loopback (`Network::Egress`), once:
    /// the first call takes the receiver. It yields the socket before the job starts (the
    /// job's connections wait in its backlog meanwhile) and closes without one for other
    /// networks or when the sandbox could not be built.
    ///
    /// Starts the thread that reads the shim's link, as [`Running::events`] does.
    pub fn egress_listener(&mut self) -> Option<Receiver<OwnedFd>> {
        self.start_reader();
        self.egress.take()
    }

    /// The link's reader thread, once, for [`Running::events`] and
    /// [`Running::egress_listener`]: both receivers are made with it.
    fn start_reader(&mut self) {
        if self.reader.is_some() || self.waited {
            return;
        }
        let Ok(side) = self.ctl.try_clone() else {
            return;
        };
        let (events_tx, events_rx) = std::sync::mpsc::sync_channel(EVENTS_QUEUED);
        let (egress_tx, egress_rx) = std::sync::mpsc::sync_channel(1);
        let reader = std::thread::Builder::new()
            .name("corral-shim-link".to_owned())
            .spawn(move || {
                let mut channels = Channels {
                    events: events_tx,
                    egress: egress_tx,
                };
                read_shim(&side, &mut channels)
            });
        if let Ok(handle) = reader {
            self.reader = Some(handle);
            self.events = Some(events_rx);
            self.egress = Some(egress_rx);
        }
    }

    /// Waits for the job to end. When this returns (even with an error) every process of
    /// the job is dead and its cgroup has been removed.
    pub fn wait(self) -> Result<Outcome, Error> {
        self.wait_timed().map(|(outcome, _)| outcome)
    }

    /// [`Running::wait`], with the run's timing marks: the caller's, the shim's and pid 1's
    /// for a run started with [`Sandbox::spawn_traced`], none otherwise.
    pub fn wait_timed(self) -> Result<(Outcome, Timings), Error> {
        let (result, teardown) = self.wait_early();
        teardown.wait();
        result
    }

    /// Waits for the job to end, as [`Running::wait`], but returns as soon as every
    /// process of the job is dead and its cgroup read and removed, while the job's pid 1
    /// may still be exiting: the [`Teardown`] waits for that (before the job dir is
    /// reused). The namespaces' teardown (an RCU grace period or more for the mounts)
    /// leaves the job's critical path.
    pub fn wait_outcome(self) -> (Result<Outcome, Error>, Teardown) {
        let (result, teardown) = self.wait_early();
        (result.map(|(outcome, _)| outcome), teardown)
    }

    /// [`Running::wait_outcome`] with the timing marks (see [`Running::wait_timed`]).
    pub fn wait_outcome_timed(self) -> (Result<(Outcome, Timings), Error>, Teardown) {
        self.wait_early()
    }

    /// [`Running::wait_outcome`], reading on this thread, while the job runs, the shim's
    /// link and the output pipes not taken: each chunk of output, live event and the egress
    /// proxy's listening socket goes to `live` as it comes. Returns once the report is in
    /// and both pipes are at their end (every process of the job is dead by then). No
    /// thread of ours reads for the job: one wakeup fewer between the shim's report and
    /// the outcome, none between the output and `live`. When [`Running::events`] or
    /// [`Running::egress_listener`] was called before, their receivers get those instead.
    pub fn wait_outcome_live(self, live: &mut dyn Live) -> (Result<Outcome, Error>, Teardown) {
        let (result, teardown) = self.wait_outcome_live_timed(live);
        (result.map(|(outcome, _)| outcome), teardown)
    }

    /// [`Running::wait_outcome_live`] with the timing marks (see [`Running::wait_timed`]).
    pub fn wait_outcome_live_timed(
        mut self,
        live: &mut dyn Live,
    ) -> (Result<(Outcome, Timings), Error>, Teardown) {
        self.wait_with(&mut Taken(live))
    }

    fn wait_early(mut self) -> (Result<(Outcome, Timings), Error>, Teardown) {
        // Nobody asked for them: events are not kept (nor counted as dropped), output not
        // taken is read and dropped.
        self.wait_with(&mut Unheard)
    }

    fn wait_with(&mut self, live: &mut dyn Link) -> (Result<(Outcome, Timings), Error>, Teardown) {
        let result = self.collect(live);
        let shim = std::mem::replace(&mut self.shim, Shim::Handed);
        let ctl = self.ctl.try_clone().ok();
        let mut teardown = Teardown { shim, ctl };
        if teardown.ctl.is_none() {
            // No way to hear of the shim's end later: wait for it now.
            teardown.settle();
        }
        (result, teardown)
    }

    /// The report, then the cgroup's counters, then its removal (the shim reports once
    /// pid 1 has left the cgroup, or once pid 1 is gone).
    fn collect(&mut self, live: &mut dyn Link) -> Result<(Outcome, Timings), Error> {
        self.waited = true;
        let mut timings = self.timings.take();
        let mut at = |mark| {
            if let Some(t) = timings.as_mut() {
                t.mark(mark);
            }
        };
        let words = self.stop_reading(live);
        at(Mark::ReportReceived);
        if !matches!(words.report, Ok(Some(_))) {
            // No report: the shim died (its pid 1 with it: parent death signal) or speaks
            // nonsense; as before any report, wait for its end, then destroy kills what
            // is left in the cgroup.
            self.shim.wait(&mut self.ctl);
            at(Mark::ShimGone);
        }
        let stats = match self.counters.take() {
            Some(counters) => counters.read(),
            None => self.cgroup.version().stats(),
        };
        at(Mark::CountersRead);
        match (&self.cgroup_pool, &words.report) {
            // Every process of the job is dead (pid 1 reported so, and has left the cgroup
            // or is gone): the pool removes the cgroup in the background.
            (Some(pool), Ok(Some(_))) => pool.give_back(self.cgroup.clone()),
            _ => self.cgroup.destroy()?,
        }
        at(Mark::CgroupRemoved);
        let mut timings = timings.unwrap_or_default();
        match words.report {
            Ok(Some(mut report)) => {
                timings.extend(std::mem::take(&mut report.timings));
                finish(report, stats).map(|mut outcome| {
                    outcome.events_dropped += words.dropped;
                    (outcome, timings)
                })
            }
            Ok(None) => Err(Error::ShimDied),
            Err(HandshakeError::Io(source)) => Err(Error::ControlSocket { source }),
            Err(err) => Err(Error::Handshake(err)),
        }
    }

    /// Joins the link's reader, or reads the link here when no thread does: either returns
    /// after the report, or when the link ends.
    fn stop_reading(&mut self, live: &mut dyn Link) -> ShimWords {
        // Nobody will take them now: events still coming are dropped, not queued.
        self.events = None;
        match self.reader.take().map(JoinHandle::join) {
            Some(Ok(words)) => words,
            Some(Err(_)) => ShimWords {
                report: Ok(None),
                dropped: 0,
            },
            None => read_here(&self.ctl, self.stdout.take(), self.stderr.take(), live),
        }
    }
}

/// Writes what `ctl` takes of `bytes` without blocking; how much that was.
fn early_write(ctl: &UnixStream, bytes: &[u8]) -> std::io::Result<usize> {
    use std::io::Write;
    ctl.set_nonblocking(true)?;
    let mut sent = 0;
    let result = loop {
        match (&*ctl).write(&bytes[sent..]) {
            Ok(0) => break Ok(sent),
            Ok(n) => {
                sent += n;
                if sent == bytes.len() {
                    break Ok(sent);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(sent),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    ctl.set_nonblocking(false)?;
    result
}

/// Signals that cancel a job supervised by [`Sandbox::run`].
const CANCEL_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Whether the calling process has a single thread (`/proc/self/task` has one entry).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.take(2).count() == 1)
}

/// The supervisor's report plus the cgroup's counters, as an [`Outcome`].
fn finish(
    report: Report,
    stats: Result<CgroupStats, crate::CgroupError>,
) -> Result<Outcome, Error> {
    if let Some(error) = report.error {
        return Err(Error::Setup(error));
    }
    let stats = stats?;
    let exit = report.exit.ok_or(Error::ShimDied)?;
    Ok(Outcome {
        exit,
        reason: decide(report.ended_by, exit, &stats, report.disk_full),
        usage: usage(&report, &stats),
        denied_syscalls: report.denied_syscalls,
        network_attempts: report.network_attempts,
        oom_kills: stats.oom_kills,
        pids_limit_hits: stats.pids_limit_hits,
        events_dropped: report.events_dropped,
    })
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.waited {
            self.cancel.cancel(Duration::ZERO);
            let _ = self.stop_reading(&mut Unheard);
            self.shim.wait(&mut self.ctl);
            let _ = self.cgroup.destroy();
        }
    }
}

/// The job's usage. I/O bytes are the larger of the cgroup's count (v2 `io.stat`, where it
/// names a device) and the build's own block counters: `io.stat` misses writeback the kernel
/// does not charge to the cgroup (a fsynced 32 MiB file counted 17–26 MiB on a 6.1 kernel),
/// the processes' counters miss I/O done for them by the kernel's threads.
fn usage(report: &Report, stats: &CgroupStats) -> Usage {
    Usage {
        cpu_user: stats.cpu_user.max(report.cpu_user),
        cpu_system: stats.cpu_system.max(report.cpu_system),
        memory_peak: stats.memory_peak,
        pids_peak: stats.pids_peak,
        io_read: stats.io_read.unwrap_or(0).max(report.io_read),
        io_write: stats.io_write.unwrap_or(0).max(report.io_write),
        wall: report.wall,
    }
}

/// Why the job ended. An operator's cancel wins; then the limit the kernel enforced (its
/// event counters say so); then our own timers; then a full disk; a clean exit 0 is always
/// `Completed`.
pub fn decide(
    ended_by: Option<EndedBy>,
    exit: Exit,
    stats: &CgroupStats,
    disk_full: bool,
) -> DeathReason {
    if ended_by == Some(EndedBy::Cancelled) {
        return DeathReason::Cancelled;
    }
    if exit == Exit::Code(0) && ended_by.is_none() {
        return DeathReason::Completed;
    }
    // A v2 `oom` without a kill still means the limit broke the job (an allocation failed).
    if stats.oom_kills > 0 || stats.oom_events > 0 {
        return DeathReason::Oom;
    }
    if stats.pids_limit_hits > 0 {
        return DeathReason::PidsLimit;
    }
    match ended_by {
        Some(EndedBy::CpuLimit) => return DeathReason::CpuLimit,
        Some(EndedBy::WallTimeout) => return DeathReason::WallTimeout,
        _ => {}
    }
    if exit == Exit::Signal(libc::SIGXCPU) {
        return DeathReason::CpuLimit;
    }
    if disk_full {
        return DeathReason::DiskLimit;
    }
    if exit == Exit::Signal(libc::SIGSYS) {
        return DeathReason::Seccomp;
    }
    DeathReason::Completed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_bytes_are_the_larger_of_the_cgroups_count_and_the_builds_own() {
        let report = Report {
            io_read: 4096,
            io_write: 32 << 20,
            ..Report::default()
        };
        let v2 = CgroupStats {
            io_read: Some(1 << 20),
            io_write: Some(17 << 20),
            ..CgroupStats::default()
        };
        let u = usage(&report, &v2);
        assert_eq!((u.io_read, u.io_write), (1 << 20, 32 << 20));
        let v1 = CgroupStats::default();
        let u = usage(&report, &v1);
        assert_eq!((u.io_read, u.io_write), (4096, 32 << 20));
    }

    #[test]
    fn reasons_follow_the_counters_not_the_signal() {
        let quiet = CgroupStats::default();
        let oom = CgroupStats {
            oom_kills: 1,
            ..CgroupStats::default()
        };
        let pids = CgroupStats {
            pids_limit_hits: 3,
            ..CgroupStats::default()
        };
        assert_eq!(
            decide(None, Exit::Code(0), &oom, true),
            DeathReason::Completed
        );
        assert_eq!(
            decide(None, Exit::Signal(9), &quiet, false),
            DeathReason::Completed,
            "a plain kill -9 is not an OOM"
        );
        assert_eq!(decide(None, Exit::Signal(9), &oom, false), DeathReason::Oom);
        let oom_without_kill = CgroupStats {
            oom_events: 2,
            ..CgroupStats::default()
        };
        assert_eq!(
            decide(None, Exit::Code(1), &oom_without_kill, false),
            DeathReason::Oom,
            "an allocation the limit refused (v2 `oom`, no `oom_kill`) is an OOM"
        );
        assert_eq!(
            decide(Some(EndedBy::WallTimeout), Exit::Signal(9), &pids, false),
            DeathReason::PidsLimit
        );
        assert_eq!(
            decide(Some(EndedBy::WallTimeout), Exit::Signal(9), &quiet, false),
            DeathReason::WallTimeout
        );
        assert_eq!(
            decide(Some(EndedBy::Cancelled), Exit::Signal(15), &oom, false),
            DeathReason::Cancelled
        );
        assert_eq!(
            decide(None, Exit::Code(1), &quiet, true),
            DeathReason::DiskLimit
        );
        assert_eq!(
            decide(None, Exit::Signal(libc::SIGXCPU), &quiet, false),
            DeathReason::CpuLimit
        );
        assert_eq!(
            decide(None, Exit::Signal(libc::SIGSYS), &quiet, false),
            DeathReason::Seccomp
        );
    }
}
