//! How a sandboxed run ended, why, and what it used.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The result of [`crate::Running::wait`]. When it exists, every process of the job is dead
/// and its cgroup is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub exit: Exit,
    pub reason: DeathReason,
    pub usage: Usage,
    /// Syscalls the filter refused, by name, with how often each was tried.
    pub denied_syscalls: BTreeMap<String, u64>,
    /// Attempts to open an IP or packet socket under [`crate::Network::None`].
    pub network_attempts: u64,
    /// Processes of the job the memory controller killed, including ones the job
    /// survived (a job can end [`DeathReason::Completed`] with OOM kills).
    #[serde(default)]
    pub oom_kills: u64,
    /// Forks and clones the pids controller refused, including ones the job survived.
    #[serde(default)]
    pub pids_limit_hits: u64,
    /// [`crate::LiveEvent`]s lost because their consumer did not keep up (or never took
    /// them): the counts above and the ones the events carried stay exact.
    #[serde(default)]
    pub events_dropped: u64,
}

impl Outcome {
    /// The job ran to completion and exited 0.
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0) && self.reason == DeathReason::Completed
    }
}

/// How the job's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Why the job ended. Decided from what the sandbox observed (timers, cgroup event
/// counters, the filesystem), never guessed from the exit signal alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeathReason {
    /// The job ended on its own (whatever its exit code).
    Completed,
    /// The memory cgroup killed a process of the job.
    Oom,
    /// The wall-clock limit passed.
    WallTimeout,
    /// The CPU-seconds limit passed.
    CpuLimit,
    /// The job failed after the pids cgroup refused it a process or thread.
    PidsLimit,
    /// The job failed after its upper dir or `/tmp` filled up (space or inodes).
    DiskLimit,
    /// Someone called [`crate::CancelHandle::cancel`] (or the worker went away).
    Cancelled,
    /// The kernel killed the job for a forbidden syscall ABI (i386 or x32).
    Seccomp,
}

/// Resources the job used, read from its cgroup (and `wait4` for I/O).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(with = "secs_f64")]
    pub cpu_user: Duration,
    #[serde(with = "secs_f64")]
    pub cpu_system: Duration,
    pub memory_peak: u64,
    pub pids_peak: u64,
    pub io_read: u64,
    pub io_write: u64,
    #[serde(with = "secs_f64")]
    pub wall: Duration,
}

mod secs_f64 {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Ok(Duration::try_from_secs_f64(secs).unwrap_or_default())
    }
}
