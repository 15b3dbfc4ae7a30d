//! The sandbox shim: the per-job process that supervises a job from outside, the role of
//! containerd-shim or conmon. It is the `corral-worker` binary re-executed (`corral-worker
//! __sandbox-shim`) or forked from the [zygote](crate::zygote), single threaded. It clones
//! the job's [init](crate::init) (its pid 1) into fresh namespaces at once, before its
//! request comes, sends init the job when it comes, places it in the job's cgroup while
//! init builds the root, writes its id maps, then supervises: answers seccomp
//! notifications, enforces the wall-clock and CPU-seconds limits, relays cancellation, and
//! finally reports to the worker. It never mounts anything itself.
//!
//! It speaks the [handshake](crate::handshake) on fd 0, a unix stream socket from the
//! worker (a request, then cancels; end of stream counts as an immediate cancel, so a job
//! never outlives its worker), and on one seqpacket socket with init.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cgroup::{CgroupVersion, JobCgroup};
use crate::event::{LiveEvent, LiveEventKind, family_name};
use crate::handshake::{
    self, EndedBy, Frames, FromInit, FromShim, Report, SetupError, SetupStep, ToInit, ToShim,
};
use crate::outcome::Exit;
use crate::spec::SandboxSpec;
use crate::sys::{self, Forked};
use crate::trace::{Mark, mark};
use crate::watch::{Gauges, Throttle, Watch, enforced_event};

/// The first argument that selects the shim in the `corral-worker` binary.
pub const SHIM_ARG: &str = "__sandbox-shim";

/// Where a shim forked by the zygote finds the job's pre-made network namespace.
pub(crate) const NETNS_FD: RawFd = 3;

/// Entry point of `corral __sandbox-shim`. Never returns.
pub fn main() -> ! {
    // Nothing the worker had open may reach the job.
    let _ = sys::close_range(3, u32::MAX);
    run(None)
}

/// Entry point of a shim the zygote forked with a pre-made network namespace on
/// [`NETNS_FD`]. Never returns.
pub(crate) fn main_with_netns() -> ! {
    // Nothing else the zygote had open (its other pre-made namespaces) may reach the job.
    let _ = sys::close_range(NETNS_FD as u32 + 1, u32::MAX);
    // Taken over as an owned copy (this crate's unsafe code stays in `sys`).
    let netns = sys::dup_cloexec(NETNS_FD).ok();
    let _ = sys::close_range(NETNS_FD as u32, NETNS_FD as u32);
    run(netns)
}

fn run(netns: Option<OwnedFd>) -> ! {
    // fd 0 is the control socket the worker gave us; fd 0 itself later becomes the job's
    // /dev/null, so keep the socket on a close-on-exec copy.
    let ctl = match sys::dup_cloexec(0) {
        Ok(fd) => UnixStream::from(fd),
        Err(_) => sys::exit_now(70),
    };
    // Pid 1 is cloned before the request comes: in a shim kept ahead (see
    // `Zygote::take_ready`), its namespaces and the mounts every job gets the same are made
    // while we wait, off the job's path. Its marks are taken once the request turns tracing
    // on.
    crate::trace::prepare();
    let init = start_init(netns, &JobOutput::OwnPipes, None);
    let mut frames = Frames::default();
    let mut outbox = Outbox::new(ctl.as_raw_fd());
    // The report goes out as soon as every process of the job is dead and pid 1 is out of
    // the job's cgroup; pid 1 may still be exiting then, its namespaces and the overlay
    // going away with it. We exit once it is gone, and that end of the control stream is
    // what tells the worker it may reuse the job dir (see `Teardown`).
    let (mut report, exiting) = match frames.read::<ToShim>(&mut &ctl) {
        Ok(Some(ToShim::Request(req))) => {
            if req.trace && crate::trace::enable() {
                crate::trace::mark(Mark::RequestRead);
            }
            supervise(
                &req.spec,
                &req.root,
                CgroupSetup::Ready(&req.cgroup),
                Supervisor {
                    ctl: Some((&ctl, frames)),
                    signals: None,
                    init,
                    events: &mut |event| outbox.push(&FromShim::Event(event)),
                    // Sent before the job starts, so before any event: nothing is pending in
                    // the outbox and the frame goes out whole, with its descriptor.
                    egress: &mut |listener| {
                        let frame = handshake::encode(&FromShim::Egress);
                        let _ = sys::send_fds(ctl.as_raw_fd(), &frame, &[listener.as_raw_fd()]);
                    },
                },
            )
            .into_parts()
        }
        // The worker went away before asking anything.
        Ok(None) => sys::exit_now(0),
        Ok(Some(ToShim::Cancel { .. })) => (
            fail(SetupError::new(
                SetupStep::Request,
                "a cancel before the request",
            )),
            None,
        ),
        Err(err) => (
            fail(SetupError::new(SetupStep::Request, err.to_string())),
            None,
        ),
    };
    report.events_dropped = outbox.dropped;
    report.timings = crate::trace::take();
    let _ = outbox.flush(&ctl);
    let _ = handshake::write(&mut &ctl, &FromShim::Report(Box::new(report)));
    if let Some(pid) = exiting {
        let _ = sys::wait4(pid, 0);
    }
    sys::exit_now(0)
}

