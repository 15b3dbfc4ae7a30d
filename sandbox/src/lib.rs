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
//! let outcome: Outcome = run.wait()?;                             // blocking: use spawn_blocking
//! dir.mark_quiescent();        // every job process is dead and its cgroup removed
//! // snapshot dir.upper() now, then drop `dir`: the pool wipes it for reuse in the background
//! ```
//!
//! [`JobDir::create`] and [`JobDir::remove`] make and remove one job filesystem without a
//! pool (`corral sandbox --disk`, tests).
//!
//! The helper binary (`corral-worker`) must dispatch `__sandbox-shim` ([`SHIM_ARG`]) to
//! [`shim::main`] and `__sandbox-zygote` ([`ZYGOTE_ARG`]) to [`zygote_main`] before
//! anything else (no threads, no runtime). With [`SandboxConfig::zygote`] set, helpers are
//! forked from one long-lived zygote instead of exec'd per job. That helper clones the
//! job's pid 1 (a reaper) into new mount, pid, net, ipc and uts namespaces. Still real
//! root, pid 1 builds the overlay root in its own mount namespace (which dies with it, so
//! no crash can leave a mount on the host), then joins the job's cgroup (on v1 by moving
//! itself, which avoids an RCU grace period; on v2 the helper moves it), pivots into the
//! root and enters the job's user and cgroup namespaces. While the helper writes its id
//! maps, pid 1 sets what the job inherits: signal dispositions, bounding set, rlimits and
//! the seccomp filter (whose listener it hands to the helper). Then it starts the job with
//! a vfork-style clone. The helper stays outside the job's cgroup and supervises: seccomp
//! notifications, wall and CPU limits, cancellation. [`Sandbox::run`] makes the cgroup
//! itself while pid 1 builds the root; [`Sandbox::spawn`] (the worker) makes it first.
//!
//! Process tree: worker → helper (`__sandbox-shim`) → pid 1 (reaper) → the job's command.
#![deny(unsafe_code)]

mod cgroup;
mod identity;
pub mod shim;
mod jobdir;
pub mod mountinfo;
mod namespaces;
mod outcome;
mod init;
mod rlimits;
mod rootfs;
mod sandbox;
mod seccomp;
mod spec;
mod sys;
mod zygote;

pub use cgroup::{
    CgroupError, CgroupStats, CgroupVersion, JobCgroup, Layout, discover as discover_cgroups,
};
pub use identity::{IdentityError, IdentityMap};
pub use shim::SHIM_ARG;
pub use jobdir::{
    JobDir, JobDirError, JobDirPool, PoolOptions, PoolRecovery, PoolStats, PooledJobDir,
};
pub use outcome::{DeathReason, Exit, Outcome, Usage};
pub use rootfs::RootfsError;
pub use sandbox::{CancelHandle, Ended, Output, Running, Sandbox};
pub use seccomp::DENIED as DENIED_SYSCALLS;
pub use sys::c_main_start;
pub use spec::{
    Identity, JOB_GID, JOB_UID, Network, SandboxConfig, SandboxLimits, SandboxSpec, Scratch,
};
pub use zygote::{ZYGOTE_ARG, Zygote, main as zygote_main};

/// Errors of [`Sandbox::spawn`] and [`Running::wait`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading /proc/self/mountinfo")]
    Mountinfo { source: std::io::Error },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("creating the control socket to the sandbox helper")]
    ControlSocket { source: std::io::Error },
    #[error("starting the sandbox helper {path}")]
    SpawnHelper {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("malformed message between worker and sandbox helper: {message}")]
    Protocol { message: String },
    #[error("the sandbox helper died without a report")]
    HelperDied,
    #[error("the sandbox could not be set up: {message}")]
    Setup { message: String },
    #[error("Sandbox::run needs a single-threaded caller (use Sandbox::spawn)")]
    NotSingleThreaded,
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
