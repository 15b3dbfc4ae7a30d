//! A job's life, top to bottom, written once for `corral replay` and `corral work`:
//!
//! ```text
//! queue ─▶ spec ─▶ stage ─▶ build ─▶ publish ─▶ verdict ─▶ queue
//!          maxima   base     sandbox   snapshots   result +
//!          lease    source   log       image       ack / requeue /
//!                   job dir  limit     cache put   dead-letter
//! ```
//!
//! - [`spec`]: the inputs a job may ask for on this worker, and the worker's [`Settings`].
//! - [`stage`]: the base, the source bundle unpacked at `/app`, the scratch and job dirs.
//! - [`build`]: the sandbox run and its output, with the one log-limit enforcement.
//! - [`publish`]: snapshots of the source and upper dirs, the image, the log blob, the
//!   action cache entry.
//! - [`verdict`]: the one pure function from what happened to the job's `JobResult` and what
//!   the queue does with its delivery.
//! - [`error`]: [`JobError`], named after the failed step, and whose fault it is.
//!
//! [`run`] is the entry point: a [`Runner`] takes the job as far as it goes and says how it
//! ended ([`Ending`]); the verdict follows. [`Sandboxed`] is the production runner; the AMQP
//! worker drives any [`Runner`] and depends on this module, never the other way.

pub mod build;
pub mod error;
pub mod publish;
pub mod spec;
pub mod stage;
pub mod verdict;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use corral_protocol::{Job, Status, Stream, Timings, WorkerInfo};
use corral_sandbox::{IdentityMap, JobDirPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::base::Catalogue;
use crate::cache::{ActionCache, ActionKey};
use crate::events::JobEvents;
use crate::metrics::Metrics;
use crate::store::Store;
use publish::Publish;

pub use build::{BuildLog, Built, Output};
pub use error::{JobError, JobFault, error_chain};
pub use spec::Settings;
pub use stage::open_store;
pub use verdict::{Action, Delivery, Ending, Facts, Verdict, verdict, wire_name};

/// Where a build's output goes while it runs: `(stream, bytes)` in the order produced.
/// Sending waits when the reader is behind, which is the back-pressure a noisy build deserves.
pub type LogSink = mpsc::Sender<(Stream, Bytes)>;

/// Why a running job was stopped from outside. The first cause wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A user asked (a Cancel message, Ctrl-C): the job ends `cancelled`.
    Cancel(Option<String>),
    /// The worker is going away (drain deadline, second signal): the job is handed back.
    Drain,
    /// The delivery died with its connection or channel: no result, the broker redelivers.
    Lost,
}

/// Stops a running job, remembering why. Clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct Stopper {
    token: CancellationToken,
    cause: Arc<OnceLock<Stop>>,
}

impl Stopper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the job for `cause` unless it was already stopped for another.
    pub fn stop(&self, cause: Stop) {
        let _ = self.cause.set(cause);
        self.token.cancel();
    }

    pub fn cause(&self) -> Option<&Stop> {
        self.cause.get()
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the job is stopped.
    pub async fn stopped(&self) {
        self.token.cancelled().await;
    }
}

/// The build slot a run holds, if its caller has slots: taken before the run starts,
/// given back by the runner once its CPU-heavy part (the build and its snapshots) is over,
/// or when the run returns. The job's image upload, result and ack then overlap the next
/// job's build. Clones share the one slot.
#[derive(Clone, Default)]
pub struct BuildSlot(Arc<std::sync::Mutex<Option<Box<dyn Send>>>>);

impl BuildSlot {
    /// A slot that is given back when `held` is dropped.
    pub fn holding(held: impl Send + 'static) -> Self {
        BuildSlot(Arc::new(std::sync::Mutex::new(Some(Box::new(held)))))
    }

    /// Gives the slot back (once; later calls do nothing).
    pub fn release(&self) {
        let held = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(held);
    }

    pub fn is_held(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }
}

impl std::fmt::Debug for BuildSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildSlot")
            .field("held", &self.is_held())
            .finish()
    }
}

/// What a run gets besides the job.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Fires on a Cancel message, a lost delivery, the drain deadline or Ctrl-C. The build
    /// is then stopped (TERM, grace, KILL) and the run returns promptly.
    pub stop: Stopper,
    /// The build's output, as it is produced.
    pub logs: LogSink,
    /// The broker delivered this job before.
    pub redelivered: bool,
    /// How often the job was tried, how often it may be.
    pub delivery: Delivery,
    /// Who is running it, for the result's `worker` field.
    pub worker: WorkerInfo,
    /// The job's one event path: every alert and lifecycle event of the run goes through it
    /// (rate-limited per kind) to the run's sinks.
    pub events: JobEvents,
    /// Given back once the build and its snapshots are over.
    pub slot: BuildSlot,
}

/// How far a run took a job: its ending and the time each stage took.
#[derive(Debug)]
pub struct Ran {
    pub ending: Ending,
    pub timings: Timings,
}

/// Takes a validated job as far as it goes. Called concurrently, up to the worker's
/// concurrency; stops promptly when `ctx.stop` fires.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, job: &Job, ctx: RunContext) -> impl Future<Output = Ran> + Send;
}