/// Frames for the worker that must never block the shim: sent as far as the socket takes
/// them, the rest kept (whole frames only, up to [`Outbox::MAX`]) for the next send, and
/// what does not fit dropped and counted. Events are rate-limited upstream, so this fills
/// only when the worker stops reading.
struct Outbox {
    sock: RawFd,
    pending: Vec<u8>,
    dropped: u64,
    broken: bool,
}

impl Outbox {
    const MAX: usize = 64 << 10;

    fn new(sock: RawFd) -> Outbox {
        Outbox {
            sock,
            pending: Vec::new(),
            dropped: 0,
            broken: false,
        }
    }

    fn push(&mut self, message: &FromShim) {
        let frame = handshake::encode(message);
        if self.broken || self.pending.len() + frame.len() > Self::MAX {
            self.dropped += 1;
            return;
        }
        self.pending.extend(frame);
        while !self.pending.is_empty() {
            match sys::send_nowait(self.sock, &self.pending) {
                Ok(0) => return,
                Ok(n) => drop(self.pending.drain(..n)),
                Err(_) => {
                    self.broken = true;
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    /// Sends what is left, blocking: before the report, which must follow it whole.
    fn flush(&mut self, mut sock: &UnixStream) -> std::io::Result<()> {
        use std::io::Write;
        let pending = std::mem::take(&mut self.pending);
        sock.write_all(&pending)
    }
}

/// Where the job's standard output and error go.
pub(crate) enum JobOutput {
    /// The supervisor's own fds 1 and 2 are pipes to the worker: the job inherits them and
    /// the supervisor points its own copies at /dev/null, so the pipes reach end-of-file
    /// when the job's processes are gone, not when the supervisor is.
    OwnPipes,
    /// The job inherits the supervisor's fds 1 and 2 as they are (a CLI's terminal).
    Inherit,
    /// The job gets these fds as 1 and 2; the supervisor's own are left alone.
    Fds(RawFd, RawFd),
}

/// Where the job's cgroup comes from.
pub(crate) enum CgroupSetup<'a> {
    /// Created before the supervisor started (the worker's path, from a pool); the
    /// supervisor writes its limits while pid 1 builds the root.
    Ready(&'a JobCgroup),
    /// Created (with its limits) by the supervisor right after the clone, while the job's
    /// pid 1 builds its root, which takes longer: the creation costs no wall time. An
    /// error stops the run.
    Create(&'a mut dyn FnMut() -> Result<JobCgroup, SetupError>),
}

/// The job's pid 1, cloned by [`start_init`] and waiting for its [`ToInit::Job`].
pub(crate) struct Init {
    pid: libc::pid_t,
    /// Our end of the seqpacket link with it.
    link: OwnedFd,
}

impl Init {
    /// For a run that ends before pid 1 got its job.
    fn kill(self) {
        let _ = sys::kill(self.pid, libc::SIGKILL);
        let _ = sys::wait4(self.pid, 0);
    }
}

/// Clones the job's pid 1 into fresh pid, ipc and uts namespaces, and a fresh network
/// namespace unless `netns` (made ahead, loopback up) is given, which it enters (its mount
/// namespace it makes once its job comes). Pid 1 at once does what does not depend on the
/// job ([`crate::init::run`]) and then waits for it. Our supplementary groups are cleared first: pid 1 and the job inherit
/// them. `cpus`: the whole CPU set, to start pid 1 on another CPU than ours (see below).
pub(crate) fn start_init(
    netns: Option<OwnedFd>,
    job_output: &JobOutput,
    cpus: Option<sys::CpuSet>,
) -> Result<Init, SetupError> {
    sys::clear_supplementary_groups().map_err(|e| SetupError::io(SetupStep::Groups, &e))?;
    // One link to init for the whole setup and its status; it carries the seccomp
    // listener too.
    let (link, init_link) =
        sys::seqpacket_pair().map_err(|e| SetupError::io(SetupStep::Link, &e))?;
    // When we make the cgroup while pid 1 builds the root, the two overlap only on two
    // CPUs, but a new child often starts queued on its parent's CPU, and then they take
    // turns (each ~0.3 ms). Restricting a task to other CPUs moves it there at once;
    // giving it back the whole set leaves it where it is. Both of us do it, whoever runs
    // first; each pair ends with the whole set, so the job inherits it whatever the order.
    let move_off = |pid: libc::pid_t, cpu: Option<usize>| {
        if let Some(all) = &cpus
            && let Some(elsewhere) = cpu.and_then(|cpu| all.without(cpu))
        {
            let _ = elsewhere.apply(pid);
            let _ = all.apply(pid);
        }
    };
    let our_cpu = sys::current_cpu();
    mark(Mark::LinkMade);
    let flags = match netns {
        Some(_) => crate::namespaces::CLONE_FLAGS & !libc::CLONE_NEWNET,
        None => crate::namespaces::CLONE_FLAGS,
    };
    let pid = match sys::clone_fork(flags) {
        Ok(Forked::Child) => {
            mark(Mark::InitStarted);
            move_off(0, our_cpu);
            drop(link);
            if let Ok(null) = std::fs::File::open("/dev/null") {
                let _ = sys::dup2(null.as_raw_fd(), 0);
            }
            if let JobOutput::Fds(out, err) = *job_output {
                let _ = sys::dup2(out, 1);
                let _ = sys::dup2(err, 2);
            }
            crate::init::run(init_link, netns)
        }
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => return Err(SetupError::io(SetupStep::Clone, &e)),
    };
    mark(Mark::Cloned);
    drop(netns);
    move_off(pid, sys::current_cpu());
    drop(init_link);
    if let JobOutput::OwnPipes = job_output
        && let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null")
    {
        let _ = sys::dup2(null.as_raw_fd(), 1);
        let _ = sys::dup2(null.as_raw_fd(), 2);
    }
    mark(Mark::Placed);
    Ok(Init { pid, link })
}

/// Sends pid 1 its job. A job larger than the link's send buffer gets room made for it.
fn send_job(link: &OwnedFd, spec: &SandboxSpec, root: &Path) -> Result<(), SetupError> {
    let job = ToInit::Job(Box::new(handshake::Job {
        spec: spec.clone(),
        root: root.to_owned(),
    }));
    let frame = handshake::encode(&job);
    let link_err = |e: std::io::Error| SetupError::io(SetupStep::Link, &e);
    if frame.len() > SMALL_FRAME {
        sys::reserve_send_buffer(link.as_raw_fd(), frame.len() + SMALL_FRAME).map_err(link_err)?;
    }
    sys::send_fds(link.as_raw_fd(), &frame, &[]).map_err(link_err)
}

/// A frame every seqpacket socket takes with its default buffer.
const SMALL_FRAME: usize = 64 << 10;

/// How the supervisor hears about cancellation, and what it hands the job.
pub(crate) struct Supervisor<'a> {
    /// The worker's control stream and what was read of it: [`ToShim::Cancel`] frames;
    /// end of stream cancels at once.
    pub ctl: Option<(&'a UnixStream, Frames)>,
    /// A signalfd for SIGINT, SIGTERM and SIGHUP (a CLI running the supervisor itself):
    /// the first cancels with [`SIGNAL_GRACE`], the next kills at once.
    pub signals: Option<OwnedFd>,
    /// The job's pid 1, from [`start_init`] (or why it could not be cloned).
    pub init: Result<Init, SetupError>,
    /// Receives what the job does as it happens ([`LiveEvent`]s, already rate-limited).
    /// Called on the supervisor's thread: it must not block.
    pub events: &'a mut dyn FnMut(LiveEvent),
    /// Receives the egress proxy's listening socket (egress jobs only), before the job
    /// starts.
    pub egress: &'a mut dyn FnMut(OwnedFd),
}

/// How long a job gets between TERM and KILL when the supervising CLI is interrupted.
pub(crate) const SIGNAL_GRACE: Duration = Duration::from_secs(2);

/// What [`supervise`] returns: the report, and pid 1 while it may still be exiting.
pub(crate) struct Supervised {
    pub report: Report,
    /// Pid 1 when it left the job's cgroup and reported before exiting: its namespaces
    /// (mounts included) may still be going away.
    exiting: Option<libc::pid_t>,
}

impl Supervised {
    /// The report, and pid 1 if it may still be exiting (the caller must wait for it).
    pub fn into_parts(self) -> (Report, Option<libc::pid_t>) {
        (self.report, self.exiting)
    }
}

impl From<Report> for Supervised {
    fn from(report: Report) -> Self {
        Supervised {
            report,
            exiting: None,
        }
    }
}

fn fail(error: SetupError) -> Report {
    Report {
        error: Some(error),
        ..Report::default()
    }
}

pub(crate) fn supervise(
    spec: &SandboxSpec,
    root: &Path,
    cgroup: CgroupSetup<'_>,
    sup: Supervisor<'_>,
) -> Supervised {
    let started = Instant::now();
    let refused = if spec.argv.is_empty() {
        Some(SetupError::new(SetupStep::Command, "empty argv"))
    } else {
        mark(Mark::Prepared);
        // The mount point only: the root is mounted by the job's pid 1 in its own mount
        // namespace, which dies with it, so no mount can outlive the job (or a crash of
        // ours). The worker removes the directory.
        std::fs::create_dir_all(root)
            .err()
            .map(|e| SetupError::io_on(SetupStep::RootMountPoint, root.display(), &e))
    };
    if let Some(why) = refused {
        if let Ok(init) = sup.init {
            init.kill();
        }
        return fail(why).into();
    }
    mark(Mark::GroupsCleared);
    run_job(spec, root, cgroup, sup, started)
}

fn run_job(
    spec: &SandboxSpec,
    root: &Path,
    cgroup: CgroupSetup<'_>,
    sup: Supervisor<'_>,
    started: Instant,
) -> Supervised {
    let Supervisor {
        mut ctl,
        signals,
        init,
        events,
        egress,
    } = sup;
    let Init { pid, link } = match init {
        Ok(init) => init,
        Err(e) => return fail(e).into(),
    };
    // Pid 1 builds the root from now on.
    if let Err(ours) = send_job(&link, spec, root) {
        // It may have failed before it could read the job.
        return fail(give_up(pid, &link, ours)).into();
    }
    mark(Mark::JobSent);
    // The cgroup is made (when it is ours to make) and entered while pid 1 builds the root.
    // Moving another process into a cgroup waits for an RCU grace period, so on v1 pid 1
    // moves itself (cheaply) once it has the list of files; on v2 we move it. Pid 1 forks
    // the job only after `Mapped`, which we send after this.
    let (cgroup, limits_due) = match cgroup {
        CgroupSetup::Ready(cg) => (Ok(cg.clone()), true),
        CgroupSetup::Create(create) => (create(), false),
    };
    let placed = cgroup
        .and_then(|cg| place(cg.version(), pid, link.as_raw_fd()).map(|()| cg))
        .and_then(|cg| {
            mark(Mark::CgroupSent);
            // A cgroup made ahead gets its limits now, while pid 1 builds the root: they
            // only have to be in place before the job starts, after `Mapped`.
            if limits_due {
                cg.version()
                    .apply(&crate::cgroup::limits_for(spec))
                    .map_err(|e| SetupError::chain(SetupStep::Cgroup, &e))?;
                mark(Mark::CgroupLimits);
            }
            // Pid 1 builds the root, then asks for its identity mapping.
            match handshake::recv::<FromInit>(link.as_raw_fd(), 1) {
                Ok(Some((FromInit::Unshared, fds))) => fds.into_iter().for_each(&mut *egress),
                Ok(Some((FromInit::Failed(e), _))) => return Err(e),
                Ok(None) => return Err(SetupError::new(SetupStep::InitDied, "")),
                Ok(Some((other, _))) => {
                    return Err(SetupError::new(
                        SetupStep::Link,
                        format!("{other:?} before Unshared"),
                    ));
                }
                Err(e) => return Err(SetupError::new(SetupStep::Link, e.to_string())),
            }
            mark(Mark::InitUnshared);
            crate::namespaces::write_id_maps(pid, &spec.identity)
                .map_err(|e| SetupError::io(SetupStep::IdMaps, &e))?;
            mark(Mark::IdMaps);
            handshake::send(link.as_raw_fd(), &ToInit::Mapped, &[])
                .map_err(|e| SetupError::io(SetupStep::Link, &e))?;
            mark(Mark::MappedSent);
            Ok(cg)
        });
    let cgroup = match placed {
        Ok(cg) => cg,
        Err(ours) => return fail(give_up(pid, &link, ours)).into(),
    };
    let mut report = Report::default();
    // The job starts only after `Mapped`, so no counter can have moved yet.
    let mut watch = Watch::start(cgroup.version());
    let mut gauges = Gauges::start(&spec.limits, pid, Instant::now());
    let mut throttle = Throttle::default();
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = sys::kill(pid, libc::SIGKILL);
            let _ = sys::wait4(pid, 0);
            return fail(SetupError::io(SetupStep::Pidfd, &e)).into();
        }
    };
    mark(Mark::Watching);
    let wall_deadline = started + spec.limits.wall;
    let mut kill_deadline: Option<Instant> = None;
    let mut listener: Option<OwnedFd> = None;
    // Init's status or setup error, once it has sent one.
    let mut last: Option<FromInit> = None;
    let mut signals = signals;
    let cpu_limit = spec.limits.cpu_seconds.map(Duration::from_secs);
    let tick = Duration::from_millis(100);
    loop {
        // Cancels already read (one may come with the request) act before any wait.
        if let Some((_, frames)) = ctl.as_mut() {
            loop {
                match frames.next::<ToShim>() {
                    Ok(None) => break,
                    Ok(Some(ToShim::Cancel { grace })) => {
                        cancel(pid, grace, &mut report, &mut kill_deadline)
                    }
                    // A second request, or garbage: the worker is not one we can follow.
                    Ok(Some(ToShim::Request(_))) | Err(_) => {
                        ctl = None;
                        cancel(pid, Duration::ZERO, &mut report, &mut kill_deadline);
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        let mut next = wall_deadline;
        if let Some(k) = kill_deadline {
            next = next.min(k);
        }
        if cpu_limit.is_some() {
            next = next.min(now + tick);
        }
        for due in [
            watch.deadline(),
            throttle.deadline(),
            Some(gauges.deadline()),
        ]
        .into_iter()
        .flatten()
        {
            next = next.min(due);
        }
        let timeout = next
            .saturating_duration_since(now)
            .as_millis()
            .min(i32::MAX as u128) as i32;
        // Pid 1's messages (it may report before it has finished exiting), then pid 1.
        let mut fds = vec![
            (link.as_raw_fd(), libc::POLLIN),
            (pidfd.as_raw_fd(), libc::POLLIN),
        ];
        let ctl_idx = ctl.as_ref().map(|(c, _)| {
            fds.push((c.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let signal_idx = signals.as_ref().map(|s| {
            fds.push((s.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let listener_idx = listener.as_ref().map(|l| {
            fds.push((l.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let watch_from = fds.len();
        fds.extend(watch.fds().into_iter().map(|fd| (fd, libc::POLLIN)));
        let revents = match sys::poll(&fds, timeout) {
            Ok(r) => r,
            Err(_) => vec![0; fds.len()],
        };
        let now = Instant::now();
        let watch_ready = revents[watch_from..].iter().any(|&r| r != 0);
        for grew in watch.wake(watch_ready, now) {
            emit(
                events,
                &mut throttle,
                enforced_event(grew, spec.limits.pids),
            );
        }
        for sampled in gauges.wake(cgroup.version(), now) {
            emit(events, &mut throttle, sampled);
        }
        for held in throttle.due(Some(now)) {
            events(held);
        }
        if revents[1] != 0 {
            break;
        }
        if revents[0] != 0 {
            match handshake::recv::<FromInit>(link.as_raw_fd(), 1) {
                Ok(Some((FromInit::Listener, fds))) => listener = fds.into_iter().next(),
                Ok(Some((end @ (FromInit::Status(_) | FromInit::Failed(_)), _))) => {
                    last = Some(end);
                    break;
                }
                Ok(None) => break,
                // Init is our own code: anything else is a broken link, and the job
                // cannot be supervised without it.
                Ok(Some((FromInit::Unshared, _))) | Err(_) => {
                    let _ = sys::kill(pid, libc::SIGKILL);
                    break;
                }
            }
        }
        if let Some(i) = listener_idx {
            if revents[i] & libc::POLLIN != 0 {
                if let Some(event) = answer_notification(
                    listener.as_ref().map(|l| l.as_raw_fd()).unwrap_or(-1),
                    &mut report,
                ) {
                    emit(events, &mut throttle, event);
                }
            } else if revents[i] & (libc::POLLHUP | libc::POLLERR) != 0 {
                // Every filtered process is gone.
                listener = None;
            }
        }
        if let Some(i) = ctl_idx
            && revents[i] != 0
            && let Some((stream, frames)) = ctl.as_mut()
            && !matches!(frames.fill(stream), Ok(true))
        {
            ctl = None;
            report.ended_by.get_or_insert(EndedBy::Cancelled);
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        if let Some(i) = signal_idx
            && revents[i] != 0
        {
            match signals.as_ref().map(|s| sys::read_signal(s.as_raw_fd())) {
                Some(Ok(_)) if kill_deadline.is_none() => {
                    cancel(pid, SIGNAL_GRACE, &mut report, &mut kill_deadline)
                }
                Some(Ok(_)) => cancel(pid, Duration::ZERO, &mut report, &mut kill_deadline),
                _ => signals = None,
            }
        }
        let now = Instant::now();
        if now >= wall_deadline {
            report.ended_by.get_or_insert(EndedBy::WallTimeout);
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        if kill_deadline.is_some_and(|k| now >= k) {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
        if let Some(limit) = cpu_limit
            && cgroup.version().cpu_usage().is_ok_and(|used| used >= limit)
        {
            report.ended_by.get_or_insert(EndedBy::CpuLimit);
            let _ = sys::kill(pid, libc::SIGKILL);
        }
    }
    report.wall = started.elapsed();
    mark(Mark::StatusReceived);
    // What was held back goes now: the consumer sees the last totals before the report.
    for held in throttle.due(None) {
        events(held);
    }
    // With pid 1 out of the cgroup (its status says so) and every process of the job dead,
    // the caller may read and remove the cgroup while pid 1 finishes exiting; otherwise
    // pid 1 is waited for here, and what it sent before dying read.
    let left = matches!(&last, Some(FromInit::Status(s)) if s.left_cgroup);
    let reaped = if left {
        None
    } else {
        let reaped = sys::wait4(pid, 0).ok().flatten();
        if last.is_none() {
            last = last_word(link.as_raw_fd());
        }
        reaped
    };
    match last {
        Some(FromInit::Status(status)) => {
            report.exit = Some(decode_status(status.wait_status));
            report.disk_full = status.disk_full;
            report.set_usage(&status.usage);
        }
        Some(FromInit::Failed(e)) => report.error = Some(e),
        _ => {
            // Pid 1 died without a status (killed): what its wait status says.
            if let Some(r) = &reaped {
                report.set_usage(&r.usage);
            }
            report.exit = reaped.map(|r| decode_status(r.status));
        }
    }
    mark(Mark::InitDone);
    Supervised {
        report,
        exiting: left.then_some(pid),
    }
}

/// Kills pid 1 during setup and says why: its own reason when it sent one (it failed
/// first), else `ours` (a consequence).
fn give_up(pid: libc::pid_t, link: &OwnedFd, ours: SetupError) -> SetupError {
    let _ = sys::kill(pid, libc::SIGKILL);
    let _ = sys::wait4(pid, 0);
    match last_word(link.as_raw_fd()) {
        Some(FromInit::Failed(theirs)) => theirs,
        _ => ours,
    }
}

/// What init sent last before it died: its status or why setup failed. Call only once
/// init is dead (the link then ends after what is queued).
fn last_word(link: RawFd) -> Option<FromInit> {
    while let Ok(Some((message, _))) = handshake::recv::<FromInit>(link, 1) {
        if matches!(message, FromInit::Status(_) | FromInit::Failed(_)) {
            return Some(message);
        }
    }
    None
}

impl Report {
    fn set_usage(&mut self, usage: &sys::Usage) {
        self.cpu_user = usage.utime;
        self.cpu_system = usage.stime;
        self.io_read = usage.inblock * 512;
        self.io_write = usage.oublock * 512;
    }
}

/// Puts pid 1 in the job's cgroup: on v1 by sending it the files to write `0` to (it moves
/// itself), otherwise by writing its pid here and sending it an empty list.
///
/// On v1 the files go open with the message (join files first): opened here, while pid 1
/// builds the root, its way to the job has a write per hierarchy instead of two path
/// walks, opens and closes.
fn place(cg: &dyn CgroupVersion, pid: libc::pid_t, link: RawFd) -> Result<(), SetupError> {
    let (join, leave) = match (cg.self_join_files(), cg.self_leave_files()) {
        (Some(join), Some(leave)) => (join, leave),
        _ => {
            for file in cg.procs_files() {
                std::fs::write(&file, pid.to_string())
                    .map_err(|e| SetupError::io_on(SetupStep::JoinCgroup, file.display(), &e))?;
            }
            (Vec::new(), Vec::new())
        }
    };
    let files = join
        .iter()
        .chain(&leave)
        .map(|f| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .map_err(|e| SetupError::io_on(SetupStep::JoinCgroup, f.display(), &e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    handshake::send(link, &ToInit::Cgroup { join, leave }, &fds)
        .map_err(|e| SetupError::io(SetupStep::Link, &e))
}

/// TERM to pid 1 (which passes it on to everything), KILL once `grace` has passed; a
/// later, shorter grace wins.
fn cancel(
    pid: libc::pid_t,
    grace: Duration,
    report: &mut Report,
    kill_deadline: &mut Option<Instant>,
) {
    report.ended_by.get_or_insert(EndedBy::Cancelled);
    let _ = sys::kill(pid, libc::SIGTERM);
    let k = Instant::now() + grace;
    *kill_deadline = Some(kill_deadline.map_or(k, |d| d.min(k)));
}

fn emit(events: &mut dyn FnMut(LiveEvent), throttle: &mut Throttle, event: LiveEvent) {
    if let Some(event) = throttle.offer(event, Instant::now()) {
        events(event);
    }
}

/// Answers one notification; the live event it makes, if any.
fn answer_notification(listener: i32, report: &mut Report) -> Option<LiveEvent> {
    let n = sys::seccomp_notif_recv(listener).ok()?;
    let verdict = crate::seccomp::classify(n.nr as i64, &n.args);
    // ENOENT: the job was killed or the call interrupted before we answered; still counted.
    let _ = sys::seccomp_notif_fail(listener, n.id, crate::seccomp::errno_for(&verdict));
    let kind = match verdict {
        crate::seccomp::Verdict::NetworkAttempt => {
            report.network_attempts += 1;
            let family = family_name(n.args[0]);
            let count = report.network_by_family.entry(family.clone()).or_default();
            *count += 1;
            LiveEventKind::NetworkAttempt {
                syscall: "socket".to_owned(),
                family,
                count: *count,
            }
        }
        crate::seccomp::Verdict::Denied(name) => {
            let count = report.denied_syscalls.entry(name.clone()).or_default();
            *count += 1;
            LiveEventKind::SeccompDenied {
                syscall: name,
                count: *count,
            }
        }
    };
    Some(LiveEvent {
        at: std::time::SystemTime::now(),
        kind,
    })
}

/// Exit code or terminating signal from a raw wait status.
pub fn decode_status(status: i32) -> Exit {
    if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Code(libc::WEXITSTATUS(status))
    }
}

/// No space or no inodes left. A failed write leaves up to one write's worth of space
/// behind, so "full" means under 1% of the filesystem (at least 1 MiB) or no free inode.
pub(crate) fn is_full(path: &Path) -> bool {
    match sys::statvfs(path) {
        Ok(s) => full(
            s.bytes_total,
            s.bytes_available,
            s.files_total,
            s.files_available,
        ),
        Err(_) => false,
    }
}

pub(crate) fn full(
    bytes_total: u64,
    bytes_available: u64,
    files_total: u64,
    files_available: u64,
) -> bool {
    bytes_available < (bytes_total / 100).max(1 << 20) || (files_total > 0 && files_available == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearly_full_counts_as_full() {
        let gib = 1 << 30;
        assert!(full(gib, 512 << 10, 1000, 10), "half a MiB left of a GiB");
        assert!(full(gib, 5 << 20, 1000, 10), "under 1%");
        assert!(!full(gib, 50 << 20, 1000, 10));
        assert!(full(gib, 500 << 20, 1000, 0), "no inode left");
        assert!(
            !full(gib, 500 << 20, 0, 0),
            "filesystems without inode counts"
        );
    }

    #[test]
    fn a_reader_that_stops_reading_never_blocks_the_shim_and_gets_whole_frames() {
        use std::io::Read;
        let (shim, mut worker) = UnixStream::pair().unwrap();
        let mut outbox = Outbox::new(shim.as_raw_fd());
        let event = |n| {
            FromShim::Event(LiveEvent {
                at: std::time::SystemTime::now(),
                kind: LiveEventKind::SeccompDenied {
                    syscall: "keyctl".into(),
                    count: n,
                },
            })
        };
        // Far more than the socket and the outbox hold; each push returns at once.
        let pushed = 100_000;
        for n in 1..=pushed {
            outbox.push(&event(n));
        }
        assert!(outbox.dropped > 0, "nothing dropped");
        assert!(outbox.pending.len() <= Outbox::MAX);
        // The worker reads again: what was kept arrives, whole.
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            worker.read_to_end(&mut bytes).unwrap();
            bytes
        });
        outbox.flush(&shim).unwrap();
        drop(shim);
        let bytes = reader.join().unwrap();
        let mut frames = Frames::default();
        let mut reader = &bytes[..];
        let mut got = 0;
        let mut last = 0;
        while let Some(message) = frames.read::<FromShim>(&mut reader).unwrap() {
            let FromShim::Event(LiveEvent {
                kind: LiveEventKind::SeccompDenied { count, .. },
                ..
            }) = message
            else {
                panic!("not the event sent: {message:?}");
            };
            assert!(count > last, "frames out of order");
            last = count;
            got += 1;
        }
        assert_eq!(got + outbox.dropped, pushed);
    }

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(decode_status(3 << 8), Exit::Code(3));
        assert_eq!(decode_status(libc::SIGKILL), Exit::Signal(9));
    }
}
