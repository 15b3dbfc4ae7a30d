//! The build pipeline, written once for `corral replay` and `corral work`:
//!
//! validate → action cache → base → fetch source → job dir → sandbox → snapshot → store
//! image → result.
//!
//! [`Pipeline::run`] returns `Ok(JobResult)` for every outcome that is the job's own
//! (succeeded, failed, timed out, killed, cancelled, rejected) and `Err(PipelineError)` only
//! when the platform failed (store, host, sandbox set-up): those are retried by the caller.
//! The job dir (upper, work, mounts, cgroup) is released on every path: its filesystem comes
//! from a [`JobDirPool`] and goes back to it, wiped in the background, once the build is over.

/// `outer: inner: innermost`, for messages that travel in results.
pub use corral_sandbox::error_chain;

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use corral_protocol::{
    Artifact, Job, JobResult, Layer, Limits, LogRef, NetworkPolicy, ProtocolError, Reason, Rule,
    Status, Stream, Timings, Usage, WorkerInfo,
};
use corral_sandbox::{
    DeathReason, Exit, IdentityMap, JOB_GID, JOB_UID, JobDirPool, Network, Outcome, Sandbox,
    SandboxConfig, SandboxLimits, SandboxSpec,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::base::{BaseError, Catalogue};
use crate::cache::{ActionCache, ActionKey};
use crate::layer::{Compression, IdMap, LayerOptions, Mode, write_layer};
use crate::metrics::Metrics;
use crate::source::{ExtractLimits, Owner, SourceError};
use crate::store::{PutOutcome, Store, StoreError};

/// Where a build's output goes while it runs: `(stream, bytes)` in the order produced.
/// Sending waits when the reader is behind, which is the back-pressure a noisy build deserves.
pub type LogSink = mpsc::Sender<(Stream, Bytes)>;

/// What a run gets besides the job.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Fires on a Cancel message, a lost delivery, the drain deadline or Ctrl-C. The build
    /// is then stopped (TERM, grace, KILL) and the run returns promptly.
    pub cancel: CancellationToken,
    /// The build's output, as it is produced.
    pub logs: LogSink,
    /// The broker delivered this job before.
    pub redelivered: bool,
    /// Earlier deliveries of this job (0 at first).
    pub delivery_count: u32,
    /// Who is running it, for the result's `worker` field.
    pub worker: WorkerInfo,
}

/// How the pipeline is set up: every knob comes from the worker's config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// This worker's maxima (at most [`Limits::MAX`]).
    pub max_limits: Limits,
    /// Host uids (and gids, from `gid_start`) handed out to projects.
    pub uid_range: RangeInclusive<u32>,
    pub sandbox: SandboxConfig,
    pub cpus_per_build: f64,
    pub kill_grace: Duration,
    pub compression: Compression,
    pub compression_threads: usize,
    pub max_output_bytes: u64,
    pub extract_limits: ExtractLimits,
    /// Answer from the action cache when the job allows it.
    pub use_cache: bool,
    /// Job filesystems kept per disk size, in use or formatted and mounted ready for the
    /// next job: the worker's concurrency (0 keeps none).
    pub job_dir_pool: usize,
}