/// Runs `job` through `runner` and decides its verdict: the one entry point of
/// `corral replay` and `corral work`.
pub async fn run(runner: &impl Runner, job: &Job, ctx: RunContext) -> Verdict {
    let started = Instant::now();
    let queued_ms = job.submitted_at_ms.map(|at| now_ms().saturating_sub(at));
    let (stop, worker, delivery) = (ctx.stop.clone(), ctx.worker.clone(), ctx.delivery);
    let (events, slot) = (ctx.events.clone(), ctx.slot.clone());
    // Every log line about this job carries its job and project ids.
    let span = tracing::info_span!("job", job = %job.job_id, project = %job.project);
    let ran = tracing::Instrument::instrument(runner.run(job, ctx), span).await;
    slot.release();
    if let Ending::Failed(err) = &ran.ending
        && err.job_fault().is_none()
    {
        tracing::warn!(
            job = %job.job_id,
            project = %job.project,
            retryable = err.is_retryable(),
            error = %error_chain(err),
            "platform error"
        );
    }
    let timings = Timings {
        queued_ms,
        total_ms: ms(started.elapsed()),
        ..ran.timings
    };
    let decided = verdict(Facts {
        stop: stop.cause().cloned(),
        delivery,
        timings,
        ..Facts::new(job, ran.ending, worker, now_ms())
    });
    events.finished(&decided);
    decided
}

