//! Staging a job's inputs: its base (by name, with its layer), the project's identity, a
//! scratch dir on the data disk, the source bundle fetched, verified and unpacked at `/app`,
//! and a job dir (upper and work) from the pool. Also the worker-wide pieces staging needs
//! opened once: the store and the cgroup builds go under.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use corral_protocol::{Job, Layer};
use corral_sandbox::{Identity, IdentityMap, JobDirPool, PooledJobDir};

use super::error::JobError;
use super::{blocking, ms};
use crate::base::{Base, Catalogue};
use crate::metrics::Metrics;
use crate::source::{ExtractLimits, Owner};
use crate::store::{Store, StoreError};

/// The in-sandbox path where the source bundle is unpacked.
pub const SOURCE_DIR: &str = "app";

/// The job's base: its rootfs and its layer (the image's first).
pub struct StagedBase {
    pub base: Base,
    pub layer: Layer,
    /// The layer's blob, kept beside the rootfs.
    pub blob: PathBuf,
}

/// The base `job` names. An unknown one is the job's fault ([`JobError::job_fault`]).
pub fn base(bases: &Catalogue, job: &Job) -> Result<StagedBase, JobError> {
    let base = bases.get(&job.base).map_err(JobError::Base)?;
    let (Some(layer), Some(blob)) = (base.layer().cloned(), base.layer_blob()) else {
        return Err(JobError::BaseWithoutLayer(job.base.to_string()));
    };
    Ok(StagedBase { base, layer, blob })
}

/// The project's host identity: derived from the project id, so the same on every worker
/// with the same uid range, unless its uid was taken here (then logged).
pub fn identity(identities: &IdentityMap, job: &Job) -> Result<Identity, JobError> {
    let allocation = identities
        .allocate(job.project.as_str())
        .map_err(JobError::Identity)?;
    if let Some(holder) = &allocation.collided_with {
        tracing::warn!(
            project = %job.project,
            holder = %holder,
            uid = allocation.identity.host_uid,
            "the project's derived uid is held by another project here; it runs as the next \
             free uid, which other workers may not share (widen sandbox.id_count)"
        );
    }
    Ok(allocation.identity)
}

/// The job's scratch space on the data disk (source, bundle, log, spooled layers), removed
/// when dropped.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn create(data_dir: &Path, job: &Job) -> Result<Self, JobError> {
        let path = data_dir.join("tmp").join(format!("job-{}", job.job_id));
        // A leftover from a crashed run of the same job is stale by definition.
        let _ = std::fs::remove_dir_all(&path);
        // The worker's own (bundle, log, spooled layers): private whatever the umask.
        std::fs::create_dir_all(&path)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| JobError::Scratch {
                path: path.clone(),
                source,
            })?;
        Ok(Scratch { path })
    }

    /// The lower dir holding `/app`.
    pub fn source_root(&self) -> PathBuf {
        self.path.join("source")
    }

    /// The build's log file.
    pub fn log(&self) -> PathBuf {
        self.path.join("build.log")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %err, "could not remove job scratch");
        }
    }
}

/// Fetches the job's source bundle, verifies its digest and unpacks it at `/app` in
/// `scratch`, owned by the build user so the build can create its venv and outputs there.
pub async fn source(
    store: &Store,
    job: &Job,
    scratch: &Scratch,
    identity: &Identity,
    limits: ExtractLimits,
) -> Result<(), JobError> {
    let app = scratch.source_root().join(SOURCE_DIR);
    // Its mode is the source layer's first entry: fixed, never the worker's umask.
    std::fs::create_dir_all(&app)
        .and_then(|()| {
            std::os::unix::fs::chown(&app, Some(identity.host_uid), Some(identity.host_gid))
        })
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755))
        })
        .map_err(|source| JobError::Scratch {
            path: app.clone(),
            source,
        })?;
    crate::source::fetch_and_extract(
        store,
        &job.source,
        &scratch.path.join("source.bundle"),
        &app,
        Some(Owner {
            uid: identity.host_uid,
            gid: identity.host_gid,
        }),
        limits,
    )
    .await
    .map(drop)
    .map_err(JobError::Source)
}

/// A ready filesystem from the pool, or one made now when none is ready. Dropped on any
/// path, it goes back to the pool: wiped for reuse once marked quiescent, torn down
/// otherwise, both in the background.
pub async fn job_dir(
    pool: &Arc<JobDirPool>,
    disk: u64,
    metrics: &Metrics,
) -> Result<PooledJobDir, JobError> {
    let started = Instant::now();
    let job_dir = match pool.take_ready(disk) {
        Some(dir) => dir,
        None => {
            let pool = pool.clone();
            blocking(move || pool.take(disk))
                .await?
                .map_err(JobError::JobDir)?
        }
    };
    metrics.job_dir_taken(job_dir.was_ready());
    tracing::info!(
        stage = "job_dir",
        ms = ms(started.elapsed()),
        ready = job_dir.was_ready(),
        "job dir taken"
    );
    Ok(job_dir)
}

/// The cgroup under which builds get their own cgroups. `Delegated` (systemd's
/// `Delegate=yes`) is the worker's own cgroup: on cgroup v2 the worker first moves itself
/// into a `worker` leaf there, since v2 lets a cgroup hold either processes or children.
pub fn cgroup_parent(
    parent: &crate::config::CgroupParent,
    layout: &corral_sandbox::Layout,
) -> std::io::Result<String> {
    use crate::config::CgroupParent;
    match parent {
        CgroupParent::Path(path) => Ok(path.to_string_lossy().trim_start_matches('/').to_string()),
        CgroupParent::Delegated => {
            let own = std::fs::read_to_string("/proc/self/cgroup")?;
            let unified = own.lines().find_map(|line| line.strip_prefix("0::"));
            let v1_memory = own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "memory")
                    .then_some(path)
            });
            match (v1_memory, unified) {
                // cgroup v1 has one hierarchy per controller and no delegation to speak of:
                // builds go under a fixed `corral` cgroup in each.
                (Some(_), _) => Ok("corral".to_string()),
                (None, Some(path)) => {
                    let root = match layout {
                        corral_sandbox::Layout::V2 { root } => root.as_path(),
                        corral_sandbox::Layout::V1 { .. } => Path::new("/sys/fs/cgroup"),
                    };
                    let path = path.trim_end_matches("/worker");
                    let dir = root.join(path.trim_start_matches('/'));
                    let leaf = dir.join("worker");
                    std::fs::create_dir_all(&leaf)?;
                    std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
                    Ok(path.trim_start_matches('/').to_string())
                }
                (None, None) => Err(std::io::Error::other(
                    "no cgroup found in /proc/self/cgroup",
                )),
            }
        }
    }
}

/// Opens the store the config names, with its credentials.
pub async fn open_store(config: &crate::config::Config) -> Result<Store, StoreError> {
    use crate::config::RegistryAuth;
    let credentials = match &config.store.auth {
        RegistryAuth::Anonymous => None,
        RegistryAuth::Basic { username, password } => Some(crate::store::Credentials::new(
            username.clone(),
            password.expose(),
        )),
        // A static token is sent as the password of the token exchange; registries that
        // take a bearer token directly accept it there too.
        RegistryAuth::Bearer(token) => {
            Some(crate::store::Credentials::new("<token>", token.expose()))
        }
    };
    Store::open(&config.store.url.to_string(), credentials).await
}
