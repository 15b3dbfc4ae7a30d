//! What a job may ask for on this worker: its inputs checked against the worker's maxima
//! (the decoder already checked the protocol's hard ones) and the lease, the build's
//! environment, and the [`Settings`] every run of this worker shares.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_protocol::{Job, Limits, ProtocolError, Rule};
use corral_sandbox::SandboxConfig;

use super::error::JobError;
use crate::egress::{AllowList, EgressError};
use crate::layer::Compression;
use crate::source::ExtractLimits;

/// How the worker runs jobs: every knob comes from the worker's config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// This worker's maxima (at most [`Limits::MAX`]).
    pub max_limits: Limits,
    /// Host uids handed out to projects.
    pub uid_range: RangeInclusive<u32>,
    /// The gid of the range's first uid: a project's gid sits at its uid's offset from it.
    pub gid_start: u32,
    pub sandbox: SandboxConfig,
    pub cpus_per_build: f64,
    /// Full use of `cpus_per_build` for this long raises `cpu_saturated`.
    pub cpu_saturated_after: Duration,
    pub kill_grace: Duration,
    pub compression: Compression,
    pub compression_threads: usize,
    pub max_output_bytes: u64,
    pub extract_limits: ExtractLimits,
    /// Answer from the action cache when the job allows it.
    pub use_cache: bool,
    /// Job filesystems kept per disk size, in use, being wiped or formatted and mounted
    /// ready for the next job (0 keeps none): one more than the worker's concurrency. A
    /// build's slot goes to the next job as soon as the build's layers are made, while its
    /// filesystem is still being wiped in the background; with only `concurrency` of them
    /// that next job often found none ready and paid a `mkfs` and a mount (5–10 % of the jobs
    /// of a burst, `scripts/bench-amqp`).
    pub job_dir_pool: usize,
    /// The egress ceiling and the proxy's connection cap (`[egress]`).
    pub egress: crate::config::EgressConfig,
}

/// The helper for `helper = "self"`: the small `corral` binary of the same install, beside
/// `current` (it starts the zygote and the shim before anything else), else `current`
/// itself. The zygote lives as long as the worker: from `corral` it holds 2.3 MiB of RSS
/// instead of 3.9 (`scripts/bench-idle`); forking it costs the same.
pub fn self_helper(current: &std::path::Path) -> PathBuf {
    let front = current.with_file_name("corral");
    if front != current && front.is_file() {
        front
    } else {
        current.to_path_buf()
    }
}

impl Settings {
    /// The settings from the worker's config.
    pub fn from_config(config: &crate::config::Config) -> std::io::Result<Self> {
        use crate::config::{Compression as Codec, SandboxHelper};
        let sandbox = &config.sandbox;
        // CORRAL_REQUIRE_CGROUP fails the start here, naming the hierarchy found.
        let layout = corral_sandbox::host_cgroup_layout().map_err(std::io::Error::other)?;
        let mut sandbox_config = SandboxConfig::new()?;
        // Under systemd the unit's RuntimeDirectory= is its one writable place in /run
        // (ProtectSystem=strict); systemd names it in RUNTIME_DIRECTORY.
        if let Some(dir) = runtime_directory(std::env::var_os("RUNTIME_DIRECTORY")) {
            sandbox_config.run_dir = dir;
        }
        match &sandbox.helper {
            SandboxHelper::Path(path) => sandbox_config.helper_exe.clone_from(path),
            SandboxHelper::SelfExe => {
                sandbox_config.helper_exe = self_helper(&sandbox_config.helper_exe);
            }
        }
        sandbox_config.cgroup_parent =
            super::stage::cgroup_parent(&sandbox.cgroup_parent, &layout)?;
        // One long-lived zygote forks each job's helper (no exec of this binary per job).
        sandbox_config.zygote = Some(Arc::new(corral_sandbox::Zygote::new(
            &sandbox_config.helper_exe,
        )));
        let level = config.snapshot.level;
        Ok(Settings {
            data_dir: config.data_dir.clone(),
            max_limits: config.limits,
            uid_range: sandbox.uid_start
                ..=sandbox
                    .uid_start
                    .saturating_add(sandbox.id_count.saturating_sub(1)),
            gid_start: sandbox.gid_start,
            sandbox: sandbox_config,
            cpus_per_build: sandbox.cpus_per_build,
            cpu_saturated_after: sandbox.cpu_saturated_after,
            kill_grace: sandbox.kill_grace,
            compression: match config.snapshot.compression {
                Codec::Gzip => Compression::Gzip { level },
                Codec::Zstd => Compression::Zstd {
                    level: i32::try_from(level).unwrap_or(3),
                },
            },
            compression_threads: usize::try_from(config.snapshot.threads).unwrap_or(1),
            max_output_bytes: config.snapshot.max_output_bytes.bytes(),
            extract_limits: ExtractLimits::default(),
            use_cache: true,
            job_dir_pool: usize::from(config.concurrency) + 1,
            egress: config.egress.clone(),
        })
    }
}

