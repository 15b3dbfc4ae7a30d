//! The action cache: the key of a build is the sha256 of its canonical inputs; the value is
//! the result of its first successful run. A redelivered or repeated job with the same inputs
//! is answered from here instead of being rebuilt — cheap, and identical by construction.
//!
//! Only `succeeded` results are cached: a failure may depend on limits, load or luck, and a
//! rerun costs only the customer's own time.

use std::io::Write;
use std::path::{Path, PathBuf};

use corral_protocol::{BuildInputs, Digest, Job, JobResult, Status};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Bumped whenever the bytes a build produces for the same inputs could change (tar layout,
/// compression, id mapping, permission policy): old cache entries then simply stop matching.
/// 2: a gzip layer is one libdeflate member per 1 MiB block (1: zlib-rs deflate blocks
/// chained by 32 KiB dictionaries, one member).
pub const LAYER_FORMAT_VERSION: u32 = 2;

/// Names the key scheme: bumped when the set of hashed fields changes.
const KEY_KIND: &str = "corral.action.v2";

/// sha256 of a build's canonical inputs, with the inputs themselves (they go into the
/// result, so that an operator can tell why two digests differ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionKey(BuildInputs);

/// What goes into the key, serialized as canonical JSON (fields in this order, no
/// whitespace): every field of [`BuildInputs`] but the key, after a `kind`.
#[derive(Serialize)]
struct Canonical<'a> {
    kind: &'static str,
    layer_format_version: u32,
    base_digest: &'a Digest,
    source_digest: &'a Digest,
    command: &'a [String],
    env_digest: &'a Digest,
    workdir: &'a str,
    source_date_epoch: u64,
    network: corral_protocol::NetworkPolicy,
    layer_encoding: &'a str,
    umask: &'a str,
}

impl ActionKey {
    /// `base_digest` is the base layer's digest (not its name: renaming a base or rebuilding
    /// it with other content must not hit); `layer_encoding` names the layer compression and
    /// its level ([`crate::layer::Compression::label`]), which both change the bytes.
    pub fn new(job: &Job, base_digest: &Digest, layer_encoding: &str) -> Self {
        let env = serde_json::to_vec(&job.env).expect("a string map serializes");
        let env_digest = Digest::from_sha256(Sha256::digest(&env).into());
        let umask = format!("{:04o}", corral_sandbox::JOB_UMASK);
        let canonical = Canonical {
            kind: KEY_KIND,
            layer_format_version: LAYER_FORMAT_VERSION,
            base_digest,
            source_digest: &job.source.digest,
            command: &job.command,
            env_digest: &env_digest,
            workdir: job.workdir.as_str(),
            source_date_epoch: job.epoch(),
            network: job.network.clone(),
            layer_encoding,
            umask: &umask,
        };
        let bytes = serde_json::to_vec(&canonical).expect("plain data serializes");
        ActionKey(BuildInputs {
            action_key: Digest::from_sha256(Sha256::digest(&bytes).into()),
            layer_format_version: LAYER_FORMAT_VERSION,
            base_digest: base_digest.clone(),
            source_digest: job.source.digest.clone(),
            command: job.command.clone(),
            env_digest,
            workdir: job.workdir.as_str().to_string(),
            source_date_epoch: job.epoch(),
            network: job.network.clone(),
            layer_encoding: layer_encoding.to_string(),
            umask,
        })
    }

    pub fn digest(&self) -> &Digest {
        &self.0.action_key
    }

