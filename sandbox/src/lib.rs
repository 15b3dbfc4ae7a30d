//! corral-sandbox: runs one hostile build command in user, mount, pid, net, ipc, uts and
//! cgroup namespaces over an overlayfs root, with cgroup (v1 or v2) limits, rlimits, a
//! seccomp filter, and accounting. It knows nothing of the wire protocol or of AMQP.
//!
//! # How the worker uses it
//!
//! ```text
//! let ids = IdentityMap::open(data_dir, 200_000..=299_999)?;      // once
//! let pool = JobDirPool::open(jobs_root, concurrency)?;           // once
//! let mut dir = pool.take(disk_bytes)?;                           // upper/ + work/, size-limited
//! let spec = SandboxSpec { lower_dirs: vec![source, base], upper: dir.upper(), work: dir.work(),
//!                          identity: ids.identity(project)?, argv, env, cwd, limits, network,
//!                          read_only_binds: vec![], hostname: "corral".into(), scratch: None };
//! let mut run = Sandbox::spawn(&spec, &SandboxConfig::new()?)?;   // safe from tokio threads
//! let (out, err) = (run.stdout.take(), run.stderr.take());        // stream them as logs
//! let cancel = run.cancel_handle();                               // cancel.cancel(grace)
//! let events = run.events();      // Receiver<LiveEvent>: OOM kills, refused forks, … as they happen
//! let outcome: Outcome = run.wait()?;                             // blocking: use spawn_blocking
//! dir.mark_quiescent();        // every job process is dead and its cgroup removed
//! // or, sooner: the outcome while the job's pid 1 is still exiting (see `Teardown`):
//! // let (outcome, teardown) = run.wait_outcome(); dir.mark_quiescent_after(teardown);
//! // or, without taking the pipes or `events()`, read all of it on the waiting thread:
//! // run.wait_outcome_live(&mut live)  // live: impl Live { output, event, egress }
//! // snapshot dir.upper() now, then drop `dir`: the pool wipes it for reuse in the background
//! ```
//!
//! [`JobDir::create`] and [`JobDir::remove`] make and remove one job filesystem without a
//! pool (`corral sandbox --disk`, tests).
//!
//! # Processes
//!
//! ```text
//! worker ──(zygote: fork)──▶ shim (`__sandbox-shim`) ──clone──▶ init (the job's pid 1) ──▶ the job's command
//! ```
//!
//! The helper binary (`corral`, or `corral-worker`) must dispatch `__sandbox-shim` ([`SHIM_ARG`]) to
//! [`shim_main`] and `__sandbox-zygote` ([`ZYGOTE_ARG`]) to [`zygote_main`] before anything
//! else (no threads, no runtime). With [`SandboxConfig::zygote`] set, shims are forked from
//! one long-lived zygote instead of exec'd per job, and while jobs come one is kept forked
//! ahead for the next job's request. The shim (the role of containerd-shim or
//! conmon) clones the job's init (what runc, youki and crun call the container's init) into
//! new pid, net, ipc and uts namespaces as soon as it starts, before its request comes; init
//! stages the mounts every job gets the same (detached, see `rootfs`) and waits for its
//! job. Then, still real root, it makes its own mount namespace and builds the overlay root
//! there (the namespace dies with it, so no crash can leave a mount on the host), joins the job's cgroup (on v1 by moving itself, which avoids an RCU grace
//! period; on v2 the shim moves it), pivots into the root and enters the job's user and
//! cgroup namespaces. While the shim writes its id maps, init sets what the job inherits:
//! signal dispositions, bounding set, rlimits and the seccomp filter (whose listener it
//! hands to the shim). Then it starts the job with a vfork-style clone. The shim stays
//! outside the job's cgroup and supervises: seccomp notifications, wall and CPU limits,
//! cancellation. [`Sandbox::run`] makes the cgroup itself while init builds the root;
//! [`Sandbox::spawn`] (the worker) makes it first. Worker, zygote, shim and init talk
//! through one versioned, framed [handshake](handshake), and a failed setup comes back as
//! a [`SetupError`] naming its [`SetupStep`].
#![deny(unsafe_code)]