/// A platform failure: the job did nothing wrong, a retry may succeed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("opening the pipeline's state under {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the base")]
    Base(#[source] BaseError),
    #[error("the base {0} has no layer digest (re-create it with `corral base build --replace`)")]
    BaseWithoutLayer(String),
    #[error("fetching the source bundle")]
    Source(#[source] SourceError),
    #[error("assigning the project's identity")]
    Identity(#[source] corral_sandbox::IdentityError),
    #[error("preparing the job dir")]
    JobDir(#[source] corral_sandbox::JobDirError),
    #[error("running the sandbox")]
    Sandbox(#[source] corral_sandbox::Error),
    #[error("snapshotting {what}")]
    Snapshot {
        what: &'static str,
        #[source]
        source: crate::layer::LayerError,
    },
    #[error("storing {what}")]
    Store {
        what: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("writing the build log to {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a blocking task died: {0}")]
    Join(String),
}

impl PipelineError {
    /// Whether a retry may help. Everything here is the platform's fault; only a few
    /// failures are known to be permanent (bad credentials, a refused request).
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Store { source, .. } => source.is_retryable(),
            _ => true,
        }
    }
}

/// The shared build pipeline.
pub struct Pipeline {
    settings: Settings,
    store: Store,
    bases: Catalogue,
    cache: ActionCache,
    identities: IdentityMap,
    job_dirs: Arc<JobDirPool>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The wire name of a status, reason or other snake_case enum (`timed_out`, `oom`).
pub fn wire_name(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

/// Milliseconds in a duration, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, ms)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PipelineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PipelineError::Join(e.to_string()))
}

/// The in-sandbox path where the source bundle is unpacked.
pub const SOURCE_DIR: &str = "app";

impl Pipeline {
    pub fn open(
        settings: Settings,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PipelineError> {
        let open_err =
            |path: &Path, source: Box<dyn std::error::Error + Send + Sync>| PipelineError::Open {
                path: path.to_path_buf(),
                source,
            };
        let data = settings.data_dir.clone();
        let bases = Catalogue::open(&data).map_err(|e| open_err(&data, e.into()))?;
        let cache_dir = data.join("cache").join("actions");
        let cache = ActionCache::open(&cache_dir).map_err(|e| open_err(&cache_dir, e.into()))?;
        let identities = IdentityMap::open(&data, settings.uid_range.clone())
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
        Ok(Pipeline {
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

    /// Runs one job to its final result (see the module docs for what is `Err`).
    pub async fn run(&self, job: Job, ctx: RunContext) -> Result<JobResult, PipelineError> {
        let started = Instant::now();
        let mut timings = Timings {
            queued_ms: job.submitted_at_ms.map(|at| now_ms().saturating_sub(at)),
            ..Timings::default()
        };
        // Every log line about this job carries its job and project ids.
        let span = tracing::info_span!("job", job = %job.job_id, project = %job.project);
        let result =
            tracing::Instrument::instrument(self.run_inner(&job, &ctx, &mut timings), span).await;
        timings.total_ms = ms(started.elapsed());
        let mut result = result?;
        if !result.cached {
            result.timings = timings;
        }
        result.correlation_id.clone_from(&job.correlation_id);
        result.finished_at_ms = now_ms();
        let reason = result.reason.map(wire_name).unwrap_or_default();
        self.metrics
            .job_finished(&wire_name(result.status), &reason);
        Ok(result)
    }

    fn rejected(&self, job: &Job, ctx: &RunContext, error: ProtocolError) -> JobResult {
        JobResult::rejected(
            job.job_id.clone(),
            Some(job.project.clone()),
            error,
            ctx.worker.clone(),
        )
    }

    async fn run_inner(
        &self,
        job: &Job,
        ctx: &RunContext,
        timings: &mut Timings,
    ) -> Result<JobResult, PipelineError> {
        // 1. Validate against this worker's maxima (the decoder checked the hard ones).
        if let Err(err) = job.validate(&self.settings.max_limits) {
            return Ok(self.rejected(job, ctx, err));
        }
        // 2. The base, by name.
        let base = match self.bases.get(&job.base) {
            Ok(base) => base,
            Err(err @ BaseError::Unknown { .. }) => {
                return Ok(self.rejected(
                    job,
                    ctx,
                    ProtocolError::new("base", Rule::Unknown, err.to_string()),
                ));
            }
            Err(err) => return Err(PipelineError::Base(err)),
        };
        let (Some(base_layer), Some(base_blob)) = (base.layer().cloned(), base.layer_blob()) else {
            return Err(PipelineError::BaseWithoutLayer(job.base.to_string()));
        };
        // 3. The action cache.
        let key = ActionKey::new(
            job,
            &base_layer.digest,
            self.settings.compression.media_type(),
        );
        if self.settings.use_cache
            && job.cache
            && let Some(hit) = self.cache_hit(job, ctx, &key).await?
        {
            tracing::info!(stage = "cache", "answered from the action cache");
            return Ok(hit);
        }
        // 4. The job's own directories: work (source, spool) on the data disk, upper on a
        //    size-limited backing.
        let identity = self
            .identities
            .identity(job.project.as_str())
            .map_err(PipelineError::Identity)?;
        let work = WorkDirs::create(&self.settings.data_dir, job)?;
        let fetch_started = Instant::now();
        let source_root = work.path.join("source");
        let app = source_root.join(SOURCE_DIR);
        // /app belongs to the build user, so the build can create its venv and outputs there.
        std::fs::create_dir_all(&app)
            .and_then(|()| {
                std::os::unix::fs::chown(&app, Some(identity.host_uid), Some(identity.host_gid))
            })
            .map_err(|source| PipelineError::Log {
                path: app.clone(),
                source,
            })?;
        let fetched = crate::source::fetch_and_extract(
            &self.store,
            &job.source,
            &work.path.join("source.bundle"),
            &app,
            Some(Owner {
                uid: identity.host_uid,
                gid: identity.host_gid,
            }),
            self.settings.extract_limits,
        )
        .await;
        match fetched {
            Ok(_) => {}
            Err(err) if err.is_job_fault() => {
                return Ok(self.rejected(job, ctx, err.to_protocol_error()));
            }
            Err(err) => return Err(PipelineError::Source(err)),
        }
        timings.fetch_ms = ms(fetch_started.elapsed());
        tracing::info!(
            stage = "fetch",
            ms = timings.fetch_ms,
            "source fetched and unpacked"
        );

        // A ready filesystem from the pool, or one made now when none is ready. Dropped on
        // any path, it goes back to the pool: wiped for reuse once marked quiescent, torn
        // down otherwise, both in the background.
        let disk = job.limits.disk_bytes.bytes();
        let job_dir_started = Instant::now();
        let mut job_dir = match self.job_dirs.take_ready(disk) {
            Some(dir) => dir,
            None => {
                let pool = self.job_dirs.clone();
                blocking(move || pool.take(disk))
                    .await?
                    .map_err(PipelineError::JobDir)?
            }
        };
        self.metrics.job_dir_taken(job_dir.was_ready());
        tracing::info!(
            stage = "job_dir",
            ms = ms(job_dir_started.elapsed()),
            ready = job_dir.was_ready(),
            "job dir taken"
        );

        // 5. The build.
        tracing::info!(stage = "build", argv = ?job.command, "build starting");
        let build_started = Instant::now();
        let spec = SandboxSpec {
            lower_dirs: vec![source_root.clone(), base.rootfs().to_path_buf()],
            upper: job_dir.upper(),
            work: job_dir.work(),
            identity,
            argv: job.command.clone(),
            env: build_env(job),
            cwd: PathBuf::from(job.workdir.as_str()),
            limits: SandboxLimits {
                memory_bytes: Some(job.limits.memory_bytes.bytes()),
                pids: Some(job.limits.pids),
                cpu_quota: Some(self.settings.cpus_per_build),
                wall: Duration::from_secs(job.limits.wall_seconds),
                cpu_seconds: Some(job.limits.cpu_seconds),
                open_files: job.limits.open_files,
                tmp_bytes: (job.limits.disk_bytes.bytes() / 4).max(16 << 20),
                file_size_bytes: Some(job.limits.disk_bytes.bytes()),
            },
            network: match job.network {
                NetworkPolicy::None => Network::None,
                NetworkPolicy::Loopback => Network::Loopback,
            },
            read_only_binds: Vec::new(),
            hostname: "corral".to_string(),
            scratch: None,
        };
        let log_path = work.path.join("build.log");
        let build = self.build(spec, job, ctx, &log_path).await?;
        // The sandbox reported every job process dead and the overlay gone.
        job_dir.mark_quiescent();
        timings.build_ms = ms(build_started.elapsed());
        tracing::info!(stage = "build", ms = timings.build_ms, "build ended");
        self.metrics
            .build_seconds
            .observe(build_started.elapsed().as_secs_f64());

        // 6. The log is stored whatever the outcome.
        let log = self.store_log(&log_path, build.log_truncated).await?;

        let mut result = JobResult::new(
            job.job_id.clone(),
            Some(job.project.clone()),
            Status::Succeeded,
            ctx.worker.clone(),
        );
        result.usage = Some(usage(&build.outcome, &job_dir.upper()));
        result.log = Some(log);
        match build.outcome.exit {
            Exit::Code(code) => result.exit_code = Some(code),
            Exit::Signal(sig) => result.signal = Some(sig),
        }
        let (status, reason, message) = classify(&build, job, ctx.cancel.is_cancelled());
        result.status = status;
        result.reason = reason;
        result.message = message;
        if status != Status::Succeeded {
            return Ok(result);
        }

        // 7. Snapshot: the sandbox guarantees every job process is dead and the overlay gone.
        let snapshot_started = Instant::now();
        let id_map = IdMap::identity()
            .uid(identity.host_uid, JOB_UID)
            .gid(identity.host_gid, JOB_GID);
        let source_layer = self
            .snapshot(
                &source_root,
                Mode::Plain,
                id_map.clone(),
                job.epoch(),
                "the source layer",
                &work.path,
            )
            .await;
        let source_layer = match source_layer {
            Ok(layer) => layer,
            Err(err) => return Err(err),
        };
        let build_layer = self
            .snapshot(
                &job_dir.upper(),
                Mode::Upper,
                id_map,
                job.epoch(),
                "the build's upper dir",
                &work.path,
            )
            .await;
        let build_layer = match build_layer {
            Ok(layer) => layer,
            Err(PipelineError::Snapshot { source, .. }) if source.is_tree_fault() => {
                // The tree the build wrote is unacceptable (too large, a redirect xattr…):
                // the job's fault, final.
                result.status = Status::Failed;
                result.reason = Some(Reason::OutputLimit);
                result.message = Some(format!("the build's output cannot be stored: {source}"));
                return Ok(result);
            }
            Err(err) => return Err(err),
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

        // 8. Store the image [base, source, build] and tag it with the job id.
        let upload_started = Instant::now();
        self.ensure_blob(&base_layer, &base_blob, "the base layer")
            .await?;
        let layers = vec![base_layer, source_layer, build_layer];
        let settings = crate::image::ImageSettings {
            created_epoch: job.epoch(),
            env: build_env(job)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            cmd: Vec::new(),
            working_dir: job.workdir.to_string(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::from([(
                "org.opencontainers.image.base.name".to_string(),
                job.base.to_string(),
            )]),
        };
        let image = crate::image::build(&layers, &settings);
        let (manifest_digest, reference) =
            crate::image::publish(&self.store, job.job_id.as_str(), &layers, &image)
                .await
                .map_err(|source| PipelineError::Store {
                    what: "the image",
                    source,
                })?;
        timings.upload_ms = ms(upload_started.elapsed());
        tracing::info!(stage = "upload", ms = timings.upload_ms, "image stored");
        self.metrics
            .upload_seconds
            .observe(upload_started.elapsed().as_secs_f64());
        result.artifact = Some(Artifact {
            manifest_digest,
            reference,
            layers,
        });
        result.timings = timings.clone();
        result.finished_at_ms = now_ms();
        if let Err(err) = self.cache.put(&key, &result) {
            tracing::warn!(error = %err, "could not record the action cache entry");
        }
        Ok(result)
    }

    async fn cache_hit(
        &self,
        job: &Job,
        ctx: &RunContext,
        key: &ActionKey,
    ) -> Result<Option<JobResult>, PipelineError> {
        let Some(mut hit) = self.cache.get(key) else {
            return Ok(None);
        };
        let artifact = hit.artifact.as_ref().expect("cache entries have artifacts");
        // The entry is only as good as the store behind it.
        let manifest = match self
            .store
            .get_manifest(artifact.manifest_digest.as_str())
            .await
        {
            Ok(manifest) => manifest,
            Err(err) if err.is_not_found() => return Ok(None),
            Err(source) => {
                return Err(PipelineError::Store {
                    what: "a cached manifest",
                    source,
                });
            }
        };
        // A different job with the same inputs gets the same image under its own tag.
        let tag = job.job_id.as_str();
        self.store
            .put_manifest(tag, &manifest.bytes, &manifest.media_type)
            .await
            .map_err(|source| PipelineError::Store {
                what: "the cached image's tag",
                source,
            })?;
        let reference = self.store.reference(tag);
        hit.job_id = job.job_id.clone();
        hit.project = Some(job.project.clone());
        hit.worker = ctx.worker.clone();
        hit.cached = true;
        if let Some(artifact) = hit.artifact.as_mut() {
            artifact.reference = reference;
        }
        self.metrics.cache_hits.inc();
        Ok(Some(hit))
    }

    /// Runs the sandbox on a blocking thread, streaming its output to the log file and to
    /// `ctx.logs`, and stopping it on cancel or when the log limit is passed.
    async fn build(
        &self,
        spec: SandboxSpec,
        job: &Job,
        ctx: &RunContext,
        log_path: &Path,
    ) -> Result<Build, PipelineError> {
        let config = self.settings.sandbox.clone();
        let mut running = blocking(move || Sandbox::spawn(&spec, &config))
            .await?
            .map_err(PipelineError::Sandbox)?;
        let cancel = running.cancel_handle();
        let grace = self.settings.kill_grace;
        let log_file = std::fs::File::create(log_path).map_err(|source| PipelineError::Log {
            path: log_path.to_path_buf(),
            source,
        })?;
        let log = Arc::new(LogWriter {
            file: std::sync::Mutex::new(log_file),
            written: AtomicU64::new(0),
            limit: job.limits.log_bytes.bytes(),
            truncated: AtomicBool::new(false),
        });
        let mut readers = Vec::new();
        for (stream, pipe) in [
            (
                Stream::Stdout,
                running
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
            (
                Stream::Stderr,
                running
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
        ] {
            let Some(mut pipe) = pipe else { continue };
            let (log, sink, cancel) = (log.clone(), ctx.logs.clone(), cancel.clone());
            readers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    if !log.append(chunk) {
                        // Past the log limit: stop the build, keep draining the pipe so the
                        // job never blocks on a full pipe while it dies.
                        cancel.cancel(grace);
                        continue;
                    }
                    let _ = sink.blocking_send((stream, Bytes::copy_from_slice(chunk)));
                }
            }));
        }
        let watcher = {
            let (token, cancel) = (ctx.cancel.clone(), cancel.clone());
            tokio::spawn(async move {
                token.cancelled().await;
                cancel.cancel(grace);
            })
        };
        let outcome = blocking(move || running.wait()).await;
        watcher.abort();
        let readers_done = blocking(move || {
            for reader in readers {
                let _ = reader.join();
            }
        })
        .await;
        let outcome = outcome?.map_err(PipelineError::Sandbox)?;
        readers_done?;
        let log_truncated = log.truncated.load(Ordering::SeqCst);
        Ok(Build {
            outcome,
            log_truncated,
        })
    }

    async fn store_log(&self, path: &Path, truncated: bool) -> Result<LogRef, PipelineError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| PipelineError::Log {
                path: path.to_path_buf(),
                source,
            })?;
        let size = bytes.len() as u64;
        let (digest, _) =
            self.store
                .put_blob_bytes(&bytes)
                .await
                .map_err(|source| PipelineError::Store {
                    what: "the build log",
                    source,
                })?;
        Ok(LogRef {
            digest,
            size,
            truncated,
        })
    }

    /// Snapshots `dir` into a layer spooled next to the store, then puts it in the store.
    async fn snapshot(
        &self,
        dir: &Path,
        mode: Mode,
        id_map: IdMap,
        epoch: u64,
        what: &'static str,
        scratch: &Path,
    ) -> Result<Layer, PipelineError> {
        let spool_dir = self
            .store
            .spool_dir()
            .unwrap_or_else(|| scratch.to_path_buf());
        let spool = tempfile::Builder::new()
            .prefix(".layer-")
            .tempfile_in(&spool_dir)
            .map_err(|source| PipelineError::Log {
                path: spool_dir.clone(),
                source,
            })?;
        let options = LayerOptions {
            epoch,
            compression: self.settings.compression,
            threads: self.settings.compression_threads,
            mode,
            id_map,
            max_output_bytes: Some(self.settings.max_output_bytes),
            ..LayerOptions::default()
        };
        let dir = dir.to_path_buf();
        let file = spool.reopen().map_err(|source| PipelineError::Log {
            path: spool.path().to_path_buf(),
            source,
        })?;
        let summary = blocking(move || write_layer(&dir, &options, std::io::BufWriter::new(file)))
            .await?
            .map_err(|source| PipelineError::Snapshot { what, source })?;
        let layer = Layer {
            digest: summary.digest,
            diff_id: summary.diff_id,
            size: summary.size,
            media_type: summary.media_type.to_string(),
        };
        // The store adopts the spooled file by renaming it (the temp file's clean-up then
        // finds nothing), or copies it and the temp file is removed when dropped.
        let outcome = self
            .store
            .put_blob_file(spool.path(), &layer.digest, layer.size)
            .await;
        drop(spool);
        match outcome.map_err(|source| PipelineError::Store { what, source })? {
            PutOutcome::AlreadyPresent => {
                self.metrics.deduplicated_bytes.inc_by(layer.size);
            }
            _ => {
                self.metrics.uploaded_bytes.inc_by(layer.size);
            }
        }
        Ok(layer)
    }

    /// Puts a blob that lives outside the store (the base layer) without giving it up.
    async fn ensure_blob(
        &self,
        layer: &Layer,
        path: &Path,
        what: &'static str,
    ) -> Result<(), PipelineError> {
        let present = self
            .store
            .has_blob(&layer.digest)
            .await
            .map_err(|source| PipelineError::Store { what, source })?;
        if present {
            return Ok(());
        }
        // `put_blob_file` adopts the file it is given (a rename): hand it a hard link (or a
        // copy when the store is elsewhere) so the base keeps its blob.
        let spool_dir = self
            .store
            .spool_dir()
            .unwrap_or_else(|| self.settings.data_dir.join("tmp"));
        // Unique per call: two jobs may ensure the same base at once.
        static LINKS: AtomicU64 = AtomicU64::new(0);
        let link = spool_dir.join(format!(
            ".base-{}-{}-{}",
            layer.digest.hex(),
            std::process::id(),
            LINKS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&link);
        let log_err = |source| PipelineError::Log {
            path: link.clone(),
            source,
        };
        match std::fs::hard_link(path, &link) {
            Ok(()) => {}
            // Another filesystem: copy into a file that must not exist yet. Copying onto an
            // existing name could truncate the base's own blob through a hard link.
            Err(err) if err.kind() == std::io::ErrorKind::CrossesDevices => {
                let mut from = std::fs::File::open(path).map_err(log_err)?;
                let mut to = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&link)
                    .map_err(log_err)?;
                std::io::copy(&mut from, &mut to).map_err(log_err)?;
            }
            Err(err) => return Err(log_err(err)),
        }
        let outcome = self
            .store
            .put_blob_file(&link, &layer.digest, layer.size)
            .await;
        let _ = std::fs::remove_file(&link);
        outcome.map_err(|source| PipelineError::Store { what, source })?;
        self.metrics.uploaded_bytes.inc_by(layer.size);
        Ok(())
    }
}

struct Build {
    outcome: Outcome,
    log_truncated: bool,
}

/// The build log, capped at the job's `log_bytes`.
struct LogWriter {
    file: std::sync::Mutex<std::fs::File>,
    written: AtomicU64,
    limit: u64,
    truncated: AtomicBool,
}

impl LogWriter {
    /// Appends what fits; returns false once the limit is passed.
    fn append(&self, chunk: &[u8]) -> bool {
        let before = self.written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        let room = self.limit.saturating_sub(before);
        let take = usize::try_from(room.min(chunk.len() as u64)).unwrap_or(chunk.len());
        if take > 0 {
            let mut file = self
                .file
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = file.write_all(&chunk[..take]);
        }
        if take < chunk.len() {
            self.truncated.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// The job's scratch space on the data disk (source, bundle, log, spooled layers).
struct WorkDirs {
    path: PathBuf,
}

impl WorkDirs {
    fn create(data_dir: &Path, job: &Job) -> Result<Self, PipelineError> {
        let path = data_dir.join("tmp").join(format!("job-{}", job.job_id));
        // A leftover from a crashed run of the same job is stale by definition.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|source| PipelineError::Log {
            path: path.clone(),
            source,
        })?;
        Ok(WorkDirs { path })
    }
}

impl Drop for WorkDirs {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %err, "could not remove job scratch");
        }
    }
}

/// The build's environment: a minimal base, then the job's own variables.
fn build_env(job: &Job) -> Vec<(String, String)> {
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

fn usage(outcome: &Outcome, upper: &Path) -> Usage {
    let u = &outcome.usage;
    Usage {
        cpu_user_ms: ms(u.cpu_user),
        cpu_system_ms: ms(u.cpu_system),
        memory_peak_bytes: u.memory_peak,
        pids_peak: u.pids_peak,
        io_read_bytes: u.io_read,
        io_write_bytes: u.io_write,
        upper_bytes: dir_bytes(upper),
        wall_ms: ms(u.wall),
        denied_syscalls: outcome.denied_syscalls.clone(),
        network_attempts: outcome.network_attempts,
    }
}

/// Bytes of regular files under `dir`, without following links (best effort).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

/// Status, reason and a human sentence for how a build ended.
fn classify(build: &Build, job: &Job, cancelled: bool) -> (Status, Option<Reason>, Option<String>) {
    let outcome = &build.outcome;
    let limits = &job.limits;
    let says = |status, reason, text: String| (status, Some(reason), Some(text));
    match outcome.reason {
        DeathReason::Oom => says(
            Status::Killed,
            Reason::Oom,
            format!(
                "the build ran out of memory (limit {})",
                limits.memory_bytes
            ),
        ),
        DeathReason::PidsLimit => says(
            Status::Killed,
            Reason::PidsLimit,
            format!(
                "the build hit its process limit ({} processes and threads)",
                limits.pids
            ),
        ),
        DeathReason::DiskLimit => says(
            Status::Killed,
            Reason::DiskLimit,
            format!("the build filled its disk (limit {})", limits.disk_bytes),
        ),
        DeathReason::WallTimeout => says(
            Status::TimedOut,
            Reason::WallTimeout,
            format!(
                "the build ran past its wall-clock limit of {} s",
                limits.wall_seconds
            ),
        ),
        DeathReason::CpuLimit => says(
            Status::TimedOut,
            Reason::CpuLimit,
            format!(
                "the build used more than its {} CPU seconds",
                limits.cpu_seconds
            ),
        ),
        DeathReason::Seccomp => says(
            Status::Killed,
            Reason::Seccomp,
            "the build used a forbidden system call ABI".into(),
        ),
        DeathReason::Cancelled if build.log_truncated && !cancelled => says(
            Status::Killed,
            Reason::LogLimit,
            format!(
                "the build wrote more than its log limit of {}",
                limits.log_bytes
            ),
        ),
        DeathReason::Cancelled => says(
            Status::Cancelled,
            Reason::Cancelled,
            "the build was cancelled".into(),
        ),
        DeathReason::Completed => match outcome.exit {
            Exit::Code(0) => (Status::Succeeded, None, None),
            Exit::Code(code) => says(
                Status::Failed,
                Reason::NonzeroExit,
                format!("the build exited with code {code}"),
            ),
            Exit::Signal(sig) => says(
                Status::Failed,
                Reason::Signal,
                format!("the build was killed by signal {sig}"),
            ),
        },
    }
}

/// The cgroup under which builds get their own cgroups. `Delegated` (systemd's
/// `Delegate=yes`) is the worker's own cgroup: on cgroup v2 the worker first moves itself
/// into a `worker` leaf there, since v2 lets a cgroup hold either processes or children.
pub fn cgroup_parent(parent: &crate::config::CgroupParent) -> std::io::Result<String> {
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
                    let path = path.trim_end_matches("/worker");
                    let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
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

impl Settings {
    /// The pipeline's settings from the worker's config.
    pub fn from_config(config: &crate::config::Config) -> std::io::Result<Self> {
        use crate::config::{Compression as Codec, SandboxHelper};
        let sandbox = &config.sandbox;
        let mut sandbox_config = SandboxConfig::new()?;
        if let SandboxHelper::Path(path) = &sandbox.helper {
            sandbox_config.helper_exe.clone_from(path);
        }
        sandbox_config.cgroup_parent = cgroup_parent(&sandbox.cgroup_parent)?;
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
            sandbox: sandbox_config,
            cpus_per_build: sandbox.cpus_per_build,
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
            job_dir_pool: usize::from(config.concurrency),
        })
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

/// The real [`crate::amqp::JobRunner`]: every job goes through the sandboxed pipeline.
pub struct PipelineRunner {
    pipeline: Arc<Pipeline>,
}

impl PipelineRunner {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        PipelineRunner { pipeline }
    }
}

impl crate::amqp::JobRunner for PipelineRunner {
    async fn run(&self, job: Job, ctx: RunContext) -> crate::amqp::RunOutcome {
        use crate::amqp::RunOutcome;
        let (job_id, project, worker) =
            (job.job_id.clone(), job.project.clone(), ctx.worker.clone());
        let cancel = ctx.cancel.clone();
        match self.pipeline.run(job, ctx).await {
            Ok(result) => RunOutcome::Final(Box::new(result)),
            Err(_) if cancel.is_cancelled() => RunOutcome::Interrupted,
            Err(err) => {
                let chain = error_chain(&err);
                if err.is_retryable() {
                    tracing::warn!(job = %job_id, project = %project, error = %chain, "platform error; the job will be retried");
                    RunOutcome::Retry(chain)
                } else {
                    tracing::error!(job = %job_id, project = %project, error = %chain, "permanent platform error");
                    let mut result = JobResult::new(job_id, Some(project), Status::Error, worker);
                    result.reason = Some(Reason::PlatformError);
                    result.message = Some(chain);
                    result.finished_at_ms = now_ms();
                    RunOutcome::Final(Box::new(result))
                }
            }
        }
    }
}
