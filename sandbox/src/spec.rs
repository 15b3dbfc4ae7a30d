//! What a sandbox is asked to run: the filesystem layers, the identity, the command, the
//! limits and the network policy. Plain data, serialisable so the worker can hand it to the
//! single-threaded shim process over a socket.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything one sandboxed run needs. The worker maps a wire `Job` to this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Read-only layers of the root filesystem, top first (e.g. `[source, base]`).
    pub lower_dirs: Vec<PathBuf>,
    /// Overlay upper dir: receives every change the job makes. Must survive the job so the
    /// worker can snapshot it (see [`crate::JobDir`]).
    pub upper: PathBuf,
    /// Overlay work dir: empty, on the same filesystem as `upper`.
    pub work: PathBuf,
    /// The project's host identity; the job runs as [`JOB_UID`]/[`JOB_GID`] inside.
    pub identity: Identity,
    /// The command; `argv[0]` is resolved by `execve` as a path inside the sandbox, or looked
    /// up in the `PATH` of `env` when it has no slash.
    pub argv: Vec<String>,
    /// The job's whole environment (nothing is inherited from the worker).
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox. Created (owned by the job) when missing.
    pub cwd: PathBuf,
    pub limits: SandboxLimits,
    pub network: Network,
    /// Host paths bind-mounted read-only (and nosuid, nodev) at the given sandbox path.
    #[serde(default)]
    pub read_only_binds: Vec<(PathBuf, PathBuf)>,
    /// Hostname inside the UTS namespace.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// A tmpfs mounted in the job's own mount namespace, before the overlay, to hold
    /// `upper` and `work` (both must lie under it; they are created there). What the job
    /// changes then lives and dies with the job: nothing is made on the host nor left
    /// behind if the caller is killed. For runs whose upper dir nobody reads afterwards.
    #[serde(default)]
    pub scratch: Option<Scratch>,
}

/// See [`SandboxSpec::scratch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scratch {
    /// An existing empty host directory to mount the tmpfs on (the host never sees the
    /// mount, so one directory serves every job).
    pub dir: PathBuf,
    /// The tmpfs's size (what the job writes there is also charged to its memory).
    pub size_bytes: u64,
}

fn default_hostname() -> String {
    "corral".to_owned()
}

/// Uid inside the sandbox that the project's host uid is mapped to.
pub const JOB_UID: u32 = 1000;
/// Gid inside the sandbox that the project's host gid is mapped to.
pub const JOB_GID: u32 = 1000;
/// The umask the job starts with, whatever the worker's own (a hardened unit runs it under
/// `UMask=0077`): the modes of what a build writes, so the build layer's bytes, must not
/// depend on how the worker was started. Pid 1 sets it before it makes the job's root, so
/// mount points, `/dev` and `/tmp` come out the same on every host too.
pub const JOB_UMASK: u32 = 0o022;

/// A project's host identity: files the job writes in the upper dir are owned by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub host_uid: u32,
    pub host_gid: u32,
}