/// The job within this worker's maxima.
pub fn check(job: &Job, maxima: &Limits) -> Result<(), JobError> {
    job.validate(maxima).map_err(JobError::Spec)
}

/// The job's egress list, when it has one, within this worker's `[egress] allow`.
pub fn egress(job: &Job, ceiling: &AllowList) -> Result<Option<AllowList>, JobError> {
    let asked = job.network.egress();
    if asked.is_empty() {
        return Ok(None);
    }
    ceiling.subset(asked).map(Some).map_err(|e| {
        let rule = match e {
            EgressError::NotAllowed { .. } => Rule::NotAllowed,
            EgressError::Entry { .. } => Rule::Charset,
        };
        JobError::Spec(ProtocolError::new("network.egress", rule, e.to_string()))
    })
}

/// Whether the action cache may answer this job or keep its result: an egress job's bytes
/// depend on what it downloaded, so only when the producer says the downloads are pinned.
pub fn cacheable(job: &Job) -> bool {
    job.cache && pinned(job)
}

/// Whether the job's bytes follow from its inputs alone: no egress, or the producer's
/// `cacheable` word that its downloads are pinned. Only such results are cached.
pub fn pinned(job: &Job) -> bool {
    job.network.egress().is_empty() || job.cacheable
}

/// The proxy the build's `HTTP_PROXY` and `HTTPS_PROXY` (both cases) point at, on the job's
/// own loopback; `NO_PROXY` keeps the job's own servers direct; `PIP_CERT` names the
/// operator's CA file when there is one. The build's only: the image's config keeps the
/// job's own env ([`build_env`]), since the proxy does not exist where the image runs.
pub fn proxy_env(job: &Job, ca: bool) -> Vec<(String, String)> {
    if job.network.egress().is_empty() {
        return Vec::new();
    }
    let url = format!("http://127.0.0.1:{}", corral_sandbox::EGRESS_PORT);
    let mut env = Vec::new();
    for name in ["HTTP_PROXY", "HTTPS_PROXY"] {
        env.push((name.to_owned(), url.clone()));
        env.push((name.to_ascii_lowercase(), url.clone()));
    }
    for name in ["NO_PROXY", "no_proxy"] {
        env.push((name.to_owned(), "localhost,127.0.0.1".to_owned()));
    }
    if ca {
        env.push(("PIP_CERT".to_owned(), crate::egress::BUILD_CA.to_owned()));
    }
    env
}

/// The job's wall limit plus `margin`, the time it needs besides its build (fetch, snapshot,
/// upload, publish), within the broker's lease on its delivery, or the broker's consumer
/// timeout could fire mid-build. The config holds its own wall limit to the same rule
/// (`amqp.lease_margin_seconds`).
pub fn check_lease(job: &Job, lease: Duration, margin: Duration) -> Result<(), ProtocolError> {
    if Duration::from_secs(job.limits.wall_seconds) + margin <= lease {
        return Ok(());
    }
    Err(ProtocolError::new(
        "limits.wall_seconds",
        Rule::Maximum,
        format!(
            "{} s plus {} s for fetch and upload exceed this worker's lease of {} s \
             (the broker's consumer_timeout); run long builds on a pool with a longer lease",
            job.limits.wall_seconds,
            margin.as_secs(),
            lease.as_secs()
        ),
    ))
}

/// The build's environment: a minimal base, then the job's own variables.
pub fn build_env(job: &Job) -> Vec<(String, String)> {
    let mut env = BTreeMap::from([
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        ),
        ("HOME".to_string(), job.workdir.to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("SOURCE_DATE_EPOCH".to_string(), job.epoch().to_string()),
    ]);
    env.extend(job.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().collect()
}

/// The first of systemd's `RUNTIME_DIRECTORY` (a `:`-separated list of absolute paths).
fn runtime_directory(value: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let value = value?.into_string().ok()?;
    let first = PathBuf::from(value.split(':').next()?);
    first.is_absolute().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_dir_is_the_units_runtime_directory() {
        let dir = |v: &str| runtime_directory(Some(v.into()));
        assert_eq!(dir("/run/corral/1"), Some(PathBuf::from("/run/corral/1")));
        assert_eq!(dir("/run/a:/run/b"), Some(PathBuf::from("/run/a")));
        assert_eq!(dir("relative"), None);
        assert_eq!(runtime_directory(None), None);
    }

    #[test]
    fn the_self_helper_is_the_corral_binary_beside_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let worker = dir.path().join("corral-worker");
        std::fs::write(&worker, "").unwrap();
        assert_eq!(self_helper(&worker), worker);
        std::fs::write(dir.path().join("corral"), "").unwrap();
        assert_eq!(self_helper(&worker), dir.path().join("corral"));
        // A worker binary that is itself named `corral` stays itself.
        assert_eq!(
            self_helper(&dir.path().join("corral")),
            dir.path().join("corral")
        );
    }
}