/// The production [`Runner`]: every job goes through the sandbox, over this worker's data
/// dir (bases, action cache, identities, job dirs) and store.
pub struct Sandboxed {
    settings: Settings,
    store: Store,
    bases: Catalogue,
    cache: ActionCache,
    identities: IdentityMap,
    job_dirs: Arc<JobDirPool>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Sandboxed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandboxed")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Sandboxed {
    /// Opens the data dir: bases, action cache, identities, and the job-dir pool, which
    /// first removes the job filesystems a previous worker left.
    pub fn open(
        mut settings: Settings,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Self, JobError> {
        let open_err =
            |path: &Path, source: Box<dyn std::error::Error + Send + Sync>| JobError::Open {
                path: path.to_path_buf(),
                source,
            };
        let data = settings.data_dir.clone();
        let bases = Catalogue::open(&data).map_err(|e| open_err(&data, e.into()))?;
        let cache_dir = data.join("cache").join("actions");
        let cache = ActionCache::open(&cache_dir).map_err(|e| open_err(&cache_dir, e.into()))?;
        let identities = IdentityMap::open(&data, settings.uid_range.clone())
            .and_then(|ids| ids.with_gid_start(settings.gid_start))
            .map_err(|e| open_err(&data, e.into()))?;
        for dir in [data.join("jobs"), data.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|e| open_err(&dir, e.into()))?;
        }
        let jobs = data.join("jobs");
        let job_dirs = JobDirPool::open(&jobs, settings.job_dir_pool)
            .map_err(|e| open_err(&jobs, e.into()))?;
        let recovered = job_dirs.recovery();
        if !recovered.removed.is_empty() {
            tracing::info!(
                removed = recovered.removed.len(),
                unmounted = recovered.unmounted.len(),
                "removed the job dirs a previous worker left"
            );
        }
        for err in &recovered.errors {
            tracing::warn!(error = %error_chain(err), "could not clean up a previous worker's job dir");
        }
        // A worker killed with SIGKILL leaves its jobs' cgroups behind (empty: their
        // processes died with the job's pid namespace, or are killed here).
        if let Ok(layout) = corral_sandbox::host_cgroup_layout() {
            let stale =
                corral_sandbox::remove_stale_cgroups(&layout, &settings.sandbox.cgroup_parent);
            if !stale.removed.is_empty() {
                tracing::info!(
                    removed = stale.removed.len(),
                    parent = %settings.sandbox.cgroup_parent,
                    "removed the job cgroups a previous worker left"
                );
            }
            for err in &stale.errors {
                tracing::warn!(error = %error_chain(err), "could not remove a previous worker's job cgroup");
            }
            // Job cgroups made ahead (as many as the job filesystems kept) and removed in the
            // background: neither is on a job's critical path. Each is used once.
            match corral_sandbox::CgroupPool::new(
                layout,
                &settings.sandbox.cgroup_parent,
                settings.job_dir_pool.max(1),
            ) {
                Ok(pool) => settings.sandbox.cgroup_pool = Some(Arc::new(pool)),
                Err(err) => {
                    tracing::warn!(error = %err, "no job cgroup pool: each job makes its own");
                }
            }
        }
        Ok(Sandboxed {
            settings,
            store,
            bases,
            cache,
            identities,
            job_dirs: Arc::new(job_dirs),
            metrics,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn bases(&self) -> &Catalogue {
        &self.bases
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// spec → stage → build → publish. `Ok` is how the job ended; `Err` is a failed step.
    async fn life(
        &self,
        job: &Job,
        ctx: &RunContext,
        timings: &mut Timings,
    ) -> Result<Ending, JobError> {
        spec::check(job, &self.settings.max_limits)?;
        let egress = spec::egress(job, &self.settings.egress.allow)?;
        let base = stage::base(&self.bases, job)?;
        let publish = Publish {
            store: &self.store,
            settings: &self.settings,
            metrics: &self.metrics,
        };
        let key = ActionKey::new(job, &base.layer.digest, &self.settings.compression.label());
        if self.settings.use_cache
            && spec::cacheable(job)
            && let Some(hit) = publish
                .cache_hit(&self.cache, &key, job, &ctx.worker)
                .await?
        {
            tracing::info!(stage = "cache", "answered from the action cache");
            return Ok(Ending::Cached(Box::new(hit)));
        }

        let identity = stage::identity(&self.identities, job)?;
        let scratch = stage::Scratch::create(&self.settings.data_dir, job)?;
        let fetch_started = Instant::now();
        stage::source(
            &self.store,
            job,
            &scratch,
            &identity,
            self.settings.extract_limits,
        )
        .await?;
        timings.fetch_ms = ms(fetch_started.elapsed());
        tracing::info!(
            stage = "fetch",
            ms = timings.fetch_ms,
            "source fetched and unpacked"
        );
        let mut job_dir =
            stage::job_dir(&self.job_dirs, job.limits.disk_bytes.bytes(), &self.metrics).await?;

        tracing::info!(stage = "build", argv = ?job.command, "build starting");
        let build_started = Instant::now();
        let spec = build::spec(
            job,
            &self.settings,
            vec![scratch.source_root(), base.base.rootfs()],
            &job_dir,
            identity,
        );
        let proxy = egress.map(|allow| build::proxy(job, allow, &self.settings, ctx));
        let (outcome, log_truncated, network, teardown) = build::sandbox(
            spec,
            &self.settings,
            job.limits.log_bytes.bytes(),
            &scratch.log(),
            ctx,
            proxy,
        )
        .await?;
        // The sandbox reported every job process dead; the overlay goes with pid 1, which
        // the pool waits for before it wipes the dir.
        job_dir.mark_quiescent_after(teardown);
        timings.build_ms = ms(build_started.elapsed());
        tracing::info!(stage = "build", ms = timings.build_ms, "build ended");
        self.metrics
            .build_seconds
            .observe(build_started.elapsed().as_secs_f64());

        let log = publish.log(&scratch.log(), log_truncated).await?;
        let mut built = Built {
            upper_bytes: build::dir_bytes(&job_dir.upper()),
            outcome,
            log_truncated,
            log: Some(log),
            output: Output::NotTaken,
            inputs: Some(Box::new(key.inputs().clone())),
            network_cut: network.as_ref().is_some_and(|n| n.cut),
            network: network.map(|n| n.usage),
        };
        if !built.outcome.success() {
            return Ok(Ending::Built(Box::new(built)));
        }
        let snapshot_started = Instant::now();
        let layers = publish
            .layers(
                job,
                &identity,
                &scratch.source_root(),
                &job_dir.upper(),
                &scratch.path,
            )
            .await;
        let (source_layer, build_layer) = match layers {
            Ok(layers) => layers,
            Err(err) => {
                let Some(JobFault::Output(why)) = err.job_fault() else {
                    return Err(err);
                };
                built.output = Output::Refused(why);
                return Ok(Ending::Built(Box::new(built)));
            }
        };
        timings.snapshot_ms = ms(snapshot_started.elapsed());
        tracing::info!(
            stage = "snapshot",
            ms = timings.snapshot_ms,
            "upper dir snapshotted"
        );
        self.metrics
            .snapshot_seconds
            .observe(snapshot_started.elapsed().as_secs_f64());
        drop(job_dir);
        // What is left waits on the store: the next job may build meanwhile.
        ctx.slot.release();

        let upload_started = Instant::now();
        let artifact = publish.image(job, &base, source_layer, build_layer).await?;
        timings.upload_ms = ms(upload_started.elapsed());
        tracing::info!(stage = "upload", ms = timings.upload_ms, "image stored");
        self.metrics
            .upload_seconds
            .observe(upload_started.elapsed().as_secs_f64());
        built.output = Output::Stored(Box::new(artifact));
        // The cache holds the result this build gets when nothing stops it.
        let decided = verdict(Facts {
            timings: timings.clone(),
            ..Facts::new(
                job,
                Ending::Built(Box::new(built.clone())),
                ctx.worker.clone(),
                now_ms(),
            )
        });
        if let Some(result) = &decided.result
            && result.status == Status::Succeeded
            && spec::pinned(job)
        {
            publish.cache_put(&self.cache, &key, result);
        }
        Ok(Ending::Built(Box::new(built)))
    }
}

impl Runner for Sandboxed {
    async fn run(&self, job: &Job, ctx: RunContext) -> Ran {
        let mut timings = Timings::default();
        let ending = self
            .life(job, &ctx, &mut timings)
            .await
            .unwrap_or_else(Ending::Failed);
        Ran { ending, timings }
    }
}

/// Milliseconds in a duration, saturating.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch, as the wire messages carry time.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, ms)
}

/// Runs `f` on the blocking pool: sandboxes, snapshots and job dirs never block the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobError::Join(e.to_string()))
}