/// Resource limits of one run. `None` means "no limit of that kind".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxLimits {
    /// Memory (RAM, no swap) of the whole job, in bytes (cgroup).
    pub memory_bytes: Option<u64>,
    /// Processes and threads of the whole job (cgroup).
    pub pids: Option<u64>,
    /// CPU bandwidth in cores, e.g. `1.0` (cgroup quota).
    pub cpu_quota: Option<f64>,
    /// Wall-clock limit; the job is killed when it passes.
    pub wall: Duration,
    /// CPU time (user + system) of the whole job, in seconds.
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_NOFILE`.
    pub open_files: u64,
    /// Size of the private `/tmp` (a tmpfs, charged to the job's memory).
    pub tmp_bytes: u64,
    /// `RLIMIT_FSIZE`: the largest file the job may write.
    pub file_size_bytes: Option<u64>,
    /// How long the job must use all of its `cpu_quota` on end to raise `cpu_saturated`
    /// (never without a quota).
    #[serde(default = "default_cpu_saturated_after")]
    pub cpu_saturated_after: Duration,
    /// Disk bandwidth of the whole job, bytes per second, for reads and for writes each
    /// (cgroup v2 `io.max`, v1 `blkio.throttle.*_bps_device`) on the block device holding
    /// `upper` (the job filesystem's loop device). None where `upper` is on no block
    /// device (a tmpfs scratch).
    #[serde(default)]
    pub disk_bytes_per_second: Option<u64>,
    /// The block device (major, minor) the bandwidth limit applies to; the sandbox finds
    /// it from `upper` when it makes the cgroup.
    #[serde(default)]
    pub disk_device: Option<(u32, u32)>,
}

/// A build compiling flat out for a minute is common; a miner does it for hours.
pub const CPU_SATURATED_AFTER: Duration = Duration::from_secs(60);

fn default_cpu_saturated_after() -> Duration {
    CPU_SATURATED_AFTER
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            memory_bytes: Some(2 << 30),
            pids: Some(512),
            cpu_quota: Some(1.0),
            wall: Duration::from_secs(30 * 60),
            cpu_seconds: None,
            open_files: 4096,
            tmp_bytes: 256 << 20,
            file_size_bytes: None,
            cpu_saturated_after: CPU_SATURATED_AFTER,
            disk_bytes_per_second: None,
            disk_device: None,
        }
    }
}

/// Network policy. Both give a fresh network namespace holding only loopback, so the
/// host's services (the broker on 127.0.0.1) and abstract unix sockets are unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// No IP networking at all: `socket(AF_INET/AF_INET6/AF_PACKET)` is refused and counted
    /// in [`crate::Outcome::network_attempts`].
    #[default]
    None,
    /// IP sockets allowed, but only the namespace's own loopback exists.
    Loopback,
    /// As `Loopback`, and pid 1 opens a TCP socket listening on `127.0.0.1:port` inside the
    /// job's namespace before the job starts, and hands it to the caller (see
    /// [`crate::Running::egress_listener`]), who serves the job's egress proxy on it from
    /// outside. The namespace still has no route out.
    Egress { port: u16 },
}

/// The port of the egress proxy's socket on the job's loopback (squid's customary one).
pub const EGRESS_PORT: u16 = 3128;

/// How the worker launches sandboxes on this host.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The binary re-executed as the zygote and the single-threaded shim
    /// (`<helper_exe> __sandbox-shim`): `corral` or `corral-worker`, which both dispatch
    /// those arguments before anything else.
    pub helper_exe: PathBuf,
    /// Cgroup (relative to each hierarchy's root) under which job cgroups are created.
    pub cgroup_parent: String,
    /// Holds `root/`, the empty directory every job's root is mounted on, each inside the
    /// job's own private mount namespace (created when missing, never removed).
    pub run_dir: PathBuf,
    /// Content of `/proc/self/mountinfo`, read at spawn when `None` (tests inject fakes).
    pub mountinfo: Option<String>,
    /// Fork shims from this zygote (started on first use) instead of exec'ing
    /// `helper_exe` for every job.
    pub zygote: Option<std::sync::Arc<crate::Zygote>>,
    /// Take job cgroups from this pool (made ahead, removed in the background) instead of
    /// making and removing each on the job's critical path ([`crate::Sandbox::spawn`]
    /// only). It must make them under [`SandboxConfig::cgroup_parent`].
    pub cgroup_pool: Option<std::sync::Arc<crate::CgroupPool>>,
}

impl SandboxConfig {
    /// The shim is the current executable, jobs go under the `corral` cgroup.
    pub fn new() -> std::io::Result<Self> {
        Ok(SandboxConfig {
            helper_exe: std::env::current_exe()?,
            cgroup_parent: "corral".to_owned(),
            run_dir: PathBuf::from("/run/corral"),
            mountinfo: None,
            zygote: None,
            cgroup_pool: None,
        })
    }
}
