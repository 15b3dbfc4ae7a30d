//! Why a sandbox could not be built, as it crosses the handshake: the step and the errno.

use std::io;

use serde::{Deserialize, Serialize};

/// A step of building a sandbox, as a [`SetupError`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupStep {
    /// The shim decoding the worker's request.
    Request,
    /// The job's command line or environment (empty, or with a NUL byte).
    Command,
    /// Opening where the job's output goes.
    Output,
    /// Dropping the supplementary groups.
    Groups,
    /// Creating the directory the root is mounted on.
    RootMountPoint,
    /// The link between shim and init.
    Link,
    /// Cloning init into new namespaces.
    Clone,
    /// Making the job's cgroup and applying its limits.
    Cgroup,
    /// Moving init into the job's cgroup.
    JoinCgroup,
    /// Writing init's uid and gid maps.
    IdMaps,
    /// Opening a pidfd on init.
    Pidfd,
    /// Init's parent-death signal.
    ParentDeathSignal,
    /// Building the overlay root and its mounts.
    Rootfs,
    /// Signal mask and dispositions.
    Signals,
    /// `pivot_root` into the job's root.
    EnterRoot,
    /// Changing into the job's working directory.
    Workdir,
    /// Setting the hostname.
    Hostname,
    /// Bringing the loopback interface up.
    Loopback,
    /// Entering the job's user namespace.
    UserNamespace,
    /// Entering the job's cgroup namespace.
    CgroupNamespace,
    /// Making init non-dumpable.
    Dumpable,
    /// Dropping the capability bounding set.
    BoundingSet,
    /// Resource limits.
    Rlimits,
    /// Installing the seccomp filter and handing over its listener.
    Seccomp,
    /// Starting the job's command.
    Start,
    /// Init died before saying why (killed, or it crashed).
    InitDied,
    /// Opening the egress proxy's listening socket on the job's loopback.
    Egress,
    /// Entering the network namespace the zygote made ahead of the job.
    NetworkNamespace,
    /// Init's own mount namespace, made once its job is known.
    MountNamespace,
}

impl SetupStep {
    pub(super) const ALL: [SetupStep; 29] = [
        SetupStep::Request,
        SetupStep::Command,
        SetupStep::Output,
        SetupStep::Groups,
        SetupStep::RootMountPoint,
        SetupStep::Link,
        SetupStep::Clone,
        SetupStep::Cgroup,
        SetupStep::JoinCgroup,
        SetupStep::IdMaps,
        SetupStep::Pidfd,
        SetupStep::ParentDeathSignal,
        SetupStep::Rootfs,
        SetupStep::Signals,
        SetupStep::EnterRoot,
        SetupStep::Workdir,
        SetupStep::Hostname,
        SetupStep::Loopback,
        SetupStep::UserNamespace,
        SetupStep::CgroupNamespace,
        SetupStep::Dumpable,
        SetupStep::BoundingSet,
        SetupStep::Rlimits,
        SetupStep::Seccomp,
        SetupStep::Start,
        SetupStep::InitDied,
        SetupStep::Egress,
        SetupStep::NetworkNamespace,
        SetupStep::MountNamespace,
    ];

    /// What the step does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            SetupStep::Request => "reading the sandbox request",
            SetupStep::Command => "the job's command line or environment",
            SetupStep::Output => "opening the job's output",
            SetupStep::Groups => "dropping supplementary groups",
            SetupStep::RootMountPoint => "creating the root mount point",
            SetupStep::Link => "the link between the sandbox shim and the job's pid 1",
            SetupStep::Clone => "clone into new namespaces",
            SetupStep::Cgroup => "making the job's cgroup",
            SetupStep::JoinCgroup => "joining the job's cgroup",
            SetupStep::IdMaps => "writing id maps",
            SetupStep::Pidfd => "pidfd_open",
            SetupStep::ParentDeathSignal => "pdeathsig",
            SetupStep::Rootfs => "building the root",
            SetupStep::Signals => "signal mask and dispositions",
            SetupStep::EnterRoot => "entering the root",
            SetupStep::Workdir => "chdir",
            SetupStep::Hostname => "sethostname",
            SetupStep::Loopback => "loopback up",
            SetupStep::UserNamespace => "user namespace",
            SetupStep::CgroupNamespace => "cgroup namespace",
            SetupStep::Dumpable => "dumpable",
            SetupStep::BoundingSet => "dropping the bounding set",
            SetupStep::Rlimits => "rlimits",
            SetupStep::Seccomp => "seccomp",
            SetupStep::Start => "start of the job",
            SetupStep::InitDied => "the job's pid 1 died during setup",
            SetupStep::Egress => "the egress proxy's listening socket",
            SetupStep::NetworkNamespace => "entering the pre-made network namespace",
            SetupStep::MountNamespace => "mount namespace",
        }
    }

    pub(super) fn code(self) -> u8 {
        Self::ALL.iter().position(|&s| s == self).unwrap_or(0) as u8
    }

    pub(super) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }
}

impl std::fmt::Display for SetupStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why a sandbox could not be built: the step, the errno when a syscall failed, and what
/// else explains it (a path, the error's text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct SetupError {
    pub step: SetupStep,
    pub errno: Option<i32>,
    pub detail: String,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.detail.is_empty() {
            true => write!(f, "{}", self.step),
            false => write!(f, "{}: {}", self.step, self.detail),
        }
    }
}

impl SetupError {
    pub(crate) fn new(step: SetupStep, detail: impl Into<String>) -> Self {
        SetupError {
            step,
            errno: None,
            detail: detail.into(),
        }
    }

    /// A failed syscall or file operation.
    pub(crate) fn io(step: SetupStep, err: &io::Error) -> Self {
        SetupError {
            step,
            errno: err.raw_os_error(),
            detail: err.to_string(),
        }
    }

    /// A failed operation on `what` (a path, a file).
    pub(crate) fn io_on(step: SetupStep, what: impl std::fmt::Display, err: &io::Error) -> Self {
        SetupError {
            step,
            errno: err.raw_os_error(),
            detail: format!("{what}: {err}"),
        }
    }

    /// An error and its sources: the errno of the first I/O error among them.
    pub(crate) fn chain(step: SetupStep, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut errno = None;
        let mut source = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                errno = io.raw_os_error();
                break;
            }
            source = e.source();
        }
        SetupError {
            step,
            errno,
            detail: crate::error_chain(err),
        }
    }
}
