//! Publishing what a build made, once every job process is dead and the overlay is gone:
//! the source and upper dirs snapshotted into layers, the base's layer ensured in the store,
//! the image [base, source, build] stored and tagged with the job id, the build log stored,
//! and the action cache consulted before a build and filled after one.
//!
//! # Flushes to disk on a job's path
//!
//! A job's result names what it stored (the image's manifest digest, its tag, the log
//! blob) and is published, then the job acked, right after this: once the broker has the
//! result, a power loss must not take away what it names. So the directory store flushes
//! before it answers, and these are the only flushes left on a job's path:
//!
//! - the tag: `index.json` is rewritten to a temp file, fsynced, renamed, and the store's
//!   directory fsynced (2 per job): the result's `reference` is that tag;
//! - a blob the store did not have yet (a new build layer, log, config or manifest): the
//!   file fsynced before its rename, the blob directory after (2 per new blob; none for a
//!   layer, log or image that is already there, which a repeated build's all are);
//! - the first job of a project on this worker: its uid is recorded in the identity map
//!   (1, `fdatasync`, in the sandbox crate): a project keeps its uid, and no uid is given
//!   to a second project, across a crash.
//!
//! The action cache entry is not flushed (see [`crate::cache::ActionCache::put`]): it is
//! an optimisation whose torn or lost entry is a miss, never a wrong answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use corral_protocol::{Artifact, Job, JobResult, Layer, LogRef, WorkerInfo};
use corral_sandbox::{Identity, JOB_GID, JOB_UID};

use super::blocking;
use super::error::JobError;
use super::spec::{Settings, build_env};
use super::stage::StagedBase;
use crate::cache::{ActionCache, ActionKey};
use crate::layer::{IdMap, LayerOptions, Mode, write_layer};
use crate::metrics::Metrics;
use crate::store::{PutOutcome, Store, sha256_bytes};

/// The store a job's artifacts go to, with what writing them needs.
pub struct Publish<'a> {
    pub store: &'a Store,
    pub settings: &'a Settings,
    pub metrics: &'a Metrics,
}