    /// The inputs the key hashes, for the result.
    pub fn inputs(&self) -> &BuildInputs {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("creating the action cache directory {path}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing action cache entry {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Action cache entries as files: `<dir>/<hex of the key>.json`.
#[derive(Debug, Clone)]
pub struct ActionCache {
    dir: PathBuf,
}

impl ActionCache {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CacheError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| CacheError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        Ok(ActionCache { dir })
    }

    fn path(&self, key: &ActionKey) -> PathBuf {
        self.dir.join(format!("{}.json", key.digest().hex()))
    }

    /// The cached result for `key`, if any. An unreadable or corrupt entry is a miss (and is
    /// removed), never an error: the build simply runs again.
    pub fn get(&self, key: &ActionKey) -> Option<JobResult> {
        let path = self.path(key);
        let bytes = std::fs::read(&path).ok()?;
        match corral_protocol::decode::<JobResult>(&bytes) {
            Ok(result) if result.status == Status::Succeeded && result.artifact.is_some() => {
                Some(result)
            }
            _ => {
                tracing::warn!(path = %path.display(), "dropping a corrupt action cache entry");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Records a succeeded result (others are ignored). Atomic: written to a temp file and
    /// renamed; concurrent writers of the same key write the same content.
    ///
    /// Not fsynced, on purpose: this write is on every job's path, and the cache is only
    /// an optimisation. After a power loss an entry may be missing (a rebuild), empty or
    /// torn (it no longer decodes: [`ActionCache::get`] treats it as a miss and removes it),
    /// or name an image the store lost (the hit is checked against the store first). None
    /// of these can hand out a wrong result, so a flush of the disk buys nothing here.
    pub fn put(&self, key: &ActionKey, result: &JobResult) -> Result<(), CacheError> {
        if result.status != Status::Succeeded || result.artifact.is_none() {
            return Ok(());
        }
        let path = self.path(key);
        let write = |path: &Path| -> std::io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
            tmp.write_all(&serde_json::to_vec_pretty(result).map_err(std::io::Error::other)?)?;
            tmp.persist(path).map_err(|e| e.error)?;
            Ok(())
        };
        write(&path).map_err(|source| CacheError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_protocol::{Artifact, JobId, WorkerInfo};

    fn job() -> Job {
        let text = format!(
            r#"{{"schema":"corral.job.v1","job_id":"j1","project":"p","base":"b","source":{{"digest":"sha256:{}"}},"command":["make"]}}"#,
            "1".repeat(64)
        );
        corral_protocol::decode_job(text.as_bytes()).unwrap()
    }

    fn base() -> Digest {
        Digest::from_sha256([7; 32])
    }

    #[test]
    fn key_depends_on_inputs_not_on_ids_or_limits() {
        let a = job();
        let mut b = job();
        b.job_id = JobId::new("j2").unwrap();
        b.limits.wall_seconds = 60;
        assert_eq!(
            ActionKey::new(&a, &base(), "gzip"),
            ActionKey::new(&b, &base(), "gzip")
        );

        let mut c = job();
        c.env.insert("X".into(), "1".into());
        assert_ne!(
            ActionKey::new(&a, &base(), "gzip"),
            ActionKey::new(&c, &base(), "gzip")
        );
        let mut d = job();
        d.source_date_epoch = Some(5);
        assert_ne!(
            ActionKey::new(&a, &base(), "gzip"),
            ActionKey::new(&d, &base(), "gzip")
        );
        assert_ne!(
            ActionKey::new(&a, &base(), "gzip"),
            ActionKey::new(&a, &Digest::from_sha256([8; 32]), "gzip")
        );
        assert_ne!(
            ActionKey::new(&a, &base(), "gzip"),
            ActionKey::new(&a, &base(), "zstd")
        );
    }

    #[test]
    fn the_result_inputs_recompute_the_key() {
        let mut a = job();
        a.env.insert("B".into(), "2".into());
        a.env.insert("A".into(), "1".into());
        let key = ActionKey::new(&a, &base(), "gzip-6");
        let i = key.inputs();
        assert_eq!(
            i.env_digest,
            Digest::from_sha256(Sha256::digest(br#"{"A":"1","B":"2"}"#).into())
        );
        assert_eq!(i.umask, "0022");
        // What an operator would write from a result alone.
        let canonical = format!(
            r#"{{"kind":"corral.action.v2","layer_format_version":{},"base_digest":"{}","source_digest":"{}","command":["make"],"env_digest":"{}","workdir":"/app","source_date_epoch":{},"network":"none","layer_encoding":"gzip-6","umask":"0022"}}"#,
            i.layer_format_version,
            i.base_digest,
            i.source_digest,
            i.env_digest,
            i.source_date_epoch,
        );
        assert_eq!(
            key.digest(),
            &Digest::from_sha256(Sha256::digest(canonical.as_bytes()).into())
        );
        assert_ne!(
            ActionKey::new(&a, &base(), "gzip-6"),
            ActionKey::new(&a, &base(), "gzip-9")
        );
    }

    #[test]
    fn stores_only_successes_and_survives_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ActionCache::open(dir.path()).unwrap();
        let key = ActionKey::new(&job(), &base(), "gzip");
        let worker = WorkerInfo {
            id: "w".into(),
            version: "0".into(),
        };
        let mut result = JobResult::new(JobId::new("j1").unwrap(), None, Status::Failed, worker);
        cache.put(&key, &result).unwrap();
        assert!(cache.get(&key).is_none());

        result.status = Status::Succeeded;
        result.artifact = Some(Artifact {
            manifest_digest: Digest::from_sha256([1; 32]),
            reference: "oci-dir:/x:j1".into(),
            layers: vec![],
        });
        cache.put(&key, &result).unwrap();
        assert_eq!(cache.get(&key), Some(result));

        std::fs::write(cache.path(&key), b"{garbage").unwrap();
        assert!(cache.get(&key).is_none());
        assert!(!cache.path(&key).exists());
    }
}