mod cgroup; // the job's cgroup: v1 and v2 behind one trait, limits, counters
mod event; // what a job does as it happens: LiveEvent
mod handshake; // the framed messages between worker, zygote, shim and init
mod identity; // project → host uid and gid, stable across restarts
mod init; // the job's pid 1: builds and enters the root, starts and reaps the job
mod jobdir; // size-limited job filesystems (upper/ + work/) and their pool
pub mod mountinfo; // parsing /proc/self/mountinfo
mod namespaces; // the namespaces a job gets and its id maps
mod netns; // a running job's network namespace from outside: sockets in it, its listeners
mod outcome; // how a run ended, why, and what it used
mod rlimits; // the job's resource limits
mod rootfs; // the overlay root, its mounts and pivot_root, behind a recordable trait
mod sandbox; // the worker's side of a run: Sandbox::spawn / Sandbox::run
mod seccomp; // the syscall filter and how its notifications are named
mod shim; // the per-job supervisor outside the job: clones init, limits, cancel, report
mod spec; // what to run and how: SandboxSpec, limits, config
#[allow(unsafe_code)]
mod sys; // the only unsafe code: thin syscall wrappers, one file per kernel concept
pub mod trace; // where a run's time goes: marks of caller, supervisor and pid 1
mod watch; // the kernel's notifications of enforced limits, and the events' rate limit
mod zygote; // one long-lived process per worker that forks the shims

pub use cgroup::{
    CgroupError, CgroupPool, CgroupPoolStats, CgroupStats, CgroupVersion,
    Counters as CgroupCounters, JobCgroup, Layout, REQUIRE_ENV as REQUIRE_CGROUP_ENV, StaleCgroups,
    block_device_of, check_required as check_required_cgroup, discover as discover_cgroups,
    host_layout as host_cgroup_layout, remove_stale as remove_stale_cgroups,
};
pub use event::{LiveEvent, LiveEventKind};
pub use handshake::{HandshakeError, SetupError, SetupStep, VERSION as HANDSHAKE_VERSION};
pub use identity::{Allocation, IdentityError, IdentityMap};
pub use jobdir::{
    JobDir, JobDirError, JobDirPool, PoolOptions, PoolRecovery, PoolStats, PooledJobDir,
};
pub use netns::{JobNetwork, Listener, Transport};
pub use outcome::{DeathReason, Exit, Outcome, Usage};
pub use rootfs::RootfsError;
pub use sandbox::{
    CancelHandle, EVENTS_QUEUED, Ended, Live, Output, OutputPipe, OutputPipes, Running, Sandbox,
    Teardown,
};
pub use seccomp::DENIED as DENIED_SYSCALLS;
pub use shim::{SHIM_ARG, main as shim_main};
pub use spec::{
    CPU_SATURATED_AFTER, EGRESS_PORT, Identity, JOB_GID, JOB_UID, JOB_UMASK, Network,
    SandboxConfig, SandboxLimits, SandboxSpec, Scratch,
};
pub use sys::c_main_start;
pub use trace::Timings;
pub use zygote::{ZYGOTE_ARG, Zygote, main as zygote_main};

/// Errors of [`Sandbox::spawn`] and [`Running::wait`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading /proc/self/mountinfo")]
    Mountinfo { source: std::io::Error },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("the control socket to the sandbox shim")]
    ControlSocket { source: std::io::Error },
    #[error("starting the sandbox shim {path}")]
    SpawnShim {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the handshake with the sandbox shim")]
    Handshake(#[source] HandshakeError),
    #[error("the sandbox shim died without a report")]
    ShimDied,
    /// The step that failed, and why (an errno when a syscall did).
    #[error("the sandbox could not be set up: {0}")]
    Setup(SetupError),
    #[error("Sandbox::run needs a single-threaded caller (use Sandbox::spawn)")]
    NotSingleThreaded,
}

impl From<SetupError> for Error {
    fn from(error: SetupError) -> Self {
        Error::Setup(error)
    }
}

/// An error and its sources, joined with `: ` (for logs and one-line messages).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}