impl Publish<'_> {
    /// The stored build log, whatever the build's outcome.
    pub async fn log(&self, path: &Path, truncated: bool) -> Result<LogRef, JobError> {
        let unread = |source| JobError::Log {
            path: path.to_path_buf(),
            source,
        };
        let unstored = |source| JobError::Store {
            what: "the build log",
            source,
        };
        let (size, digest) = match self.store.dir().cloned() {
            // Read and stored in one trip to the blocking pool.
            Some(store) => {
                let path = path.to_path_buf();
                let (size, stored) = blocking(move || {
                    let bytes = std::fs::read(&path)?;
                    let digest = sha256_bytes(&bytes);
                    let stored = store.put_blob_bytes_sync(&bytes, &digest).map(|_| digest);
                    Ok((bytes.len() as u64, stored))
                })
                .await?
                .map_err(unread)?;
                (size, stored.map_err(unstored)?)
            }
            None => {
                let bytes = tokio::fs::read(path).await.map_err(unread)?;
                let (digest, _) = self.store.put_blob_bytes(&bytes).await.map_err(unstored)?;
                (bytes.len() as u64, digest)
            }
        };
        Ok(LogRef {
            digest,
            size,
            truncated,
        })
    }

    /// The source layer (plain) and the build layer (the upper dir, overlay semantics),
    /// with in-sandbox ids. A tree the build wrote that cannot be stored is
    /// [`JobError::job_fault`].
    pub async fn layers(
        &self,
        job: &Job,
        identity: &Identity,
        source_root: &Path,
        upper: &Path,
        scratch: &Path,
    ) -> Result<(Layer, Layer), JobError> {
        let id_map = IdMap::identity()
            .uid(identity.host_uid, JOB_UID)
            .gid(identity.host_gid, JOB_GID);
        let source = self
            .snapshot(
                source_root,
                Mode::Plain,
                id_map.clone(),
                job.epoch(),
                "the source layer",
                scratch,
            )
            .await?;
        let build = self
            .snapshot(
                upper,
                Mode::Upper,
                id_map,
                job.epoch(),
                "the build's upper dir",
                scratch,
            )
            .await?;
        Ok((source, build))
    }

    /// Stores the image [base, source, build] tagged with the job id.
    pub async fn image(
        &self,
        job: &Job,
        base: &StagedBase,
        source: Layer,
        build: Layer,
    ) -> Result<Artifact, JobError> {
        let layers = vec![base.layer.clone(), source, build];
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
        let mut again = true;
        let (manifest_digest, reference) = loop {
            self.ensure_blob(&base.layer, &base.blob, "the base layer")
                .await?;
            match crate::image::publish(self.store, job.job_id.as_str(), &layers, &image).await {
                Ok(stored) => break stored,
                // The registry lost a blob it held (garbage collection) and the store has
                // forgotten what it saw there: check and upload the base again, once.
                Err(err) if err.is_blobs_missing() && again => {
                    tracing::warn!(job = %job.job_id, error = %err, "storing the image again");
                    again = false;
                }
                Err(source) => {
                    return Err(JobError::Store {
                        what: "the image",
                        source,
                    });
                }
            }
        };
        Ok(Artifact {
            manifest_digest,
            reference,
            layers,
        })
    }

    /// The cached result for `key`, re-tagged for `job`, if its image is still in the store.
    pub async fn cache_hit(
        &self,
        cache: &ActionCache,
        key: &ActionKey,
        job: &Job,
        worker: &WorkerInfo,
    ) -> Result<Option<JobResult>, JobError> {
        let Some(mut hit) = cache.get(key) else {
            return Ok(None);
        };
        let Some(artifact) = hit.artifact.as_mut() else {
            return Ok(None);
        };
        // The entry is only as good as the store behind it.
        let manifest = match self
            .store
            .get_manifest(artifact.manifest_digest.as_str())
            .await
        {
            Ok(manifest) => manifest,
            Err(err) if err.is_not_found() => return Ok(None),
            Err(source) => {
                return Err(JobError::Store {
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
            .map_err(|source| JobError::Store {
                what: "the cached image's tag",
                source,
            })?;
        artifact.reference = self.store.reference(tag);
        hit.job_id = job.job_id.clone();
        hit.project = Some(job.project.clone());
        hit.worker = worker.clone();
        hit.cached = true;
        hit.inputs = Some(key.inputs().clone());
        self.metrics.cache_hits.inc();
        Ok(Some(hit))
    }

    /// Records a succeeded result under `key` (best effort: a miss only costs a rebuild).
    pub fn cache_put(&self, cache: &ActionCache, key: &ActionKey, result: &JobResult) {
        if let Err(err) = cache.put(key, result) {
            tracing::warn!(error = %err, "could not record the action cache entry");
        }
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
    ) -> Result<Layer, JobError> {
        let spool_dir = self
            .store
            .spool_dir()
            .unwrap_or_else(|| scratch.to_path_buf());
        let spool_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JobError::Spool { what, path, source }
        };
        let spool = tempfile::Builder::new()
            .prefix(".layer-")
            .tempfile_in(&spool_dir)
            .map_err(spool_err(&spool_dir))?;
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
        let file = spool.reopen().map_err(spool_err(spool.path()))?;
        // The directory store takes the layer in the same trip to the blocking pool.
        let (here, spooled) = (self.store.dir().cloned(), spool.path().to_path_buf());
        let (summary, stored) = blocking(move || {
            let summary = write_layer(&dir, &options, std::io::BufWriter::new(file))?;
            let stored =
                here.map(|store| store.put_blob_file_sync(&spooled, &summary.digest, summary.size));
            Ok((summary, stored))
        })
        .await?
        .map_err(|source| JobError::Snapshot { what, source })?;
        let layer = Layer {
            digest: summary.digest,
            diff_id: summary.diff_id,
            size: summary.size,
            media_type: summary.media_type.to_string(),
        };
        // The store adopts the spooled file by renaming it (the temp file's clean-up then
        // finds nothing), or copies it and the temp file is removed when dropped.
        let outcome = match stored {
            Some(stored) => stored,
            None => {
                self.store
                    .put_blob_file(spool.path(), &layer.digest, layer.size)
                    .await
            }
        };
        drop(spool);
        match outcome.map_err(|source| JobError::Store { what, source })? {
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
    ) -> Result<(), JobError> {
        let present = self
            .store
            .has_blob(&layer.digest)
            .await
            .map_err(|source| JobError::Store { what, source })?;
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
        let spool_err = |source| JobError::Spool {
            what,
            path: link.clone(),
            source,
        };
        match std::fs::hard_link(path, &link) {
            Ok(()) => {}
            // Another filesystem: copy into a file that must not exist yet. Copying onto an
            // existing name could truncate the base's own blob through a hard link.
            Err(err) if err.kind() == std::io::ErrorKind::CrossesDevices => {
                let mut from = std::fs::File::open(path).map_err(spool_err)?;
                let mut to = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&link)
                    .map_err(spool_err)?;
                std::io::copy(&mut from, &mut to).map_err(spool_err)?;
            }
            Err(err) => return Err(spool_err(err)),
        }
        let outcome = self
            .store
            .put_blob_file(&link, &layer.digest, layer.size)
            .await;
        let _ = std::fs::remove_file(&link);
        outcome.map_err(|source| JobError::Store { what, source })?;
        self.metrics.uploaded_bytes.inc_by(layer.size);
        Ok(())
    }
}
